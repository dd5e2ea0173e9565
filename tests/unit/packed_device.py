"""The device side of a packed virtqueue ("Packed Virtqueues"), for unit tests.

It works on the very ring memory the driver wrote, through bus addresses, as a device
would: ``take`` collects available chains (following NEXT and indirect tables),
``complete`` writes a used descriptor at the device's used position, in whatever
buffer order a test asks for. Knobs let a test misbehave on purpose (a used descriptor
with the wrong wrap bits, an unknown buffer ID, a length too large) and set the device
event suppression structure. ``serve_blk`` answers virtio-blk requests as the legacy
model does, and ``PackedBlkTransport`` puts a VirtioBlk on top of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

from virtio_user.memory import DmaRegion
from virtio_user.spec import BLK_OUTHDR, VIRTQ_DESC, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, DescFlag, Feature
from fake_device import FakeBackend, FakeBlkDevice, dma_view

_DESC = VIRTQ_DESC
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
        return dma_view(self.regions, bus, length)

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
    def serve_blk(self, blk: FakeBlkDevice, bufs: list[Buffer], order: str = "ring") -> None:
        """Serve virtio-blk requests with the legacy model's semantics (``blk._serve``:
        its disk, capacity, errors) and complete them in ring order or reversed."""
        for buf in (reversed(bufs) if order == "reverse" else bufs):
            readable = b"".join(bytes(self.mem(a, n)) for a, n, w in buf.segs if not w)
            writable = [(a, n) for a, n, w in buf.segs if w]
            rtype, _, sector = BLK_OUTHDR.unpack_from(readable)
            in_len = sum(n for _, n in writable)
            status, data = blk._serve(rtype, sector, readable[16:], in_len - 1)
            out = (data or b"").ljust(in_len - 1, b"\0") + bytes([status])
            pos = 0
            for a, n in writable:
                self.mem(a, n)[:] = out[pos:pos + n]
                pos += n
            self.complete(buf.id, in_len)


class PackedBlkTransport:
    """A modern transport test double whose queue 0 is served by a PackedDevice (the
    register protocol is ModernTransport's business and tested there): it offers
    VIRTIO_F_VERSION_1 and VIRTIO_F_RING_PACKED on top of a FakeBlkDevice's features,
    config and disk."""

    kind = "modern"
    iommu = False

    def __init__(self, backend: FakeBackend, packed: bool = True) -> None:
        self.backend = backend
        self.blk = backend.device
        self.offered = self.blk.host_features | Feature.VIRTIO_F_VERSION_1 | (
            Feature.VIRTIO_F_RING_PACKED if packed else 0)
        self.status = 0
        self.driver_features = 0
        self.device: PackedDevice | None = None
        self.order = "ring"
        self.misbehave: str | None = None  # once: "bad_id", "len_too_large", "wrong_wrap"
        self.notifies = 0
        self.resets = 0

    def reset(self) -> None:
        self.status = 0
        self.device = None
        self.resets += 1

    def add_status(self, bits: int) -> None:
        self.status |= int(bits)

    def fail(self) -> None:
        self.status |= 128

    def device_features(self) -> int:
        return int(self.offered)

    def transport_features(self, offered: int) -> int:
        return int(Feature.VIRTIO_F_VERSION_1)

    def set_driver_features(self, features: int) -> None:
        assert not features & ~self.offered, "driver accepted a feature not offered"
        self.driver_features = features

    def features_ok(self) -> None:
        self.status |= 8

    def queue_size(self, index: int) -> int:
        return self.blk.queue_size_reported if index == 0 else 0

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        assert self.driver_features & Feature.VIRTIO_F_RING_PACKED, "packed ring not negotiated"
        self.device = PackedDevice(self.blk.regions, size, desc, driver, device)

    def notifier(self, index: int) -> Callable[[], None]:
        def kick() -> None:
            self.notifies += 1
            if self.device is None or self.blk.stall:
                return
            bufs = self.device.take()
            if self.misbehave and bufs:
                self._misbehave(self.device, bufs[0])
                bufs = bufs[1:]
            self.device.serve_blk(self.blk, bufs, self.order)
        return kick

    def _misbehave(self, device: PackedDevice, buf: Buffer) -> None:
        trick, self.misbehave = self.misbehave, None
        if trick == "bad_id":
            device.complete(self.blk.queue_size_reported + 3, 1, slots=buf.slots)
        elif trick == "len_too_large":
            device.complete(buf.id, buf.writable + 1)
        elif trick == "wrong_wrap":
            device.complete(buf.id, 1, wrap=device.used_wrap ^ 1)

    def isr(self) -> int:
        return 0

    def read_config(self, dtype: Any = None) -> Any:
        return self.blk.config.copy()
