"""The packed virtqueue: numpy dtypes, the layout function, PackedQueue.

virtio 1.2, "Packed Virtqueues": one descriptor ring that both sides write (the driver
makes descriptors available, the device overwrites them as used), a driver and a device
event suppression structure, and one wrap counter per side ("Driver and Device Ring
Wrap Counters"). A descriptor is available when its AVAIL bit equals the driver's wrap
counter and its USED bit does not; used when both equal the device's. A chain occupies
consecutive ring slots; the device writes one used descriptor per chain, carrying the
chain's buffer ID, and skips the rest of the chain's slots.

Trust boundary as in SplitQueue: the driver's bookkeeping (free buffer IDs, one per ring
slot a chain holds, tokens, writable lengths) lives in ``RingCore``. From device-visible
memory PackedQueue reads only the used descriptor at its used position (flags, then id
and len) and the device event suppression structure, and validates each used
descriptor before believing it.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence, TypeVar

import numpy as np

from ..memory import PAGE
from ..spec import (MAX_QUEUE_SIZE, VIRTQ_DESC, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, DescFlag,
                    RingEventFlags)
from .core import (DESC_BYTES, FRAME_ENTRIES, Fields, Layout, RingCore, Seg, fence_acquire,
                   fence_release)

assert sys.byteorder == "little", "the memoryview casts below assume a little-endian CPU"

T = TypeVar("T")

# struct pvirtq_desc: addr (le64) + len (le32) + id (le16) + flags (le16).
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"),
                              ("flags", "<u2")])
# struct pvirtq_event_suppress: desc (le16: offset in bits 0-14, wrap in bit 15) + flags.
EVENT_SUPPRESS_DTYPE = np.dtype([("off_wrap", "<u2"), ("flags", "<u2")])
_DESC = VIRTQ_DESC
_PREFIX = struct.Struct("<QIH")  # a descriptor without its flags, which are stored last
_NEXT = int(DescFlag.VIRTQ_DESC_F_NEXT)
_WRITE = int(DescFlag.VIRTQ_DESC_F_WRITE)
_INDIRECT = int(DescFlag.VIRTQ_DESC_F_INDIRECT)
_AVAIL, _USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
_BOTH = _AVAIL | _USED
_DISABLE = int(RingEventFlags.RING_EVENT_FLAGS_DISABLE)
_ENABLE = int(RingEventFlags.RING_EVENT_FLAGS_ENABLE)
_DESC_EVENT = int(RingEventFlags.RING_EVENT_FLAGS_DESC)
_WRAP_BIT = 15  # of off_wrap


@dataclass(frozen=True)
class PackedLayout(Layout):
    """Byte offsets of the three areas of a packed virtqueue of ``size`` descriptors,
    allocated together: descriptor ring (16-byte aligned), driver event suppression
    ("Driver Area"), device event suppression ("Device Area"), each 4-byte aligned."""

    driver: int
    device: int


def packed_layout(size: int) -> PackedLayout:
    """"Packed Virtqueues": any queue size from 1 to 32768 (not only powers of two)."""
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise ValueError(f"queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    desc = 0
    driver = desc + PACKED_DESC_DTYPE.itemsize * size
    device = driver + EVENT_SUPPRESS_DTYPE.itemsize
    total = -(-(device + EVENT_SUPPRESS_DTYPE.itemsize) // PAGE) * PAGE
    return PackedLayout(size=size, total=total, desc=desc, driver=driver, device=device)


def _avail_bits(wrap: int) -> int:
    """The wrap bits of a descriptor the driver makes available in a lap ``wrap``."""
    return _AVAIL if wrap else _USED


def _fields(addr: int, length: int, writable: bool, next_index: int) -> Fields:
    """An entry of an indirect table: addr, len, id (unused), flags. "Indirect Flag:
    Scatter-Gather Support": in a table only VIRTQ_DESC_F_WRITE counts; the entries
    follow each other, no NEXT."""
    return addr, length, 0, _WRITE if writable else 0


class PackedQueue(RingCore[T]):
    """A packed virtqueue with SplitQueue's interface: ``add`` writes a chain (indirect
    when negotiated), holding back the flags of the batch's first head; ``kick`` stores
    them, so the device sees the whole batch at once, and notifies unless the device's
    event suppression says not to; ``reap`` collects and validates completions in ring
    order (in any buffer order); ``wait`` polls with a deadline (``RingCore``)."""

    ID_WORD = "used buffer ID"
    NOT_IN_FLIGHT = "not in flight"
    VIEWS = ("desc", "driver_event", "device_event")
    _table_fields = staticmethod(_fields)
    NAME = "queue 0"
    ALIGN = PAGE
    layout: PackedLayout
    layout_for = staticmethod(packed_layout)

    def _map(self) -> None:
        lay, size = self.layout, self.size
        self.desc_bus = self.ring.bus + lay.desc
        self.driver_bus = self.ring.bus + lay.driver
        self.device_bus = self.ring.bus + lay.device
        self.areas = (self.desc_bus, self.driver_bus, self.device_bus)  # for setup_queue
        mm, base = self._mm, self.ring.offset
        self._desc_off = base + lay.desc
        # numpy views by field name, for inspection and tests ...
        # np.frombuffer holds a buffer export on the mapping (np.ndarray(buffer=mm) does
        # not): a view kept past close() keeps the mapping instead of reading freed memory.
        self.desc = np.frombuffer(mm, PACKED_DESC_DTYPE, size, base + lay.desc)
        self.driver_event = np.frombuffer(mm, EVENT_SUPPRESS_DTYPE, 1,
                                          base + lay.driver).reshape(())
        self.device_event = np.frombuffer(mm, EVENT_SUPPRESS_DTYPE, 1,
                                          base + lay.device).reshape(())
        # ... and memoryview casts for the hot path (a numpy scalar access costs several
        # times a plain index), over the whole region so that an index follows from a
        # byte offset with a shift: the slot at offset o has id at u16 o/2+6, flags at
        # u16 o/2+7, len at u32 o/4+2.
        self._u16 = memoryview(mm).cast("H")
        self._u32 = memoryview(mm).cast("I")
        self._device_off_wrap = (base + lay.device) // 2
        self._device_flags = (base + lay.device) // 2 + 1
        # We poll: no used buffer notifications ("Driver Requirements: Event Suppression").
        self._driver_flags = (base + lay.driver) // 2 + 1
        self._u16[self._driver_flags] = _DISABLE
        # A chain of k ring descriptors holds k buffer IDs (its own, first in _chain,
        # and k-1 parked), so there are always as many free IDs as free descriptors.
        self._ring_end = self._desc_off + DESC_BYTES * size
        self._avail_off = self._desc_off  # byte offset (in the region) of the next slot
        self._avail_wrap = 1  # "Driver Ring Wrap Counter", starts at 1
        self._avail_flags = _avail_bits(1)
        # The used position: the u16 index of the flags of the slot where the device
        # writes the next used descriptor, and the wrap bits (_used_none) that slot has
        # while still available: the "Device Ring Wrap Counter" as the driver tracks it
        # (1 at first: AVAIL set).
        self._used_at = self._desc_off // 2 + 7
        self._used_mask = _BOTH
        self._used_none = _AVAIL
        self._used_end = (self._ring_end >> 1) + 7  # _used_at one slot past the ring
        self._used_span = 8 * size  # u16 indices per lap of the ring
        # Publication: the first head added after a kick keeps its flags back (u16 index
        # and value here) until the kick; later heads are stored at once, which the
        # device cannot see past the held one ("the device ... in ring order").
        self._held_at = -1
        self._held_flags = 0
        self._kick_off = self._desc_off  # _avail_off at the last kick

    # -- state --------------------------------------------------------------------
    @property
    def avail_pos(self) -> int:
        return (self._avail_off - self._desc_off) >> 4

    @property
    def used_pos(self) -> int:
        return self._slot(self._used_at)

    def _slot(self, flags_at: int) -> int:
        """The ring slot whose flags are at u16 index ``flags_at``."""
        return (2 * flags_at - 14 - self._desc_off) >> 4

    @property
    def avail_idx(self) -> int:
        """The next slot to make available, the wrap counter in bit 15 (the encoding of
        off_wrap in "Event Suppression Structure Format")."""
        return self.avail_pos | self._avail_wrap << _WRAP_BIT

    @property
    def used_idx(self) -> int:
        """The slot of the next used descriptor, the wrap counter in bit 15."""
        return self.used_pos | self.used_wrap << _WRAP_BIT

    @property
    def avail_wrap(self) -> int:
        return self._avail_wrap

    @property
    def used_wrap(self) -> int:
        return int(self._used_none == _AVAIL)

    # -- submit -------------------------------------------------------------------
    def _hold(self, index: int, flags: int) -> None:
        """Store a head's flags (at u16 ``index``), unless it is the batch's first."""
        if self._held_at < 0:
            self._held_at, self._held_flags = index, flags
        else:
            self._u16[index] = flags

    def _advance(self, off: int) -> int:
        """The byte offset of the slot after the one at ``off``, flipping the driver's
        wrap counter at the end of the ring."""
        off += DESC_BYTES
        if off == self._ring_end:
            off = self._desc_off
            self._avail_wrap ^= 1
            self._avail_flags ^= _BOTH
        return off

    def _put_indirect(self, bid: int, n: int) -> None:
        """One descriptor at the avail position pointing at the ID's table (flags last,
        or held)."""
        off = self._avail_off
        _PREFIX.pack_into(self._mm, off, self._table_bus[bid], DESC_BYTES * n, bid)
        self._hold((off >> 1) + 7, _INDIRECT | self._avail_flags)
        self._avail_off = self._advance(off)

    def _put_direct(self, ids: list[int], segs: Sequence[Seg]) -> None:
        """Consecutive ring descriptors, NEXT on all but the last, the buffer ID (the
        first of ``ids``; the others stay parked) in each; the head's flags last (or
        held)."""
        bid, last = ids[0], len(segs) - 1
        mm, off = self._mm, self._avail_off
        for i, (addr, length, w) in enumerate(segs):
            flags = (_WRITE if w else 0) | (_NEXT if i < last else 0) | self._avail_flags
            if i == 0:
                head_index, head_flags = (off >> 1) + 7, flags
                _PREFIX.pack_into(mm, off, addr, length, bid)
            else:
                _DESC.pack_into(mm, off, addr, length, bid, flags)
            off = self._advance(off)
        self._avail_off = off
        self._hold(head_index, head_flags)

    # -- framed chains: the fast path for one data segment ---------------------------
    def _framed_ring(self) -> list[bytes]:
        return [_PREFIX.pack(bus, FRAME_ENTRIES * DESC_BYTES, bid)
                for bid, bus in enumerate(self._table_bus)]

    def add_framed(self, data: bytes, token: T, writable: int) -> int:
        """The framed chain's one ring descriptor goes at the avail position, the
        batch's first held back (``_put_indirect``, inlined)."""
        free = self._free
        if self.broken or not free or token is None:
            self._refuse(token)
        bid = free.pop()
        if self._framed[bid] is not data:  # identity: the caller reuses one per buffer
            self._frame_data(bid, data)
        # _put_indirect, _hold and _advance, inlined: this runs per request.
        off = self._avail_off
        self._mm[off:off + 14] = self._frame_ring[bid]
        if self._held_at < 0:
            self._held_at, self._held_flags = (off >> 1) + 7, _INDIRECT | self._avail_flags
        else:
            self._u16[(off >> 1) + 7] = _INDIRECT | self._avail_flags
        off += DESC_BYTES
        if off == self._ring_end:
            off = self._desc_off
            self._avail_wrap ^= 1
            self._avail_flags ^= _BOTH
        self._avail_off = off
        self._held.append(bid)
        self._writable[bid] = writable
        self._token[bid] = token
        return bid

    def kick(self) -> None:
        """Publish every chain added since the last kick, and notify if needed."""
        if self.broken:
            self._check_usable()
        if self._held_at < 0:
            return
        # Write ordering: every descriptor of the batch (and the later heads' flags) was
        # stored before this one flags word, which makes the batch visible. x86 is TSO
        # (stores become visible in program order); a weaker CPU would need a write
        # barrier here.
        u16 = self._u16
        u16[self._held_at] = self._held_flags
        self._held_at = -1
        self.in_flight += len(self._held)
        self._held = []
        since, self._kick_off = self._kick_off, self._avail_off
        # Store-load ordering is NOT kept by TSO: without a full barrier we could read a
        # stale event suppression structure while the device, having just re-enabled
        # notifications, reads our old flags: a lost kick.
        fence_acquire()
        fence_release()
        flags = u16[self._device_flags] & 3
        if flags == _DISABLE:
            return
        if flags == _DESC_EVENT and self.event_idx:
            # "Driver notifications" with RING_EVENT_FLAGS_DESC: notify only when the
            # descriptor at off_wrap is among the slots just published, from ``since``
            # (a whole ring when it equals the avail offset) (Linux's
            # virtqueue_kick_prepare_packed, in 16-bit arithmetic).
            off_wrap = u16[self._device_off_wrap]
            event = off_wrap & 0x7FFF
            if off_wrap >> _WRAP_BIT != self._avail_wrap:
                event -= self.size
            avail, first = self._avail_off, self._desc_off
            added = ((avail - since) >> 4) % self.size or self.size
            if (((avail - first) >> 4) - event - 1) & 0xFFFF >= added:
                return
        self._notify()  # a register write into the device: also a full barrier
        self.kicks += 1

    # -- complete -----------------------------------------------------------------
    def reap(self) -> list[tuple[T, int]]:
        """Every completion the device has published, as (token, used length), each
        checked: wrap bits, buffer ID in flight, length within the chain's writable
        bytes. The flags are read before id and len; x86 does not reorder loads."""
        if self.broken:
            self._check_usable()
        left = self.in_flight
        u16, at, pending = self._u16, self._used_at, self._used_none
        bits = u16[at] & _BOTH  # at: the u16 index of the used position's flags
        if bits == pending or not left:
            return []  # still available: nothing used yet
        u32, tokens, writable = self._u32, self._token, self._writable
        chains, free, held = self._chain, self._free, self._held
        used_bits = pending ^ _USED  # AVAIL|USED in lap 1, neither in lap 0
        out: list[tuple[T, int]] = []
        first_freed = len(free)
        while True:
            if bits != used_bits:
                if bits == pending:
                    break  # still available: not used yet
                self._bad_wrap(at, bits)
            bid, length = u16[at - 1], u32[(at >> 1) - 1]  # id and len of that slot
            try:
                token = tokens[bid]
            except IndexError:  # a buffer ID beyond the queue: _bad_used says so
                token = None
            if token is None or length > writable[bid] or bid in held:
                self._bad_used(bid, length, f" at slot {self._slot(at)}")
            tokens[bid] = None
            chain = chains[bid]
            free += chain
            at += 8 * len(chain)
            if at >= self._used_end:
                at -= self._used_span
                used_bits ^= _BOTH
                pending ^= _BOTH
            out.append((token, length))
            left -= 1
            if not left:
                break
            bits = u16[at] & _BOTH
        # Freed in completion order, handed out in reverse: flipped, as SplitQueue.reap.
        free[first_freed:] = free[:first_freed - 1:-1] if first_freed else free[::-1]
        self._used_at, self._used_none = at, pending
        self.in_flight = left
        self.completed += len(out)
        return out

    def _bad_wrap(self, at: int, bits: int) -> NoReturn:
        """The fault for a descriptor at the used position that is neither still
        available nor used in the device's current lap."""
        expected = self._used_none ^ _USED
        self._fault(f"{self._label}used descriptor at slot {self._slot(at)} has wrap bits "
                    f"{bits:#06x}, expected {expected:#06x} (used wrap counter "
                    f"{int(bool(expected))})")

    def pop_used(self) -> tuple[T, int] | None:
        """The next completion as (token, used length), checked as ``reap`` checks
        each, or None if the device has used nothing (or nothing is in flight): one at
        a time, as Linux's virtqueue_get_buf."""
        if self.broken:
            self._check_usable()
        u16, at, pending = self._u16, self._used_at, self._used_none
        bits = u16[at] & _BOTH
        if bits == pending or not self.in_flight:
            return None
        if bits != pending ^ _USED:
            self._bad_wrap(at, bits)
        bid, length = u16[at - 1], self._u32[(at >> 1) - 1]  # id and len of that slot
        tokens = self._token
        try:
            token = tokens[bid]
        except IndexError:  # as in reap
            token = None
        if token is None or length > self._writable[bid] or bid in self._held:
            self._bad_used(bid, length, f" at slot {self._slot(at)}")
        tokens[bid] = None
        chain = self._chain[bid]
        self._free += chain
        at += 8 * len(chain)
        if at >= self._used_end:
            at -= self._used_span
            pending ^= _BOTH
        self._used_at, self._used_none = at, pending
        self.in_flight -= 1
        self.completed += 1
        return token, length

    # -- used buffer notifications (for a Waiter) ---------------------------------------
    def _interrupts(self, enable: bool) -> None:
        """"Driver Requirements: Event Suppression": RING_EVENT_FLAGS_ENABLE in the
        driver event suppression structure (valid with or without EVENT_IDX), or
        RING_EVENT_FLAGS_DISABLE."""
        self._u16[self._driver_flags] = _ENABLE if enable else _DISABLE
