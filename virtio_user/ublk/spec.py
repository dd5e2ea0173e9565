"""ublk's user-space interface, declared once: include/uapi/linux/ublk_cmd.h (Linux 6.12).

Control commands go to /dev/ublk-control, I/O commands to /dev/ublkcN, each as one
IORING_OP_URING_CMD whose ``cmd_op`` is the ioctl-encoded command code (the kernel
accepts the legacy plain codes only with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES) and whose
payload (``ublksrv_ctrl_cmd``, ``ublksrv_io_cmd``) sits at the SQE's ``cmd`` offset.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

import numpy as np

from ..io_uring.spec import URING_CMD_HEAD_DTYPE, struct_of

CONTROL_PATH = "/dev/ublk-control"


def char_path(dev_id: int) -> str:
    return f"/dev/ublkc{dev_id}"


def block_path(dev_id: int) -> str:
    return f"/dev/ublkb{dev_id}"


# include/uapi/asm-generic/ioctl.h: dir (2 bits) << 30 | size (14) << 16 | type << 8 | nr
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("u") << 8 | nr


# struct ublksrv_ctrl_cmd: the payload of every control command.
CTRL_CMD_DTYPE = np.dtype([
    ("dev_id", "<u4"), ("queue_id", "<u2"), ("len", "<u2"), ("addr", "<u8"),
    ("data", "<u8"), ("dev_path_len", "<u2"), ("pad", "<u2"), ("reserved", "<u4")])

# struct ublksrv_io_cmd: FETCH_REQ / COMMIT_AND_FETCH_REQ payload.
IO_CMD_DTYPE = np.dtype([("q_id", "<u2"), ("tag", "<u2"), ("result", "<i4"),
                         ("addr", "<u8")])

# struct ublksrv_io_desc: what the driver writes per tag in the mmapped area of
# /dev/ublkcN (read-only for us); op in bits 0-7 of op_flags, flags above.
IO_DESC_DTYPE = np.dtype([("op_flags", "<u4"), ("nr_sectors", "<u4"),
                          ("start_sector", "<u8"), ("addr", "<u8")])

# struct ublksrv_ctrl_dev_info: ADD_DEV's argument and answer, GET_DEV_INFO's answer.
DEV_INFO_DTYPE = np.dtype([
    ("nr_hw_queues", "<u2"), ("queue_depth", "<u2"), ("state", "<u2"), ("pad0", "<u2"),
    ("max_io_buf_bytes", "<u4"), ("dev_id", "<u4"), ("ublksrv_pid", "<i4"),
    ("pad1", "<u4"), ("flags", "<u8"), ("ublksrv_flags", "<u8"), ("owner_uid", "<u4"),
    ("owner_gid", "<u4"), ("reserved1", "<u8"), ("reserved2", "<u8")])

# struct ublk_param_basic / _discard / _devt / _zoned, and struct ublk_params (8-byte
# aligned: basic holds u64s, so the whole is padded to a multiple of 8).
PARAM_BASIC_DTYPE = np.dtype([
    ("attrs", "<u4"), ("logical_bs_shift", "u1"), ("physical_bs_shift", "u1"),
    ("io_opt_shift", "u1"), ("io_min_shift", "u1"), ("max_sectors", "<u4"),
    ("chunk_sectors", "<u4"), ("dev_sectors", "<u8"), ("virt_boundary_mask", "<u8")])
PARAM_DISCARD_DTYPE = np.dtype([
    ("discard_alignment", "<u4"), ("discard_granularity", "<u4"),
    ("max_discard_sectors", "<u4"), ("max_write_zeroes_sectors", "<u4"),
    ("max_discard_segments", "<u2"), ("reserved0", "<u2")])
PARAM_DEVT_DTYPE = np.dtype([("char_major", "<u4"), ("char_minor", "<u4"),
                             ("disk_major", "<u4"), ("disk_minor", "<u4")])
PARAM_ZONED_DTYPE = np.dtype([("max_open_zones", "<u4"), ("max_active_zones", "<u4"),
                              ("max_zone_append_sectors", "<u4"), ("reserved", "u1", (20,))])
PARAMS_DTYPE = np.dtype({
    "names": ["len", "types", "basic", "discard", "devt", "zoned"],
    "formats": ["<u4", "<u4", PARAM_BASIC_DTYPE, PARAM_DISCARD_DTYPE, PARAM_DEVT_DTYPE,
                PARAM_ZONED_DTYPE],
    "offsets": [0, 4, 8, 40, 60, 76], "itemsize": 112})


class CtrlCmd(IntEnum):
    """UBLK_U_CMD_*: control commands, ioctl-encoded with struct ublksrv_ctrl_cmd."""
    UBLK_U_CMD_GET_DEV_INFO = _ioc(_IOC_READ, 0x02, CTRL_CMD_DTYPE.itemsize)
    UBLK_U_CMD_ADD_DEV = _ioc(_IOC_READ | _IOC_WRITE, 0x04, CTRL_CMD_DTYPE.itemsize)
    UBLK_U_CMD_DEL_DEV = _ioc(_IOC_READ | _IOC_WRITE, 0x05, CTRL_CMD_DTYPE.itemsize)
    UBLK_U_CMD_START_DEV = _ioc(_IOC_READ | _IOC_WRITE, 0x06, CTRL_CMD_DTYPE.itemsize)
    UBLK_U_CMD_STOP_DEV = _ioc(_IOC_READ | _IOC_WRITE, 0x07, CTRL_CMD_DTYPE.itemsize)
    UBLK_U_CMD_SET_PARAMS = _ioc(_IOC_READ | _IOC_WRITE, 0x08, CTRL_CMD_DTYPE.itemsize)
    UBLK_U_CMD_GET_PARAMS = _ioc(_IOC_READ, 0x09, CTRL_CMD_DTYPE.itemsize)


class IoCmd(IntEnum):
    """UBLK_U_IO_*: per-tag commands, ioctl-encoded with struct ublksrv_io_cmd."""
    UBLK_U_IO_FETCH_REQ = _ioc(_IOC_READ | _IOC_WRITE, 0x20, IO_CMD_DTYPE.itemsize)
    UBLK_U_IO_COMMIT_AND_FETCH_REQ = _ioc(_IOC_READ | _IOC_WRITE, 0x21,
                                          IO_CMD_DTYPE.itemsize)


class IoOp(IntEnum):
    """UBLK_IO_OP_*: ublksrv_io_desc.op_flags & 0xff."""
    UBLK_IO_OP_READ = 0
    UBLK_IO_OP_WRITE = 1
    UBLK_IO_OP_FLUSH = 2
    UBLK_IO_OP_DISCARD = 3
    UBLK_IO_OP_WRITE_SAME = 4
    UBLK_IO_OP_WRITE_ZEROES = 5


class IoFlag(IntFlag):
    """UBLK_IO_F_*: ublksrv_io_desc.op_flags above bit 8."""
    UBLK_IO_F_FAILFAST_DEV = 1 << 8
    UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
    UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
    UBLK_IO_F_META = 1 << 11
    UBLK_IO_F_FUA = 1 << 13
    UBLK_IO_F_NOUNMAP = 1 << 15
    UBLK_IO_F_SWAP = 1 << 16


class DevFlag(IntFlag):
    """UBLK_F_*: ublksrv_ctrl_dev_info.flags."""
    UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
    UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
    UBLK_F_NEED_GET_DATA = 1 << 2
    UBLK_F_USER_RECOVERY = 1 << 3
    UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
    UBLK_F_UNPRIVILEGED_DEV = 1 << 5
    UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
    UBLK_F_USER_COPY = 1 << 7
    UBLK_F_ZONED = 1 << 8


class DevState(IntEnum):
    """UBLK_S_DEV_*: ublksrv_ctrl_dev_info.state."""
    UBLK_S_DEV_DEAD = 0
    UBLK_S_DEV_LIVE = 1
    UBLK_S_DEV_QUIESCED = 2


class Attr(IntFlag):
    """UBLK_ATTR_*: ublk_param_basic.attrs."""
    UBLK_ATTR_READ_ONLY = 1 << 0
    UBLK_ATTR_ROTATIONAL = 1 << 1
    UBLK_ATTR_VOLATILE_CACHE = 1 << 2
    UBLK_ATTR_FUA = 1 << 3


class ParamType(IntFlag):
    """UBLK_PARAM_TYPE_*: ublk_params.types."""
    UBLK_PARAM_TYPE_BASIC = 1 << 0
    UBLK_PARAM_TYPE_DISCARD = 1 << 1
    UBLK_PARAM_TYPE_DEVT = 1 << 2
    UBLK_PARAM_TYPE_ZONED = 1 << 3


UBLK_IO_RES_OK = 0
UBLK_IO_RES_ABORT = -19  # -ENODEV: the queue is going away; the tag will not come back
UBLKSRV_CMD_BUF_OFFSET = 0  # mmap offset of queue 0's descriptors on /dev/ublkcN
UBLK_MAX_QUEUE_DEPTH = 4096
UBLK_MAX_NR_QUEUES = 4096
UBLK_IO_OP_MASK = 0xFF

# Hot path: a whole URING_CMD SQE for an I/O command, and one descriptor.
IO_CMD_SQE = struct_of(URING_CMD_HEAD_DTYPE, IO_CMD_DTYPE)
IO_DESC = struct_of(IO_DESC_DTYPE)
CTRL_CMD = struct_of(CTRL_CMD_DTYPE)


def desc_area_bytes(depth: int, page: int = 4096) -> int:
    """The bytes of one queue's descriptor area (ublk_queue_cmd_buf_size): depth
    descriptors, rounded up to whole pages."""
    return -(-depth * IO_DESC_DTYPE.itemsize // page) * page


assert CTRL_CMD_DTYPE.itemsize == 32 and IO_CMD_DTYPE.itemsize == 16
assert IO_DESC_DTYPE.itemsize == 24 and DEV_INFO_DTYPE.itemsize == 64
assert PARAM_BASIC_DTYPE.itemsize == 32 and PARAM_DISCARD_DTYPE.itemsize == 20
assert IO_CMD_SQE.size == 64
