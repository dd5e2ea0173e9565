"""The split virtqueue in legacy layout: numpy dtypes, the layout function, SplitQueue.

virtio 1.2, "Split Virtqueues" (descriptor table, available ring, used ring) and
"Legacy Interfaces: A Note on Virtqueue Layout" (the used ring starts on a 4096-byte
boundary; QUEUE_ADDRESS holds the ring's address >> 12). Legacy rings are in the
guest's native byte order, which on x86 is little-endian, as the dtypes spell out.

Trust boundary: the driver's bookkeeping (free list, chains, tokens, writable lengths)
lives here in Python. From device-visible memory SplitQueue reads only ``used.idx``,
``used.ring`` and the notification hints (``used.flags`` / ``avail_event``), and every
used element is validated before it is believed.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, NoReturn, Sequence, TypeVar

import numpy as np

from ..errors import DeviceError, DeviceTimeout, DmaError, VirtioError
from ..memory import PAGE, Chunk, DmaAllocator
from ..spec import (VIRTQ_DESC, VIRTQ_DESC_DTYPE, LEGACY_PFN_SHIFT, LEGACY_QUEUE_ALIGN, MAX_QUEUE_SIZE,
                   VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY, DescFlag)

if TYPE_CHECKING:
    from ..interrupts import Waiter

assert sys.byteorder == "little", "the memoryview casts below assume a little-endian CPU"

T = TypeVar("T")

DESC_DTYPE = VIRTQ_DESC_DTYPE
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])  # id (le32) + len (le32)
_DESC = VIRTQ_DESC
DESC_BYTES = _DESC.size
# A framed indirect table (``frame``/``add_framed``): the id's fixed first segment, the
# request's data, the id's fixed last segment.
FRAME_FIRST, FRAME_DATA, FRAME_LAST = 0, 1, 2
FRAME_ENTRIES = 3
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


class QueueFull(VirtioError):
    """Not enough free descriptors for the chain; reap completions first."""


@dataclass(frozen=True)
class QueueLayout:
    """Byte offsets of the three parts of a legacy split virtqueue of ``size`` entries."""

    size: int
    desc: int
    avail: int
    used: int
    total: int  # bytes to allocate, a whole number of pages


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
    return QueueLayout(size, desc, avail, used, total)


SPINS_PER_CLOCK = 1024  # looks at the used index between two clock reads in wait()
_fence_lock = threading.Lock()
# The two halves of full_barrier(), bound once: the rings inline them on the kick path.
fence_acquire, fence_release = _fence_lock.acquire, _fence_lock.release


def full_barrier() -> None:
    """A full memory barrier (store-load ordering), which Python has no word for.

    On x86 any locked instruction is one; CPython's Lock.acquire/release on Linux run
    sem_trywait/sem_post, which are lock-prefixed compare-and-swaps.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def indirect_tables(alloc: DmaAllocator, count: int, entries: int) -> tuple[Chunk, int, list[int]]:
    """``count`` indirect descriptor tables of ``entries`` 16-byte descriptors each (both
    rings' descriptors are 16 bytes: "The Virtqueue Descriptor Table", "Packed
    Virtqueues"): the chunk, each table's size in bytes and each table's bus address.
    A table takes the next power of two of its size and is aligned to it, so none
    straddles a page boundary (bus addresses are contiguous only within a page)."""
    table_bytes = 1 << (DESC_BYTES * entries - 1).bit_length()
    if table_bytes > PAGE:
        raise ValueError(f"indirect tables of {entries} entries exceed a page")
    chunk = alloc.alloc(count * table_bytes, table_bytes)
    bus = alloc.region.bus
    return chunk, table_bytes, [bus(chunk.offset + i * table_bytes) for i in range(count)]


class QueueFaults:
    """What both rings do when the device misbehaves: remember why (``broken``), reset
    it through ``on_fault`` before raising, and refuse every later use."""

    broken: str | None
    _on_fault: Callable[[], object]

    def _check_usable(self) -> None:
        if self.broken:
            raise DeviceError(f"the queue is unusable after: {self.broken}")

    def _fault(self, message: str, cls: type[DeviceError] = DeviceError) -> NoReturn:
        """Reset the device, then raise: no data from a misbehaving device is used.
        ``on_fault`` says whether the reset took (False: the status did not read back
        0). A signal that interrupts the reset propagates as it is: a Ctrl-C stays one."""
        self.broken = message
        outcome = ("the device has been reset" if self._on_fault() is not False
                   else "the device did not reset; its memory stays mapped")
        raise cls(f"{message}; {outcome}")


class SplitQueue(QueueFaults, Generic[T]):
    """A split virtqueue the driver fills and the device drains.

    ``add`` writes a chain (indirect when negotiated) and queues its head; ``kick``
    publishes every queued head with one ``avail.idx`` store and at most one notify;
    ``reap`` collects and validates every completion in one pass; ``wait`` polls until
    something completes or the deadline passes. On any violation by the device, or a
    timeout, ``on_fault`` (a device reset) runs before the error is raised, and the
    queue refuses further use.
    """

    def __init__(self, alloc: DmaAllocator, size: int, notify: Callable[[], None], *,
                 indirect: bool, event_idx: bool, on_fault: Callable[[], bool | None],
                 max_chain: int = 16) -> None:
        self.layout = lay = legacy_layout(size)
        self.size = size
        self._mask = size - 1
        self._notify = notify
        self._on_fault = on_fault
        self.indirect = indirect
        self.event_idx = event_idx
        self.max_chain = max_chain if indirect else size
        region = alloc.region
        self.ring = alloc.alloc(lay.total, LEGACY_QUEUE_ALIGN)
        if not self.ring.is_contiguous():
            raise DmaError(f"queue memory ({lay.total} bytes) is not physically contiguous")
        if (self.ring.bus >> LEGACY_PFN_SHIFT) >> 32:
            raise DmaError(f"queue at {self.ring.bus:#x} is beyond QUEUE_ADDRESS's 32-bit PFN")
        self.pfn = self.ring.bus >> LEGACY_PFN_SHIFT
        mm, base = region.mm, self.ring.offset
        mm[base:base + lay.total] = bytes(lay.total)  # never hand stale rings to a device
        self._mm = mm
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
        self._used_idx = lay.used // 2 + 1
        self._used_ring = (lay.used + 4) // 4
        self._avail_event = (lay.used + 4 + 8 * size) // 2
        # We poll: ask for no interrupts (with EVENT_IDX the device reads used_event).
        self._u16[self._avail_flags] = VIRTQ_AVAIL_F_NO_INTERRUPT
        self._u16[self._used_event] = 0xFFFF
        if indirect:
            self.tables, self._table_bytes, self._table_bus = indirect_tables(
                alloc, size, max_chain)
            self._table_off = self.tables.offset
            self._table_segs: list[Sequence[tuple[int, int, bool]] | None] = [None] * size
        # Framed tables (``frame``/``add_framed``): the data descriptor each head's table
        # holds between its fixed first and last entries, None when the table is not framed.
        self._framed: list[bytes | None] = [None] * size
        self.framed = False  # frame() was called: add_framed may be used
        self._frame_first: list[bytes] = []
        self._frame_last: list[bytes] = []
        self._frame_ring: list[bytes] = []
        self._structs: dict[int, struct.Struct] = {}
        # Driver-private bookkeeping (never read back from device memory).
        self._free = list(range(size - 1, -1, -1))
        self._token: list[T | None] = [None] * size
        self._writable = [0] * size
        self._chain: list[list[int] | None] = [None] * size
        self._next_avail = 0  # free-running count of heads added
        self._held: list[int] = []  # heads added since the last kick: not yet published
        self._published = 0  # avail.idx as last stored (16 bits)
        self._last_used = 0  # used.idx as last consumed (16 bits)
        self.in_flight = 0  # published and not yet reaped
        self.completed = 0
        self.kicks = 0
        self.broken: str | None = None
        self.waiter: Waiter | None = None  # None: poll; else sleep when spins run out

    # -- state --------------------------------------------------------------------
    @property
    def avail_idx(self) -> int:
        return self._published

    @property
    def used_idx(self) -> int:
        return self._last_used

    @property
    def outstanding(self) -> int:
        """Chains added and not yet reaped, published or not."""
        return self.in_flight + len(self._held)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_ids(self) -> list[int]:
        """The free descriptor ids, the one the next ``add`` takes first (to inspect)."""
        return self._free[::-1]

    def next_head(self) -> int:
        """The descriptor id the next ``add`` will return as its head (callers keep
        per-head state, such as a request header, at that index)."""
        if self.broken or not self._free:
            self._check_usable()
            raise QueueFull(f"all {self.size} descriptors are in use")
        return self._free[-1]

    def descriptors_needed(self, nsegs: int) -> int:
        """Ring descriptors a chain of ``nsegs`` segments takes (one with a table)."""
        return 1 if self.indirect and nsegs > 1 else nsegs

    # -- submit -------------------------------------------------------------------
    def add(self, segs: Sequence[tuple[int, int, bool]], token: T,
            writable: int | None = None) -> int:
        """Write a chain of (bus, length, device_writable) segments, queue its head for
        the next ``kick`` and return the head's descriptor id. ``writable`` (the sum of
        the writable lengths) may be given by a caller that already knows it."""
        if self.broken:
            self._check_usable()
        n = len(segs)
        if n == 0 or token is None:
            raise ValueError("a chain needs at least one segment and a token")
        if self.indirect and n > 1:
            if n > self.max_chain or not self._free:
                self._refuse_indirect(n)
            head = self._free.pop()
            # A slot reused for the same chain (same buffer, same length: the common
            # case when a caller recycles its requests) already holds the right table.
            # Only the driver writes tables; a device scribbling on them could as well
            # scribble on anything else (uio gives no protection).
            if self._table_segs[head] != segs:
                self._write_table(head, segs)
        else:
            head = self._add_direct(segs)
        self._writable[head] = (sum(length for _, length, w in segs if w)
                                if writable is None else writable)
        self._token[head] = token
        self._u16[self._avail_ring + (self._next_avail & self._mask)] = head
        self._next_avail += 1
        self._held.append(head)
        return head

    def _flat(self, segs: Sequence[tuple[int, int, bool]], nexts: Sequence[int]) -> list[int]:
        flat: list[int] = []
        last = len(segs) - 1
        for i, (addr, length, w) in enumerate(segs):
            flat += (addr, length, (_WRITE if w else 0) | (_NEXT if i < last else 0),
                     nexts[i] if i < last else 0)
        return flat

    def _packer(self, n: int) -> struct.Struct:
        s = self._structs.get(n)
        if s is None:
            s = self._structs[n] = struct.Struct("<" + VIRTQ_DESC.format.lstrip("<") * n)
        return s

    def _refuse_indirect(self, n: int) -> None:
        if n > self.max_chain:
            raise ValueError(f"{n} segments exceed the indirect table of {self.max_chain}")
        raise QueueFull(f"all {self.size} descriptors are in use")

    def _write_table(self, head: int, segs: Sequence[tuple[int, int, bool]]) -> None:
        """Fill the head's indirect table and point its ring descriptor at it."""
        n = len(segs)
        self._packer(n).pack_into(self._mm, self._table_off + head * self._table_bytes,
                                  *self._flat(segs, range(1, n)))
        _DESC.pack_into(self._mm, self._desc_off + 16 * head, self._table_bus[head],
                        16 * n, _INDIRECT, 0)
        self._table_segs[head] = segs
        self._framed[head] = None

    def _add_direct(self, segs: Sequence[tuple[int, int, bool]]) -> int:
        n = len(segs)
        if n > len(self._free):
            raise QueueFull(f"{n} descriptors needed, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        if self.indirect:  # these ring descriptors no longer point at the ids' tables
            for i in ids:
                self._table_segs[i] = None
                self._framed[i] = None
        for i, flat in enumerate(zip(*[iter(self._flat(segs, ids[1:]))] * 4)):
            _DESC.pack_into(self._mm, self._desc_off + 16 * ids[i], *flat)
        self._chain[ids[0]] = ids
        return ids[0]

    # -- framed chains: the fast path for one data segment ---------------------------
    def frame(self, first: Sequence[tuple[int, int, bool]],
              last: Sequence[tuple[int, int, bool]]) -> None:
        """Give every descriptor id a fixed first and last segment (for virtio-blk: the
        head's request header and status byte). ``add_framed`` then fills a 3-entry
        indirect table of which only the middle (data) entry changes, and a table whose
        data entry is already the one asked for is not written at all."""
        if not self.indirect or self.max_chain < FRAME_ENTRIES:
            raise ValueError(f"framed chains need indirect tables of at least "
                             f"{FRAME_ENTRIES} entries")
        if len(first) != self.size or len(last) != self.size:
            raise ValueError(f"frame needs one first and one last segment per id ({self.size})")
        self._frame_first = [_DESC.pack(bus, n, _NEXT | (_WRITE if w else 0), FRAME_DATA)
                             for bus, n, w in first]
        self._frame_last = [_DESC.pack(bus, n, _WRITE if w else 0, 0) for bus, n, w in last]
        self._frame_ring = [_DESC.pack(bus, FRAME_ENTRIES * DESC_BYTES, _INDIRECT, 0)
                            for bus in self._table_bus]
        self._framed = [None] * self.size
        self.framed = True

    @staticmethod
    def framed_data(bus: int, length: int, writable: bool) -> bytes:
        """The middle entry of a framed table, packed: callers build it once per buffer
        and pass the same object to every ``add_framed``."""
        return _DESC.pack(bus, length, _NEXT | (_WRITE if writable else 0), FRAME_LAST)

    def add_framed(self, data: bytes, token: T, writable: int) -> int:
        """``add`` for a framed chain: first segment, ``data`` (from ``framed_data``),
        last segment. ``writable`` is the chain's device-writable bytes."""
        free = self._free
        if self.broken or not free or token is None:
            self._check_usable()
            if token is None:
                raise ValueError("a chain needs a token")
            raise QueueFull(f"all {self.size} descriptors are in use")
        head = free.pop()
        held = self._framed[head]
        if held is not data:  # identity: the caller reuses one object per buffer
            table = self._table_off + head * self._table_bytes
            mm = self._mm
            if held is None:  # not framed yet, or a plain add wrote another table
                first, last = table + FRAME_FIRST * DESC_BYTES, table + FRAME_LAST * DESC_BYTES
                mm[first:first + DESC_BYTES] = self._frame_first[head]
                mm[last:last + DESC_BYTES] = self._frame_last[head]
                off = self._desc_off + DESC_BYTES * head
                mm[off:off + DESC_BYTES] = self._frame_ring[head]
                self._table_segs[head] = None
            middle = table + FRAME_DATA * DESC_BYTES
            mm[middle:middle + DESC_BYTES] = data
            self._framed[head] = data
        self._writable[head] = writable
        self._token[head] = token
        self._u16[self._avail_ring + (self._next_avail & self._mask)] = head
        self._next_avail += 1
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
        used = u16[self._used_idx]
        last = self._last_used
        n = (used - last) & 0xFFFF
        if not n:
            return []
        if n > self.in_flight:
            self._fault(f"used.idx moved from {last} to {used}: {n} completions "
                        f"with only {self.in_flight} requests in flight")
        out: list[tuple[T, int]] = []
        u32, ring, mask = self._u32, self._used_ring, self._mask
        tokens, writable, chains, free = self._token, self._writable, self._chain, self._free
        held = self._held
        first_freed = len(free)
        for i in range(n):
            slot = ring + 2 * ((last + i) & mask)
            head, length = u32[slot], u32[slot + 1]
            try:
                token = tokens[head]
            except IndexError:  # an id beyond the queue: _bad_used says so
                token = None
            if token is None or length > writable[head] or head in held:
                self._bad_used(head, length)
            # Release the chain to the free list (inline: this loop runs per completion).
            tokens[head] = None
            chain = chains[head]
            if chain is None:
                free.append(head)
            else:
                chains[head] = None
                free.extend(chain)
            out.append((token, length))
        # Freed in completion order, handed out in reverse (the free list is a stack):
        # flip them, so that a caller who resubmits in the order it reaped gets each
        # buffer its previous id again, whose framed table then needs no write.
        free[first_freed:] = free[:first_freed - 1:-1] if first_freed else free[::-1]
        self._last_used = used
        self.in_flight -= n
        self.completed += n
        # Keep used_event one behind: the device would interrupt only after wrapping.
        u16[self._used_event] = (used - 1) & 0xFFFF
        return out

    def _bad_used(self, head: int, length: int) -> NoReturn:
        """The fault for a used element that names no chain in flight, or claims more
        bytes than the chain let the device write."""
        size = self.size
        why = ("out of range" if head >= size
               else "not the head of a chain in flight" if self._token[head] is None
               else "not yet published (added, no kick since)" if head in self._held
               else None)
        if why:
            self._fault(f"used id {head} is {why} (queue size {size})")
        self._fault(f"used len {length} for id {head} exceeds the chain's "
                    f"{self._writable[head]} device-writable bytes")

    def pop_used(self) -> tuple[T, int] | None:
        """The oldest completion as (token, used length), checked as ``reap`` checks
        each, or None if the device has published none: one at a time, as Linux's
        virtqueue_get_buf, and as strict as ``reap`` about used.idx."""
        if self.broken:
            self._check_usable()
        u16 = self._u16
        used, last = u16[self._used_idx], self._last_used
        if used == last:
            return None
        if (used - last) & 0xFFFF > self.in_flight:
            self._fault(f"used.idx moved from {last} to {used}: {(used - last) & 0xFFFF} "
                        f"completions with only {self.in_flight} requests in flight")
        slot = self._used_ring + 2 * (last & self._mask)
        u32 = self._u32
        head, length = u32[slot], u32[slot + 1]
        tokens = self._token
        try:
            token = tokens[head]
        except IndexError:  # an id beyond the queue: _bad_used says so
            token = None
        if token is None or length > self._writable[head] or head in self._held:
            self._bad_used(head, length)
        tokens[head] = None
        chain = self._chain[head]
        if chain is None:
            self._free.append(head)
        else:
            self._chain[head] = None
            self._free.extend(chain)
        self._last_used = last = (last + 1) & 0xFFFF
        self.in_flight -= 1
        self.completed += 1
        u16[self._used_event] = (last - 1) & 0xFFFF  # as in reap
        return token, length

    def wait(self, timeout: float) -> list[tuple[T, int]]:
        """Poll until at least one completion (or nothing is in flight); DeviceTimeout
        after ``timeout`` seconds. A timeout of 0 (or less) only looks: it returns what
        has completed, possibly nothing."""
        if (timeout > 0 and self._u16[self._used_idx] == self._last_used and self.in_flight
                and not self.broken):
            self._await_used(timeout)
        return self.reap()

    def wait_one(self, timeout: float) -> tuple[T, int] | None:
        """``wait`` for one completion (``pop_used`` once the device has published one):
        for a caller with one chain in flight. None if nothing is in flight."""
        if self._u16[self._used_idx] == self._last_used and self.in_flight:
            self._await_used(timeout)
        return self.pop_used()

    def _await_used(self, timeout: float) -> None:
        """Return once used.idx has moved; DeviceTimeout after ``timeout`` seconds."""
        u16, pos, last = self._u16, self._used_idx, self._last_used
        if self.waiter is not None:
            self._sleep_wait(self.waiter, timeout)
            return
        clock, deadline, spins = time.monotonic, 0.0, range(SPINS_PER_CLOCK)
        while True:
            # The clock only every SPINS_PER_CLOCK looks (the deadline starts at the
            # first): in a TCG guest whose clocksource is HPET each read traps into
            # QEMU, under the lock the device emulation needs to complete our requests.
            # The look itself is the tightest loop Python has: it runs until the device
            # answers, and the time from its answer to our reap is latency.
            for _ in spins:
                if u16[pos] != last:
                    return
            if not deadline:
                deadline = clock() + timeout
            elif clock() > deadline:
                self._timed_out(timeout)

    def _sleep_wait(self, waiter: Waiter, timeout: float) -> None:
        """``_await_used`` with a waiter: look ``waiter.spins`` times, then sleep until
        the device interrupts (the waiter arms, re-checks and disarms)."""
        u16, pos, last = self._u16, self._used_idx, self._last_used
        for _ in range(waiter.spins):
            if u16[pos] != last:
                return
        if not waiter.sleep(self, time.monotonic() + timeout):
            self._timed_out(timeout)

    def _timed_out(self, timeout: float) -> None:
        pending = [t for t in self._token if t is not None]
        more = f" (and {len(pending) - 1} more in flight)" if len(pending) > 1 else ""
        self._fault(f"no completion within {timeout:g} s for {pending[0]}{more}",
                    DeviceTimeout)

    # -- used buffer notifications (for a Waiter) ---------------------------------------
    def has_used(self) -> bool:
        return self._u16[self._used_idx] != self._last_used

    def arm_interrupts(self) -> bool:
        """Ask the device to interrupt for the next used buffer, then look again: True
        if one is already there. "Driver Requirements: Used Buffer Notification
        Suppression": without EVENT_IDX clear VIRTQ_AVAIL_F_NO_INTERRUPT, with it set
        used_event to the used index we wait past. The barrier orders that store before
        the re-read of used.idx: a device that published just before seeing our request
        is caught by the re-read, one that publishes after it sees the request."""
        u16 = self._u16
        if self.event_idx:
            u16[self._used_event] = self._last_used
        else:
            u16[self._avail_flags] = 0
        full_barrier()
        return u16[self._used_idx] != self._last_used

    def disarm_interrupts(self) -> None:
        """Back to polling: no interrupts (with EVENT_IDX, only after a full wrap)."""
        if not hasattr(self, "desc"):
            return  # detached: the ring memory is gone
        if self.event_idx:
            self._u16[self._used_event] = (self._last_used - 1) & 0xFFFF
        else:
            self._u16[self._avail_flags] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def detach(self) -> None:
        """Drop the views on DMA memory (after the device reset) so it can be unmapped."""
        self._u16.release()
        self._u32.release()
        del self.desc, self.avail, self.used
        self.broken = self.broken or "closed"
