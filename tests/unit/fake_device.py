"""A Python model of a legacy virtio-blk device, for unit tests (no root, no QEMU).

It implements the BAR0 register block (``RegisterIO``) and serves requests from the
very ring memory the driver wrote, with a ``bytearray`` as the disk. On demand it
completes requests out of order, holds them, stalls, or misbehaves once (``misbehave``):

- ``"bad_id"``: a used id beyond the queue size;
- ``"id_not_in_flight"``: the id of a descriptor that heads no chain in flight;
- ``"len_too_large"``: a used length larger than the chain's writable bytes;
- ``"idx_jump"``: used.idx advanced by more than the queue size;
- ``"no_status"``: the status byte left unwritten;
- ``"status_only"``: only the status byte written, and a used length of 1;
- ``"zero_len"``: a used length of 0.

``reset_fails`` makes a write of 0 to the status register do nothing (the status does
not read back 0).
"""

from __future__ import annotations

import struct
from typing import Callable

import numpy as np

from virtio_user.memory import DmaRegion
from virtio_user.spec import (BLK_OUTHDR, VIRTQ_DESC, BLK_CONFIG_DTYPE, BLK_DWZ_DTYPE, LEGACY_CONFIG_OFFSET,
                    LEGACY_CONFIG_OFFSET_MSIX, LEGACY_PFN_SHIFT, SECTOR_SIZE,
                    VIRTIO_BLK_ID_BYTES, BlkStatus, DescFlag, Feature, IsrBit, LegacyReg,
                    ReqType, Reg, VIRTIO_PCI_LEGACY_BLK)
from virtio_user.ring.split import QueueLayout, legacy_layout

DEFAULT_FEATURES = (
    Feature.VIRTIO_BLK_F_SEG_MAX | Feature.VIRTIO_BLK_F_BLK_SIZE | Feature.VIRTIO_BLK_F_FLUSH
    | Feature.VIRTIO_BLK_F_DISCARD | Feature.VIRTIO_BLK_F_WRITE_ZEROES
    | Feature.VIRTIO_BLK_F_TOPOLOGY | Feature.VIRTIO_BLK_F_CONFIG_WCE
    | Feature.VIRTIO_RING_F_INDIRECT_DESC | Feature.VIRTIO_RING_F_EVENT_IDX
    | Feature.VIRTIO_F_NOTIFY_ON_EMPTY | Feature.VIRTIO_F_ANY_LAYOUT)

_DESC = VIRTQ_DESC
OK, IOERR, UNSUPP = (int(s) for s in BlkStatus)


def dma_view(regions: list[DmaRegion], bus: int, length: int) -> memoryview:
    """What the device reaches at bus address ``bus``: it must lie inside one region
    the driver allocated, or the driver gave the device an address it does not own."""
    for region in regions:
        try:
            off = region.offset_of(bus)
        except KeyError:
            continue
        assert off + length <= region.size, f"DMA at {bus:#x}+{length} runs off"
        return memoryview(region.mm)[off:off + length]
    raise AssertionError(f"device DMA to {bus:#x}, outside any region")


class FakeBlkDevice:
    """The device side of a legacy virtio-blk over one queue."""

    def __init__(self, capacity: int = 2048, *, queue_size: int = 256,
                 features: int = DEFAULT_FEATURES, size_max: int = 0, seg_max: int = 126,
                 blk_size: int = 512, serial: str = "fake-serial", msix: bool = False,
                 max_discard_sectors: int = 1 << 16,
                 discard_sector_alignment: int = 1, num_queues: int = 1) -> None:
        self.disk = bytearray(capacity * SECTOR_SIZE)
        self.queue_size_reported = queue_size
        self.host_features = int(features)
        self.config = np.zeros((), BLK_CONFIG_DTYPE)
        self.config["capacity"] = capacity
        self.config["size_max"] = size_max
        self.config["seg_max"] = seg_max
        self.config["blk_size"] = blk_size
        self.config["max_discard_sectors"] = max_discard_sectors
        self.config["max_discard_seg"] = 1
        self.config["discard_sector_alignment"] = discard_sector_alignment
        self.config["max_write_zeroes_sectors"] = max_discard_sectors
        self.config["max_write_zeroes_seg"] = 1
        self.config["num_queues"] = num_queues
        self.num_queues = num_queues
        if num_queues > 1:
            self.host_features |= Feature.VIRTIO_BLK_F_MQ
        # per-queue notifies, by queue index (QUEUE_NOTIFY's value)
        self.queue_notifies = [0] * num_queues
        self.serial = serial.encode()
        self.msix = msix
        self.regions: list[DmaRegion] = []
        # behaviour knobs for tests
        self.auto = True  # serve requests on every notify
        self.stall = False  # ignore notifies: nothing ever completes
        self.reverse = False  # complete each batch in reverse order
        self.misbehave: str | None = None
        self.reset_fails = False
        self.ioerr_sectors: set[int] = set()
        # observable state
        self.log: list[str] = []
        self.requests: list[tuple[int, int, int]] = []  # (type, sector, data bytes)
        self.ranges: list[tuple[int, int, int]] = []  # discard/write zeroes: type, sector, n
        self.range_flags: list[int] = []  # the flags field of each entry of self.ranges
        self.notifies = 0
        self.resets = 0
        self._pending: list[int] = []
        self.reset()

    # -- registers ------------------------------------------------------------------
    def reset(self) -> None:
        self.status = 0
        self.guest_features = 0
        self.queue_select = 0
        self.pfn = 0
        self.isr = 0
        self.last_avail = 0
        self.used_idx = 0
        self._pending = []
        # Queue 0's state lives in the attributes above; the others' here, swapped in
        # while one of them is served (``_use``).
        self._served = 0
        self._others = {q: (0, 0, 0, []) for q in range(1, getattr(self, "num_queues", 1))}

    def _use(self, queue: int) -> None:
        """Make ``queue`` the one whose state is in pfn, last_avail, used_idx, _pending."""
        if queue == self._served:
            return
        self._others[self._served] = (self.pfn, self.last_avail, self.used_idx, self._pending)
        self.pfn, self.last_avail, self.used_idx, self._pending = self._others.pop(queue)
        self._served = queue

    def queue_pfn(self, queue: int) -> int:
        self._use(queue)
        pfn = self.pfn
        self._use(0)
        return pfn

    def set_queue_pfn(self, queue: int, pfn: int) -> None:
        self._use(queue)
        self.pfn = pfn
        self._use(0)

    @property
    def config_offset(self) -> int:
        return LEGACY_CONFIG_OFFSET_MSIX if self.msix else LEGACY_CONFIG_OFFSET

    def read(self, reg: Reg) -> int:
        return self.read_at(reg.offset, reg.width)

    def read_at(self, offset: int, width: int) -> int:
        if offset >= self.config_offset:
            raw = self.config.tobytes() + b"\xff" * 8
            start = offset - self.config_offset
            return int.from_bytes(raw[start:start + width], "little")
        if offset == LegacyReg.ISR_STATUS.offset:
            value, self.isr = self.isr, 0
            return value
        return {
            LegacyReg.HOST_FEATURES.offset: self.host_features,
            LegacyReg.GUEST_FEATURES.offset: self.guest_features,
            LegacyReg.QUEUE_ADDRESS.offset: self.queue_pfn(self.queue_select)
            if self.queue_select < self.num_queues else 0,
            LegacyReg.QUEUE_SIZE.offset: self.queue_size_reported
            if self.queue_select < self.num_queues else 0,
            LegacyReg.QUEUE_SELECT.offset: self.queue_select,
            LegacyReg.DEVICE_STATUS.offset: self.status,
        }.get(offset, 0)

    def write(self, reg: Reg, value: int) -> None:
        if reg == LegacyReg.DEVICE_STATUS:
            self.log.append(f"status {value:#x}")
            if value == 0 and self.reset_fails:
                pass
            elif value == 0:
                self.resets += 1
                self.reset()
            else:
                self.status = value
        elif reg == LegacyReg.GUEST_FEATURES:
            assert not value & ~self.host_features, "driver accepted a feature not offered"
            self.guest_features = value
        elif reg == LegacyReg.QUEUE_SELECT:
            self.queue_select = value
        elif reg == LegacyReg.QUEUE_ADDRESS and self.queue_select < self.num_queues:
            self.set_queue_pfn(self.queue_select, value)
            self.log.append(f"pfn {value:#x}" if not self.queue_select
                            else f"queue {self.queue_select} pfn {value:#x}")
        elif reg == LegacyReg.QUEUE_NOTIFY:
            self.notifies += 1
            if value < self.num_queues:
                self.queue_notifies[value] += 1
            if self.auto and not self.stall and value < self.num_queues:
                self.process(queue=value)

    def poker(self, reg: Reg, value: int) -> Callable[[], None]:
        return lambda: self.write(reg, value)

    def resize(self, capacity: int) -> None:
        """Change the capacity and raise the config-change ISR bit (like block_resize)."""
        self.config["capacity"] = capacity
        self.disk = self.disk[:capacity * SECTOR_SIZE].ljust(capacity * SECTOR_SIZE, b"\0")
        self.isr |= IsrBit.CONFIG

    # -- memory ---------------------------------------------------------------------
    def _mem(self, bus: int, length: int) -> memoryview:
        return dma_view(self.regions, bus, length)

    def _u16(self, bus: int) -> int:
        return int.from_bytes(self._mem(bus, 2), "little")

    def _set_u16(self, bus: int, value: int) -> None:
        self._mem(bus, 2)[:] = (value & 0xFFFF).to_bytes(2, "little")

    # -- the queue ------------------------------------------------------------------
    def process(self, limit: int | None = None, queue: int = 0) -> int:
        """Take new available chains of ``queue`` and complete up to ``limit`` pending
        ones."""
        self._use(queue)
        try:
            return self._process(limit)
        finally:
            self._use(0)

    def _process(self, limit: int | None) -> int:
        assert self.status & 4, "notified before DRIVER_OK"
        assert self.pfn, "notified with no queue address"
        size = self.queue_size_reported
        lay = legacy_layout(size)
        base = self.pfn << LEGACY_PFN_SHIFT
        avail_idx = self._u16(base + lay.avail + 2)
        while self.last_avail != avail_idx:
            slot = base + lay.avail + 4 + 2 * (self.last_avail % size)
            self._pending.append(self._u16(slot))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        # EVENT_IDX: ask to be notified of the very next available buffer.
        self._set_u16(base + lay.used + 4 + 8 * size, avail_idx)
        batch = self._pending[:limit] if limit is not None else self._pending[:]
        self._pending = self._pending[len(batch):]
        if self.reverse:
            batch.reverse()
        for head in batch:
            self._complete(base, lay, size, head)
        return len(batch)

    def _chain(self, base: int, head: int) -> list[tuple[int, int, bool]]:
        """The (bus, len, writable) segments of the chain at ``head``."""
        desc_bus = base
        addr, length, flags, nxt = _DESC.unpack(self._mem(desc_bus + 16 * head, 16))
        table, index, count = desc_bus, head, self.queue_size_reported
        if flags & DescFlag.VIRTQ_DESC_F_INDIRECT:
            table, index, count = addr, 0, length // 16
        segs = []
        for _ in range(count):
            addr, length, flags, nxt = _DESC.unpack(self._mem(table + 16 * index, 16))
            assert not flags & DescFlag.VIRTQ_DESC_F_INDIRECT, "nested indirect table"
            segs.append((addr, length, bool(flags & DescFlag.VIRTQ_DESC_F_WRITE)))
            if not flags & DescFlag.VIRTQ_DESC_F_NEXT:
                return segs
            index = nxt
        raise AssertionError("descriptor chain loops")

    def _complete(self, base: int, lay: QueueLayout, size: int, head: int) -> None:
        segs = self._chain(base, head)
        readable = b"".join(bytes(self._mem(a, n)) for a, n, w in segs if not w)
        writable = [(a, n) for a, n, w in segs if w]
        assert not any(w for _, _, w in segs[:1]), "header must be device-readable"
        rtype, _, sector = BLK_OUTHDR.unpack_from(readable)
        out = readable[16:]
        in_len = sum(n for _, n in writable)
        status, data = self._serve(rtype, sector, out, in_len - 1)
        self.requests.append((rtype, sector, len(out) if out else in_len - 1))
        buf = (data or b"").ljust(in_len - 1, b"\0")
        if self.misbehave != "no_status":
            buf += bytes([status])
        pos = 0
        for a, n in writable:
            piece = buf[pos:pos + n]
            if self.misbehave == "status_only":
                piece = piece[-1:] if pos + n == in_len else b""
                a += n - len(piece)
            self._mem(a, len(piece))[:] = piece
            pos += n
        used_id, used_len = head, in_len
        trick, self.misbehave = self.misbehave, None
        if trick in ("status_only", "zero_len"):
            used_len = 1 if trick == "status_only" else 0
        if trick == "bad_id":
            used_id = size + 5
        elif trick == "id_not_in_flight":
            used_id = (head + 1) % size
        elif trick == "len_too_large":
            used_len = in_len + 1
        elem = base + lay.used + 4 + 8 * (self.used_idx % size)
        self._mem(elem, 8)[:] = struct.pack("<II", used_id, used_len)
        self.used_idx = (self.used_idx + (size + 1 if trick == "idx_jump" else 1)) & 0xFFFF
        self._set_u16(base + lay.used + 2, self.used_idx)

    def _serve(self, rtype: int, sector: int, out: bytes, in_bytes: int) -> tuple[int, bytes]:
        capacity = int(self.config["capacity"])
        ro = self.host_features & Feature.VIRTIO_BLK_F_RO
        if rtype == ReqType.VIRTIO_BLK_T_IN:
            count = in_bytes // SECTOR_SIZE
            if sector + count > capacity or self.ioerr_sectors & set(range(sector, sector + count)):
                return IOERR, b""
            return OK, bytes(self.disk[sector * SECTOR_SIZE:(sector + count) * SECTOR_SIZE])
        if rtype == ReqType.VIRTIO_BLK_T_OUT:
            count = len(out) // SECTOR_SIZE
            if ro or sector + count > capacity or self.ioerr_sectors & set(range(sector, sector + count)):
                return IOERR, b""
            self.disk[sector * SECTOR_SIZE:sector * SECTOR_SIZE + len(out)] = out
            return OK, b""
        if rtype == ReqType.VIRTIO_BLK_T_FLUSH:
            return (OK if self.host_features & Feature.VIRTIO_BLK_F_FLUSH else UNSUPP), b""
        if rtype == ReqType.VIRTIO_BLK_T_GET_ID:
            return OK, self.serial[:VIRTIO_BLK_ID_BYTES]
        if rtype in (ReqType.VIRTIO_BLK_T_DISCARD, ReqType.VIRTIO_BLK_T_WRITE_ZEROES):
            if ro:
                return IOERR, b""
            limit = int(self.config["max_discard_sectors"
                                    if rtype == ReqType.VIRTIO_BLK_T_DISCARD
                                    else "max_write_zeroes_sectors"])
            for rng in np.frombuffer(out, BLK_DWZ_DTYPE):
                start, n = int(rng["sector"]), int(rng["num_sectors"])
                self.ranges.append((rtype, start, n))
                self.range_flags.append(int(rng["flags"]))
                if start + n > capacity or n > limit:
                    return IOERR, b""
                self.disk[start * SECTOR_SIZE:(start + n) * SECTOR_SIZE] = bytes(n * SECTOR_SIZE)
            return OK, b""
        return UNSUPP, b""


class FakeBackend:
    """A backend around a FakeBlkDevice: anonymous DMA memory with made-up addresses."""

    name = "fake"

    def __init__(self, device: FakeBlkDevice | None = None, bdf: str = "0000:00:10.0",
                 contiguous: int = 64 << 10) -> None:
        self.device = device or FakeBlkDevice()
        self.bdf = bdf
        self.bar0 = self.device
        self.msix_enabled = self.device.msix
        self.contiguous = contiguous
        self.closed = False
        self.device_id = VIRTIO_PCI_LEGACY_BLK
        self.config = FakeConfigSpace()  # no capabilities: the legacy interface only
        self.can_translate = False
        self.translating = False

    def bar(self, index: int) -> FakeConfigSpace:
        raise AssertionError("the legacy fake has no memory BARs")

    def enable_translation(self) -> None:
        raise AssertionError("the fake backend cannot translate")

    def alloc_dma(self, size: int) -> DmaRegion:
        base = 0x1_0000_0000 + len(self.device.regions) * (1 << 32)
        region = DmaRegion.anonymous(size, base, self.contiguous)
        self.device.regions.append(region)
        log, device, close = self.device.log, self.device, region.close

        def recorded_close() -> None:  # tests check the device was reset by then
            log.append(f"unmap with status {device.status:#x} pfn {device.pfn:#x}")
            close()
        region.close = recorded_close  # type: ignore[method-assign]
        return region

    def close(self) -> None:
        self.device.log.append("backend closed")
        self.closed = True


class FakeConfigSpace:
    """256 bytes of PCI configuration space, by default with no capabilities; tests
    write capability lists into ``data`` (see fake_modern.py)."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data.ljust(256, b"\0"))
        self.size = len(self.data)
        self.what = "fake PCI config"

    def read_at(self, offset: int, width: int) -> int:
        assert 0 <= offset and offset + width <= self.size, f"config read at {offset:#x}"
        return int.from_bytes(self.data[offset:offset + width], "little")

    def write_at(self, offset: int, width: int, value: int) -> None:
        self.data[offset:offset + width] = value.to_bytes(width, "little")

    def read(self, reg: Reg) -> int:
        return self.read_at(reg.offset, reg.width)

    def write(self, reg: Reg, value: int) -> None:
        self.write_at(reg.offset, reg.width, value)

    def poker(self, reg: Reg, value: int) -> Callable[[], None]:
        return lambda: self.write(reg, value)
