"""The device side of a packed virtqueue ("Packed Virtqueues"), for unit tests.

It works on the very ring memory the driver wrote, through bus addresses, as a device
would: ``take`` collects available chains (following NEXT and indirect tables),
``complete`` writes a used descriptor at the device's used position, in whatever
buffer order a test asks for. Knobs let a test misbehave on purpose (a used descriptor
with the wrong wrap bits, an unknown buffer ID, a length too large) and set the device
event suppression structure. ``serve_blk`` answers virtio-blk requests from a bytearray.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtio_user.memory import DmaRegion
from virtio_user.spec import (SECTOR_SIZE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, BlkStatus,
                              DescFlag, ReqType)

_DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = (int(DescFlag.VIRTQ_DESC_F_NEXT), int(DescFlag.VIRTQ_DESC_F_WRITE),
                         int(DescFlag.VIRTQ_DESC_F_INDIRECT))
AVAIL, USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED


@dataclass
class Buffer:
    """One available chain as the device took it."""

    id: int
    segs: list[tuple[int, int, bool]]  # (bus, len, device-writable)
    slots: int  # ring descriptors it occupied
    indirect: bool

    @property
    def writable(self) -> int:
        return sum(n for _, n, w in self.segs if w)


class PackedDevice:
    """One packed queue of ``size`` descriptors at ``desc``/``driver``/``device`` (bus
    addresses inside ``regions``)."""

    def __init__(self, regions: list[DmaRegion], size: int, desc: int, driver: int,
                 device: int) -> None:
        self.regions = regions
        self.size = size
        self.desc, self.driver, self.device = desc, driver, device
        self.avail_pos, self.avail_wrap = 0, 1
        self.used_pos, self.used_wrap = 0, 1
        self.taken: dict[int, Buffer] = {}

    # -- memory -----------------------------------------------------------------------
    def mem(self, bus: int, length: int) -> memoryview:
        for region in self.regions:
            try:
                off = region.offset_of(bus)
            except KeyError:
                continue
            assert off + length <= region.size, f"DMA at {bus:#x}+{length} runs off"
            return memoryview(region.mm)[off:off + length]
        raise AssertionError(f"device DMA to {bus:#x}, outside any region")

    def read_desc(self, bus: int) -> tuple[int, int, int, int]:
        addr, length, bid, flags = _DESC.unpack(self.mem(bus, 16))
        return addr, length, bid, flags

    def _u16(self, bus: int) -> int:
        return int(struct.unpack("<H", self.mem(bus, 2))[0])

    # -- event suppression ----------------------------------------------------------
    @property
    def driver_event_flags(self) -> int:
        return self._u16(self.driver + 2)

    def suppress(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        """Write the device event suppression structure (off_wrap, flags)."""
        self.mem(self.device, 4)[:] = struct.pack("<HH", off | wrap << 15, flags)

    # -- available side -------------------------------------------------------------
    def _is_avail(self, flags: int) -> bool:
        return bool(flags & AVAIL) == bool(self.avail_wrap) and \
            bool(flags & USED) != bool(self.avail_wrap)

    def take(self, limit: int | None = None) -> list[Buffer]:
        """Every available chain from the device's avail position, in ring order."""
        got: list[Buffer] = []
        while limit is None or len(got) < limit:
            addr, length, bid, flags = self.read_desc(self.desc + 16 * self.avail_pos)
            if not self._is_avail(flags):
                break
            segs: list[tuple[int, int, bool]] = []
            slots = 0
            indirect = False
            while True:
                slots += 1
                if flags & INDIRECT:
                    assert length % 16 == 0 and length, f"indirect table of {length} bytes"
                    for i in range(length // 16):
                        a, n, _, f = self.read_desc(addr + 16 * i)
                        assert not f & (INDIRECT | NEXT), "flags in an indirect table"
                        segs.append((a, n, bool(f & WRITE)))
                    indirect = True
                else:
                    segs.append((addr, length, bool(flags & WRITE)))
                self._advance_avail()
                if not flags & NEXT:
                    break
                addr, length, bid_next, flags = self.read_desc(self.desc + 16 * self.avail_pos)
                assert self._is_avail(flags), "a chain continues into a non-available slot"
                assert bid_next == bid, "buffer ID changes within a chain"
                assert slots < self.size, "chain longer than the ring"
            assert bid not in self.taken, f"buffer ID {bid} made available twice"
            buf = Buffer(bid, segs, slots, indirect)
            self.taken[bid] = buf
            got.append(buf)
        return got

    def _advance_avail(self) -> None:
        self.avail_pos += 1
        if self.avail_pos == self.size:
            self.avail_pos = 0
            self.avail_wrap ^= 1

    # -- used side --------------------------------------------------------------------
    def complete(self, bid: int, length: int | None = None, *, wrap: int | None = None,
                 slots: int | None = None, flags: int | None = None) -> None:
        """Write the used descriptor for buffer ``bid`` (length: its writable bytes by
        default). ``wrap``/``flags`` override the wrap bits; ``slots`` how far to skip."""
        buf = self.taken.pop(bid, None)
        if length is None:
            length = buf.writable if buf else 0
        w = self.used_wrap if wrap is None else wrap
        f = (AVAIL | USED if w else 0) if flags is None else flags
        at = self.desc + 16 * self.used_pos
        # id and len first, flags last ("Device Requirements: The Virtqueue Descriptor
        # Table": the flags make the descriptor used).
        self.mem(at, 12)[8:12] = struct.pack("<I", length)
        self.mem(at + 12, 2)[:] = struct.pack("<H", bid)
        self.mem(at + 14, 2)[:] = struct.pack("<H", f)
        self.used_pos += slots if slots is not None else (buf.slots if buf else 1)
        if self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap ^= 1

    # -- a virtio-blk device on top -------------------------------------------------------
    def serve_blk(self, disk: bytearray, bufs: list[Buffer]) -> None:
        """Serve IN/OUT/FLUSH requests from ``disk`` and complete them in list order."""
        for buf in bufs:
            hdr = bytes(self.mem(buf.segs[0][0], 16))
            rtype, _, sector = struct.unpack("<IIQ", hdr)
            data, status = buf.segs[1:-1], buf.segs[-1]
            pos = sector * SECTOR_SIZE
            written = 0
            for bus, n, w in data:
                if rtype == ReqType.VIRTIO_BLK_T_IN:
                    self.mem(bus, n)[:] = disk[pos:pos + n]
                    written += n
                elif rtype == ReqType.VIRTIO_BLK_T_OUT:
                    disk[pos:pos + n] = self.mem(bus, n)
                pos += n
            self.mem(status[0], 1)[0] = int(BlkStatus.VIRTIO_BLK_S_OK)
            self.complete(buf.id, written + 1)
