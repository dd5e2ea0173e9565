"""What the kernel is told about the disk (struct ublk_params), from what the virtio
device negotiated, and how a ublk request becomes a virtio-blk request.

Both are pure functions of small records, so unit tests cover them without a kernel.
virtio 1.2, "Block Device: Device configuration layout" and "Device Operation";
include/uapi/linux/ublk_cmd.h for the other side.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..spec import (BLK_DWZ_DTYPE, SECTOR_SIZE, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, Feature,
                    ReqType)
from .spec import PARAMS_DTYPE, Attr, IoFlag, IoOp, ParamType, UBLK_IO_OP_MASK

if TYPE_CHECKING:
    from ..blk import VirtioBlk


@dataclass(frozen=True)
class DiskShape:
    """The virtio disk as the kernel should see it."""
    capacity: int  # sectors
    block_size: int
    read_only: bool = False
    flush: bool = False  # VIRTIO_BLK_F_FLUSH: a volatile write cache
    discard: bool = False
    write_zeroes: bool = False
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0

    @classmethod
    def of(cls, dev: VirtioBlk) -> DiskShape:
        lim = dev.limits
        return cls(dev.capacity, dev.block_size, dev.read_only,
                   dev.has(Feature.VIRTIO_BLK_F_FLUSH), dev.has(Feature.VIRTIO_BLK_F_DISCARD),
                   dev.has(Feature.VIRTIO_BLK_F_WRITE_ZEROES), lim.max_discard_sectors,
                   lim.max_write_zeroes_sectors)


def make_params(shape: DiskShape, max_sectors: int) -> np.ndarray:
    """struct ublk_params for SET_PARAMS: basic always, discard when the device can
    discard or write zeroes. ``max_sectors`` is the largest request one virtio request
    carries (seg_max, size_max, the tag buffer): the block layer splits larger ones, so
    every ublk request maps to exactly one virtio request."""
    p = np.zeros((), PARAMS_DTYPE)
    p["len"] = PARAMS_DTYPE.itemsize
    types = ParamType.UBLK_PARAM_TYPE_BASIC
    shift = shape.block_size.bit_length() - 1
    basic = p["basic"]
    attrs = Attr(0)
    if shape.read_only:
        attrs |= Attr.UBLK_ATTR_READ_ONLY
    if shape.flush:
        attrs |= Attr.UBLK_ATTR_VOLATILE_CACHE  # FUA is emulated by the kernel's flushes
    basic["attrs"] = int(attrs)
    basic["logical_bs_shift"] = basic["physical_bs_shift"] = shift
    basic["io_min_shift"] = basic["io_opt_shift"] = shift
    per_block = shape.block_size // SECTOR_SIZE
    basic["max_sectors"] = max_sectors // per_block * per_block
    basic["dev_sectors"] = shape.capacity
    if (shape.discard or shape.write_zeroes) and not shape.read_only:
        types |= ParamType.UBLK_PARAM_TYPE_DISCARD
        d = p["discard"]
        d["discard_granularity"] = shape.block_size
        if shape.discard:
            d["max_discard_sectors"] = _blocks(shape.max_discard_sectors, per_block)
            d["max_discard_segments"] = 1  # one range per virtio request
        if shape.write_zeroes:
            d["max_write_zeroes_sectors"] = _blocks(shape.max_write_zeroes_sectors, per_block)
    p["types"] = int(types)
    return p


def _blocks(sectors: int, per_block: int) -> int:
    return min(sectors, 0xFFFF_FFFF) // per_block * per_block


class Plan(NamedTuple):
    """One virtio request for one ublk request: type, first sector, sectors, bytes of
    the tag buffer it carries (or holding its discard range), write-zeroes flags, and
    the result to commit on success."""
    type: ReqType
    sector: int
    sectors: int
    nbytes: int
    dwz_flags: int
    result: int


_RW = {IoOp.UBLK_IO_OP_READ: ReqType.VIRTIO_BLK_T_IN,
       IoOp.UBLK_IO_OP_WRITE: ReqType.VIRTIO_BLK_T_OUT}
_NOUNMAP = int(IoFlag.UBLK_IO_F_NOUNMAP)
_DWZ_BYTES = BLK_DWZ_DTYPE.itemsize  # one struct virtio_blk_discard_write_zeroes


def translate(op_flags: int, nr_sectors: int, start_sector: int, shape: DiskShape,
              buf_bytes: int) -> Plan | int:
    """The virtio request for a ublksrv_io_desc, or the negative errno to commit
    without one. The kernel is trusted to stay within what SET_PARAMS allowed, but a
    descriptor is still checked before it names our DMA buffer and the device."""
    op = op_flags & UBLK_IO_OP_MASK
    if op == IoOp.UBLK_IO_OP_FLUSH:
        if not shape.flush:
            return 0  # no volatile cache: nothing to make durable
        return Plan(ReqType.VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0, 0)
    if nr_sectors <= 0 or start_sector + nr_sectors > shape.capacity:
        return -errno.EINVAL
    if op in _RW:
        nbytes = nr_sectors * SECTOR_SIZE
        if nbytes > buf_bytes:
            return -errno.EINVAL
        if op == IoOp.UBLK_IO_OP_WRITE and shape.read_only:
            return -errno.EROFS
        return Plan(_RW[IoOp(op)], start_sector, nr_sectors, nbytes, 0, nbytes)
    if shape.read_only:
        return -errno.EROFS
    if op == IoOp.UBLK_IO_OP_DISCARD and shape.discard:
        if nr_sectors > shape.max_discard_sectors:
            return -errno.EINVAL
        return Plan(ReqType.VIRTIO_BLK_T_DISCARD, start_sector, nr_sectors, _DWZ_BYTES, 0, 0)
    if op == IoOp.UBLK_IO_OP_WRITE_ZEROES and shape.write_zeroes:
        if nr_sectors > shape.max_write_zeroes_sectors:
            return -errno.EINVAL
        flags = 0 if op_flags & _NOUNMAP else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        return Plan(ReqType.VIRTIO_BLK_T_WRITE_ZEROES, start_sector, nr_sectors, _DWZ_BYTES, flags, 0)
    return -errno.EOPNOTSUPP
