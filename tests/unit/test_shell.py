"""virtio-user shell on the device model: the CLI's commands at a prompt, submit/reap
step by step, the ring as both sides see it, errors that leave the device usable."""

from __future__ import annotations

import io
import signal
from typing import Any

import pytest

from test_cli import Env
from virtio_user import cli, commands
from virtio_user.shell import Shell
from virtio_user.spec import Feature
from fake_device import DEFAULT_FEATURES

SECTOR = 512


def shell(make_blk: Any, script: str = "", **options: Any) -> tuple[Shell, Any]:
    blk, device = make_blk(**options)
    device.disk[:] = bytes(i * 7 % 251 for i in range(len(device.disk)))
    args = cli.build_parser().parse_args(["shell"])
    return Shell(blk, args, stdin=io.StringIO(script)), device


def hexdump(data: bytes) -> str:
    out = io.StringIO()
    dump = commands.HexDump(out)
    dump.feed(data)
    dump.end()
    return out.getvalue()


def test_a_script_runs_the_cli_commands_on_one_open_device(
        capsysbinary: Any, monkeypatch: Any) -> None:
    env = Env()
    monkeypatch.setattr("sys.stdin", io.StringIO("read 2 1\nwrite 9 --pattern 0x33 --count 2\n"
                                                 "id\n"))
    assert env.run("shell") == 0
    out = capsysbinary.readouterr().out
    assert out == bytes(env.device.disk[2 * SECTOR:3 * SECTOR]) + b"fake-serial\n"
    assert env.device.disk[9 * SECTOR:11 * SECTOR] == b"\x33" * 2 * SECTOR
    assert env.opened == 1
    assert env.device.status == 0  # reset when the shell ended


def test_submit_ring_reap_step_by_step(make_blk: Any, capsys: Any) -> None:
    sh, device = shell(make_blk)
    device.auto = False  # the device takes requests only when the test says so
    sh.onecmd("submit read 8 2")
    out = capsys.readouterr().out
    assert out == "submitted IN sectors 8..9: head 0, avail.idx 1, 1 in flight\n"

    sh.onecmd("ring")
    ring = capsys.readouterr().out.splitlines()
    assert "avail (driver writes): flags 0x1 idx 1 used_event 65535" in ring
    assert "used  (device writes): flags 0x0 idx 0 avail_event 0" in ring
    assert ("driver: published 1, reaped up to 0 (0 completed and not reaped), "
            "1 in flight, 255 free, 1 kicks") in ring
    assert "free list (next first): 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 ... (255 in all)" \
        in ring
    assert "avail.ring[0..0]: 0" in ring
    assert "used.ring: empty" in ring
    chain = ring[ring.index("  head 0: IN sectors 8..9") + 1:]
    assert [line.split("flags")[1].split()[0] for line in chain] == [
        "INDIRECT", "NEXT", "NEXT|WRITE", "WRITE"]  # header, data, status in the table
    assert chain[2].split("len")[1].split()[0] == str(2 * SECTOR)

    device.process()
    sh.onecmd("ring")
    ring = capsys.readouterr().out.splitlines()
    assert "used  (device writes): flags 0x0 idx 1 avail_event 1" in ring
    assert any("(1 completed and not reaped)" in line for line in ring)
    assert f"used.ring[0..0] (id/len): 0/{2 * SECTOR + 1}" in ring

    sh.onecmd("reap")
    out = capsys.readouterr().out
    assert out == (f"reaped IN sectors 8..9: VIRTIO_BLK_S_OK, head 0, used len "
                   f"{2 * SECTOR + 1}\n" + hexdump(bytes(device.disk[8 * SECTOR:10 * SECTOR])))
    sh.onecmd("reap")
    assert capsys.readouterr().out == "nothing to reap: no request in flight\n"
    assert sh.status == 0


def test_submitted_writes_and_flush_complete_in_order_of_reaping(make_blk: Any,
                                                                capsys: Any) -> None:
    sh, device = shell(make_blk)
    device.auto = False
    sh.onecmd("submit write 100 3 --pattern 0xab")
    sh.onecmd("submit flush")
    sh.onecmd("ring")
    assert "requests in flight: 2" in capsys.readouterr().out
    assert device.disk[100 * SECTOR:103 * SECTOR] != b"\xab" * 3 * SECTOR
    device.process()
    sh.onecmd("reap")
    out = capsys.readouterr().out.splitlines()
    assert out == ["reaped OUT sectors 100..102: VIRTIO_BLK_S_OK, head 0, used len 1",
                   "reaped FLUSH: VIRTIO_BLK_S_OK, head 1, used len 1"]
    assert device.disk[100 * SECTOR:103 * SECTOR] == b"\xab" * 3 * SECTOR


def test_reaped_buffers_are_reused(make_blk: Any, capsys: Any) -> None:
    sh, device = shell(make_blk)
    for _ in range(50):
        sh.onecmd("submit read 0 8")
        sh.onecmd("reap")
    assert len(sh.spare[8 * SECTOR]) == 1
    assert sh.status == 0


@pytest.mark.parametrize("line,code,message", [
    ("read -1 2", 1, "virtio-user: sector -1 is negative"),
    ("read 16380 8", 22, "virtio-user: sectors 16380..16387 exceed capacity 16384"),
    ("submit read 16380 8", 22, "virtio-user: sectors 16380..16387 exceed capacity 16384"),
    ("submit write 0 1 --pattern 300", 1, "virtio-user: pattern byte 300 is not in 0..255"),
    ("submit write 0 1", 1, "virtio-user: submit write: the following arguments are "
                            "required: --pattern"),
    ("submit read 0 4096", 1, "virtio-user: submit: count 4096 exceeds 2048 sectors"),
    ("submit read 0 0x", 1, "virtio-user: count '0x' is not a number"),
    ("frobnicate", 1, "virtio-user: unknown command 'frobnicate' (help lists them)"),
    ("shell", 1, "virtio-user: shell: already in the shell"),
    ("nbd", 1, "virtio-user: nbd: not at the prompt"),
    ("read 'unclosed", 1, "virtio-user: No closing quotation"),
    ("reap now", 1, "virtio-user: reap: takes no arguments"),
])
def test_errors_print_the_cli_message_and_leave_the_device_alone(
        capsys: Any, monkeypatch: Any, line: str, code: int, message: str) -> None:
    env = Env()
    before = bytes(env.device.disk)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{line}\nid\n"))
    assert env.run("shell") == code
    out, err = capsys.readouterr()
    assert err.startswith(message), err
    assert out.endswith("fake-serial\n")  # the next command still ran
    assert bytes(env.device.disk) == before
    assert env.device.requests == [(8, 0, 20)]  # only GET_ID reached the device


def test_the_exit_status_is_the_last_failure(make_blk: Any, capsys: Any) -> None:
    sh, _ = shell(make_blk, "read -1 1\nread 0 99999\nid\n")
    assert sh.run() == 22
    sh, _ = shell(make_blk, "id\n# a comment\n\nflush\n")
    assert sh.run() == 0
    assert capsys.readouterr().out == "fake-serial\n" * 2


def test_quit_and_end_of_input_stop_reading(make_blk: Any, capsys: Any) -> None:
    sh, device = shell(make_blk, "id\nquit\nwrite 0 --pattern 1 --count 1\n")
    assert sh.run() == 0
    assert device.disk[:SECTOR] != b"\x01" * SECTOR
    assert capsys.readouterr().out == "fake-serial\n"


def test_read_only_device_refuses_submitted_writes(make_blk: Any, capsys: Any) -> None:
    sh, device = shell(make_blk, "submit write 0 1 --pattern 1\n",
                       features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_RO)
    assert sh.run() == 7
    assert "read-only" in capsys.readouterr().err
    assert device.requests == []


def test_a_device_fault_resets_it_and_later_commands_say_so(make_blk: Any,
                                                            capsys: Any) -> None:
    sh, device = shell(make_blk, "submit read 0 1\nreap\nread 0 1\n")
    device.misbehave = "bad_id"
    resets = device.resets
    assert sh.run() == 15
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("virtio-user: used id") and "has been reset" in err[0]
    assert err[1].startswith("virtio-user: the queue is unusable")
    assert device.resets == resets + 1


def test_sigint_during_a_command_cancels_it_sigterm_ends_the_shell(make_blk: Any,
                                                                  capsys: Any,
                                                                  monkeypatch: Any) -> None:
    from virtio_user.errors import Interrupted
    sh, _ = shell(make_blk)

    def interrupted(signum: int) -> Any:
        def run(rest: list[str]) -> int:
            raise Interrupted(signum)
        return run
    sh.builtin["ring"] = interrupted(signal.SIGINT)
    sh.onecmd("ring")
    assert sh.status == 130
    sh.builtin["ring"] = interrupted(signal.SIGTERM)
    with pytest.raises(Interrupted):
        sh.onecmd("ring")


def test_help_lists_every_command_and_shows_options(make_blk: Any, capsys: Any) -> None:
    sh, _ = shell(make_blk, "help\nhelp read\nhelp ring\n")
    assert sh.run() == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.split("usage:")[0].splitlines()]
    assert names == sorted({*cli.COMMANDS, "submit", "reap", "ring", "help", "quit"}
                           - {"shell", "nbd"})
    assert "usage: virtio-user read [--help] [-o FILE] SECTOR COUNT" in out
    assert "ring: show the queue" in out


def test_completion_of_commands_and_options(make_blk: Any) -> None:
    sh, _ = shell(make_blk)
    assert sh.completenames("wr") == ["write", "write-zeroes"]
    assert sh.completenames("re") == ["read", "reap"]
    assert sh.completedefault("--p", "write 0 --p", 8, 11) == ["--pattern"]
    assert sh.completedefault("--j", "info --j", 5, 8) == ["--json"]
    assert sh.completedefault("f", "submit f", 7, 8) == ["flush"]
    assert sh.completedefault("ri", "help ri", 5, 7) == ["ring"]


def test_ring_on_a_packed_queue(monkeypatch: Any, capsys: Any) -> None:
    import virtio_user.blk as blk_module
    from packed_device import PackedBlkTransport
    from fake_device import FakeBackend, FakeBlkDevice

    made: list[PackedBlkTransport] = []

    def transport(backend: Any, choice: str = "auto") -> PackedBlkTransport:
        made.append(PackedBlkTransport(backend))
        return made[0]
    monkeypatch.setattr(blk_module, "open_transport", transport)
    dev = blk_module.VirtioBlk(FakeBackend(FakeBlkDevice()), timeout=0.2,
                               ring="packed")
    try:
        sh = Shell(dev, cli.build_parser().parse_args(["shell"]), stdin=io.StringIO())
        sh.onecmd("submit read 8 2")
        sh.onecmd("submit flush")
        capsys.readouterr()
        sh.onecmd("ring")
        ring = capsys.readouterr().out.splitlines()
        assert ring[0].startswith("packed ring: 256 descriptors at bus ")
        assert ring[3].startswith("driver: next avail slot 2 (wrap 1), next used slot 0 "
                                  "(wrap 1), 2 in flight, 254 free")
        assert "slots in flight: 2" in ring
        # The model completes at the notify: each slot now holds the device's used
        # descriptor (AVAIL and USED both equal to its wrap counter 1) for buffer id 0, 1.
        slots = ring[ring.index("slots in flight: 2") + 1:][:2]
        assert [line.split(" id ")[1].split() for line in slots] == [
            ["0", "flags", "AVAIL|USED"], ["1", "flags", "AVAIL|USED"]]
        assert ring[-3:] == ["requests in flight: 2", "  buffer id 0: IN sectors 8..9",
                             "  buffer id 1: FLUSH"]
    finally:
        dev.close()


def test_at_a_terminal_prompt_completion_history_and_ctrl_d() -> None:
    """The shell on a pseudo-terminal, as a person at a keyboard uses it."""
    import os
    import pty
    import select
    import sys
    import time
    from pathlib import Path

    child = ("import sys; sys.path.insert(0, sys.argv[1]); from test_cli import Env; "
             "sys.exit(Env().run('shell'))")
    pid, fd = pty.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.execv(sys.executable, [sys.executable, "-c", child, str(Path(__file__).parent)])
        finally:
            os._exit(127)
    prompt = b"virtio-user 0000:00:10.0> "

    def until(expected: bytes, timeout: float = 60.0) -> bytes:
        got, deadline = b"", time.monotonic() + timeout
        while not got.endswith(expected) and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    got += os.read(fd, 4096)
                except OSError:
                    break
        assert got.endswith(expected), got
        return got

    status = None
    try:
        until(prompt)
        os.write(fd, b"id\r")
        assert until(prompt) == b"id\r\nfake-serial\r\n" + prompt
        os.write(fd, b"write-z\t")  # Tab completes the command
        until(b"write-zeroes")
        os.write(fd, b"\x15\x1b[A\r")  # clear the line, up arrow: the last command again
        assert until(prompt).endswith(b"id\r\nfake-serial\r\n" + prompt)
        os.write(fd, b"read -1 1\r")
        assert b"virtio-user: sector -1 is negative" in until(prompt)
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1  # the last failing command's status


def test_a_failed_submit_gives_its_buffer_back(make_blk: Any, capsys: Any,
                                              monkeypatch: Any) -> None:
    """submit takes a DMA buffer before dev.submit; when that raises (QueueFull), the
    buffer must come back, or each failed submit leaks one."""
    sh, device = shell(make_blk, queue_size=4)
    device.auto = False
    for _ in range(4):
        sh.onecmd("submit read 0 1")
    allocs = []
    real = sh.dev.alloc_buffer
    monkeypatch.setattr(sh.dev, "alloc_buffer", lambda n: allocs.append(n) or real(n))
    for _ in range(10):
        sh.onecmd("submit read 0 1")
    assert sh.status == 99 and "descriptors" in capsys.readouterr().err
    assert len(allocs) == 1, f"{len(allocs)} buffers taken for 10 failed submits"
    assert len(sh.spare[SECTOR]) == 1


def test_ctrl_c_that_resets_the_device_ends_the_shell(make_blk: Any, capsys: Any) -> None:
    """Ctrl-C while a read waits: the driver resets the device to take its buffers back
    and the queue is unusable. The shell says so and ends, instead of failing every later
    command with exit 15."""
    sh, device = shell(make_blk, "read 0 8\nid\nread 0 1\n")
    device.auto = False

    def ctrl_c(timeout: float) -> None:
        raise KeyboardInterrupt
    sh.dev.queue._await_used = ctrl_c  # type: ignore[method-assign]
    resets = device.resets
    assert sh.run() == 130
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].endswith("the shell ends, start it again to go on"), err
    assert "unusable" not in err and out == "", "no later command ran"
    assert device.resets == resets + 1
