"""The packed virtqueue: numpy dtypes, the layout function, PackedQueue.

virtio 1.2, "Packed Virtqueues": one descriptor ring that both sides write (the driver
makes descriptors available, the device overwrites them as used), a driver and a device
event suppression structure, and one wrap counter per side ("Driver and Device Ring
Wrap Counters"). A descriptor is available when its AVAIL bit equals the driver's wrap
counter and its USED bit does not; used when both equal the device's. A chain occupies
consecutive ring slots; the device writes one used descriptor per chain, carrying the
chain's buffer ID, and skips the rest of the chain's slots.

Trust boundary as in SplitQueue: the driver's bookkeeping (free buffer IDs, one per ring
slot a chain holds, tokens, writable lengths) lives here in Python. From device-visible
memory PackedQueue reads only the used descriptor at its used position (flags, then id
and len) and the device event suppression structure, and validates each used
descriptor before believing it.
"""

from __future__ import annotations

import struct
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, NoReturn, Sequence, TypeVar

import numpy as np

from ..errors import DeviceTimeout, DmaError
from ..memory import PAGE, DmaAllocator
from ..spec import (MAX_QUEUE_SIZE, VIRTQ_DESC, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, DescFlag,
                   RingEventFlags)
from .split import (SPINS_PER_CLOCK, QueueFaults, QueueFull, fence_acquire, fence_release,
                        indirect_tables)

if TYPE_CHECKING:
    from ..interrupts import Waiter

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
_DESC_EVENT = int(RingEventFlags.RING_EVENT_FLAGS_DESC)
_WRAP_BIT = 15  # of off_wrap


@dataclass(frozen=True)
class PackedLayout:
    """Byte offsets of the three areas of a packed virtqueue of ``size`` descriptors,
    allocated together: descriptor ring (16-byte aligned), driver event suppression
    ("Driver Area"), device event suppression ("Device Area"), each 4-byte aligned."""

    size: int
    desc: int
    driver: int
    device: int
    total: int  # bytes to allocate, a whole number of pages


def packed_layout(size: int) -> PackedLayout:
    """"Packed Virtqueues": any queue size from 1 to 32768 (not only powers of two)."""
    if not 1 <= size <= MAX_QUEUE_SIZE:
        raise ValueError(f"queue size {size} is not in 1..{MAX_QUEUE_SIZE}")
    desc = 0
    driver = desc + PACKED_DESC_DTYPE.itemsize * size
    device = driver + EVENT_SUPPRESS_DTYPE.itemsize
    total = -(-(device + EVENT_SUPPRESS_DTYPE.itemsize) // PAGE) * PAGE
    return PackedLayout(size, desc, driver, device, total)


def _avail_bits(wrap: int) -> int:
    """The wrap bits of a descriptor the driver makes available in a lap ``wrap``."""
    return _AVAIL if wrap else _USED


class PackedQueue(QueueFaults, Generic[T]):
    """A packed virtqueue with SplitQueue's interface: ``add`` writes a chain (indirect
    when negotiated), holding back the flags of the batch's first head; ``kick`` stores
    them, so the device sees the whole batch at once, and notifies unless the device's
    event suppression says not to; ``reap`` collects and validates completions in ring
    order (in any buffer order); ``wait`` polls with a deadline.
    A violation or a timeout runs ``on_fault`` (a device reset) and breaks the queue."""

    def __init__(self, alloc: DmaAllocator, size: int, notify: Callable[[], None], *,
                 indirect: bool, event_idx: bool, on_fault: Callable[[], bool | None],
                 max_chain: int = 16, name: str = "queue 0") -> None:
        self.layout = lay = packed_layout(size)
        self.size = size
        self.name = name
        self._notify = notify
        self._on_fault = on_fault
        self.indirect = indirect
        self.event_idx = event_idx
        self.max_chain = max_chain if indirect else size
        region = alloc.region
        self.ring = alloc.alloc(lay.total, PAGE)
        if not self.ring.is_contiguous():
            raise DmaError(f"queue memory ({lay.total} bytes) is not physically contiguous")
        self.desc_bus = self.ring.bus + lay.desc
        self.driver_bus = self.ring.bus + lay.driver
        self.device_bus = self.ring.bus + lay.device
        self.areas = (self.desc_bus, self.driver_bus, self.device_bus)  # for setup_queue
        mm, base = region.mm, self.ring.offset
        mm[base:base + lay.total] = bytes(lay.total)  # never hand stale rings to a device
        self._mm = mm
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
        self._driver_off_wrap = (base + lay.driver) // 2
        self._driver_flags = (base + lay.driver) // 2 + 1
        self._u16[self._driver_flags] = _DISABLE
        if indirect:
            self.tables, self._table_bytes, self._table_bus = indirect_tables(
                alloc, size, max_chain)
            self._table_off = self.tables.offset
            self._table_segs: list[Sequence[tuple[int, int, bool]] | None] = [None] * size
        # Framed tables (``frame``/``add_framed``), per buffer ID as SplitQueue's per head.
        self._framed: list[bytes | None] = [None] * size
        self.framed = False
        self._frame_first: list[bytes] = []
        self._frame_last: list[bytes] = []
        self._frame_ring: list[bytes] = []  # addr, len, id of the ring descriptor
        self._structs: dict[int, struct.Struct] = {}
        # Driver-private bookkeeping (never read back from device memory). A chain of k
        # ring descriptors holds k buffer IDs (its own, first in _chain, and k-1 parked),
        # so there are always exactly as many free IDs as free descriptors.
        self._free = list(range(size - 1, -1, -1))  # buffer IDs
        self._chain: list[list[int] | None] = [None] * size  # IDs of a multi-slot chain
        self._token: list[T | None] = [None] * size
        self._writable = [0] * size
        self._ring_end = self._desc_off + 16 * size
        self._avail_off = self._desc_off  # byte offset (in the region) of the next slot
        self._avail_wrap = 1  # "Driver Ring Wrap Counter", starts at 1
        self._avail_flags = _avail_bits(1)
        # Where the device writes the next used descriptor, as the u16 index of its
        # flags, and the wrap bits that slot has while still available: the "Device Ring
        # Wrap Counter" as the driver tracks it (1 at first: AVAIL set).
        self._used_at = self._desc_off // 2 + 7
        self._used_pending = _AVAIL
        self._used_end = (self._ring_end >> 1) + 7  # _used_at one slot past the ring
        self._used_span = 8 * size  # u16 indices per lap of the ring
        # Publication: the first head added after a kick keeps its flags back (u16 index
        # and value here) until the kick; later heads are stored at once, which the
        # device cannot see past the held one ("the device ... in ring order").
        self._held_at = -1
        self._held_flags = 0
        self._held_ids: list[int] = []  # buffer IDs added since the last kick: unpublished
        self._kick_off = self._desc_off  # _avail_off at the last kick
        self.in_flight = 0  # published and not yet reaped
        self.completed = 0
        self.kicks = 0
        self.broken: str | None = None
        self.waiter: Waiter | None = None  # None: poll; else sleep when spins run out

    # -- state --------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Chains added and not yet reaped, published or not."""
        return self.in_flight + len(self._held_ids)

    @property
    def num_free(self) -> int:
        """Free ring descriptors (as many as free buffer IDs)."""
        return len(self._free)

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
        return int(self._used_pending == _AVAIL)

    def free_ids(self) -> list[int]:
        """Free buffer IDs, the next one ``add`` takes first (for inspection)."""
        return self._free[::-1]

    def next_head(self) -> int:
        """The buffer ID the next ``add`` will return (callers keep per-request state,
        such as the request header, at that index)."""
        if self.broken or not self._free:
            self._check_usable()
            raise QueueFull(f"all {self.size} descriptors are in use")
        return self._free[-1]

    def descriptors_needed(self, nsegs: int) -> int:
        return 1 if self.indirect and nsegs > 1 else nsegs

    # -- submit -------------------------------------------------------------------
    def add(self, segs: Sequence[tuple[int, int, bool]], token: T,
            writable: int | None = None) -> int:
        """Write a chain of (bus, length, device_writable) segments for the next ``kick``
        to publish and return its buffer ID."""
        if self.broken:
            self._check_usable()
        n = len(segs)
        if n == 0 or token is None:
            raise ValueError("a chain needs at least one segment and a token")
        if self.indirect and n > 1:
            if n > self.max_chain:
                raise ValueError(f"{n} segments exceed the indirect table of {self.max_chain}")
            if not self._free:
                raise QueueFull(f"all {self.size} descriptors are in use")
            bid = self._free.pop()
            if self._table_segs[bid] != segs:
                self._write_table(bid, segs)
            self._put_head(_PREFIX.pack(self._table_bus[bid], 16 * n, bid), _INDIRECT)
        else:
            if n > len(self._free):
                raise QueueFull(f"{n} descriptors needed, {len(self._free)} free")
            bid = self._add_direct(segs)
        self._writable[bid] = (sum(length for _, length, w in segs if w)
                               if writable is None else writable)
        self._token[bid] = token
        self._held_ids.append(bid)
        return bid

    def _hold(self, index: int, flags: int) -> None:
        """Store a head's flags (at u16 ``index``), unless it is the batch's first."""
        if self._held_at < 0:
            self._held_at, self._held_flags = index, flags
        else:
            self._u16[index] = flags

    def _advance(self, off: int) -> int:
        """The byte offset of the slot after the one at ``off``, flipping the driver's
        wrap counter at the end of the ring."""
        off += 16
        if off == self._ring_end:
            off = self._desc_off
            self._avail_wrap ^= 1
            self._avail_flags ^= _BOTH
        return off

    def _put_head(self, prefix: bytes, flags: int) -> None:
        """Store a one-descriptor chain at the avail position (flags last, or held)."""
        off = self._avail_off
        self._mm[off:off + 14] = prefix
        self._hold((off >> 1) + 7, flags | self._avail_flags)
        self._avail_off = self._advance(off)

    def _add_direct(self, segs: Sequence[tuple[int, int, bool]]) -> int:
        """Consecutive ring descriptors, NEXT on all but the last, the buffer ID in
        each; the head's flags last (or held). Returns the buffer ID."""
        ids = [self._free.pop() for _ in segs]
        bid = ids[0]
        if self.indirect:  # a plain add: the ID's table no longer matches what it held
            self._table_segs[bid] = None
            self._framed[bid] = None
        if len(ids) > 1:
            self._chain[bid] = ids
        last = len(segs) - 1
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
        return bid

    def _packer(self, n: int) -> struct.Struct:
        s = self._structs.get(n)
        if s is None:
            s = self._structs[n] = struct.Struct("<" + VIRTQ_DESC.format.lstrip("<") * n)
        return s

    def _write_table(self, bid: int, segs: Sequence[tuple[int, int, bool]]) -> None:
        """Fill the buffer ID's indirect table. "Indirect Flag: Scatter-Gather Support":
        in a table only VIRTQ_DESC_F_WRITE counts; entries follow each other, no NEXT."""
        flat: list[int] = []
        for addr, length, w in segs:
            flat += (addr, length, 0, _WRITE if w else 0)
        self._packer(len(segs)).pack_into(
            self._mm, self._table_off + bid * self._table_bytes, *flat)
        self._table_segs[bid] = segs
        self._framed[bid] = None

    # -- framed chains: the fast path for one data segment ---------------------------
    def frame(self, first: Sequence[tuple[int, int, bool]],
              last: Sequence[tuple[int, int, bool]]) -> None:
        """Give every buffer ID a fixed first and last segment (as SplitQueue.frame):
        ``add_framed`` then needs only the middle entry of a 3-entry table."""
        if not self.indirect or self.max_chain < 3:
            raise ValueError("framed chains need indirect tables of at least 3 entries")
        if len(first) != self.size or len(last) != self.size:
            raise ValueError(f"frame needs one first and one last segment per id ({self.size})")
        self._frame_first = [_DESC.pack(bus, n, 0, _WRITE if w else 0) for bus, n, w in first]
        self._frame_last = [_DESC.pack(bus, n, 0, _WRITE if w else 0) for bus, n, w in last]
        self._frame_ring = [_PREFIX.pack(bus, 48, bid) for bid, bus in enumerate(self._table_bus)]
        self._framed = [None] * self.size
        self.framed = True

    @staticmethod
    def framed_data(bus: int, length: int, writable: bool) -> bytes:
        """The middle entry of a framed table, packed once per buffer by the caller."""
        return _DESC.pack(bus, length, 0, _WRITE if writable else 0)

    def add_framed(self, data: bytes, token: T, writable: int) -> int:
        """``add`` for a framed chain: first segment, ``data`` (from ``framed_data``),
        last segment. ``writable`` is the chain's device-writable bytes."""
        free = self._free
        if self.broken or not free or token is None:
            self._check_usable()
            if token is None:
                raise ValueError("a chain needs a token")
            raise QueueFull(f"all {self.size} descriptors are in use")
        bid = free.pop()
        mm = self._mm
        if self._framed[bid] is not data:  # identity: the caller reuses one object per buffer
            table = self._table_off + bid * self._table_bytes
            if self._framed[bid] is None:  # not framed yet, or a plain add wrote the table
                mm[table:table + 16] = self._frame_first[bid]
                mm[table + 32:table + 48] = self._frame_last[bid]
                self._table_segs[bid] = None
            mm[table + 16:table + 32] = data
            self._framed[bid] = data
        # _put_head, _hold and _advance, inlined: this runs per request.
        off = self._avail_off
        mm[off:off + 14] = self._frame_ring[bid]
        if self._held_at < 0:
            self._held_at, self._held_flags = (off >> 1) + 7, _INDIRECT | self._avail_flags
        else:
            self._u16[(off >> 1) + 7] = _INDIRECT | self._avail_flags
        self._held_ids.append(bid)
        off += 16
        if off == self._ring_end:
            off = self._desc_off
            self._avail_wrap ^= 1
            self._avail_flags ^= _BOTH
        self._avail_off = off
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
        self.in_flight += len(self._held_ids)
        self._held_ids = []
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
        u16, at, pending = self._u16, self._used_at, self._used_pending
        bits = u16[at] & _BOTH  # at: the u16 index of the used position's flags
        if bits == pending or not left:
            return []  # still available: nothing used yet
        u32, tokens, writable = self._u32, self._token, self._writable
        chains, free, held = self._chain, self._free, self._held_ids
        used_bits = pending ^ _USED  # AVAIL|USED in lap 1, neither in lap 0
        out: list[tuple[T, int]] = []
        first_freed = len(free)
        while True:
            if bits != used_bits:
                if bits == pending:
                    break  # still available: not used yet
                self._fault(f"{self.name}: used descriptor at slot {self._slot(at)} has "
                            f"wrap bits {bits:#06x}, expected {used_bits:#06x} (used wrap "
                            f"counter {int(bool(used_bits))})")
            bid, length = u16[at - 1], u32[(at >> 1) - 1]  # id and len of that slot
            try:
                token = tokens[bid]
            except IndexError:  # a buffer ID beyond the queue: _bad_used says so
                token = None
            if token is None or length > writable[bid] or bid in held:
                self._bad_used(bid, length, at)
            tokens[bid] = None
            chain = chains[bid]
            if chain is None:
                free.append(bid)
                at += 8
            else:
                chains[bid] = None
                free.extend(chain)
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
        # Freed in completion order, handed out in reverse (the free list is a stack):
        # flip them, so that a caller who resubmits in the order it reaped gets each
        # buffer its previous id again, whose framed table then needs no write.
        free[first_freed:] = free[:first_freed - 1:-1] if first_freed else free[::-1]
        self._used_at, self._used_pending = at, pending
        self.in_flight = left
        self.completed += len(out)
        return out

    def _bad_used(self, bid: int, length: int, at: int) -> NoReturn:
        """The fault for a used descriptor whose buffer ID is not in flight, or which
        claims more bytes than the chain let the device write."""
        size = self.size
        why = ("out of range" if bid >= size
               else "not in flight" if self._token[bid] is None
               else "not yet published (added, no kick since)" if bid in self._held_ids
               else None)
        if why:
            self._fault(f"{self.name}: used buffer ID {bid} at slot {self._slot(at)} is "
                        f"{why} (queue size {size})")
        self._fault(f"{self.name}: used len {length} for buffer ID {bid} exceeds "
                    f"the chain's {self._writable[bid]} device-writable bytes")

    def pop_used(self) -> tuple[T, int] | None:
        """The next completion as (token, used length), checked as ``reap`` checks
        each, or None if the device has used nothing (or nothing is in flight): one at
        a time, as Linux's virtqueue_get_buf."""
        if self.broken:
            self._check_usable()
        u16, at, pending = self._u16, self._used_at, self._used_pending
        bits = u16[at] & _BOTH
        if bits == pending or not self.in_flight:
            return None
        if bits != pending ^ _USED:
            self._fault(f"{self.name}: used descriptor at slot {self._slot(at)} has "
                        f"wrap bits {bits:#06x}, expected {pending ^ _USED:#06x} (used "
                        f"wrap counter {int(bool(pending ^ _USED))})")
        bid, length = u16[at - 1], self._u32[(at >> 1) - 1]  # id and len of that slot
        tokens = self._token
        try:
            token = tokens[bid]
        except IndexError:  # a buffer ID beyond the queue: _bad_used says so
            token = None
        if token is None or length > self._writable[bid] or bid in self._held_ids:
            self._bad_used(bid, length, at)
        tokens[bid] = None
        chain = self._chain[bid]
        if chain is None:
            self._free.append(bid)
            at += 8
        else:
            self._chain[bid] = None
            self._free.extend(chain)
            at += 8 * len(chain)
        if at >= self._used_end:
            at -= self._used_span
            pending ^= _BOTH
        self._used_at, self._used_pending = at, pending
        self.in_flight -= 1
        self.completed += 1
        return token, length

    def wait(self, timeout: float) -> list[tuple[T, int]]:
        """Poll until at least one completion (or nothing is in flight); DeviceTimeout
        after ``timeout`` seconds. A timeout of 0 (or less) only looks: it returns what
        has completed, possibly nothing."""
        if (timeout > 0 and self._u16[self._used_at] & _BOTH == self._used_pending
                and self.in_flight and not self.broken):
            self._await_used(timeout)
        return self.reap()

    def wait_one(self, timeout: float) -> tuple[T, int] | None:
        """``wait`` for one completion (``pop_used`` once the device has used one): for
        a caller with one chain in flight. None if nothing is in flight."""
        if self._u16[self._used_at] & _BOTH == self._used_pending and self.in_flight:
            self._await_used(timeout)
        return self.pop_used()

    def _await_used(self, timeout: float) -> None:
        """Return once the descriptor at the used position has changed; DeviceTimeout
        after ``timeout`` seconds (as SplitQueue._await_used: a tight look, the clock
        now and then)."""
        if self.waiter is not None:
            self._sleep_wait(self.waiter, timeout)
            return
        u16, at, pending = self._u16, self._used_at, self._used_pending
        clock, deadline, spins = time.monotonic, 0.0, range(SPINS_PER_CLOCK)
        while True:
            for _ in spins:
                if u16[at] & _BOTH != pending:
                    return
            if not deadline:
                deadline = clock() + timeout
            elif clock() > deadline:
                self._timed_out(timeout)

    def _timed_out(self, timeout: float) -> None:
        pending_tokens = [t for t in self._token if t is not None]
        more = (f" (and {len(pending_tokens) - 1} more in flight)"
                if len(pending_tokens) > 1 else "")
        self._fault(f"{self.name}: no completion within {timeout:g} s for "
                    f"{pending_tokens[0]}{more}", DeviceTimeout)

    def _sleep_wait(self, waiter: Waiter, timeout: float) -> None:
        """``_await_used`` with a waiter: look ``waiter.spins`` times, then sleep until
        the device interrupts (the waiter arms, re-checks and disarms)."""
        for _ in range(waiter.spins):
            if self.has_used():
                return
        if not waiter.sleep(self, time.monotonic() + timeout):
            self._timed_out(timeout)

    # -- used buffer notifications (for a Waiter) ---------------------------------------
    def has_used(self) -> bool:
        """The descriptor at the used position no longer has the available bits."""
        return bool(self.in_flight) and (self._u16[self._used_at] & _BOTH
                                         != self._used_pending)

    def arm_interrupts(self) -> bool:
        """"Driver Requirements: Event Suppression": RING_EVENT_FLAGS_ENABLE in the
        driver event suppression structure (valid with or without EVENT_IDX), a full
        barrier, then look at the used position again: True if a used descriptor is
        already there (it may have been written before the device saw ENABLE)."""
        self._u16[self._driver_flags] = int(RingEventFlags.RING_EVENT_FLAGS_ENABLE)
        fence_acquire()
        fence_release()
        return self.has_used()

    def disarm_interrupts(self) -> None:
        if hasattr(self, "desc"):  # not detached
            self._u16[self._driver_flags] = _DISABLE

    def detach(self) -> None:
        """Drop the views on DMA memory (after the device reset) so it can be unmapped."""
        self._u16.release()
        self._u32.release()
        del self.desc, self.driver_event, self.device_event
        self.broken = self.broken or "closed"
