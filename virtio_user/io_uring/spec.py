"""io_uring's user-space interface, declared once: include/uapi/linux/io_uring.h.

The structs are numpy structured dtypes with explicit little-endian fields (the layout)
and, for the hot path, ``struct.Struct`` formats derived from those same dtypes
(``struct_of``), so no offset is counted by hand twice. Syscall numbers are x86-64's
(arch/x86/entry/syscalls/syscall_64.tbl).
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

import numpy as np

SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
SYS_io_uring_register = 427


class Setup(IntFlag):
    """io_uring_params.flags (IORING_SETUP_*)."""
    IORING_SETUP_IOPOLL = 1 << 0
    IORING_SETUP_SQPOLL = 1 << 1
    IORING_SETUP_CQSIZE = 1 << 3
    IORING_SETUP_CLAMP = 1 << 4
    IORING_SETUP_SUBMIT_ALL = 1 << 7
    IORING_SETUP_COOP_TASKRUN = 1 << 8  # no IPI for task work: it runs at our next entry
    IORING_SETUP_TASKRUN_FLAG = 1 << 9  # ...and sq.flags says when some is pending
    IORING_SETUP_SQE128 = 1 << 10  # 128-byte SQEs: room for a URING_CMD's 80-byte payload
    IORING_SETUP_CQE32 = 1 << 11  # 32-byte CQEs
    IORING_SETUP_SINGLE_ISSUER = 1 << 12


class Feat(IntFlag):
    """io_uring_params.features (IORING_FEAT_*)."""
    IORING_FEAT_SINGLE_MMAP = 1 << 0
    IORING_FEAT_NODROP = 1 << 1
    IORING_FEAT_EXT_ARG = 1 << 8


class SqFlag(IntFlag):
    """The SQ ring's flags word (IORING_SQ_*)."""
    IORING_SQ_NEED_WAKEUP = 1 << 0
    IORING_SQ_CQ_OVERFLOW = 1 << 1
    IORING_SQ_TASKRUN = 1 << 2  # task work waits for an io_uring_enter (TASKRUN_FLAG)


class Enter(IntFlag):
    """io_uring_enter flags (IORING_ENTER_*)."""
    IORING_ENTER_GETEVENTS = 1 << 0
    IORING_ENTER_EXT_ARG = 1 << 3


class Op(IntEnum):
    """sqe.opcode (enum io_uring_op): only the ones used here."""
    IORING_OP_NOP = 0
    IORING_OP_POLL_ADD = 6
    IORING_OP_ASYNC_CANCEL = 14
    IORING_OP_URING_CMD = 46


class SqeFlag(IntFlag):
    IOSQE_FIXED_FILE = 1 << 0
    IOSQE_ASYNC = 1 << 4


# mmap offsets of the three regions of a ring fd.
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# struct io_sqring_offsets / io_cqring_offsets: byte offsets inside the ring mappings.
SQRING_OFFSETS_DTYPE = np.dtype([
    ("head", "<u4"), ("tail", "<u4"), ("ring_mask", "<u4"), ("ring_entries", "<u4"),
    ("flags", "<u4"), ("dropped", "<u4"), ("array", "<u4"), ("resv1", "<u4"),
    ("user_addr", "<u8")])
CQRING_OFFSETS_DTYPE = np.dtype([
    ("head", "<u4"), ("tail", "<u4"), ("ring_mask", "<u4"), ("ring_entries", "<u4"),
    ("overflow", "<u4"), ("cqes", "<u4"), ("flags", "<u4"), ("resv1", "<u4"),
    ("user_addr", "<u8")])

# struct io_uring_params: what io_uring_setup reads (entries, flags) and fills in.
PARAMS_DTYPE = np.dtype([
    ("sq_entries", "<u4"), ("cq_entries", "<u4"), ("flags", "<u4"),
    ("sq_thread_cpu", "<u4"), ("sq_thread_idle", "<u4"), ("features", "<u4"),
    ("wq_fd", "<u4"), ("resv", "<u4", (3,)),
    ("sq_off", SQRING_OFFSETS_DTYPE), ("cq_off", CQRING_OFFSETS_DTYPE)])

# struct io_uring_sqe, the 64-byte part. Unions are named by the member used here:
# ``off`` is {off, addr2, {cmd_op, __pad1}}, ``op_flags`` is {rw_flags, poll32_events,
# uring_cmd_flags, ...}, ``file_index`` is {splice_fd_in, file_index, ...}. For
# IORING_OP_URING_CMD the command's own payload (``cmd[]``) starts at CMD_OFFSET, over
# addr3 and __pad2, and runs on into the second 64 bytes of an SQE128 entry.
SQE_DTYPE = np.dtype([
    ("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"),
    ("off", "<u8"), ("addr", "<u8"), ("len", "<u4"), ("op_flags", "<u4"),
    ("user_data", "<u8"), ("buf_index", "<u2"), ("personality", "<u2"),
    ("file_index", "<i4"), ("addr3", "<u8"), ("pad2", "<u8")])
SQE_BYTES = 64
SQE128_BYTES = 128
# The same head with ``off`` seen as {cmd_op (le32), __pad1 (le32)}, ending where cmd[]
# begins: what a URING_CMD writes before its payload.
URING_CMD_HEAD_DTYPE = np.dtype([
    ("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"),
    ("cmd_op", "<u4"), ("pad1", "<u4"), ("addr", "<u8"), ("len", "<u4"),
    ("op_flags", "<u4"), ("user_data", "<u8"), ("buf_index", "<u2"),
    ("personality", "<u2"), ("file_index", "<i4")])
CMD_OFFSET = 48  # offsetof(struct io_uring_sqe, cmd)
CMD_BYTES_SQE128 = SQE128_BYTES - CMD_OFFSET  # 80

# struct io_uring_cqe: user_data, res, flags; with IORING_SETUP_CQE32, big_cqe[2] (u64).
CQE_DTYPE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])
CQE32_DTYPE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4"),
                        ("big_cqe", "<u8", (2,))])

# struct io_uring_getevents_arg (IORING_ENTER_EXT_ARG) and struct __kernel_timespec.
GETEVENTS_ARG_DTYPE = np.dtype([("sigmask", "<u8"), ("sigmask_sz", "<u4"),
                                ("min_wait_usec", "<u4"), ("ts", "<u8")])
TIMESPEC_DTYPE = np.dtype([("tv_sec", "<i8"), ("tv_nsec", "<i8")])

_CODES = {np.dtype("u1"): "B", np.dtype("<u2"): "H", np.dtype("<u4"): "I",
          np.dtype("<u8"): "Q", np.dtype("<i4"): "i", np.dtype("<i8"): "q",
          np.dtype("<i2"): "h"}


def struct_of(*dtypes: np.dtype) -> struct.Struct:
    """The little-endian ``struct`` format of packed structured dtypes laid end to end
    (scalar fields, no holes): the hot path packs with it, the dtype stays the
    declaration. Raises ValueError for a field it cannot express or a hole."""
    fmt = "<"
    for dt in dtypes:
        at = 0
        for name in dt.names or ():
            fdt, off = dt.fields[name][:2]  # type: ignore[index]
            if off != at or fdt not in _CODES:
                raise ValueError(f"{name}: offset {off}, {fdt} is not a packed scalar")
            fmt += _CODES[fdt]
            at += fdt.itemsize
        if at != dt.itemsize:
            raise ValueError(f"{dt}: {dt.itemsize - at} bytes of trailing padding")
    return struct.Struct(fmt)


# Hot-path views of the declarations above.
URING_CMD_HEAD = struct_of(URING_CMD_HEAD_DTYPE)
CQE = struct_of(CQE_DTYPE)

assert SQE_DTYPE.itemsize == SQE_BYTES
assert URING_CMD_HEAD.size == CMD_OFFSET
assert PARAMS_DTYPE.itemsize == 120
assert CQE_DTYPE.itemsize == 16 and CQE32_DTYPE.itemsize == 32
assert GETEVENTS_ARG_DTYPE.itemsize == 24
