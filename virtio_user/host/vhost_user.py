"""Disks served by a device this project did not write: qemu-storage-daemon's
vhost-user-blk export (libvhost-user), seen by the guest as a vhost-user-blk-pci device.

The daemon owns the image and serves the virtqueues itself, reading and writing guest
memory directly: the guest's RAM must be a shared memory backend (memfd, ``share=on``)
that QEMU hands over the vhost-user socket. libvhost-user refuses legacy devices, so the
device is modern only (1af4:1042).

One daemon per disk, started before QEMU (QEMU connects to its socket at start-up) and
stopped after it, always: ``StorageDaemon`` is a context manager whose every wait is
bounded, and the daemon dies with the harness even if the harness is killed outright
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import DEFAULT_QEMU, Qemu
from .errors import BadOption, VMLaunchFailure
from .options import image_format, split_spec, switch

START_SECONDS = 15.0  # for the socket to appear
STOP_SECONDS = 5.0  # after SIGTERM, then again after SIGKILL
PR_SET_PDEATHSIG = 1


@dataclass
class VhostUserDisk:
    """A raw or qcow2 image exported by qemu-storage-daemon as vhost-user-blk."""
    path: Path
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> "VhostUserDisk":
        """``PATH[,readonly=on|off]``; ``,,`` stands for a comma in PATH."""
        path, *opts = split_spec(spec)
        if not path:
            raise BadOption(f"vhost-user disk {spec}: no image path")
        disk = cls(Path(path))
        for opt in opts:
            key, _, value = opt.partition("=")
            if key != "readonly":
                raise BadOption(f"vhost-user disk {spec}: unknown option {opt!r} "
                                "(only readonly=on|off)")
            disk.readonly = switch(key, value, f"vhost-user disk {spec}")
        return disk

    def daemon_command(self, socket: Path,
                       binary: str = "qemu-storage-daemon") -> list[str]:
        """qemu-storage-daemon's command line (JSON options: no escaping to get wrong)."""
        image: dict[str, Any] = {"driver": "file", "node-name": "file",
                                 "filename": str(self.path.resolve()),
                                 "read-only": self.readonly}
        fmt = {"driver": image_format(self.path, "vhost-user disk"), "node-name": "fmt",
               "file": "file", "read-only": self.readonly}
        export = {"type": "vhost-user-blk", "id": "export", "node-name": "fmt",
                  "writable": not self.readonly,
                  "addr": {"type": "unix", "path": str(socket)}}
        return [binary, "--blockdev", json.dumps(image),
                "--blockdev", json.dumps(fmt), "--export", json.dumps(export)]


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the harness that started it is gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class StorageDaemon:
    """One running qemu-storage-daemon. ``with StorageDaemon(...)``: started on entry
    (ready when its socket exists), stopped on exit whatever happened."""

    def __init__(self, disk: VhostUserDisk, socket: Path, log: Path,
                 qemu: Qemu | None = None) -> None:
        self.disk = disk
        self.qemu = qemu or Qemu(DEFAULT_QEMU)  # whose qemu-storage-daemon
        self.socket = socket
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_SECONDS) -> None:
        cmd = self.disk.daemon_command(self.socket,
                                       self.qemu.binary("qemu-storage-daemon"))
        with self.log.open("wb") as log:
            try:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                             env=self.qemu.env(),
                                             stderr=subprocess.STDOUT,
                                             start_new_session=True,
                                             preexec_fn=_die_with_parent)
            except OSError as exc:
                raise VMLaunchFailure(f"cannot start qemu-storage-daemon: {exc}",
                                      command=cmd) from exc
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise self.failure(f"qemu-storage-daemon exited with status "
                                   f"{self.proc.returncode}", cmd)
            if time.monotonic() > deadline:
                raise self.failure(f"qemu-storage-daemon did not create {self.socket} "
                                   f"within {timeout:g} s", cmd)
            time.sleep(0.02)

    def failure(self, message: str, cmd: list[str]) -> VMLaunchFailure:
        output = self.output()
        return VMLaunchFailure(f"vhost-user disk {self.disk.path}: {message}:\n"
                               f"{output[-2000:]}", self.proc.poll() if self.proc else None,
                               cmd, output)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM (the daemon removes its socket), then SIGKILL; never waits unbounded."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> "StorageDaemon":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
