"""One ublk queue served by one virtqueue: FETCH_REQ for every tag, then for each
request the kernel hands over, one virtio-blk request on the tag's own DMA buffer (the
kernel copies write data into it and read data out of it: this process never touches
the bytes), answered with COMMIT_AND_FETCH_REQ once the device completes it.

The loop is ublksrv's (lib/ublksrv_queue.c) and libublk-rs's: a ring of its own per
queue, one ``io_uring_enter`` per turn that both commits the finished tags and, when
the device is idle, waits for the next request. While requests are on the device it
polls the used ring, and peeks at the CQ between looks (new requests are posted by the
kernel's task work without a system call of ours).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import DeviceError, DeviceTimeout, VirtioError
from ..io_uring import Ring, map_readonly
from ..io_uring.spec import URING_CMD_HEAD, Op, Setup, struct_of
from ..request import Request
from ..spec import BLK_DWZ_DTYPE, BlkStatus, IsrBit, ReqType
from ..ring.core import QueueFull
from .params import DiskShape, Plan, translate
from .spec import (IO_CMD_SQE, IO_DESC, IO_DESC_DTYPE, UBLK_IO_RES_ABORT, UBLK_IO_RES_OK,
                   UBLKSRV_CMD_BUF_OFFSET, IoCmd, IoOp, desc_area_bytes)

if TYPE_CHECKING:
    from ..blk import VirtioBlk
    from ..request import DmaBuffer

log = logging.getLogger(__name__)

TICK = 0.2  # seconds an idle loop sleeps in io_uring_enter before looking at ``stop``
# Counted, not timed (a clock read traps into QEMU under TCG): looks at the used ring
# between two looks at the CQ, and rounds of that before a blocking device wait.
RING_LOOKS = 32
SPIN_ROUNDS = 2000
IDLE_ROUNDS = 200  # rounds of looks at the ring before an idle server sleeps
_URING_CMD = int(Op.IORING_OP_URING_CMD)
_FETCH = int(IoCmd.UBLK_U_IO_FETCH_REQ)
_COMMIT = int(IoCmd.UBLK_U_IO_COMMIT_AND_FETCH_REQ)
_DESC_BYTES = IO_DESC_DTYPE.itemsize
_OK = int(BlkStatus.VIRTIO_BLK_S_OK)
_UNSUPP = int(BlkStatus.VIRTIO_BLK_S_UNSUPP)
_DWZ = {ReqType.VIRTIO_BLK_T_DISCARD, ReqType.VIRTIO_BLK_T_WRITE_ZEROES}
_POLL_ADD = int(Op.IORING_OP_POLL_ADD)
# The same 48-byte head (op_flags is poll32_events), then addr3 and __pad2 zeroed.
_POLL_SQE = struct.Struct(URING_CMD_HEAD.format + "QQ")
_IRQ = 1 << 32  # user_data of the interrupt polls (+ index): above every tag
_WRITE_OP = int(IoOp.UBLK_IO_OP_WRITE)
_RW_TYPES = (ReqType.VIRTIO_BLK_T_IN, ReqType.VIRTIO_BLK_T_OUT)  # by UBLK_IO_OP_READ/WRITE
_DWZ_STRUCT = struct_of(BLK_DWZ_DTYPE)  # the one range of a discard or write-zeroes


def interrupt_fds(dev: VirtioBlk) -> list[int]:
    """The fds the device's interrupts arrive on (``--wait interrupt`` or ``hybrid``),
    or none (``--wait poll``): uio's /dev/uioN, or vfio's eventfds."""
    waiter = dev.waiter
    if waiter is None:
        return []
    source = waiter.source
    fd = getattr(source, "fd", None)
    if isinstance(fd, int):
        return [fd] if fd >= 0 else []
    fds = getattr(source, "fds", [])
    return [int(f) for f in fds]


def buffer_address(buf: DmaBuffer) -> int:
    """The user-space address of a DMA buffer: what FETCH_REQ names for the kernel."""
    anchor = ctypes.c_char.from_buffer(buf.mv)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@dataclass
class QueueStats:
    requests: int = 0
    errors: int = 0
    by_op: dict[int, int] = field(default_factory=dict)


class UblkQueue:
    """Queue ``q_id`` of ublk device ``dev_id`` (/dev/ublkcN open as ``cdev_fd``),
    with one DMA buffer per tag."""

    def __init__(self, dev: VirtioBlk, cdev_fd: int, buffers: list[DmaBuffer],
                 shape: DiskShape, q_id: int = 0) -> None:
        self.dev = dev
        self.fd = cdev_fd
        self.q_id = q_id
        self.depth = len(buffers)
        self.shape = shape
        self.buffers = buffers
        self.buf_bytes = min(b.size for b in buffers)
        self.addrs = [buffer_address(b) for b in buffers]
        self.reqs = [Request(ReqType.VIRTIO_BLK_T_IN, buffer=b, tag=t)
                     for t, b in enumerate(buffers)]
        self.results = [0] * self.depth  # what to commit for each tag on success
        self.stats = QueueStats()
        self._capacity = shape.capacity
        self._read_only = shape.read_only
        self.live = 0  # tags the kernel may still hand us (FETCH outstanding)
        self._waiting: list[Request] = []  # for room on the virtqueue
        # Queue q's descriptors sit at q * (the largest area) on /dev/ublkcN (ublk_ch_mmap).
        self._descs_mm = map_readonly(cdev_fd, desc_area_bytes(self.depth),
                                      UBLKSRV_CMD_BUF_OFFSET
                                      + q_id * desc_area_bytes(4096))
        self.descs = memoryview(self._descs_mm)
        # One SQE per tag at most, plus the interrupt polls.
        self._irq_fds = interrupt_fds(dev)
        self._polling = [False] * len(self._irq_fds)
        # COOP_TASKRUN: the kernel posts new requests at our next io_uring_enter
        # instead of interrupting this CPU (an IPI, dear under TCG) while we poll the
        # device; TASKRUN_FLAG tells the polling loop when to enter (ublksrv does the
        # same).
        self.ring = Ring(self.depth + len(self._irq_fds), Setup.IORING_SETUP_SQE128
                         | Setup.IORING_SETUP_CQE32 | Setup.IORING_SETUP_COOP_TASKRUN
                         | Setup.IORING_SETUP_TASKRUN_FLAG)

    # -- the commands -------------------------------------------------------------
    def _queue_cmd(self, cmd: int, tag: int, result: int) -> None:
        off = self.ring.next_sqe()
        IO_CMD_SQE.pack_into(self.ring.sqes_mv, off, _URING_CMD, 0, 0, self.fd, cmd, 0, 0, 0,
                             0, tag, 0, 0, 0, self.q_id, tag, result, self.addrs[tag])

    def fetch_all(self) -> None:
        """FETCH_REQ for every tag: the queue is ready once the kernel holds them all
        (START_DEV waits for that)."""
        for tag in range(self.depth):
            self._queue_cmd(_FETCH, tag, 0)
        self.live = self.depth
        while self.ring.queued:
            if not self.ring.enter():
                time.sleep(0.001)

    # -- the loop -----------------------------------------------------------------
    def serve(self, until: Callable[[], bool]) -> None:
        """Serve until ``until()`` is true (looked at each turn) or the kernel aborted
        every tag: polling the used ring while the device works, or (``--wait
        interrupt`` or ``hybrid``) sleeping in the same io_uring_enter that waits for
        the kernel's requests, woken by either."""
        if self._irq_fds:
            self._serve_sleeping(until)
            return
        dev, ring = self.dev, self.ring
        while self.live and not until():
            idle = not dev.in_flight and not self._waiting
            if idle:
                if ring.queued:
                    ring.enter()  # the commits first: they let the kernel send more
                self._await_kernel()
            ring.enter(1 if idle else 0, TICK)
            for tag, res, _ in ring.reap():
                self._arrived(tag, res)
            if self._waiting:
                self._submit()
            if dev.in_flight:
                self._await_device()

    def _serve_sleeping(self, until: Callable[[], bool]) -> None:
        """The interrupt-driven loop: while requests are on the device, its interrupt
        fd (uio's /dev/uioN, vfio's eventfds) is polled through the ring
        (IORING_OP_POLL_ADD), so one io_uring_enter sleeps until the kernel hands over
        a request or the device completes one. The lost wake-up is avoided as the
        Waiter does: arm the queue's notifications, then look at the used ring once
        more before sleeping ("Used Buffer Notification Suppression")."""
        dev, ring, queue = self.dev, self.ring, self.dev.queue
        silent = 0  # turns that ended at TICK with requests on the device
        try:
            while self.live and not until():
                wait = 1
                if dev.in_flight:
                    if queue.arm_interrupts():
                        wait = 0  # completions already there
                    else:
                        self._arm_polls()
                got = ring.enter(wait, TICK) if wait or ring.queued else 0
                cqes = ring.reap()
                for tag, res, _ in cqes:
                    if tag >= _IRQ:
                        self._interrupted(tag - _IRQ)
                    else:
                        self._arrived(tag, res)
                if self._waiting:
                    self._submit()
                done = dev.reap(0) if dev.in_flight else []
                if done:
                    self._completed(done)
                if dev.in_flight and not (done or cqes or got):
                    silent += 1
                    if silent * TICK > dev.timeout:
                        raise DeviceTimeout(f"{dev.bdf}: no completion within "
                                            f"{dev.timeout:g} s")
                else:
                    silent = 0
        finally:
            queue.disarm_interrupts()

    def _arm_polls(self) -> None:
        for i, fd in enumerate(self._irq_fds):
            if not self._polling[i]:
                off = self.ring.next_sqe()
                _POLL_SQE.pack_into(self.ring.sqes_mv, off, _POLL_ADD, 0, 0, fd, 0, 0, 0, 0,
                                    select.POLLIN, _IRQ + i, 0, 0, 0, 0, 0)
                self._polling[i] = True

    def _interrupted(self, index: int) -> None:
        """An interrupt fd became readable: acknowledge (and unmask) through the
        device's IrqSource, as its Waiter would after poll(2)."""
        if not 0 <= index < len(self._irq_fds):
            raise DeviceError(f"ublk ring: unknown completion {_IRQ + index:#x}")
        self._polling[index] = False
        waiter = self.dev.waiter
        assert waiter is not None
        bits = waiter.source.wait(0)
        if bits is not None and bits & IsrBit.CONFIG:
            waiter.on_config()

    def _await_kernel(self) -> None:
        """Look at the ring for the kernel's next request a while before sleeping in
        io_uring_enter: a sleeping server is woken by an inter-processor interrupt,
        which costs a TCG guest about as much as the request itself. With
        COOP_TASKRUN a polling server costs the kernel no IPI: the TASKRUN flag says
        when to enter."""
        ring = self.ring
        for _ in range(IDLE_ROUNDS):
            for _ in range(RING_LOOKS):
                if ring.work_pending():
                    return
            os.sched_yield()

    def _await_device(self) -> None:
        """Completions from the device; commits queued for the next enter. Looks at the
        CQ between looks at the used ring (new requests join the device's work), then
        waits on the device alone: that wait fails a silent device."""
        dev, ring = self.dev, self.ring
        for _ in range(SPIN_ROUNDS):
            for _ in range(RING_LOOKS):
                done = dev.reap(0)
                if done:
                    self._completed(done)
                    return
            if ring.work_pending():
                return
            # fio and the kernel's side of each request need a CPU too (2 vCPUs).
            os.sched_yield()
        self._completed(dev.reap(dev.timeout))

    def _arrived(self, tag: int, res: int) -> None:
        if not 0 <= tag < self.depth:
            raise DeviceError(f"ublk completion for tag {tag} of a {self.depth}-deep queue")
        if res != UBLK_IO_RES_OK:
            self.live -= 1  # aborted (-ENODEV: the device is going away) or refused
            if res != UBLK_IO_RES_ABORT:
                log.warning("ublk tag %d: FETCH/COMMIT failed: %s", tag, os.strerror(-res))
            return
        op_flags, nr, sector, _ = IO_DESC.unpack_from(self.descs, tag * _DESC_BYTES)
        self.stats.requests += 1
        op = op_flags & 0xFF
        nbytes = nr << 9
        if (op <= _WRITE_OP and 0 < nbytes <= self.buf_bytes and sector + nr <= self._capacity
                and not (op and self._read_only)):
            # READ or WRITE that fits (what translate() would say, without its tuple):
            # the hot path.
            req = self.reqs[tag]
            req.type, req.sector, req.count, req.nbytes = _RW_TYPES[op], sector, nr, nbytes
            req.buffer = self.buffers[tag]
            self.results[tag] = nbytes
            self._waiting.append(req)
            return
        plan = translate(op_flags, nr, sector, self.shape, self.buf_bytes)
        if type(plan) is int:
            if plan:
                self.stats.errors += 1
                log.warning("ublk tag %d: op %#x sectors %d+%d refused: %s", tag, op_flags,
                            sector, nr, os.strerror(-plan))
            self._queue_cmd(_COMMIT, tag, plan)
            return
        assert isinstance(plan, Plan)
        req = self.reqs[tag]
        req.type, req.sector, req.count, req.nbytes = plan.type, plan.sector, plan.sectors, \
            plan.nbytes
        req.buffer = self.buffers[tag] if plan.nbytes else None
        if plan.type in _DWZ:
            _DWZ_STRUCT.pack_into(self.buffers[tag].mv, 0, plan.sector, plan.sectors,
                                  plan.dwz_flags)
        self.results[tag] = plan.result
        self._waiting.append(req)

    def _submit(self) -> None:
        try:
            self.dev.submit(self._waiting)
            self._waiting.clear()
            return
        except QueueFull:
            pass
        while self._waiting:  # as many as fit, the rest after completions
            try:
                self.dev.submit(self._waiting[:1])
            except QueueFull:
                return
            self._waiting.pop(0)

    def _completed(self, done: list[Request]) -> None:
        for req in done:
            tag = req.tag
            if req.status == _OK:
                self._queue_cmd(_COMMIT, tag, self.results[tag])
                continue
            self.stats.errors += 1
            err = errno.EOPNOTSUPP if req.status == _UNSUPP else errno.EIO
            log.warning("%s: %s failed (status %s): ublk tag %d gets %s", self.dev.bdf,
                        req, req.status, tag, errno.errorcode[err])
            self._queue_cmd(_COMMIT, tag, -err)

    # -- ending -------------------------------------------------------------------
    def drain(self, timeout: float) -> None:
        """Nothing may stay on the device: the tag buffers are ours until it completes."""
        deadline = time.monotonic() + timeout
        try:
            while self.dev.in_flight and time.monotonic() < deadline:
                self.dev.reap(timeout)
        except VirtioError as exc:  # a broken device has been reset: nothing is out
            log.warning("%s: %s", self.dev.bdf, exc)
        self._waiting.clear()

    def close(self) -> None:
        """Close the ring first: the kernel cancels the FETCH_REQs still pending (they
        never complete by themselves after STOP_DEV), then unmap and close the device."""
        self.ring.close()
        self.descs.release()
        self._descs_mm.close()

