"""The NBD wire, declared once: include/uapi/linux/nbd.h (the structs, commands,
flags and ioctls) and the NBD protocol's "Transmission phase" (doc/proto.md)."""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, NamedTuple

from ..errors import ProtocolError
from ..spec import Feature

if TYPE_CHECKING:
    from ..blk import VirtioBlk

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
# struct nbd_request: magic (be32), type (be32: command flags << 16 | command),
# cookie (8 bytes, echoed in the reply), from (be64, bytes), len (be32, bytes)
REQUEST = struct.Struct(">II8sQI")
# struct nbd_reply: magic (be32), error (be32, an errno), cookie (8 bytes)
REPLY = struct.Struct(">II8s")


class Cmd(IntEnum):
    """NBD_CMD_*: the low 16 bits of a request's type."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


class CmdFlag(IntFlag):
    """NBD_CMD_FLAG_*: the high 16 bits of a request's type, as the kernel sends them."""

    FUA = 1 << 16
    NO_HOLE = 1 << 17  # write zeroes: do not deallocate


class Flag(IntFlag):
    """NBD_FLAG_*: the transmission flags (NBD_SET_FLAGS)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6


class Ioctl(IntEnum):
    """The nbd ioctls: _IO(0xab, nr)."""

    SET_SOCK = 0xAB00
    SET_BLKSIZE = 0xAB01
    DO_IT = 0xAB03
    CLEAR_SOCK = 0xAB04
    CLEAR_QUE = 0xAB05
    SET_SIZE_BLOCKS = 0xAB07
    DISCONNECT = 0xAB08
    SET_TIMEOUT = 0xAB09
    SET_FLAGS = 0xAB0A


class NbdRequest(NamedTuple):
    cmd: int
    flags: int  # CmdFlag bits
    cookie: bytes
    offset: int
    length: int


def parse_request(raw: bytes | bytearray | memoryview) -> NbdRequest:
    """One request header; ProtocolError for a bad magic or a command we do not know."""
    magic, type_, cookie, offset, length = REQUEST.unpack(raw)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x} (expected {REQUEST_MAGIC:#010x})")
    cmd = type_ & 0xFFFF
    if cmd not in _COMMANDS:
        raise ProtocolError(f"unknown command {cmd} (type {type_:#x})")
    return NbdRequest(cmd, type_ & 0xFFFF0000, cookie, offset, length)


_COMMANDS = frozenset(int(c) for c in Cmd)
# Plain ints and names for the per-request path: an enum lookup or an IntFlag operation
# runs Python code in the enum module, and under TCG each costs tens of microseconds.
CMD_NAMES = {int(c): c.name for c in Cmd}
FUA_FLAG, NO_HOLE_FLAG = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
NEEDS_FLAG = {int(Cmd.TRIM): int(Flag.SEND_TRIM),
               int(Cmd.WRITE_ZEROES): int(Flag.SEND_WRITE_ZEROES)}


def pack_reply(error: int, cookie: bytes) -> bytes:
    return REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def transmission_flags(dev: VirtioBlk) -> Flag:
    """What the kernel may send, from what the device negotiated."""
    flags = Flag.HAS_FLAGS
    if dev.read_only:
        return flags | Flag.READ_ONLY
    if dev.has(Feature.VIRTIO_BLK_F_FLUSH):
        flags |= Flag.SEND_FLUSH | Flag.SEND_FUA
    if dev.has(Feature.VIRTIO_BLK_F_DISCARD):
        flags |= Flag.SEND_TRIM
    if dev.has(Feature.VIRTIO_BLK_F_WRITE_ZEROES):
        flags |= Flag.SEND_WRITE_ZEROES
    return flags


