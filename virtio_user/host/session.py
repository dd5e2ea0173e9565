"""Session mode: boot one guest, then run many commands in it.

The channel is a virtio-serial port (``virtio-user.agent``) served in the guest by
qemu/agent.py, which runs each command with the host's own Python environment and streams
its output back as JSON lines (the protocol is in that file's docstring). A test suite
boots a guest once per module and pays only the per-command cost after that.

    with GuestSession(disks=[Disk(Path("a.img"))]) as vm:
        r = vm.run(["virtio-user", "info", "--json"])
        assert r.status == 0, r.stderr
        vm.qmp.cmd("block_resize", node_name=..., size=...)

QMP (``vm.qmp``) is qemu.qmp's synchronous ``QEMUMonitorProtocol``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from qemu.qmp.legacy import QEMUMonitorProtocol

from . import accel as accel_mod
from . import assets
from .errors import GuestDied, GuestTimeout, HarnessError
from .machine import Disk, Machine, MachineConfig
from .vhost_user import VhostUserDisk

OutputSink = Callable[[int, bytes], None]  # (fd, data): fd 1 is stdout, 2 stderr
DEFAULT_BOOT_TIMEOUT = 180.0
DEFAULT_COMMAND_TIMEOUT = 300.0


@dataclass
class CommandResult:
    argv: list[str]
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass
class Command:
    """A command started in the guest; ``wait()`` gives its CommandResult."""
    session: "GuestSession"
    id: int
    argv: list[str]
    sink: OutputSink | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    status: int | None = None

    def feed(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).extend(data)
        if self.sink is not None:
            self.sink(fd, data)

    def signal(self, signum: int = signal.SIGINT) -> None:
        self.session._send({"op": "signal", "id": self.id, "signal": int(signum)})

    def wait(self, timeout: float = DEFAULT_COMMAND_TIMEOUT) -> CommandResult:
        self.session._wait_for(lambda: self.status is not None, timeout,
                               f"command {self.argv}")
        assert self.status is not None
        return CommandResult(self.argv, self.status, bytes(self.stdout), bytes(self.stderr))

    def wait_output(self, needle: bytes, timeout: float = 60.0) -> None:
        """Wait until ``needle`` shows up in the command's stdout or stderr."""
        self.session._wait_for(
            lambda: needle in self.stdout or needle in self.stderr or self.status is not None,
            timeout, f"{needle!r} from {self.argv}")


class GuestSession:
    """A booted guest with its agent connected. A context manager; never leaks QEMU."""

    def __init__(self, disks: Sequence[Disk | str | Path] = (), *, accel: str = "auto",
                 backend: str = "uio", memory_mib: int = 1024,
                 qemu_args: Sequence[str] = (), cwd: Path | None = None,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
                 vhost_user_disks: Sequence[VhostUserDisk | str | Path] = (),
                 warm_start: bool = False, kernel: str = assets.DEFAULT_KERNEL,
                 qemu: str = assets.DEFAULT_QEMU, modules: Sequence[str] = ()) -> None:
        """``kernel`` (6.1 or 6.12) and ``qemu`` (7.2 or 10.0) as run-in-qemu.sh's
        --kernel and --qemu (a backports one is fetched on first use); ``modules`` are
        kernel modules to load at boot beyond qemu/modules.txt (``ublk_drv``, say)."""
        guest_kernel = assets.find_kernel(kernel)
        self.config = MachineConfig(
            disks=[d if isinstance(d, Disk) else Disk.parse(str(d)) for d in disks],
            vhost_user_disks=[d if isinstance(d, VhostUserDisk)
                              else VhostUserDisk.parse(str(d)) for d in vhost_user_disks],
            accel=accel_mod.choose(accel, guest_kernel.vmlinuz), backend=backend,
            kernel=kernel, qemu=qemu, modules=list(modules),
            memory_mib=memory_mib, qemu_args=list(qemu_args), cwd=cwd or Path.cwd())
        self.boot_timeout = boot_timeout
        # virtio-user commands fork from a guest interpreter that has imported the driver
        # already (qemu/warm.py): for test suites; commands whose start-up is under test
        # must run cold (spawn(warm=False)).
        self.warm_start = warm_start
        self.machine = Machine(self.config)
        self.cond = threading.Condition()
        self.commands: dict[int, Command] = {}
        self.next_id = 1
        self.ready_uptime: float | None = None
        self.closed_reason: str | None = None
        self.conn: socket.socket | None = None
        self.reader: threading.Thread | None = None

    @property
    def accel(self) -> str:
        return self.config.accel

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        if self.machine.qmp is None:
            raise GuestDied("QMP is not connected: the guest is not running")
        return self.machine.qmp

    # -- start and stop ---------------------------------------------------------------

    def start(self) -> "GuestSession":
        try:
            self.machine.launch()
            self.conn = self.machine.accept_agent(timeout=self.boot_timeout)
            self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                           name="virtio-user-agent-reader")
            self.reader.start()
            self._wait_for(lambda: self.ready_uptime is not None, self.boot_timeout,
                           "the guest to boot")
        except BaseException:
            self.close()
            raise
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Power the guest off through the agent, then make sure QEMU is gone."""
        if self.conn is not None and self.closed_reason is None and self.machine.alive():
            try:
                self._send({"op": "poweroff"})
                self.machine.wait(timeout)
            except (OSError, HarnessError):
                pass
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.machine.close()

    def __enter__(self) -> "GuestSession":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------

    def spawn(self, argv: Sequence[str] | str, *, cwd: Path | str | None = None,
              env: dict[str, str] | None = None, sink: OutputSink | None = None,
              warm: bool | None = None) -> Command:
        """Start ``argv`` in the guest (a string runs through ``sh -c``); ``warm``
        overrides the session's ``warm_start`` for this command."""
        args = ["sh", "-c", argv] if isinstance(argv, str) else [str(a) for a in argv]
        with self.cond:
            cmd = Command(self, self.next_id, args, sink)
            self.commands[cmd.id] = cmd
            self.next_id += 1
        self._send({"op": "run", "id": cmd.id, "argv": args,
                    "cwd": str(cwd or self.config.cwd.resolve()), "env": env or {},
                    "warm": self.warm_start if warm is None else warm})
        return cmd

    def run(self, argv: Sequence[str] | str, *, timeout: float = DEFAULT_COMMAND_TIMEOUT,
            cwd: Path | str | None = None, env: dict[str, str] | None = None,
            sink: OutputSink | None = None, warm: bool | None = None) -> CommandResult:
        """Run ``argv`` in the guest and return its status and output."""
        return self.spawn(argv, cwd=cwd, env=env, sink=sink, warm=warm).wait(timeout)

    # -- plumbing ---------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        if self.conn is None or self.closed_reason is not None:
            raise GuestDied(self._death_message())
        self.conn.sendall((json.dumps(msg) + "\n").encode())

    def _read_loop(self) -> None:
        assert self.conn is not None
        buf = b""
        try:
            while True:
                chunk = self.conn.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._dispatch(json.loads(line))
        except OSError:
            pass
        with self.cond:
            self.closed_reason = "the guest closed the agent channel"
            self.cond.notify_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        with self.cond:
            op = msg.get("op")
            if op == "ready":
                self.ready_uptime = msg["uptime"]
            elif op == "output":
                self.commands[msg["id"]].feed(msg["fd"], base64.b64decode(msg["data"]))
            elif op == "exit":
                self.commands.pop(msg["id"]).status = msg["status"]
            self.cond.notify_all()

    def _death_message(self) -> str:
        why = self.closed_reason or "QEMU exited"
        panic = self.machine.panic_line()
        if panic is not None:
            # The backtrace after it is long: name the cause before the tail.
            why = f"the guest kernel panicked: {panic}"
        elif not self.machine.alive() and self.machine.proc is not None:
            why = f"QEMU exited with status {self.machine.proc.returncode}"
        return (f"{why}\n--- last lines of the guest serial console ---\n"
                f"{self.machine.serial_tail()}\n--- QEMU output ---\n"
                f"{self.machine.qemu_output()[-2000:]}")

    def _wait_for(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not done():
                if self.closed_reason is not None or not self.machine.alive():
                    raise GuestDied(f"while waiting for {what}: {self._death_message()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(
                        f"timed out after {timeout:g} s waiting for {what}\n"
                        f"--- last lines of the guest serial console ---\n"
                        f"{self.machine.serial_tail()}")
                self.cond.wait(min(left, 0.5))


def sink_to_stdio(fd: int, data: bytes) -> None:
    """An OutputSink that streams the guest's output to this process's stdout/stderr."""
    os.write(fd, data)
