"""VirtioBlk: a virtio-blk device (legacy or modern transport) driven from user space.

virtio 1.2, "Block Device": feature bits, "Device configuration layout", "Device
Initialization" and "Device Operation" (request header, data, status byte).

Two ways to use it. Plain calls (``read``, ``write``, ``flush``, ``discard``,
``write_zeroes``, ``get_id``) validate their arguments before anything reaches the
device, split by the device's limits, pipeline the pieces through a pool of DMA bounce
buffers and raise typed errors. For speed, ``alloc_buffer``/``submit``/``reap`` keep the
queue full: one kick per batch, one pass over the used ring per reap, no copies.
"""

from __future__ import annotations

import atexit
import logging
import math
import signal
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .options import DEFAULT_TIMEOUT
from .errors import (BlkIOError, DeviceError, InvalidArgument, OutOfRange,
                     ReadOnlyDevice, Unsupported)
from .memory import HUGEPAGE, DmaAllocator, DmaRegion
from .spec import (BLK_DWZ_DTYPE, DRIVER_FEATURES, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES,
                   VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, Feature, IsrBit, ReqType,
                   feature_names)
from .request import DmaBuffer as DmaBuffer, Request as Request  # re-exported: public API
from .blk_queue import RequestQueue, status_error as status_error  # status_error: public
from .blk_setup import (DWZ_MAX_SECTORS, POOL_BUFFERS, Limits, Queue, check_queues,
                        check_ring, choose_queues, chunk_limit, open_waiters, read_limits,
                        ring_features, ring_name, set_up_queue)
from .transport import Backend, Transport, initialize, open_transport

if TYPE_CHECKING:
    from .interrupts import IrqSource, Waiter

log = logging.getLogger(__name__)
# The package stays quiet unless the application configures logging. Set here, where the
# driver loads, not in __init__: the command line's --help should not import logging.
logging.getLogger(__package__).addHandler(logging.NullHandler())

CONFIG_POLL_CALLS = 64  # plain calls between looks at the ISR's config-change bit


# Strong references: a device dropped without close() must not be garbage collected
# (its memory unmapped) while it may still write there; the exit hook resets it first.
_open_devices: set[VirtioBlk] = set()


@atexit.register
def _close_all() -> None:
    """Last resort: a device left open at exit is reset before the process goes."""
    for dev in list(_open_devices):
        dev.close()


# Memory a device that would not reset may still write: never unmapped (see close()).
_leaked_regions: list[DmaRegion] = []


class VirtioBlk:
    """A virtio-blk device (legacy or modern transport), initialised and ready;
    close() resets it."""

    def __init__(self, backend: Backend, *, timeout: float = DEFAULT_TIMEOUT,
                 pool_buffers: int = POOL_BUFFERS,
                 transport: str = "auto", wait: str = "poll", ring: str = "auto",
                 queues: int | None = None) -> None:
        try:
            check_ring(ring)
            check_queues(queues)
            self.transport: Transport = open_transport(backend, transport)
        except BaseException:
            backend.close()
            raise
        self.ring = ring  # what was asked for; the queue's class says what is in use
        self.backend = backend
        self.bdf = backend.bdf
        self.timeout = timeout
        self._closed = False
        self._regions: list[DmaRegion] = []
        self._user_allocs: list[DmaAllocator] = []
        self.queues: list[RequestQueue] = []
        self.worker: int | None = None  # in a worker process (workers.py): its queue
        self._serial: str | None = None
        self._config_polled = -1
        self.wait_mode = wait  # poll, interrupt or hybrid (interrupts.py)
        self.waiter: Waiter | None = None
        self._irq: IrqSource | None = None  # the device's; each queue's waiter has a view
        self.capacity_changes: list[tuple[int, int]] = []  # (old, new), from interrupts
        _open_devices.add(self)
        try:
            self.features_offered, self.features = initialize(
                self.transport, DRIVER_FEATURES | ring_features(ring),
                lambda features: self._setup(pool_buffers, features, queues))
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, bdf: str | None = None, *, backend: str = "uio", rebind: bool = False,
             timeout: float = DEFAULT_TIMEOUT, transport: str = "auto",
             **kwargs: Any) -> VirtioBlk:
        """Find the device (``bdf`` or the first virtio-blk), take it from the kernel
        through ``backend`` and initialise it over ``transport`` (auto, legacy, modern)."""
        from .transport import open_backend
        return cls(open_backend(backend, bdf, rebind=rebind, transport=transport),
                   timeout=timeout, transport=transport, **kwargs)

    # -- set-up -------------------------------------------------------------------
    def _setup(self, pool_buffers: int, features: int, queues: int | None) -> None:
        """The block device's part of "Device Initialization" (blk_setup.py): config,
        every request queue used (``queues``, or the default of choose_queues) with its
        request slots and bounce buffers, interrupts."""
        self.features = features
        self.limits = read_limits(self.transport, features, self.bdf)
        for index in range(choose_queues(queues, self.limits.num_queues, self.bdf)):
            self.queues.append(self._set_up_queue(index, pool_buffers))
        self._irq, waiters = open_waiters(self.wait_mode, self.backend, self.transport,
                                          [q.vq for q in self.queues], self._config_changed)
        self.waiter = waiters[0] if waiters else None  # queue 0's
        q = self.queue
        log.debug("%s: %d %s queue(s) of %d, indirect %s, event_idx %s, features %s",
                  self.bdf, len(self.queues), ring_name(q), q.size, q.indirect,
                  q.event_idx, feature_names(self.features))

    def _set_up_queue(self, index: int, pool_buffers: int) -> RequestQueue:
        qs = set_up_queue(self.transport, self.limits, self.features, self.ring, index,
                          pool_buffers, self._alloc_region,
                          lambda: self.queue_fault(index, "a ring fault"), self.bdf)
        return RequestQueue(index, qs.queue, qs.slots, qs.pool, qs.data_segs,
                            qs.chunk_sectors, self.bdf, self.queue_fault)

    def after_fork(self, queue: int) -> None:
        """In a worker process (workers.py) that drives ``queue`` alone."""
        self.worker = queue
        after = getattr(self._irq, "after_fork", None)
        if after is not None:
            after()

    def queue_fault(self, index: int, message: str) -> bool:
        """A fault on queue ``index``: the device is reset, which stops every queue, so
        every other queue is broken too. True if the reset took."""
        for q in self.queues:
            if q.index != index and not q.vq.broken:
                q.vq.broken = f"the device was reset after a fault on queue {index}"
        return self._reset_quietly()

    def _alloc_region(self, size: int) -> DmaRegion:
        """DMA memory kept until close(), which frees it only once the device is reset."""
        region = self.backend.alloc_dma(size)
        self._regions.append(region)
        return region

    def _config_changed(self) -> None:
        """A configuration-change interrupt: re-read the config, say what changed."""
        old = self.limits.capacity
        self.refresh_config()
        new = self.limits.capacity
        if new != old:
            self.capacity_changes.append((old, new))
            log.warning("%s: capacity changed from %d to %d sectors", self.bdf, old, new)

    def max_request_bytes(self, pool: Sequence[DmaBuffer]) -> int:
        """The most bytes one request can carry from any buffer of ``pool`` (from
        ``alloc_buffer``): within seg_max segments of at most size_max bytes, a whole
        number of blocks. Callers that split their own I/O (the NBD server) split at
        this, as the plain read/write API does."""
        return chunk_limit(pool, self.limits, self.queues[0].data_segs, self.bdf)

    # -- properties ---------------------------------------------------------------
    def has(self, feature: Feature) -> bool:
        return bool(self.features & feature)

    @property
    def capacity(self) -> int:
        return self.limits.capacity

    @property
    def block_size(self) -> int:
        return self.limits.block_size

    @property
    def read_only(self) -> bool:
        return self.has(Feature.VIRTIO_BLK_F_RO)

    @property
    def queue(self) -> Queue:
        """Queue 0's ring (the single-queue API's)."""
        return self.queues[0].vq

    @property
    def queue_size(self) -> int:
        return self.queue.size

    @property
    def serial(self) -> str | None:
        """What GET_ID returns (None if the device does not support it)."""
        if self._serial is None:
            try:
                self._serial = self.get_id()
            except Unsupported:
                return None
        return self._serial

    def info(self) -> dict[str, Any]:
        lim = self.limits
        return {
            "pci_address": self.bdf, "backend": self.backend.name,
            "transport": self.transport.kind, "iommu": self.transport.iommu,
            "wait": self.wait_mode,
            "interrupts": self.waiter.source.kind if self.waiter else None,
            "capacity_sectors": lim.capacity, "block_size": lim.block_size,
            "queue_size": self.queue_size,
            "num_queues_offered": lim.num_queues, "num_queues": len(self.queues),
            "features_offered": feature_names(self.features_offered),
            "features_negotiated": feature_names(self.features),
            "read_only": self.read_only, "serial": self.serial,
            "size_max": lim.size_max, "seg_max": lim.seg_max,
            "indirect": self.queue.indirect, "event_idx": self.queue.event_idx,
            "ring": ring_name(self.queue),
        }

    # -- validation ---------------------------------------------------------------
    def refresh_config(self) -> None:
        """Re-read the device config (the capacity may have changed)."""
        self.limits = read_limits(self.transport, self.features, self.bdf)

    def _poll_config_change(self) -> None:
        """ISR bit 1 says the config changed ("Device Configuration Space"). Looked at
        once every CONFIG_POLL_CALLS calls: an ISR read traps into the device (under its
        lock, in QEMU), too dear for every request, and so is a clock read under TCG
        (HPET). Correctness does not depend on it: a range beyond the known capacity
        re-reads the config (check_range), and an I/O error past a shrunk capacity is
        reported as out of range (_explain)."""
        self._config_polled += 1
        if self._config_polled % CONFIG_POLL_CALLS or self.waiter is not None:
            return  # with a waiter, the config interrupt tells (and the ISR is its)
        if self.transport.isr() & IsrBit.CONFIG:
            self.refresh_config()

    def check_range(self, sector: int, count: int) -> None:
        """Refuse what the device would: negative, empty, unaligned or beyond capacity,
        and what no device could take: a sector or count that is not an integer."""
        for name, value in (("sector", sector), ("count", count)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise InvalidArgument(f"{name} {value!r} is not an integer")
        if sector < 0:
            raise InvalidArgument(f"sector {sector} is negative")
        if count <= 0:
            raise InvalidArgument(f"count {count} must be at least 1")
        if sector + count > self.limits.capacity:
            self.refresh_config()  # it may have grown without us seeing the ISR bit
            if sector + count > self.limits.capacity:
                raise OutOfRange(f"sectors {sector}..{sector + count - 1} exceed capacity "
                                 f"{self.limits.capacity}", sector, count, self.limits.capacity)
        per_block = self.limits.block_size // SECTOR_SIZE
        if sector % per_block or count % per_block:
            raise InvalidArgument(f"sectors {sector}..{sector + count - 1} are not aligned "
                                  f"to the {self.limits.block_size}-byte block size")

    def check_writable(self, what: str) -> None:
        """Refuse a modifying request to a read-only device before it is sent."""
        if self.read_only:
            raise ReadOnlyDevice(f"{self.bdf} is read-only (VIRTIO_BLK_F_RO): "
                                 f"refusing to {what}")

    def _require(self, feature: Feature) -> None:
        if not self.has(feature):
            raise Unsupported(f"{self.bdf} does not offer {feature.name}")

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError(f"{self.bdf} is closed")

    # -- batch API ----------------------------------------------------------------
    def alloc_buffer(self, nbytes: int) -> DmaBuffer:
        """A DMA buffer for ``submit``; kept until close(). Not in a worker (workers.py):
        its allocator is a copy of the parent's, and memory mapped there alone could be
        freed by its death while the device still writes it."""
        self._check_open()
        if self.worker is not None:
            raise InvalidArgument(f"worker {self.worker}: allocate DMA buffers before "
                                  "the workers start")
        if nbytes <= 0:
            raise InvalidArgument(f"buffer size {nbytes} must be positive")
        for alloc in self._user_allocs:
            try:
                return DmaBuffer(alloc.alloc(nbytes, 4096), self.limits.size_max,
                                 self.queue.framed_data)
            except Exception:
                continue
        self._user_allocs.append(DmaAllocator(self._alloc_region(max(nbytes, HUGEPAGE))))
        return DmaBuffer(self._user_allocs[-1].alloc(nbytes, 4096), self.limits.size_max,
                         self.queue.framed_data)

    def submit(self, requests: Sequence[Request], kick: bool = True) -> None:
        """Queue every request on queue 0 and kick once, or none of them: the whole
        batch is checked first (type, sector an integer within u64, data within its
        buffer and within seg_max segments, room in the queue). The sectors are not
        checked against the capacity: callers of the batch API do that up front
        (``check_range``).

        With ``kick=False`` the requests are written into the ring but not published:
        the device cannot see them until the next ``kick`` (or submit). A caller at
        queue depth 1 builds its next request that way while the current one is in
        flight, and publishes it the moment that one completes."""
        self.queues[0].submit(requests, kick)

    def kick(self) -> None:
        """Publish every request submitted with ``kick=False`` (and notify the device
        unless it said it need not be)."""
        self.queues[0].kick()

    def reap(self, timeout: float | None = None) -> list[Request]:
        """Completed requests of queue 0 (waiting up to ``timeout`` for at least one
        while any is in flight), each with ``status`` set. A status byte the device did
        not write is a device error."""
        return self.queues[0].reap(self.timeout if timeout is None else timeout)

    def reap_one(self, timeout: float | None = None) -> Request | None:
        """The next completed request, waiting up to ``timeout`` while any is in flight
        (None if none is), checked as ``reap`` checks each: for a caller with one
        request in flight, with no batch to build."""
        return self.queues[0].reap_one(self.timeout if timeout is None else timeout)

    @property
    def in_flight(self) -> int:
        return self.queues[0].in_flight

    @property
    def requests_completed(self) -> int:
        """Requests reaped since the device was opened (the queues count them, so the
        reap path does not count twice)."""
        return sum(q.vq.completed for q in self.queues)

    # -- plain API ----------------------------------------------------------------
    def read(self, sector: int, count: int, *, queue: int = 0) -> bytes:
        """``count`` sectors from ``sector`` (through request queue ``queue``)."""
        self._check_open()
        self._poll_config_change()
        self.check_range(sector, count)
        pieces: list[bytes] = []
        self._transfer(ReqType.VIRTIO_BLK_T_IN, sector, count, pieces, queue)
        # One allocation for the result: under TCG, page faults on fresh memory cost more
        # than the copies, so no zero-filled bytearray that is copied again.
        return b"".join(pieces)

    def write(self, sector: int, data: bytes | bytearray | memoryview, *,
              queue: int = 0) -> None:
        """Write ``data`` (a whole number of blocks) at ``sector`` (through request
        queue ``queue``)."""
        self._check_open()
        view = memoryview(data).cast("B")
        if not len(view) or len(view) % SECTOR_SIZE:
            raise InvalidArgument(f"data of {len(view)} bytes is not a positive multiple "
                                  f"of {SECTOR_SIZE}")
        self.check_writable("write")
        self._poll_config_change()
        self.check_range(sector, len(view) // SECTOR_SIZE)
        self._transfer(ReqType.VIRTIO_BLK_T_OUT, sector, len(view) // SECTOR_SIZE, view,
                       queue)

    def flush(self) -> None:
        """Make completed writes durable (VIRTIO_BLK_T_FLUSH)."""
        self._check_open()
        self._require(Feature.VIRTIO_BLK_F_FLUSH)
        self._run_one(Request(ReqType.VIRTIO_BLK_T_FLUSH))

    def get_id(self) -> str:
        """The device's ID string (VIRTIO_BLK_T_GET_ID: up to 20 bytes)."""
        self._check_open()
        buf = self.queues[0].pool[0]
        buf.mv[:VIRTIO_BLK_ID_BYTES] = bytes(VIRTIO_BLK_ID_BYTES)
        self._run_one(Request(ReqType.VIRTIO_BLK_T_GET_ID, buffer=buf,
                              nbytes=VIRTIO_BLK_ID_BYTES))
        raw = bytes(buf.mv[:VIRTIO_BLK_ID_BYTES])
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def discard(self, sector: int, count: int) -> None:
        """Tell the device the range is unused (VIRTIO_BLK_T_DISCARD)."""
        self._ranges(ReqType.VIRTIO_BLK_T_DISCARD, Feature.VIRTIO_BLK_F_DISCARD, "discard",
                     sector, count, self.limits.max_discard_sectors, 0)

    def write_zeroes(self, sector: int, count: int, unmap: bool = False) -> None:
        """Zero the range (VIRTIO_BLK_T_WRITE_ZEROES), optionally letting it unmap."""
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        self._ranges(ReqType.VIRTIO_BLK_T_WRITE_ZEROES, Feature.VIRTIO_BLK_F_WRITE_ZEROES,
                     "write zeroes", sector, count, self.limits.max_write_zeroes_sectors, flags)

    def _ranges(self, rtype: ReqType, feature: Feature, what: str, sector: int, count: int,
                max_sectors: int, flags: int) -> None:
        """One request per piece of at most ``max_sectors`` (whole blocks), each carrying
        one struct virtio_blk_discard_write_zeroes."""
        self._check_open()
        self.check_writable(what)
        self._require(feature)
        self._poll_config_change()
        self.check_range(sector, count)
        buf = self.queues[0].pool[0]
        entry = np.ndarray((), BLK_DWZ_DTYPE, buf.mv)
        for start, n in range_pieces(self.limits, rtype, sector, count, max_sectors,
                                     self.bdf):
            entry["sector"], entry["num_sectors"], entry["flags"] = start, n, flags
            self._run_one(Request(rtype, start, n, buf, BLK_DWZ_DTYPE.itemsize))
        del entry

    def _run_one(self, req: Request) -> None:
        error = self.queues[0].run([req], self.timeout)
        if error is not None:
            if req.count:
                self._explain(error, req.sector, req.count)
            raise error

    def _transfer(self, rtype: ReqType, sector: int, count: int,
                  data: memoryview | list[bytes], queue: int = 0) -> None:
        """Move ``count`` sectors between the device and ``data`` (a view to write from,
        or a list that collects what is read, in order) through queue 0's bounce pool,
        keeping every pool buffer busy (pipeline.py)."""
        if not 0 <= queue < len(self.queues):
            raise InvalidArgument(f"queue {queue} is not one of the {len(self.queues)} "
                                  "set up (--queues)")
        error = self.queues[queue].transfer(rtype, sector, count, data, self.timeout)
        if error is not None:
            self._explain(error, sector, count)
            raise error

    def _explain(self, error: BaseException, sector: int, count: int) -> None:
        """An I/O error may mean the device shrank since we last looked: then say so."""
        if isinstance(error, BlkIOError):
            self.refresh_config()
            if sector + count > self.limits.capacity:
                raise OutOfRange(f"sectors {sector}..{sector + count - 1} exceed capacity "
                                 f"{self.limits.capacity}", sector, count,
                                 self.limits.capacity) from error

    # -- failure and teardown -----------------------------------------------------
    def _reset_quietly(self) -> bool:
        """Reset; True if the status read back 0 (the device let go of its queues)."""
        try:
            self.transport.reset()
        except DeviceError:
            log.warning("%s: reset failed", self.bdf, exc_info=True)
            return False
        return True

    def close(self) -> None:
        """Reset the device, THEN release its memory: a device that is not reset may
        still write into the rings and buffers, so if the reset does not take, the
        memory stays mapped (leaked, with an error logged) for the life of the process.
        Signals wait until this is done; one that arrives as close() begins leaves the
        device open, for the caller's retry or the exit hook."""
        if self._closed:
            return
        blocked = _block_signals()
        try:
            if self._closed:  # closed by a signal handler run as signals were blocked
                return
            self._closed = True
            reset = self._reset_quietly()
            if self._irq is not None:  # vectors freed after the reset, before release
                self._irq.close()
            for q in self.queues:
                q.closed = True
                q.vq.detach()
                for buf in q.pool:
                    buf.mv.release()
                q.pool = []
            if reset:
                for region in self._regions:
                    region.close()
            else:
                self._leak(self._regions)
            self._regions = []
            self.backend.close()
        finally:
            _open_devices.discard(self)
            _unblock_signals(blocked)

    def _leak(self, regions: list[DmaRegion]) -> None:
        _leaked_regions.extend(regions)
        log.error("%s: the device did not reset; %d bytes of DMA memory are kept mapped "
                  "(not freed) until the process exits, since the device may still write "
                  "them", self.bdf, sum(r.size for r in regions))

    def __enter__(self) -> VirtioBlk:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def range_pieces(limits: Limits, rtype: ReqType, sector: int, count: int,
                 max_sectors: int, bdf: str) -> Iterator[tuple[int, int]]:
    """(start, sectors) pieces of at most ``max_sectors``, whole blocks, and for a
    discard ending on multiples of discard_sector_alignment where the range goes on
    (as Linux splits at discard_granularity). A limit below one block is refused:
    rounding it up would exceed what the device accepts."""
    block = limits.block_size
    per_block = block // SECTOR_SIZE
    limit = min(max_sectors, DWZ_MAX_SECTORS)
    if limit < per_block:
        name = ("max_discard_sectors" if rtype == ReqType.VIRTIO_BLK_T_DISCARD
                else "max_write_zeroes_sectors")
        raise Unsupported(f"{bdf}: the device's {name} {limit} is below one "
                          f"{block}-byte block")
    unit = per_block
    if rtype == ReqType.VIRTIO_BLK_T_DISCARD:
        unit = math.lcm(per_block, limits.discard_sector_alignment or 1)
    step = limit // unit * unit if limit >= unit else limit // per_block * per_block
    start, end = sector, sector + count
    while start < end:
        stop = min(end, start + step)
        if stop < end and stop // unit * unit > start:
            stop = stop // unit * unit
        yield start, stop - start
        start = stop


def _block_signals() -> set[Any] | None:
    """Block SIGINT and SIGTERM; the previous mask. A signal that arrived just before
    has its handler run here (CPython runs pending handlers when the mask changes): if
    that raises, the mask is put back and nothing has been done yet."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    return previous


def _unblock_signals(previous: set[Any] | None) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
