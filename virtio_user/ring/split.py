"""The split virtqueue in legacy layout: numpy dtypes, the layout function, SplitQueue.

virtio 1.2, "Split Virtqueues" (descriptor table, available ring, used ring) and
"Legacy Interfaces: A Note on Virtqueue Layout" (the used ring starts on a 4096-byte
boundary; QUEUE_ADDRESS holds the ring's address >> 12). Legacy rings are in the
guest's native byte order, which on x86 is little-endian, as the dtypes spell out.

Trust boundary: the driver's bookkeeping lives in ``RingCore``. From device-visible
memory SplitQueue reads only ``used.idx``, ``used.ring`` and the notification hints
(``used.flags`` / ``avail_event``), and every used element is validated before it is
believed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NoReturn, Sequence, TypeVar

import numpy as np

from ..errors import DmaError
from ..memory import PAGE
from ..spec import (VIRTQ_DESC, VIRTQ_DESC_DTYPE, LEGACY_PFN_SHIFT, LEGACY_QUEUE_ALIGN,
                    MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY, DescFlag)
from .core import (DESC_BYTES, FRAME_ENTRIES, LAST, Fields, Layout, RingCore, Seg,
                   fence_acquire, fence_release)

assert sys.byteorder == "little", "the memoryview casts below assume a little-endian CPU"

T = TypeVar("T")

DESC_DTYPE = VIRTQ_DESC_DTYPE
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])  # id (le32) + len (le32)
_DESC = VIRTQ_DESC
_NEXT = int(DescFlag.VIRTQ_DESC_F_NEXT)
_WRITE = int(DescFlag.VIRTQ_DESC_F_WRITE)
_INDIRECT = int(DescFlag.VIRTQ_DESC_F_INDIRECT)


def avail_dtype(size: int) -> np.dtype:
    """struct virtq_avail: flags, idx, ring[size], used_event (all le16)."""
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", "<u2", (size,)),
                     ("used_event", "<u2")])


def used_dtype(size: int) -> np.dtype:
    """struct virtq_used: flags, idx (le16), ring[size] of (id, len), avail_event (le16)."""
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", USED_ELEM_DTYPE, (size,)),
                     ("avail_event", "<u2")])


@dataclass(frozen=True)
class QueueLayout(Layout):
    """Byte offsets of the three parts of a legacy split virtqueue of ``size`` entries:
    the descriptor table, the available ring and the used ring."""

    avail: int
    used: int


def legacy_layout(size: int) -> QueueLayout:
    """The legacy layout: descriptor table, then the available ring (with used_event),
    then, at the next 4096-byte boundary, the used ring (with avail_event).

    "Split Virtqueues": queue size is a power of 2 no larger than 32768.
    """
    if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
    desc = 0
    avail = desc + DESC_DTYPE.itemsize * size
    used = -(-(avail + avail_dtype(size).itemsize) // LEGACY_QUEUE_ALIGN) * LEGACY_QUEUE_ALIGN
    total = -(-(used + used_dtype(size).itemsize) // PAGE) * PAGE
    return QueueLayout(size=size, total=total, desc=desc, avail=avail, used=used)


def _fields(addr: int, length: int, writable: bool, next_index: int) -> Fields:
    """struct virtq_desc: addr, len, flags (NEXT unless last, WRITE), next."""
    last = next_index == LAST
    return (addr, length, (_WRITE if writable else 0) | (0 if last else _NEXT),
            0 if last else next_index)


class SplitQueue(RingCore[T]):
    """A split virtqueue the driver fills and the device drains.

    ``add`` writes a chain (indirect when negotiated) and stores its head in the next
    available ring entry; ``kick`` publishes every stored head with one ``avail.idx``
    store and at most one notify; ``reap`` collects and validates every completion from
    the used ring in one pass; ``wait`` polls until something completes or the deadline
    passes (``RingCore``).
    """

    ID_WORD = "used id"
    NOT_IN_FLIGHT = "not the head of a chain in flight"
    VIEWS = ("desc", "avail", "used")
    _table_fields = staticmethod(_fields)
    NAME = ""  # one queue: messages say "used id ..." as they always did
    ALIGN = LEGACY_QUEUE_ALIGN
    layout: QueueLayout
    layout_for = staticmethod(legacy_layout)

    def _map(self) -> None:
        lay, size = self.layout, self.size
        if (self.ring.bus >> LEGACY_PFN_SHIFT) >> 32:
            raise DmaError(f"queue at {self.ring.bus:#x} is beyond QUEUE_ADDRESS's 32-bit PFN")
        self.pfn = self.ring.bus >> LEGACY_PFN_SHIFT
        self._mask = size - 1
        mm, base = self._mm, self.ring.offset
        self._desc_off = base + lay.desc
        # numpy views by field name, for inspection and tests. np.frombuffer holds a
        # buffer export on the mapping (np.ndarray(buffer=mm) does not): a view kept
        # past close() then keeps the mapping alive instead of reading unmapped memory ...
        self.desc = np.frombuffer(mm, DESC_DTYPE, size, base + lay.desc)
        self.avail = np.frombuffer(mm, avail_dtype(size), 1, base + lay.avail).reshape(())
        self.used = np.frombuffer(mm, used_dtype(size), 1, base + lay.used).reshape(())
        # ... and memoryview casts for the hot path, where a numpy scalar access costs
        # several times a plain list index.
        self._u16 = memoryview(mm)[base:base + lay.total].cast("H")
        self._u32 = memoryview(mm)[base:base + lay.total].cast("I")
        self._avail_flags = lay.avail // 2
        self._avail_idx = lay.avail // 2 + 1
        self._avail_ring = lay.avail // 2 + 2
        self._used_event = lay.avail // 2 + 2 + size
        self._used_flags = lay.used // 2
        self._used_ring = (lay.used + 4) // 4
        self._avail_event = (lay.used + 4 + 8 * size) // 2
        # The used position: used.idx, which holds _used_none (what we last consumed,
        # 16 bits) while the device has used nothing new.
        self._used_at = lay.used // 2 + 1
        self._used_mask = 0xFFFF
        self._used_none = 0
        # We poll: ask for no interrupts (with EVENT_IDX the device reads used_event).
        self._u16[self._avail_flags] = VIRTQ_AVAIL_F_NO_INTERRUPT
        self._u16[self._used_event] = 0xFFFF
        self._next_avail = 0  # free-running count of heads added
        self._published = 0  # avail.idx as last stored (16 bits)

    # -- state --------------------------------------------------------------------
    @property
    def avail_idx(self) -> int:
        return self._published

    @property
    def used_idx(self) -> int:
        return self._used_none

    # -- submit -------------------------------------------------------------------
    def _put_indirect(self, head: int, n: int) -> None:
        # The head's descriptor was pointed at its table when the table was written.
        self._u16[self._avail_ring + (self._next_avail & self._mask)] = head
        self._next_avail += 1

    def _write_table(self, head: int, segs: Sequence[Seg]) -> None:
        super()._write_table(head, segs)
        _DESC.pack_into(self._mm, self._desc_off + DESC_BYTES * head, self._table_bus[head],
                        DESC_BYTES * len(segs), _INDIRECT, 0)

    def _put_direct(self, ids: list[int], segs: Sequence[Seg]) -> None:
        last, mm, off = len(ids) - 1, self._mm, self._desc_off
        for i, (addr, length, w) in enumerate(segs):
            _DESC.pack_into(mm, off + DESC_BYTES * ids[i],
                            *_fields(addr, length, w, ids[i + 1] if i < last else LAST))
        self._u16[self._avail_ring + (self._next_avail & self._mask)] = ids[0]
        self._next_avail += 1

    # -- framed chains: the fast path for one data segment ---------------------------
    def _framed_ring(self) -> list[bytes]:
        return [_DESC.pack(bus, FRAME_ENTRIES * DESC_BYTES, _INDIRECT, 0)
                for bus in self._table_bus]

    def _frame_data(self, head: int, data: bytes) -> None:
        # The head's ring descriptor may point at a plain table, or be a direct one.
        off = self._desc_off + DESC_BYTES * head
        self._mm[off:off + DESC_BYTES] = self._frame_ring[head]
        super()._frame_data(head, data)

    def add_framed(self, data: bytes, token: T, writable: int) -> int:
        """The framed chain's head goes in the next available ring entry; its ring
        descriptor already points at its table (``_frame_data``)."""
        free = self._free
        if self.broken or not free or token is None:
            self._refuse(token)
        head = free.pop()
        self._u16[self._avail_ring + (self._next_avail & self._mask)] = head
        self._next_avail += 1
        if self._framed[head] is not data:  # identity: the caller reuses one per buffer
            self._frame_data(head, data)
        self._writable[head] = writable
        self._token[head] = token
        self._held.append(head)
        return head

    def kick(self) -> None:
        """Publish every chain added since the last kick: bump ``avail.idx`` over the
        ring entries ``add`` stored, then notify unless the device said it need not be
        ("Driver Requirements: Available Buffer Notification Suppression")."""
        if self.broken:
            self._check_usable()
        new = self._next_avail & 0xFFFF
        old = self._published
        if new == old:
            return
        # Write ordering: the ring entries (and descriptors) were stored before this
        # idx store. x86 is TSO, stores become visible in program order, so the device
        # cannot see the new idx before the entries it covers; a weaker CPU would need
        # a write barrier here.
        u16 = self._u16
        u16[self._avail_idx] = new
        self._published = new
        self._held = []
        added = (new - old) & 0xFFFF
        self.in_flight += added
        # Store-load ordering is NOT kept by TSO: without a full barrier we could read
        # a stale avail_event/flags while the device, having re-enabled notifications,
        # reads our old idx: a lost kick.
        fence_acquire()  # full_barrier(), inlined: this runs per batch
        fence_release()
        if self.event_idx:  # vring_need_event
            if (new - u16[self._avail_event] - 1) & 0xFFFF >= added:
                return
        elif u16[self._used_flags] & VIRTQ_USED_F_NO_NOTIFY:
            return
        self._notify()  # a register write into the device: also a full barrier
        self.kicks += 1

    # -- complete -----------------------------------------------------------------
    def reap(self) -> list[tuple[T, int]]:
        """Every completion the device has published, as (token, used length), after
        checking each: id in range and the head of a chain in flight, length within
        that chain's device-writable bytes, and used.idx not beyond what is in flight.
        Loads are not reordered with other loads on x86, so the entries read after
        used.idx are at least as new as it."""
        if self.broken:
            self._check_usable()
        u16 = self._u16
        used = u16[self._used_at]
        last = self._used_none
        n = (used - last) & 0xFFFF
        if not n:
            return []
        if n > self.in_flight:
            self._bad_used_idx(used)
        out: list[tuple[T, int]] = []
        u32, ring, mask, size = self._u32, self._used_ring, self._mask, self.size
        tokens, writable, chains, free = self._token, self._writable, self._chain, self._free
        held = self._held
        first_freed = len(free)
        for i in range(n):
            slot = ring + 2 * ((last + i) & mask)
            head, length = u32[slot], u32[slot + 1]
            # One test per element (inline: this loop runs per completion); _bad_used
            # says what is wrong.
            if (head >= size or (token := tokens[head]) is None or length > writable[head]
                    or head in held):
                self._bad_used(head, length)
            tokens[head] = None
            free += chains[head]
            out.append((token, length))
        # Freed in completion order, handed out in reverse (the free list is a stack):
        # flip them, so that a caller who resubmits in the order it reaped gets each
        # buffer its previous id again, whose framed table then needs no write.
        free[first_freed:] = free[:first_freed - 1:-1] if first_freed else free[::-1]
        self._used_none = used
        self.in_flight -= n
        self.completed += n
        # Keep used_event one behind: the device would interrupt only after wrapping.
        u16[self._used_event] = (used - 1) & 0xFFFF
        return out

    def _bad_used_idx(self, used: int) -> NoReturn:
        last = self._used_none
        self._fault(f"used.idx moved from {last} to {used}: {(used - last) & 0xFFFF} "
                    f"completions with only {self.in_flight} requests in flight")

    def pop_used(self) -> tuple[T, int] | None:
        """The oldest completion as (token, used length), checked as ``reap`` checks
        each, or None if the device has published none: one at a time, as Linux's
        virtqueue_get_buf, and as strict as ``reap`` about used.idx."""
        if self.broken:
            self._check_usable()
        u16 = self._u16
        used, last = u16[self._used_at], self._used_none
        if used == last:
            return None
        if (used - last) & 0xFFFF > self.in_flight:
            self._bad_used_idx(used)
        slot = self._used_ring + 2 * (last & self._mask)
        u32, tokens = self._u32, self._token
        head, length = u32[slot], u32[slot + 1]
        if (head >= self.size or (token := tokens[head]) is None
                or length > self._writable[head] or head in self._held):
            self._bad_used(head, length)
        tokens[head] = None
        self._free += self._chain[head]
        self._used_none = last = (last + 1) & 0xFFFF
        self.in_flight -= 1
        self.completed += 1
        u16[self._used_event] = (last - 1) & 0xFFFF  # as in reap
        return token, length

    # -- used buffer notifications (for a Waiter) ---------------------------------------
    def _interrupts(self, enable: bool) -> None:
        """"Driver Requirements: Used Buffer Notification Suppression": without
        EVENT_IDX VIRTQ_AVAIL_F_NO_INTERRUPT says it; with it, used_event names the used
        index to interrupt past: the one we wait past, or (off) one a full wrap away."""
        if self.event_idx:
            self._u16[self._used_event] = (self._used_none - (0 if enable else 1)) & 0xFFFF
        else:
            self._u16[self._avail_flags] = 0 if enable else VIRTQ_AVAIL_F_NO_INTERRUPT
