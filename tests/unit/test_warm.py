"""qemu/warm.py on the host: a command forked from the warm interpreter gives the same
status, output and name as the entry point started cold."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

WARM = Path(__file__).resolve().parents[2] / "qemu" / "warm.py"
AGENT = WARM.with_name("agent.py")


class Warm:
    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, str(WARM), str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock.settimeout(60)

    def run(self, argv: list[str], cid: int = 1) -> tuple[int, bytes, bytes, int]:
        """(status, stdout, stderr, pid) of ``argv`` run warm."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        msg = {"id": cid, "argv": argv, "cwd": "/", "env": dict(os.environ)}
        socket.send_fds(self.sock, [json.dumps(msg).encode()], [stdin, out_w, err_w])
        for fd in (stdin, out_w, err_w):
            os.close(fd)
        started = json.loads(self.sock.recv(65536))
        assert started["id"] == cid and started["pid"] > 0
        with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
            stdout, stderr = out.read(), err.read()
        ended = json.loads(self.sock.recv(65536))
        assert ended["id"] == cid
        return ended["status"], stdout, stderr, started["pid"]

    def start(self, argv: list[str], cid: int) -> tuple[int, Callable[[], tuple[int, bytes]]]:
        """Start ``argv`` warm: its pid, and a function that waits for (status, stderr)."""
        err_r, err_w = os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(os.devnull, os.O_WRONLY)
        msg = {"id": cid, "argv": argv, "cwd": "/", "env": dict(os.environ)}
        socket.send_fds(self.sock, [json.dumps(msg).encode()], [stdin, out, err_w])
        for fd in (stdin, out, err_w):
            os.close(fd)
        started = json.loads(self.sock.recv(65536))
        assert started["id"] == cid and started["pid"] > 0

        def done() -> tuple[int, bytes]:
            with os.fdopen(err_r, "rb") as err:
                stderr = err.read()
            ended = json.loads(self.sock.recv(65536))
            assert ended["id"] == cid
            return ended["status"], stderr
        return started["pid"], done

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def warm() -> Iterator[Warm]:
    w = Warm()
    yield w
    w.close()


def _open_writer(fifo: Path, timeout: float = 30) -> int:
    """The FIFO's write end, once a reader has it open (ENXIO until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def cold(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Through the installed entry point, as the guest would start it."""
    entry = Path(sys.executable).parent / argv[0]
    r = subprocess.run([str(entry), *argv[1:]], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("args", [["--help"], ["read", "0", "x"], ["--no-such-option"],
                                  ["write", "0", "--pattern", "300"]])
def test_a_warm_command_is_the_cold_one(warm: Warm, args: list[str]) -> None:
    status, out, err, _ = warm.run(["virtio-user", *args])
    assert (status, out, err) == cold(["virtio-user", *args])
    assert status == (0 if args == ["--help"] else 1)


def test_the_child_is_named_after_the_command_and_ends_the_agent_loop(
        warm: Warm, tmp_path: Path) -> None:
    status, out, _, pid = warm.run(["virtio-user", "--help"], cid=7)
    assert status == 0 and out.startswith(b"usage: virtio-user")
    assert pid != warm.proc.pid
    # The name is read while the child lives: ``write -i FIFO`` opens the FIFO before
    # the device, and blocks there until the test opens the other end; then it looks
    # for a PCI address that no machine has.
    fifo = tmp_path / "input"
    os.mkfifo(fifo)
    started, done = warm.start(["virtio-user", "--device", "0000:ff:1f.7", "write", "0",
                                "-i", str(fifo)], cid=8)
    writer = _open_writer(fifo)  # returns once the child has opened its end
    try:
        comm = Path(f"/proc/{started}/comm").read_text().strip()
    finally:
        os.close(writer)
    assert comm == "virtio-user"
    status, err = done()
    assert status == 15 and b"0000:ff:1f.7" in err, err
    # The agent closing its end ends the warm interpreter.
    w = Warm()
    w.sock.close()
    assert w.proc.wait(30) == 0


def _load_agent() -> Any:
    """qemu/agent.py as a module (``qemu`` itself is qemu.qmp's namespace package)."""
    spec = importlib.util.spec_from_file_location("virtio_user_guest_agent", AGENT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_command_the_warm_interpreter_cannot_take_leaks_no_pipe() -> None:
    """send_fds to a warm interpreter that is gone fails: the command is reported as not
    started (127), and the pipes made for its output are closed, not kept forever."""
    agent_module = _load_agent()
    port, host = socket.socketpair()
    warm, gone = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gone.close()
    agent = agent_module.Agent(port.fileno())
    agent.warm = warm
    before = set(os.listdir("/proc/self/fd"))
    agent.start({"op": "run", "id": 5, "argv": ["virtio-user", "--help"], "warm": True})
    assert set(os.listdir("/proc/self/fd")) == before, "pipe ends leaked"
    host.settimeout(5)
    replies = [json.loads(line) for line in host.recv(65536).decode().splitlines()]
    assert replies[-1] == {"op": "exit", "id": 5, "status": 127}
    assert 5 not in agent.children
    for s in (warm, port, host):
        s.close()
