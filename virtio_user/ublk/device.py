"""A ublk device's life around one queue: ADD_DEV and SET_PARAMS from the virtio disk,
the queue's FETCH_REQs, START_DEV (from a thread: adding the disk reads it, and those
reads need the queue served), serving, then STOP_DEV (from a thread again: it waits
for the I/O in flight), the flush, the queue closed (which cancels its FETCH_REQs) and
DEL_DEV. Every step is bounded; ``del_device`` and ``list_devices`` serve the CLI."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..daemon import process_alive
from ..errors import CannotOpen, DeviceBusy, DeviceTimeout, InvalidArgument
from ..spec import SECTOR_SIZE, Feature
from .control import Control, DevInfo, UblkCommandError, device_ids
from .params import DiskShape, make_params
from .server import UblkQueue
from .spec import block_path, char_path

if TYPE_CHECKING:
    from ..blk import VirtioBlk
    from ..request import DmaBuffer

log = logging.getLogger(__name__)

DEPTH = 64  # tags on the queue (ublksrv's default is 128; the virtqueue holds 256)
BUFFER_BYTES = 512 << 10  # one DMA buffer per tag: ublksrv's default max_io_buf_bytes
NODE_TIMEOUT = 10.0  # for /dev/ublkcN and /dev/ublkbN to appear (devtmpfs)
STOP_TIMEOUT = 30.0  # STOP_DEV waits for I/O in flight, served meanwhile
DEL_TIMEOUT = 10.0  # DEL_DEV waits for /dev/ublkcN's last close
SERVER_EXIT_TIMEOUT = 60.0  # ``del`` waits this long for a live server to finish


@dataclass
class Started:
    dev_id: int
    path: str


def _wait_for(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise DeviceTimeout(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.05)  # each look is a stat over devtmpfs; slow under TCG


class _Background:
    """One control command run in a thread with a Control of its own."""

    def __init__(self, what: str, call: Callable[[Control], None]) -> None:
        self.what = what
        self.error: BaseException | None = None
        self._call = call
        self.thread = threading.Thread(target=self._run, name=f"ublk-{what}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with Control() as ctrl:
                self._call(ctrl)
        except BaseException as exc:  # reported by the owner
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def serve(dev: VirtioBlk, dev_id: int | None, stop: threading.Event,
          on_ready: Callable[[Started], None], depth: int = DEPTH,
          buffer_bytes: int = BUFFER_BYTES) -> str:
    """Create the ublk device for ``dev`` and serve it until ``stop`` is set or the
    kernel ends the queue; then remove it. Returns why it ended."""
    shape = DiskShape.of(dev)
    depth = max(1, min(depth, dev.queue_size))
    buffers = [dev.alloc_buffer(buffer_bytes) for _ in range(depth)]
    max_bytes = min(buffer_bytes, dev.max_request_bytes(buffers))
    with Control() as ctrl:
        info = ctrl.add(dev_id=dev_id, queues=1, depth=depth, max_io_buf_bytes=buffer_bytes)
        number = info.dev_id
        log.info("ublk device %d added (flags %#x)", number, info.flags)
        try:
            ctrl.set_params(number, make_params(shape, max_bytes // SECTOR_SIZE))
            return _serve_added(dev, number, shape, buffers, stop, on_ready)
        finally:
            _delete(ctrl, number)


def _serve_added(dev: VirtioBlk, number: int, shape: DiskShape, buffers: list[DmaBuffer],
                 stop: threading.Event, on_ready: Callable[[Started], None]) -> str:
    _wait_for(char_path(number), NODE_TIMEOUT)
    cdev = os.open(char_path(number), os.O_RDWR | os.O_CLOEXEC)
    queue: UblkQueue | None = None
    try:
        queue = UblkQueue(dev, cdev, buffers, shape)
        queue.fetch_all()
        pid = os.getpid()
        starter = _Background("start", lambda c: c.start(number, pid))
        queue.serve(lambda: starter.done or stop.is_set())
        if not starter.done:  # asked to stop while starting: serve the start's reads
            queue.serve(lambda: starter.done)
        if starter.error is not None:
            raise starter.error
        _wait_for(block_path(number), NODE_TIMEOUT)
        on_ready(Started(number, block_path(number)))
        queue.serve(stop.is_set)
        reason = "stop requested" if stop.is_set() else "the kernel ended the queue"
        log.info("%s: %s; %d requests, %d errors", block_path(number), reason,
                 queue.stats.requests, queue.stats.errors)
        _stop(queue, number)
        _flush(dev)
        return reason
    finally:
        if queue is not None:
            queue.drain(dev.timeout)
            queue.close()
        os.close(cdev)


def _stop(queue: UblkQueue, number: int) -> None:
    """STOP_DEV while the queue is served: it waits for the requests in flight (and
    the kernel's last writes); bounded."""
    stopper = _Background("stop", lambda c: c.stop(number))
    deadline = time.monotonic() + STOP_TIMEOUT
    queue.serve(lambda: stopper.done or time.monotonic() > deadline)
    stopper.thread.join(max(0.0, deadline - time.monotonic()))
    if not stopper.done:
        log.warning("ublk STOP_DEV of device %d did not finish within %g s", number,
                    STOP_TIMEOUT)
    elif stopper.error is not None:
        log.warning("ublk STOP_DEV of device %d: %s", number, stopper.error)


def _flush(dev: VirtioBlk) -> None:
    if dev.read_only or not dev.has(Feature.VIRTIO_BLK_F_FLUSH):
        return
    try:
        dev.flush()
    except Exception as exc:  # the device is going away; best effort
        log.warning("%s: flush at the end failed: %s", dev.bdf, exc)


def _delete(ctrl: Control, number: int) -> None:
    try:
        ctrl.stop(number)  # a no-op if stopped; needed after a failed start
    except (UblkCommandError, DeviceTimeout) as exc:
        log.warning("ublk STOP_DEV of device %d: %s", number, exc)
    try:
        ctrl.delete(number, timeout=DEL_TIMEOUT)
        log.info("ublk device %d deleted", number)
    except (UblkCommandError, DeviceTimeout) as exc:
        log.warning("ublk DEL_DEV of device %d: %s", number, exc)


# -- del and list, from another process ---------------------------------------------
def mount_point(path: str, table: str = "/proc/self/mounts") -> str | None:
    """Where the block device ``path`` is mounted, from the mount table, or None."""
    try:
        real = os.path.realpath(path)
        with open(table) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and os.path.realpath(fields[0]) == real:
                    # the table escapes space, tab, newline and backslash as \ooo
                    return fields[1].encode().decode("unicode_escape")
    except OSError:
        pass
    return None


def check_unused(path: str) -> None:
    """Refuse to remove a disk that is mounted or held open exclusively."""
    where = mount_point(path)
    if where is not None:
        raise DeviceBusy(f"{path} is mounted on {where}: unmount it first")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusy(f"{path} is in use (held open exclusively: a mount, a "
                             "device-mapper or md device): release it first") from exc
        return
    os.close(fd)


def del_device(number: int) -> str:
    """Remove ublk device ``number``: a live server is asked to (SIGTERM: it stops,
    flushes and deletes); a dead one's device is stopped and deleted here."""
    if number < 0:
        raise InvalidArgument(f"ublk device number {number} is negative")
    with Control() as ctrl:
        try:
            info = ctrl.info(number)
        except UblkCommandError as exc:
            if exc.errno == errno.ENODEV:
                raise CannotOpen(f"no ublk device {number}") from exc
            raise
        check_unused(block_path(number))
        pid = info.ublksrv_pid
        if pid > 0 and process_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + SERVER_EXIT_TIMEOUT
            while number in device_ids():
                if time.monotonic() > deadline:
                    raise DeviceTimeout(f"ublk device {number}: its server (pid {pid}) "
                                        f"did not remove it within {SERVER_EXIT_TIMEOUT:g} s")
                time.sleep(0.05)
            return f"ublk device {number} removed by its server (pid {pid})"
        _delete(ctrl, number)
        if number in device_ids():
            raise DeviceTimeout(f"ublk device {number} is still there after DEL_DEV")
        return f"ublk device {number} removed (its server had gone)"


def list_devices() -> list[tuple[DevInfo, int]]:
    """Each ublk device with its size in sectors (0 before START_DEV)."""
    out = []
    with Control() as ctrl:
        for number in device_ids():
            try:
                info = ctrl.info(number)
            except UblkCommandError:
                continue  # removed meanwhile
            try:
                with open(f"/sys/block/ublkb{number}/size") as f:
                    sectors = int(f.read())
            except (OSError, ValueError):
                sectors = 0
            out.append((info, sectors))
    return out
