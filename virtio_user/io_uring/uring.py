"""One io_uring instance through the kernel's own interface: ``io_uring_setup`` and
``io_uring_enter`` called through ``syscall(2)`` (ctypes), the SQ ring, the CQ ring and
the SQE array mmapped from the ring fd. This module owns those mappings (and the one of
a device that shares its memory with user space through mmap, ``map_readonly``).

Why not a binding: liburing is C (a Python binding would need a compiler in the guest),
and the Python packages for it we could find do not expose SQE128/CQE32 and URING_CMD;
the interface is four words per ring and two syscalls, declared in spec.py.

Memory ordering (the kernel's side is in io_uring/io_uring.c: it reads ``sq.tail`` with
smp_load_acquire and publishes ``cq.tail`` with smp_store_release). On x86-64 (TSO)
stores become visible in program order and loads are not reordered with other loads
or with later stores; each Python statement below is a separate C call the compiler
cannot move accesses across. So: an SQE's bytes are stored before the tail word that
publishes it (release by program order); the CQ tail is loaded before the CQEs it
covers (acquire by program order), and the CQ head that gives those slots back is
stored after the CQEs were read. The virtqueue relies on the same rules.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from typing import Any

import numpy as np

from ..errors import CannotOpen, VirtioError
from .spec import (CQE, CQE32_DTYPE, CQE_DTYPE, Enter, Feat, GETEVENTS_ARG_DTYPE,
                   IORING_OFF_CQ_RING, IORING_OFF_SQ_RING, IORING_OFF_SQES, PARAMS_DTYPE,
                   SQE128_BYTES, SQE_BYTES, SYS_io_uring_enter, SYS_io_uring_setup, Setup, SqFlag,
                   TIMESPEC_DTYPE)

assert platform.machine() in ("x86_64", "AMD64"), "ordering argued for x86-64 (TSO) only"

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_WORD = 4
_GETEVENTS = int(Enter.IORING_ENTER_GETEVENTS)
_EXT_ARG = int(Enter.IORING_ENTER_EXT_ARG)
_TASKRUN = int(SqFlag.IORING_SQ_TASKRUN)


class RingFull(VirtioError):
    """No free SQE: submit (io_uring_enter) what is queued first."""


class RingError(CannotOpen):
    """io_uring_setup or io_uring_enter failed; errno kept."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


def syscall(number: int, *args: int) -> int:
    """``syscall(2)``: the result, or -errno (the kernel's own convention)."""
    ret = _syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    return int(ret) if ret >= 0 else -ctypes.get_errno()


def map_readonly(fd: int, length: int, offset: int) -> mmap.mmap:
    """A shared read-only mapping of ``fd`` (a device that publishes into it)."""
    return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset)


class Ring:
    """An io_uring with ``entries`` SQEs (SQE128 and CQE32 by default: what URING_CMD
    to ublk needs). Not thread-safe: one thread submits and reaps."""

    def __init__(self, entries: int,
                 flags: Setup = Setup.IORING_SETUP_SQE128 | Setup.IORING_SETUP_CQE32) -> None:
        params = np.zeros((), PARAMS_DTYPE)
        params["flags"] = int(flags)
        fd = syscall(SYS_io_uring_setup, entries, params.ctypes.data)
        if fd < 0:
            hint = (" (io_uring disabled: /proc/sys/kernel/io_uring_disabled)"
                    if -fd == errno.EPERM else "")
            raise RingError(f"io_uring_setup({entries}): {os.strerror(-fd)}{hint}", -fd)
        self.fd = fd
        self._maps: list[mmap.mmap] = []
        try:
            self._map(params, flags)
        except BaseException:
            self.close()
            raise
        self.features = Feat(int(params["features"]))
        if not self.features & Feat.IORING_FEAT_EXT_ARG:
            self.close()
            raise RingError("io_uring without IORING_FEAT_EXT_ARG (Linux < 5.11): "
                            "no bounded wait", errno.ENOSYS)
        self._arg = np.zeros((), GETEVENTS_ARG_DTYPE)
        self._ts = np.zeros((), TIMESPEC_DTYPE)
        self._arg["ts"] = self._ts.ctypes.data
        self._arg_addr = self._arg.ctypes.data
        self._tail = self._sq[self._sq_tail]  # our shadow of sq.tail
        self._submitted = self._tail
        self._cq_head_val = self._cq[self._cq_head]

    def _map(self, params: Any, flags: Setup) -> None:
        sq_off, cq_off = params["sq_off"], params["cq_off"]
        self.sq_entries = int(params["sq_entries"])
        self.cq_entries = int(params["cq_entries"])
        self.sqe_bytes = SQE128_BYTES if flags & Setup.IORING_SETUP_SQE128 else SQE_BYTES
        self.cqe_bytes = (CQE32_DTYPE if flags & Setup.IORING_SETUP_CQE32
                          else CQE_DTYPE).itemsize
        sq_len = int(sq_off["array"]) + self.sq_entries * _WORD
        cq_len = int(cq_off["cqes"]) + self.cq_entries * self.cqe_bytes
        if int(params["features"]) & Feat.IORING_FEAT_SINGLE_MMAP:
            sq_mm = cq_mm = self._mmap(max(sq_len, cq_len), IORING_OFF_SQ_RING)
        else:
            sq_mm = self._mmap(sq_len, IORING_OFF_SQ_RING)
            cq_mm = self._mmap(cq_len, IORING_OFF_CQ_RING)
        sqes_mm = self._mmap(self.sq_entries * self.sqe_bytes, IORING_OFF_SQES)
        # Index words as memoryview casts (plain ints per access: the hot path).
        self._sq = memoryview(sq_mm).cast("I")
        self._cq = memoryview(cq_mm).cast("I")
        self._sq_head = int(sq_off["head"]) // _WORD
        self._sq_tail = int(sq_off["tail"]) // _WORD
        self._sq_mask = self._sq[int(sq_off["ring_mask"]) // _WORD]
        self._sq_flags = int(sq_off["flags"]) // _WORD
        self._cq_head = int(cq_off["head"]) // _WORD
        self._cq_tail = int(cq_off["tail"]) // _WORD
        self._cq_mask = self._cq[int(cq_off["ring_mask"]) // _WORD]
        self._cqes_off = int(cq_off["cqes"])
        self.cq_mv = memoryview(cq_mm)
        self.sqes_mv = memoryview(sqes_mm)
        # The SQ's indirection array, identity once and for all: SQE i is slot i.
        array = int(sq_off["array"]) // _WORD
        for i in range(self.sq_entries):
            self._sq[array + i] = i
        # Structured views, for inspection and tests (the hot path packs bytes).
        self.cqes = np.frombuffer(cq_mm, CQE32_DTYPE if self.cqe_bytes == 32 else CQE_DTYPE,
                                  self.cq_entries, self._cqes_off)

    def _mmap(self, length: int, offset: int) -> mmap.mmap:
        mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(mm)
        return mm

    # -- submission ---------------------------------------------------------------
    def next_sqe(self) -> int:
        """The byte offset in ``sqes_mv`` of the next free SQE, taken (the caller fills
        it before the next ``enter``). RingFull if the kernel has not consumed enough."""
        if self._tail - self._sq[self._sq_head] >= self.sq_entries:
            raise RingFull(f"all {self.sq_entries} SQEs are queued")
        off = (self._tail & self._sq_mask) * self.sqe_bytes
        self._tail = (self._tail + 1) & 0xFFFF_FFFF
        return off

    @property
    def queued(self) -> int:
        """SQEs taken and not yet handed to the kernel."""
        return (self._tail - self._submitted) & 0xFFFF_FFFF

    def enter(self, wait_nr: int = 0, timeout: float | None = None) -> int:
        """Publish the queued SQEs and submit them; with ``wait_nr``, wait up to
        ``timeout`` seconds (None: no limit) for that many completions. Returns how many
        SQEs the kernel took. A signal or the timeout ends the wait early, silently."""
        to_submit = self.queued
        self._sq[self._sq_tail] = self._tail  # release: the SQEs were stored before
        flags, arg, argsz = _GETEVENTS, 0, 0
        if wait_nr and timeout is not None:
            sec = int(timeout)
            self._ts["tv_sec"], self._ts["tv_nsec"] = sec, int((timeout - sec) * 1e9)
            flags |= _EXT_ARG
            arg, argsz = self._arg_addr, GETEVENTS_ARG_DTYPE.itemsize
        ret = syscall(SYS_io_uring_enter, self.fd, to_submit, wait_nr, flags, arg, argsz)
        if ret < 0:
            if -ret in (errno.EINTR, errno.ETIME, errno.EAGAIN, errno.EBUSY):
                return 0  # nothing taken; the caller looks again
            raise RingError(f"io_uring_enter: {os.strerror(-ret)}", -ret)
        self._submitted = (self._submitted + ret) & 0xFFFF_FFFF
        return ret

    # -- completion ---------------------------------------------------------------
    def ready(self) -> int:
        """Completions waiting in the CQ (no system call)."""
        return (self._cq[self._cq_tail] - self._cq_head_val) & 0xFFFF_FFFF

    def work_pending(self) -> bool:
        """Completions to reap, or (IORING_SETUP_TASKRUN_FLAG) task work that posts
        them at our next io_uring_enter: no system call."""
        return bool(self._cq[self._cq_tail] != self._cq_head_val
                    or self._sq[self._sq_flags] & _TASKRUN)

    def reap(self) -> list[tuple[int, int, int]]:
        """Every waiting completion as (user_data, res, flags), oldest first; their
        slots go back to the kernel."""
        head = self._cq_head_val
        tail = self._cq[self._cq_tail]  # acquire: the CQEs below are read after it
        if head == tail:
            return []
        mv, base, size, mask, unpack = (self.cq_mv, self._cqes_off, self.cqe_bytes,
                                        self._cq_mask, CQE.unpack_from)
        out = []
        while head != tail:
            out.append(unpack(mv, base + (head & mask) * size))
            head = (head + 1) & 0xFFFF_FFFF
        self._cq_head_val = head
        self._cq[self._cq_head] = head  # after the reads: the slots are the kernel's again
        return out

    def close(self) -> None:
        """Unmap and close; the kernel cancels what is still pending on the ring."""
        for view in ("_sq", "_cq", "cq_mv", "sqes_mv"):
            mv = getattr(self, view, None)
            if mv is not None:
                mv.release()
        self.cqes = None  # type: ignore[assignment]
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view still exported: the GC unmaps it later
                pass
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
