"""What the split and the packed virtqueue share: ``RingCore``.

virtio 1.2, "Basic Facilities of a Virtio Device: Virtqueues". Both rings hand out
descriptor ids from one free list, keep the same driver-private bookkeeping per id
(token, device-writable bytes, the ids a chain holds), fill indirect tables ("Indirect
Descriptors", "Indirect Flag: Scatter-Gather Support") and framed tables the same way,
check what a caller passes and what the device returns the same way, and wait, time
out and break the same way. A ring module (``split``, ``packed``) keeps only its layout
and its discipline: where a chain's descriptors go, how a batch is published (``kick``)
and how used buffers are found (``reap``, ``pop_used``).

Trust boundary: everything here is the driver's own; from device memory the core reads
only the one word a ring names as its "used position" (``_used_at``: split's used.idx,
the flags of packed's next used descriptor), to wait on it.

The hot paths (``add_framed``, ``kick``, ``reap``, ``pop_used``) stay in the ring
modules, inlined by hand: a Python call costs about a microsecond in a TCG guest, as
much as the checks themselves. What they share that runs only on an error or on a change
(refusals, faults, table writes) lives here.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Generic, NoReturn, Sequence, TypeVar

from ..errors import DeviceError, DeviceTimeout, DmaError, VirtioError
from ..memory import PAGE, Chunk, DmaAllocator
from ..spec import VIRTQ_DESC

if TYPE_CHECKING:
    from ..interrupts import Waiter

T = TypeVar("T")
Seg = tuple[int, int, bool]  # (bus address, length, device-writable)
Fields = tuple[int, int, int, int]  # one 16-byte descriptor, as VIRTQ_DESC packs it


@dataclass(frozen=True)
class Layout:
    """Byte offsets of a ring's parts in its memory, which begins with the descriptors
    (each ring adds its other parts)."""

    size: int  # entries
    total: int  # bytes to allocate, a whole number of pages
    desc: int


DESC_BYTES = VIRTQ_DESC.size  # both rings' descriptors are 16 bytes
# A framed indirect table (``frame``/``add_framed``): the id's fixed first segment, the
# request's data, the id's fixed last segment.
FRAME_FIRST, FRAME_DATA, FRAME_LAST = 0, 1, 2
FRAME_ENTRIES = 3
LAST = -1  # ``next_index`` of a table's last entry

SPINS_PER_CLOCK = 1024  # looks at the used position between two clock reads in wait()
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


class QueueFull(VirtioError):
    """Not enough free descriptors for the chain; reap completions first."""


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


class RingCore(Generic[T]):
    """The part of a virtqueue that does not depend on its layout.

    A subclass sets the used position (``_used_at``, ``_used_mask``, ``_used_none``:
    ``u16[_used_at] & _used_mask`` reads ``_used_none`` while the device has used
    nothing new) and provides ``_table_fields`` (one descriptor of an indirect table),
    ``_put_indirect``/``_put_direct`` (a chain's ring descriptors), ``add_framed``,
    ``kick``, ``reap``, ``pop_used`` and ``_interrupts``.
    On any violation by the device, or a timeout, ``on_fault`` (a device reset) runs
    before the error is raised, and the queue refuses further use (``broken``).
    """

    NAME: ClassVar[str]  # the default name, which prefixes fault messages when not ""
    ALIGN: ClassVar[int]  # of the ring memory
    ID_WORD: ClassVar[str]  # what a fault calls a used id ("used id", "used buffer ID")
    NOT_IN_FLIGHT: ClassVar[str]  # what a fault says of an id with no chain in flight
    VIEWS: ClassVar[tuple[str, ...]]  # the numpy views on ring memory, dropped by detach

    _u16: memoryview
    _u32: memoryview
    _used_at: int
    _used_mask: int
    _used_none: int

    def __init__(self, alloc: DmaAllocator, size: int, notify: Callable[[], None], *,
                 indirect: bool, event_idx: bool, on_fault: Callable[[], bool | None],
                 max_chain: int = 16, name: str | None = None) -> None:
        self.layout = lay = self.layout_for(size)
        self.size = size
        self.name = self.NAME if name is None else name
        self._label = f"{self.name}: " if self.name else ""
        self._notify = notify
        self._on_fault = on_fault
        self.indirect = indirect
        self.event_idx = event_idx
        self.max_chain = max_chain if indirect else size
        total = lay.total
        self.ring = alloc.alloc(total, self.ALIGN)
        if not self.ring.is_contiguous():
            raise DmaError(f"queue memory ({total} bytes) is not physically contiguous")
        mm = self._mm = alloc.region.mm
        mm[self.ring.offset:self.ring.offset + total] = bytes(total)  # no stale rings
        if indirect:
            self.tables, self._table_bytes, self._table_bus = indirect_tables(
                alloc, size, max_chain)
            self._table_off = self.tables.offset
            self._table_segs: list[Sequence[Seg] | None] = [None] * size
        # Framed tables (``frame``/``add_framed``): the data descriptor each id's table
        # holds between its fixed first and last entries, None when it is not framed.
        self._framed: list[bytes | None] = [None] * size
        self.framed = False  # frame() was called: add_framed may be used
        self._frame_first: list[bytes] = []
        self._frame_last: list[bytes] = []
        self._frame_ring: list[bytes] = []  # what a ring descriptor of a framed id holds
        self._structs: dict[int, struct.Struct] = {}
        # Driver-private bookkeeping (never read back from device memory). _chain[id]:
        # the ids a chain headed by ``id`` holds, all of which go back to the free list
        # when it completes (one, but for a direct chain of several descriptors).
        self._free = list(range(size - 1, -1, -1))
        self._token: list[T | None] = [None] * size
        self._writable = [0] * size
        self._chain: list[list[int]] = [[i] for i in range(size)]
        self._held: list[int] = []  # ids added since the last kick: not yet published
        self.in_flight = 0  # published and not yet reaped
        self.completed = 0
        self.kicks = 0
        self.broken: str | None = None
        self.waiter: Waiter | None = None  # None: poll; else sleep when spins run out
        self._map()

    @staticmethod
    def layout_for(size: int) -> Layout:
        """The ring's layout for ``size`` entries (raises ValueError for a bad size)."""
        raise NotImplementedError

    def _map(self) -> None:
        """Set up the views on ring memory (``self.layout``) and the ring's own state."""
        raise NotImplementedError

    # -- state --------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Chains added and not yet reaped, published or not."""
        return self.in_flight + len(self._held)

    @property
    def num_free(self) -> int:
        """Free descriptors (on a packed ring, as many as free buffer IDs)."""
        return len(self._free)

    def free_ids(self) -> list[int]:
        """The free ids, the one the next ``add`` takes first (to inspect)."""
        return self._free[::-1]

    def next_head(self) -> int:
        """The id the next ``add`` will return (callers keep per-request state, such as
        a request header, at that index)."""
        if self.broken or not self._free:
            self._check_usable()
            raise QueueFull(f"all {self.size} descriptors are in use")
        return self._free[-1]

    def descriptors_needed(self, nsegs: int) -> int:
        """Ring descriptors a chain of ``nsegs`` segments takes (one with a table)."""
        return 1 if self.indirect and nsegs > 1 else nsegs

    # -- submit -------------------------------------------------------------------
    def add(self, segs: Sequence[Seg], token: T, writable: int | None = None) -> int:
        """Write a chain of (bus, length, device_writable) segments (indirect when
        negotiated), queue it for the next ``kick`` and return its id. ``writable`` (the
        sum of the writable lengths) may be given by a caller that already knows it."""
        if self.broken:
            self._check_usable()
        n = len(segs)
        if n == 0 or token is None:
            raise ValueError("a chain needs at least one segment and a token")
        free = self._free
        if self.indirect and n > 1:
            if n > self.max_chain:
                raise ValueError(f"{n} segments exceed the indirect table of {self.max_chain}")
            if not free:
                raise QueueFull(f"all {self.size} descriptors are in use")
            head = free.pop()
            # A slot reused for the same chain (same buffer, same length: the common
            # case when a caller recycles its requests) already holds the right table.
            # Only the driver writes tables; a device scribbling on them could as well
            # scribble on anything else (uio gives no protection).
            if self._table_segs[head] != segs:
                self._write_table(head, segs)
            self._put_indirect(head, n)
        else:
            if n > len(free):
                raise QueueFull(f"{n} descriptors needed, {len(free)} free")
            ids = [free.pop() for _ in segs]
            head = ids[0]
            if self.indirect:  # one descriptor (n is 1): no longer the id's table
                self._table_segs[head] = None
                self._framed[head] = None
            self._chain[head] = ids
            self._put_direct(ids, segs)
        self._writable[head] = (sum(length for _, length, w in segs if w)
                                if writable is None else writable)
        self._token[head] = token
        self._held.append(head)
        return head

    @staticmethod
    def _table_fields(addr: int, length: int, writable: bool, next_index: int) -> Fields:
        """One descriptor of an indirect table; ``next_index`` is LAST for the last."""
        raise NotImplementedError

    def _put_indirect(self, head: int, n: int) -> None:
        """Make a ring descriptor of ``head`` point at its table of ``n`` entries."""
        raise NotImplementedError

    def _put_direct(self, ids: list[int], segs: Sequence[Seg]) -> None:
        """Write ``segs`` as ring descriptors, one per id of ``ids``."""
        raise NotImplementedError

    def _packer(self, n: int) -> struct.Struct:
        s = self._structs.get(n)
        if s is None:
            s = self._structs[n] = struct.Struct("<" + VIRTQ_DESC.format.lstrip("<") * n)
        return s

    def _write_table(self, head: int, segs: Sequence[Seg]) -> None:
        """Fill the id's indirect table with ``segs``, in order."""
        n, fields = len(segs), self._table_fields
        flat: list[int] = []
        for i, (addr, length, w) in enumerate(segs, 1):
            flat += fields(addr, length, w, i if i < n else LAST)
        self._packer(n).pack_into(self._mm, self._table_off + head * self._table_bytes, *flat)
        self._table_segs[head] = segs
        self._framed[head] = None

    # -- framed chains: the fast path for one data segment ---------------------------
    def frame(self, first: Sequence[Seg], last: Sequence[Seg]) -> None:
        """Give every id a fixed first and last segment (for virtio-blk: the request
        header and status byte of that id). ``add_framed`` then fills a 3-entry
        indirect table of which only the middle (data) entry changes, and a table whose
        data entry is already the one asked for is not written at all."""
        if not self.indirect or self.max_chain < FRAME_ENTRIES:
            raise ValueError(f"framed chains need indirect tables of at least "
                             f"{FRAME_ENTRIES} entries")
        if len(first) != self.size or len(last) != self.size:
            raise ValueError(f"frame needs one first and one last segment per id ({self.size})")
        fields, pack = self._table_fields, VIRTQ_DESC.pack
        self._frame_first = [pack(*fields(bus, n, w, FRAME_DATA)) for bus, n, w in first]
        self._frame_last = [pack(*fields(bus, n, w, LAST)) for bus, n, w in last]
        self._frame_ring = self._framed_ring()
        self._framed = [None] * self.size
        self.framed = True

    @classmethod
    def framed_data(cls, bus: int, length: int, writable: bool) -> bytes:
        """The middle entry of a framed table, packed: callers build it once per buffer
        and pass the same object to every ``add_framed``."""
        return VIRTQ_DESC.pack(*cls._table_fields(bus, length, writable, FRAME_LAST))

    def add_framed(self, data: bytes, token: T, writable: int) -> int:
        """``add`` for a framed chain: first segment, ``data`` (from ``framed_data``),
        last segment. ``writable`` is the chain's device-writable bytes."""
        raise NotImplementedError

    def _framed_ring(self) -> list[bytes]:
        """Per id, what its ring descriptor holds when it carries a framed table."""
        raise NotImplementedError

    def _refuse(self, token: object) -> NoReturn:
        """Why ``add_framed`` took nothing: a broken or full queue, or no token."""
        self._check_usable()
        if token is None:
            raise ValueError("a chain needs a token")
        raise QueueFull(f"all {self.size} descriptors are in use")

    def _frame_data(self, head: int, data: bytes) -> None:
        """Put ``data`` (from ``framed_data``) in the middle of the id's framed table,
        writing the fixed entries first if a plain ``add`` used the table since."""
        table, mm = self._table_off + head * self._table_bytes, self._mm
        if self._framed[head] is None:
            first = table + FRAME_FIRST * DESC_BYTES
            last = table + FRAME_LAST * DESC_BYTES
            mm[first:first + DESC_BYTES] = self._frame_first[head]
            mm[last:last + DESC_BYTES] = self._frame_last[head]
            self._table_segs[head] = None
        middle = table + FRAME_DATA * DESC_BYTES
        mm[middle:middle + DESC_BYTES] = data
        self._framed[head] = data

    # -- faults -------------------------------------------------------------------
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

    def _bad_used(self, head: int, length: int, where: str = "") -> NoReturn:
        """The fault for a used element (at ``where`` in the ring) that names no chain in
        flight, or claims more bytes than the chain let the device write."""
        size = self.size
        why = ("out of range" if head >= size
               else self.NOT_IN_FLIGHT if self._token[head] is None
               else "not yet published (added, no kick since)" if head in self._held
               else None)
        if why:
            self._fault(f"{self._label}{self.ID_WORD} {head}{where} is {why} "
                        f"(queue size {size})")
        self._fault(f"{self._label}used len {length} for {self.ID_WORD.removeprefix('used ')} "
                    f"{head} exceeds the chain's {self._writable[head]} device-writable bytes")

    def _timed_out(self, timeout: float) -> NoReturn:
        pending = [t for t in self._token if t is not None]
        more = f" (and {len(pending) - 1} more in flight)" if len(pending) > 1 else ""
        self._fault(f"{self._label}no completion within {timeout:g} s for {pending[0]}{more}",
                    DeviceTimeout)

    # -- complete -----------------------------------------------------------------
    def reap(self) -> list[tuple[T, int]]:
        raise NotImplementedError

    def pop_used(self) -> tuple[T, int] | None:
        raise NotImplementedError

    def wait(self, timeout: float) -> list[tuple[T, int]]:
        """Poll until at least one completion (or nothing is in flight); DeviceTimeout
        after ``timeout`` seconds. A timeout of 0 (or less) only looks: it returns what
        has completed, possibly nothing. A broken queue says so at once."""
        if (timeout > 0 and self._u16[self._used_at] & self._used_mask == self._used_none
                and self.in_flight and not self.broken):
            self._await_used(timeout)
        return self.reap()

    def wait_one(self, timeout: float) -> tuple[T, int] | None:
        """``wait`` for one completion (``pop_used`` once the device has published one):
        for a caller with one chain in flight. None if nothing is in flight. A broken
        queue (say, after a timeout) says so at once: no second wait, no second reset."""
        if (self._u16[self._used_at] & self._used_mask == self._used_none
                and self.in_flight and not self.broken):
            self._await_used(timeout)
        return self.pop_used()

    def _await_used(self, timeout: float) -> None:
        """Return once the used position has changed; DeviceTimeout after ``timeout``
        seconds."""
        if self.waiter is not None:
            self._sleep_wait(self.waiter, timeout)
            return
        u16, at, mask, none = self._u16, self._used_at, self._used_mask, self._used_none
        clock, deadline, spins = time.monotonic, 0.0, range(SPINS_PER_CLOCK)
        while True:
            # The clock only every SPINS_PER_CLOCK looks (the deadline starts at the
            # first): in a TCG guest whose clocksource is HPET each read traps into
            # QEMU, under the lock the device emulation needs to complete our requests.
            # The look itself is the tightest loop Python has: it runs until the device
            # answers, and the time from its answer to our reap is latency.
            for _ in spins:
                if u16[at] & mask != none:
                    return
            if not deadline:
                deadline = clock() + timeout
            elif clock() > deadline:
                self._timed_out(timeout)

    def _sleep_wait(self, waiter: Waiter, timeout: float) -> None:
        """``_await_used`` with a waiter: look ``waiter.spins`` times, then sleep until
        the device interrupts (the waiter arms, re-checks and disarms)."""
        u16, at, mask, none = self._u16, self._used_at, self._used_mask, self._used_none
        for _ in range(waiter.spins):
            if u16[at] & mask != none:
                return
        if not waiter.sleep(self, time.monotonic() + timeout):
            self._timed_out(timeout)

    # -- used buffer notifications (for a Waiter) ---------------------------------------
    def has_used(self) -> bool:
        """Something is in flight and the used position has moved."""
        return bool(self.in_flight) and (self._u16[self._used_at] & self._used_mask
                                         != self._used_none)

    def arm_interrupts(self) -> bool:
        """Ask the device to interrupt for the next used buffer, then look again: True
        if one is already there. The barrier orders the request before the re-read of
        the used position: a device that published just before it saw our request is
        caught by the re-read, one that publishes after it sees the request."""
        self._interrupts(True)
        full_barrier()
        return self.has_used()

    def disarm_interrupts(self) -> None:
        """Back to polling."""
        if hasattr(self, "desc"):  # not detached: the ring memory is still there
            self._interrupts(False)

    def _interrupts(self, enable: bool) -> None:
        """Ask for used buffer notifications, or for none ("Used Buffer Notification
        Suppression", "Event Suppression Structure Format")."""
        raise NotImplementedError

    def detach(self) -> None:
        """Drop the views on DMA memory (after the device reset) so it can be unmapped."""
        self._u16.release()
        self._u32.release()
        for view in self.VIEWS:
            delattr(self, view)
        self.broken = self.broken or "closed"
