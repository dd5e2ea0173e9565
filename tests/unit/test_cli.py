"""The CLI against the fake device: exit codes, messages, output forms, and that bad
input never reaches the device."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_user import cli, pci
from virtio_user.blk import VirtioBlk
from virtio_user.pci import parse_bdf
from virtio_user.spec import Feature
from fake_device import DEFAULT_FEATURES, FakeBackend, FakeBlkDevice
from virtio_user.errors import InvalidArgument

SECTOR = 512
CAPACITY = 16384


class Env:
    def __init__(self, capacity: int = CAPACITY, **options: Any) -> None:
        self.device = FakeBlkDevice(capacity=capacity, **options)
        self.device.disk[:] = (b"virtio" * (len(self.device.disk) // 6 + 1))[:len(self.device.disk)]
        self.opened = 0

    def opener(self, args: Any) -> VirtioBlk:
        self.opened += 1
        return VirtioBlk(FakeBackend(self.device), timeout=args.timeout)

    def run(self, *argv: object) -> int:
        return cli.main([str(a) for a in argv], opener=self.opener)


@pytest.fixture
def env() -> Env:
    return Env()


def test_read_to_a_pipe_is_raw(env: Env, capsysbinary: Any) -> None:
    assert env.run("read", "0x2", 3) == 0
    assert capsysbinary.readouterr().out == bytes(env.device.disk[2 * SECTOR:5 * SECTOR])


def test_read_to_a_terminal_is_a_hexdump(env: Env, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    env.device.disk[:SECTOR] = bytes(SECTOR)
    env.device.disk[:5] = b"hello"
    assert env.run("read", 0, 1) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("00000000  68 65 6c 6c 6f 00 00 00  00 00 00 00 00 00 00 00  "
                      "|hello...........|")
    assert out[1:] == ["00000010  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  "
                       "|................|", "*", "00000200"]


def test_read_to_a_file_and_write_from_a_file(env: Env, tmp_path: Path) -> None:
    data = os.urandom(3 * SECTOR)
    (tmp_path / "in.bin").write_bytes(data)
    assert env.run("write", 10, "-i", tmp_path / "in.bin") == 0
    assert env.run("read", 10, 3, "-o", tmp_path / "out.bin") == 0
    assert (tmp_path / "out.bin").read_bytes() == data


def test_pattern_write(env: Env) -> None:
    assert env.run("write", 3000, "--pattern", "0x5a", "--count", 3) == 0
    assert env.device.disk[3000 * SECTOR:3003 * SECTOR] == b"\x5a" * 3 * SECTOR


def test_info_json_keys(env: Env, capsys: Any) -> None:
    import json
    assert env.run("info", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("pci_address", "capacity_sectors", "block_size", "queue_size",
                "features_offered", "features_negotiated", "read_only", "serial",
                "size_max", "seg_max"):
        assert key in info
    assert info["capacity_sectors"] == CAPACITY and info["serial"] == "fake-serial"


BAD = [  # argv, exit code, text in the message
    (["read", "-1", "1"], 1, "-1"), (["read", "0", "0"], 1, "count"),
    (["read", "0", "-5"], 1, "-5"), (["read", "abc", "1"], 1, "abc"),
    (["read", "0", str(2**64)], 22, "capacity"), (["read", str(2**70), "1"], 22, "capacity"),
    (["read", "16383", "2"], 22, "sectors 16383..16384 exceed capacity 16384"),
    (["write", "0", "--pattern", "256", "--count", "1"], 1, "256"),
    (["write", "0", "--pattern", "1", "--count", "0"], 1, "count"),
    (["write", "0", "--pattern", "1"], 1, "--count"),
    (["write", "0", "-i", "odd.bin"], 1, "512"),
    (["write", "0", "-i", "missing.bin"], 15, "missing.bin"),
    (["write", "16384", "--pattern", "1", "--count", "1"], 22, "capacity"),
    (["write", "0", "--pattern", "1", "--count", str(2**64)], 22, "capacity"),
    (["write", "0"], 1, ""), (["discard", "0", "0"], 1, "count"),
    (["write-zeroes", "-3", "1"], 1, "-3"), (["frobnicate"], 1, "frobnicate"), ([], 1, ""),
    (["--device", "0000:00:10", "info"], 1, "0000:00:10"),
    (["--device", "zz:zz", "info"], 1, "zz:zz"), (["--timeout", "0", "info"], 1, "timeout"),
    (["read", "0", "1", "-o", "/nonexistent/dir/x"], 15, "/nonexistent/dir/x"),
    (["--timeout", "nan", "info"], 1, "timeout"), (["--timeout", "inf", "info"], 1, "timeout"),
    (["--timeout", "-inf", "info"], 1, "timeout"), (["--timeout", "1e999", "info"], 1, "timeout"),
    (["bench", "--bs", "\u00b2"], 1, "--bs"), (["bench", "--bs", "\u0664\u0660\u0669\u0666"], 1, "--bs"),
    (["bench", "--iodepth", "\u00b2"], 1, "--iodepth"), (["bench", "--ios", "\u0663"], 1, "--ios"),
    (["bench", "--ios", "1_000"], 1, "--ios"), (["bench", "--runtime", "nan"], 1, "--runtime"),
    (["bench", "--runtime", "inf"], 1, "--runtime"), (["bench", "--bs", "4k\u00b2"], 1, "--bs"),
    # str.strip and int() drop Unicode blanks; hypothesis found "0\xa0" read as sector 0.
    (["read", "0\u00a0", "1"], 1, "sector"), (["read", "0", "\u20031"], 1, "count"),
    (["bench", "--bs", "4k\u00a0"], 1, "--bs"), (["--timeout", "\u00a05", "info"], 1, "timeout"),
    (["--device", "00:10.0\u00a0", "info"], 1, "PCI address"),
    (["--queues", "0", "info"], 1, "--queues 0 must be from 1 to 64"),
    (["--queues", "65", "info"], 1, "--queues"), (["--queues", "1.5", "info"], 1, "--queues"),
    (["--queues", "\u0663", "info"], 1, "--queues"),
]


def test_vfio_backend_with_no_device_is_exit_15(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("virtio_user.pci.list_devices", lambda: [])
    assert cli.main(["--backend", "vfio", "info"]) == 15
    assert "no virtio-blk PCI device found: none is 1af4:1001" in capsys.readouterr().err


def test_help_and_the_default_device_cover_legacy_and_modern(capsys: Any,
                                                              monkeypatch: Any) -> None:
    """--help names both device IDs, and --device's default finds either: the first
    virtio-blk function in address order, skipping other virtio devices (1af4:1000)."""
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "virtio-blk PCI devices, legacy (1af4:1001) and modern (1af4:1042)" in out
    assert "default: the first virtio-blk device, 1af4:1001 or 1af4:1042" in out
    assert "legacy virtio-blk device" not in out
    net = pci.PciDevice("0000:00:03.0", 0x1AF4, 0x1000, 1)
    modern = pci.PciDevice("0000:00:10.0", 0x1AF4, 0x1042, 0x1100)
    legacy = pci.PciDevice("0000:00:11.0", 0x1AF4, 0x1001, 2)
    monkeypatch.setattr(pci, "list_devices", lambda: [net, modern, legacy])
    assert pci.find(None) == modern
    monkeypatch.setattr(pci, "list_devices", lambda: [net, legacy])
    assert pci.find(None) == legacy


@pytest.mark.parametrize("argv,code,text", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_input_gets_its_code_and_leaves_the_disk(env: Env, tmp_path: Path, capsys: Any,
                                                     monkeypatch: Any, argv: list[str],
                                                     code: int, text: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd.bin").write_bytes(b"x" * 700)
    before = bytes(env.device.disk)
    assert env.run(*argv) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    assert bytes(env.device.disk) == before
    if code in (1, 15):
        assert env.opened == 0  # refused before the device was opened


def test_read_only_device_exit_7(capsys: Any) -> None:
    env = Env(features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_RO)
    before = bytes(env.device.disk)
    for argv in (("write", 0, "--pattern", 1, "--count", 1), ("discard", 0, 8),
                 ("write-zeroes", 0, 8)):
        assert env.run(*argv) == 7
    assert "read-only" in capsys.readouterr().err
    assert bytes(env.device.disk) == before


def test_device_errors_map_to_codes(capsys: Any) -> None:
    env = Env(features=DEFAULT_FEATURES & ~Feature.VIRTIO_BLK_F_DISCARD)
    env.device.ioerr_sectors = {100}
    assert env.run("read", 96, 8) == 3
    assert "96..103" in capsys.readouterr().err
    assert env.run("discard", 0, 8) == 5
    env.device.stall = True
    assert env.run("--timeout", "0.05", "read", 0, 1) == 33
    assert "IN sectors 0..0" in capsys.readouterr().err
    env.device.stall = False
    env.device.misbehave = "bad_id"
    assert env.run("read", 0, 1) == 15


def test_interrupted_write_reports_progress_and_resets(capsys: Any, monkeypatch: Any) -> None:
    env = Env(capacity=65536)
    real_write = VirtioBlk.write
    calls = []

    def write(self: VirtioBlk, sector: int, data: bytes) -> None:
        calls.append(sector)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(self, sector, data)

    monkeypatch.setattr(VirtioBlk, "write", write)
    code = env.run("--progress", "write", 0, "--pattern", "0x77", "--count", 5 * 8192)
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT
    assert "written 8192/40960 sectors" in err
    assert "interrupted by SIGINT after 16384 of 40960 sectors" in err
    assert env.device.status == 0 and env.device.log[-1] == "backend closed"


def test_debug_shows_tracebacks(env: Env, capsys: Any) -> None:
    assert env.run("--debug", "read", 0, 0) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("text,bdf", [("0000:00:10.0", "0000:00:10.0"),
                                      ("00:1F.2", "0000:00:1f.2")])
def test_parse_bdf(text: str, bdf: str) -> None:
    assert parse_bdf(text) == bdf


@pytest.mark.parametrize("text", ["0000:00:10", "zz:zz", "", "0000:00:20.0", "0000:00:10.8"])
def test_parse_bdf_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        parse_bdf(text)


numbers = st.one_of(st.integers(-2**80, 2**80), st.integers(-3, 3),
                    st.integers(CAPACITY - 3, CAPACITY + 3))


@settings(max_examples=150, deadline=None)
@given(cmd=st.sampled_from(["read", "discard", "write-zeroes", "write"]), sector=numbers,
       count=numbers, spell=st.sampled_from([str, hex]))
def test_generated_ranges(cmd: str, sector: int, count: int, spell: Any) -> None:
    env = Env()
    before = bytes(env.device.disk)
    s, c = spell(sector), spell(count)
    argv = (["write", s, "--pattern", "1", "--count", c] if cmd == "write"
            else [cmd, s, c] + (["-o", os.devnull] if cmd == "read" else []))
    want = 1 if sector < 0 or count <= 0 else 22 if sector + count > CAPACITY else 0
    if want == 0 and cmd != "read":
        return
    assert env.run(*argv) == want
    assert bytes(env.device.disk) == before


# -- hardening: each of these failed on an earlier version ------------------------------

@pytest.mark.parametrize("target", ["dangling", "/proc/version", "/dev/full", "directory"])
def test_unusable_output_is_exit_15_before_the_device_opens(env: Env, tmp_path: Path,
                                                           capsys: Any, target: str) -> None:
    path = {"dangling": tmp_path / "link", "directory": tmp_path}.get(target, Path(target))
    if target == "dangling":
        path.symlink_to("/nonexistent/dir/file")
    assert env.run("read", 0, 8, "-o", path) == 15
    assert f"cannot write {path}" in capsys.readouterr().err
    assert env.opened == 0


def _fifo_feeder(path: Path, data: bytes, piece: int = 1 << 20) -> Any:
    import threading
    os.mkfifo(path)

    def feed() -> None:
        with open(path, "wb") as f:
            try:
                for i in range(0, len(data), piece):
                    f.write(data[i:i + piece])
            except BrokenPipeError:
                pass  # the reader stopped early, as it should
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def test_write_from_an_endless_stream_is_bounded_by_the_capacity(tmp_path: Path,
                                                                 capsys: Any) -> None:
    import tracemalloc
    env = Env(capacity=16384)
    feeder = _fifo_feeder(tmp_path / "zeros", bytes(64 << 20))  # 8 times the device
    tracemalloc.start()
    try:
        code = env.run("write", 0, "-i", tmp_path / "zeros")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    feeder.join(10)
    assert code == 22, capsys.readouterr().err
    assert peak < 24 << 20
    assert "beyond the end of the device" in capsys.readouterr().err
    assert env.device.disk == bytes(16384 * SECTOR)  # written up to the end, no further


def test_write_from_a_stream_that_fits(tmp_path: Path) -> None:
    env = Env(capacity=16384)
    data = os.urandom(9 << 20 >> 1)  # 4.5 MiB: a whole piece and a part
    feeder = _fifo_feeder(tmp_path / "in", data)
    assert env.run("write", 100, "-i", tmp_path / "in") == 0
    feeder.join(10)
    assert env.device.disk[100 * SECTOR:100 * SECTOR + len(data)] == data


def test_regular_input_file_beyond_the_capacity_writes_nothing(tmp_path: Path) -> None:
    env = Env(capacity=16384)
    before = bytes(env.device.disk)
    (tmp_path / "big").write_bytes(b"\x22" * (16385 * SECTOR))
    assert env.run("write", 0, "-i", tmp_path / "big") == 22
    assert bytes(env.device.disk) == before


def test_sigterm_during_a_write_resets_and_exits_143(capsys: Any, monkeypatch: Any) -> None:
    env = Env(capacity=65536)
    real_write = VirtioBlk.write
    calls = []

    def write(self: VirtioBlk, sector: int, data: bytes) -> None:
        calls.append(sector)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        real_write(self, sector, data)

    monkeypatch.setattr(VirtioBlk, "write", write)
    assert env.run("write", 0, "--pattern", "0x77", "--count", 5 * 8192) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert env.device.status == 0 and env.device.log[-1] == "backend closed"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ctrl_c_during_the_reset_after_a_device_fault_is_exit_130(capsys: Any,
                                                                  monkeypatch: Any) -> None:
    env = Env()
    env.device.misbehave = "bad_id"
    real_reset = FakeBlkDevice.reset
    interrupted = []

    def reset(self: FakeBlkDevice) -> None:
        if self.requests and not interrupted:  # the reset after the faulty completion
            interrupted.append(1)
            raise KeyboardInterrupt
        real_reset(self)

    monkeypatch.setattr(FakeBlkDevice, "reset", reset)
    assert env.run("read", 0, 1, "-o", os.devnull) == 128 + signal.SIGINT
    assert interrupted and env.device.status == 0  # close() reset it after all


def test_write_from_dev_zero_as_documented(capsys: Any) -> None:
    env = Env(capacity=2048)
    assert env.run("write", 0, "-i", "/dev/zero") == 22
    assert "sectors 0..2047 were written" in capsys.readouterr().err
    assert env.device.disk == bytes(2048 * SECTOR)


def test_write_input_that_grows_after_the_check_writes_only_what_was_checked(
        tmp_path: Path, capsys: Any) -> None:
    """A regular file is checked at its length before the device opens; sectors
    appended after that were not checked (against the capacity, say) and are not
    written."""
    env = Env()
    before = bytes(env.device.disk)
    source = tmp_path / "growing"
    source.write_bytes(b"a" * 2 * SECTOR)
    opener = env.opener

    def grow_then_open(args: Any) -> VirtioBlk:
        with source.open("ab") as f:
            f.write(b"b" * 3 * SECTOR)
        return opener(args)
    env.opener = grow_then_open  # type: ignore[method-assign]
    assert env.run("write", 10, "-i", source) == 0
    disk = bytes(env.device.disk)
    assert disk[10 * SECTOR:12 * SECTOR] == b"a" * 2 * SECTOR
    assert disk[12 * SECTOR:] == before[12 * SECTOR:], "sectors past the checked length"


def _mq_opener(device: FakeBlkDevice) -> Any:
    def opener(args: Any) -> VirtioBlk:
        return VirtioBlk(FakeBackend(device), timeout=args.timeout, queues=args.queues)
    return opener


@pytest.mark.parametrize("argv, used", [(["info"], 2), (["--queues", "1", "info"], 1),
                                        (["--queues", "4", "info"], 4)])
def test_info_shows_the_queues_offered_and_used(argv: list[str], used: int, capsys: Any,
                                                monkeypatch: Any) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # default: one per CPU
    device = FakeBlkDevice(capacity=64, num_queues=4)
    assert cli.main(argv, opener=_mq_opener(device)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"{'num_queues_offered':20} 4" in lines and f"{'num_queues':20} {used}" in lines
    assert cli.main(["--queues", "2", "info", "--json"], opener=_mq_opener(device)) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_queues_offered"], info["num_queues"]) == (4, 2)


def test_more_queues_than_the_device_offers_is_exit_1(capsys: Any) -> None:
    device = FakeBlkDevice(capacity=64, num_queues=2)
    assert cli.main(["--queues", "3", "info"], opener=_mq_opener(device)) == 1
    assert "--queues 3 exceeds the 2 request queues" in capsys.readouterr().err
