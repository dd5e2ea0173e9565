"""The kernel side: the nbd ioctls on /dev/nbdN, the thread that blocks in NBD_DO_IT,
and finding or disconnecting a served device through sysfs."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import socket
import threading
import time

from ..daemon import process_alive
from ..errors import CannotOpen, DeviceBusy, DeviceTimeout, InvalidArgument

from .wire import Flag, Ioctl

log = logging.getLogger(__name__)

KERNEL_TIMEOUT = 30  # seconds before the kernel fails a request without a reply
READY_TIMEOUT = 30.0  # for /dev/nbdN to have its size after NBD_DO_IT
DISCONNECT_TIMEOUT = 30.0  # for the server to end after NBD_DISCONNECT
_NBD_PATH = re.compile(r"/dev/(nbd\d+)")


def nbd_name(path: str) -> str:
    """``nbd0`` for ``/dev/nbd0``; InvalidArgument for anything else."""
    m = _NBD_PATH.fullmatch(path)
    if m is None:
        raise InvalidArgument(f"{path!r} is not an NBD device: give /dev/nbdN")
    return m.group(1)


def server_pid(name: str) -> int | None:
    """The process serving nbdN (the kernel names the thread in NBD_DO_IT), or None."""
    try:
        with open(f"/sys/block/{name}/pid") as f:
            tid = int(f.read())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def _ioctl(fd: int, request: Ioctl, arg: int = 0) -> None:
    fcntl.ioctl(fd, request, arg)


class KernelNbd:
    """``/dev/nbdN`` configured through the ioctls, with a thread blocked in NBD_DO_IT
    (it returns when the connection ends)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = nbd_name(path)
        self.error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._ours = False  # our socket is set: clearing it cannot cut another connection
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CannotOpen(f"cannot open {path}: {exc.strerror}") from exc

    def configure(self, sock: socket.socket, *, block_size: int, size_bytes: int,
                  flags: Flag, timeout: int) -> None:
        blocks = size_bytes // block_size
        if blocks >= 1 << 31:  # the ioctl's argument goes through a C int
            raise InvalidArgument(f"{size_bytes} bytes in {block_size}-byte blocks is more "
                                  "than the nbd ioctls take (2^31 blocks)")
        steps = ((Ioctl.SET_BLKSIZE, block_size), (Ioctl.SET_SIZE_BLOCKS, blocks),
                 (Ioctl.SET_TIMEOUT, timeout), (Ioctl.SET_FLAGS, int(flags)),
                 (Ioctl.SET_SOCK, sock.fileno()))
        for request, arg in steps:
            try:
                _ioctl(self.fd, request, arg)
                self._ours = request == Ioctl.SET_SOCK
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise DeviceBusy(f"{self.path} is in use by another NBD connection") from exc
                raise CannotOpen(f"{self.path}: NBD_{request.name} failed: "
                                 f"{exc.strerror}") from exc

    def start(self) -> None:
        self._thread = threading.Thread(target=self._do_it, name=f"{self.name}-do-it",
                                        daemon=True)
        self._thread.start()

    def _do_it(self) -> None:
        # Signals go to the main thread: one arriving here would abort NBD_DO_IT and
        # with it every request in flight.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            _ioctl(self.fd, Ioctl.DO_IT)
        except OSError as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ready(self) -> bool:
        """The kernel has the device up: its server pid and its size are published."""
        try:
            with open(f"/sys/block/{self.name}/size") as f:
                size = int(f.read())
        except (OSError, ValueError):
            return False
        return size > 0 and os.path.exists(f"/sys/block/{self.name}/pid")

    def disconnect(self) -> None:
        """NBD_DISCONNECT from a helper thread: the kernel sends NBD_CMD_DISC down the
        socket, which must not wait on this process's own reading."""
        threading.Thread(target=self._disconnect, daemon=True,
                         name=f"{self.name}-disconnect").start()

    def _disconnect(self) -> None:
        try:
            _ioctl(self.fd, Ioctl.DISCONNECT)
        except OSError as exc:
            log.warning("%s: NBD_DISCONNECT: %s", self.path, exc.strerror)

    def close(self, timeout: float = DISCONNECT_TIMEOUT) -> None:
        """Wait (bounded) for NBD_DO_IT to return, then clear the socket and the queue
        as nbd-client does; NBD_CLEAR_SOCK also ends a NBD_DO_IT still waiting."""
        if self._thread is not None:
            self._thread.join(timeout)
        for request in (Ioctl.CLEAR_QUE, Ioctl.CLEAR_SOCK) if self._ours else ():
            try:
                _ioctl(self.fd, request)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        os.close(self.fd)


def disconnect(path: str, timeout: float = DISCONNECT_TIMEOUT) -> int:
    """``nbd -d``: ask the kernel to disconnect (the server flushes and ends), then wait
    for the server process to end."""
    name = nbd_name(path)
    pid = server_pid(name)
    if pid is None:
        raise CannotOpen(f"{path} is not connected")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise CannotOpen(f"cannot open {path}: {exc.strerror}") from exc
    try:
        _ioctl(fd, Ioctl.DISCONNECT)
    except OSError as exc:
        raise CannotOpen(f"{path}: NBD_DISCONNECT failed: {exc.strerror}") from exc
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise DeviceTimeout(f"{path}: the server (pid {pid}) did not end within "
                                f"{timeout:g} s of NBD_DISCONNECT")
        time.sleep(0.05)
    return 0


