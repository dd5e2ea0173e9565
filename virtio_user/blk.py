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
import contextlib
import logging
import math
import signal
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Sequence

import numpy as np

from .options import DEFAULT_TIMEOUT
from .errors import (BlkIOError, DeviceError, InvalidArgument, OutOfRange,
                     ReadOnlyDevice, Unsupported)
from .memory import HUGEPAGE, DmaAllocator, DmaRegion
from . import pipeline
from .spec import (BLK_DWZ_DTYPE, BLK_OUTHDR, DRIVER_FEATURES, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES,
                   VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, BlkStatus, Feature, IsrBit, ReqType,
                   feature_names)
from .request import DmaBuffer as DmaBuffer, Request as Request  # re-exported: public API
from .blk_setup import (DWZ_MAX_SECTORS, POOL_BUFFERS, Limits, check_ring, chunk_limit,
                        open_waiter, read_limits, ring_features, set_up_queue)
from .transport import Backend, Transport, initialize, open_transport
from .ring.core import QueueFull
from .ring.packed import PackedQueue
from .ring.split import SplitQueue

if TYPE_CHECKING:
    from .interrupts import Waiter

log = logging.getLogger(__name__)
# The package stays quiet unless the application configures logging. Set here, where the
# driver loads, not in __init__: the command line's --help should not import logging.
logging.getLogger(__package__).addHandler(logging.NullHandler())

CONFIG_POLL_CALLS = 64  # plain calls between looks at the ISR's config-change bit
_HDR = BLK_OUTHDR
_UNSET = 0xFF  # status byte before the device writes it: not a valid VIRTIO_BLK_S_*
_DEVICE_WRITES = frozenset((ReqType.VIRTIO_BLK_T_IN, ReqType.VIRTIO_BLK_T_GET_ID))
# Per VIRTIO_BLK_T_* value: 1 if the device writes the data, else 0. One lookup checks
# the type and gives the direction (and, as nbytes * into + 1, the writable bytes).
_INTO = {int(t): int(t in _DEVICE_WRITES) for t in ReqType}
_REQ_TYPES = frozenset(int(t) for t in ReqType)
_U64_MAX = (1 << 64) - 1  # virtio_blk_outhdr.sector is le64
# The highest VIRTIO_BLK_S_* value, as a plain int: an enum member's attribute lookup
# costs several times an int comparison, per completion.
_LAST_STATUS = int(max(BlkStatus))


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
                 transport: str = "auto", wait: str = "poll", ring: str = "auto") -> None:
        try:
            check_ring(ring)
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
        self._orphans: list[Request] = []
        self._serial: str | None = None
        self._config_polled = -1
        self.wait_mode = wait  # poll, interrupt or hybrid (interrupts.py)
        self.waiter: Waiter | None = None
        self.capacity_changes: list[tuple[int, int]] = []  # (old, new), from interrupts
        _open_devices.add(self)
        try:
            self.features_offered, self.features = initialize(
                self.transport, DRIVER_FEATURES | ring_features(ring),
                lambda features: self._setup(pool_buffers, features))
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
    def _setup(self, pool_buffers: int, features: int) -> None:
        """The block device's part of "Device Initialization" (blk_setup.py): config,
        queue, request slots, bounce buffers, interrupts."""
        self.features = features
        self.limits = read_limits(self.transport, features, self.bdf)
        qs = set_up_queue(self.transport, self.limits, features, self.ring, pool_buffers,
                          self._alloc_region, self._reset_quietly, self.bdf)
        self.queue: SplitQueue[Request] | PackedQueue[Request] = qs.queue
        self._data_segs = qs.data_segs
        slots = qs.slots
        self._mm, self._hdr_off, self._status_off = slots.mm, slots.hdr_off, slots.status_off
        self._hdr_seg, self._status_seg = slots.hdr_seg, slots.status_seg
        self._pool = qs.pool
        self._chunk_sectors = qs.chunk_sectors
        self.waiter = open_waiter(self.wait_mode, self.backend, self.transport, self.queue,
                                  self._config_changed)
        log.debug("%s: %s queue %d, indirect %s, event_idx %s, features %s", self.bdf,
                  "packed" if isinstance(self.queue, PackedQueue) else "split",
                  self.queue.size, self.queue.indirect, self.queue.event_idx,
                  feature_names(self.features))

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
        return chunk_limit(pool, self.limits, self._data_segs, self.bdf)

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
            "features_offered": feature_names(self.features_offered),
            "features_negotiated": feature_names(self.features),
            "read_only": self.read_only, "serial": self.serial,
            "size_max": lim.size_max, "seg_max": lim.seg_max,
            "indirect": self.queue.indirect, "event_idx": self.queue.event_idx,
            "ring": "packed" if isinstance(self.queue, PackedQueue) else "split",
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
        """Refuse what the device would: negative, empty, unaligned or beyond capacity."""
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
        """A DMA buffer for ``submit``; kept until close()."""
        self._check_open()
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
        """Queue every request and kick once, or none of them: the whole batch is
        checked first (type, sector within u64, data within its buffer and within
        seg_max segments, room in the queue). The sectors are not checked against the
        capacity: callers of the batch API do that up front (``check_range``).

        With ``kick=False`` the requests are written into the ring but not published:
        the device cannot see them until the next ``kick`` (or submit). A caller at
        queue depth 1 builds its next request that way while the current one is in
        flight, and publishes it the moment that one completes."""
        if self._closed:
            self._check_open()
        if len(requests) == 1 and self._add_one(requests[0]):
            if kick:
                self.queue.kick()
            return
        framed = self._plan(requests)
        try:
            self._add(requests, framed)
        except BaseException:
            self._interrupted()
            raise
        if kick:
            self.queue.kick()

    def kick(self) -> None:
        """Publish every request submitted with ``kick=False`` (and notify the device
        unless it said it need not be)."""
        if self._closed:
            self._check_open()
        self.queue.kick()

    def _add_one(self, req: Request) -> bool:
        """QD1's case, inline (a Python call costs as much as a dozen operations): queue
        one request whose data is one segment already framed for its buffer, with the
        same checks as _plan. False, with nothing queued, for anything else: the general
        path checks it and says what is wrong. add_framed refuses a full or broken queue
        before any write."""
        q = self.queue
        nbytes, buf = req.nbytes, req.buffer
        try:
            into = _INTO[req.type]
            data = buf.framed_descs[2 * nbytes + into]  # type: ignore[union-attr]
        except (KeyError, TypeError, AttributeError):  # bad type, no buffer, unframed
            return False
        if (data is None or not q.framed or not 0 < nbytes <= buf.size  # type: ignore[union-attr]
                or not 0 <= req.sector <= _U64_MAX):
            return False
        try:
            head = q.add_framed(data, req, nbytes * into + 1)
            _HDR.pack_into(self._mm, self._hdr_off + 16 * head, req.type, 0, req.sector)
            self._mm[self._status_off + head] = _UNSET
            req.status = None
            req.head = head
        except QueueFull:  # refused before any write: requests held back stay valid
            raise
        except BaseException:
            self._interrupted()
            raise
        return True

    def _interrupted(self) -> None:
        """Only a signal (or a full or broken queue, before anything was added) stops
        a checked batch. Chains added but not kicked must never go out (their headers
        may be half written): break the queue and reset."""
        q = self.queue
        if q.outstanding != q.in_flight and not q.broken:
            q.broken = "a submit was interrupted with requests half queued"
            self._reset_quietly()

    def _plan(self, requests: Sequence[Request]) -> list[bytes | None]:
        """Check the batch; per request its framed data descriptor (None: a chain of
        its own segments). Raises before anything is queued."""
        q = self.queue
        framed, descriptors, max_segs = q.framed, q.descriptors_needed, self._data_segs
        plan: list[bytes | None] = []
        need = 0
        for req in requests:
            rtype, nbytes, data = req.type, req.nbytes, None
            if rtype not in _REQ_TYPES:
                raise InvalidArgument(f"request type {rtype!r} is not a VIRTIO_BLK_T_* type")
            if not 0 <= req.sector <= _U64_MAX:
                raise InvalidArgument(f"{req}: sector {req.sector} is outside 0..2**64-1")
            if nbytes:
                buf = req.buffer
                if buf is None or not 0 < nbytes <= buf.size:
                    raise InvalidArgument(f"{req}: {nbytes} bytes do not fit its buffer of "
                                          f"{buf.size if buf else 0}")
                into = rtype in _DEVICE_WRITES
                if framed:
                    try:
                        data = buf.framed_descs[nbytes * 2 + into]
                    except KeyError:
                        data = buf.framed(nbytes, into)
                if data is None:
                    nsegs = len(buf.segments(nbytes))
                    if nsegs > max_segs:
                        raise InvalidArgument(f"{req}: {nsegs} segments exceed {max_segs}")
                    need += descriptors(nsegs + 2)
                else:
                    need += 1
            else:
                need += descriptors(2)
            plan.append(data)
        if need > q.num_free:
            raise QueueFull(f"{len(requests)} requests need {need} descriptors, "
                            f"{q.num_free} free")
        return plan

    def _add(self, requests: Sequence[Request], framed: list[bytes | None]) -> None:
        """Queue checked requests (the hot path: names bound to locals once per batch).
        A framed request writes only its data descriptor; the header goes in the head's
        preallocated slot, where only type and sector change."""
        q = self.queue
        mm, hdr_off, status_off = self._mm, self._hdr_off, self._status_off
        add_framed, pack, device_writes = q.add_framed, _HDR.pack_into, _DEVICE_WRITES
        for req, data in zip(requests, framed):
            if data is None:
                head = self._add_chain(req)
            else:
                nbytes = req.nbytes
                head = add_framed(data, req, nbytes + 1 if req.type in device_writes else 1)
            pack(mm, hdr_off + 16 * head, req.type, 0, req.sector)
            mm[status_off + head] = _UNSET
            req.status = None
            req.head = head

    def _add_chain(self, req: Request) -> int:
        """Queue a request as a chain of its own segments (header, data, status)."""
        head = self.queue.next_head()
        nbytes = req.nbytes
        if nbytes:
            into = req.type in _DEVICE_WRITES
            data = req.buffer.chain(nbytes, into)  # type: ignore[union-attr]
            segs = (self._hdr_seg[head], *data, self._status_seg[head])
            writable = nbytes + 1 if into else 1
        else:
            segs = (self._hdr_seg[head], self._status_seg[head])
            writable = 1
        return self.queue.add(segs, req, writable)

    def _descriptors(self, buf: DmaBuffer, nbytes: int) -> int:
        """Descriptors a request from ``buf`` takes: header, data segments, status."""
        return self.queue.descriptors_needed(2 + len(buf.segments(nbytes)))

    def reap(self, timeout: float | None = None) -> list[Request]:
        """Completed requests (waiting up to ``timeout`` for at least one while any is in
        flight), each with ``status`` set. A status byte the device did not write is a
        device error."""
        if self._closed or self._orphans:
            self._check_open()
            done, self._orphans = self._orphans, []
            return done
        got = self.queue.wait(self.timeout if timeout is None else timeout)
        mm, off = self._mm, self._status_off
        out = []
        for req, length in got:
            # Inline, as in reap_one (a Python call per request costs as much as the
            # checks): _bad_completion says what is wrong.
            status = mm[off + req.head]
            if (not length or status > _LAST_STATUS
                    or (length <= req.nbytes and req.type in _DEVICE_WRITES)):
                self._bad_completion(req, length, status)
            req.status = status
            req.used_len = length
            out.append(req)
        return out

    def reap_one(self, timeout: float | None = None) -> Request | None:
        """The next completed request, waiting up to ``timeout`` while any is in flight
        (None if none is), checked as ``reap`` checks each: for a caller with one
        request in flight, with no batch to build."""
        if self._closed or self._orphans:
            self._check_open()
            return self._orphans.pop(0)
        got = self.queue.wait_one(self.timeout if timeout is None else timeout)
        if got is None:
            return None
        req, length = got
        status = self._mm[self._status_off + req.head]
        if (not length or status > _LAST_STATUS
                or (length <= req.nbytes and req.type in _DEVICE_WRITES)):
            self._bad_completion(req, length, status)
        req.status = status
        req.used_len = length
        return req

    def _bad_completion(self, req: Request, length: int, status: int) -> NoReturn:
        """The fault for a completion that cannot be trusted. The status byte is the
        last device-writable byte: a used len that stops short of it (or of the data,
        for IN and GET_ID) means the device did not write them, and what the buffer
        holds is stale ("The Virtqueue Used Ring")."""
        if not length or (length <= req.nbytes and req.type in _DEVICE_WRITES):
            self._fault(f"{req}: used len {length} does not cover the data and "
                        "status byte the device must write")
        self._fault(f"{req}: status byte {status:#x} is not a VIRTIO_BLK_S_* value")

    @property
    def in_flight(self) -> int:
        return self.queue.in_flight

    @property
    def requests_completed(self) -> int:
        """Requests reaped since the device was opened (the queue counts them, so the
        reap path does not count twice)."""
        return self.queue.completed

    # -- plain API ----------------------------------------------------------------
    def read(self, sector: int, count: int) -> bytes:
        """``count`` sectors from ``sector``."""
        self._check_open()
        self._poll_config_change()
        self.check_range(sector, count)
        pieces: list[bytes] = []
        self._transfer(ReqType.VIRTIO_BLK_T_IN, sector, count, pieces)
        # One allocation for the result: under TCG, page faults on fresh memory cost more
        # than the copies, so no zero-filled bytearray that is copied again.
        return b"".join(pieces)

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (a whole number of blocks) at ``sector``."""
        self._check_open()
        view = memoryview(data).cast("B")
        if not len(view) or len(view) % SECTOR_SIZE:
            raise InvalidArgument(f"data of {len(view)} bytes is not a positive multiple "
                                  f"of {SECTOR_SIZE}")
        self.check_writable("write")
        self._poll_config_change()
        self.check_range(sector, len(view) // SECTOR_SIZE)
        self._transfer(ReqType.VIRTIO_BLK_T_OUT, sector, len(view) // SECTOR_SIZE, view)

    def flush(self) -> None:
        """Make completed writes durable (VIRTIO_BLK_T_FLUSH)."""
        self._check_open()
        self._require(Feature.VIRTIO_BLK_F_FLUSH)
        self._run_one(Request(ReqType.VIRTIO_BLK_T_FLUSH))

    def get_id(self) -> str:
        """The device's ID string (VIRTIO_BLK_T_GET_ID: up to 20 bytes)."""
        self._check_open()
        buf = self._pool[0]
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
        buf = self._pool[0]
        entry = np.ndarray((), BLK_DWZ_DTYPE, buf.mv)
        for start, n in range_pieces(self.limits, rtype, sector, count, max_sectors,
                                     self.bdf):
            entry["sector"], entry["num_sectors"], entry["flags"] = start, n, flags
            self._run_one(Request(rtype, start, n, buf, BLK_DWZ_DTYPE.itemsize))
        del entry

    def _run_one(self, req: Request) -> None:
        self._transfer_requests([req])

    # -- the pipeline behind the plain API ----------------------------------------
    def _transfer(self, rtype: ReqType, sector: int, count: int,
                  data: memoryview | list[bytes]) -> None:
        """Move ``count`` sectors between the device and ``data`` (a view to write from,
        or a list that collects what is read, in order) in pieces of at most one bounce
        buffer, keeping every pool buffer busy."""
        with self._pool_guard():
            self._pipeline(rtype, sector, count, data)

    @contextlib.contextmanager
    def _pool_guard(self) -> Iterator[None]:
        """If a plain call is cut short (a signal, a device error) while its requests
        are still out, their bounce buffers may not be reused: reset the device and
        refuse further use, as after a protocol error."""
        try:
            yield
        except BaseException:
            if not self._closed and self.queue.outstanding and not self.queue.broken:
                self.queue.broken = "a call was interrupted with requests in flight"
                self._reset_quietly()
            raise

    def _pipeline(self, rtype: ReqType, sector: int, count: int,
                  data: memoryview | list[bytes]) -> None:
        error = pipeline.transfer(_PipelinePort(self, rtype), self._pool,
                                  self._chunk_sectors, sector, count, data)
        if error is not None:
            self._explain(error, sector, count)
            raise error

    def _transfer_requests(self, requests: list[Request]) -> None:
        inflight = {id(r): r for r in requests}
        error = None
        with self._pool_guard():
            self.submit(requests)
            while inflight:
                for req in self._reap_own(inflight):
                    error = error or status_error(req, self.bdf)
        if error is not None:
            if requests[0].count:
                self._explain(error, requests[0].sector, requests[0].count)
            raise error

    def _explain(self, error: BaseException, sector: int, count: int) -> None:
        """An I/O error may mean the device shrank since we last looked: then say so."""
        if isinstance(error, BlkIOError):
            self.refresh_config()
            if sector + count > self.limits.capacity:
                raise OutOfRange(f"sectors {sector}..{sector + count - 1} exceed capacity "
                                 f"{self.limits.capacity}", sector, count,
                                 self.limits.capacity) from error

    def _reap_own(self, inflight: dict[int, Request]) -> list[Request]:
        """Reap; requests of the batch API's callers are kept for their next reap()."""
        held, self._orphans = self._orphans, []  # reap() would hand these out first
        try:
            got = self.reap()
        finally:
            self._orphans = held
        mine = []
        for req in got:
            if inflight.pop(id(req), None) is None:
                self._orphans.append(req)
            else:
                mine.append(req)
        return mine

    # -- failure and teardown -----------------------------------------------------
    def _reset_quietly(self) -> bool:
        """Reset; True if the status read back 0 (the device let go of its queues)."""
        try:
            self.transport.reset()
        except DeviceError:
            log.warning("%s: reset failed", self.bdf, exc_info=True)
            return False
        return True

    def _fault(self, message: str) -> NoReturn:
        self.queue.broken = message
        outcome = ("the device has been reset" if self._reset_quietly()
                   else "the device did not reset; its memory stays mapped")
        raise DeviceError(f"{self.bdf}: {message}; {outcome}")

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
            if self.waiter is not None:  # vectors freed after the reset, before release
                self.waiter.close()
            if hasattr(self, "queue"):
                self.queue.detach()
            for buf in getattr(self, "_pool", []):
                buf.mv.release()
            self._pool = []
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


def status_error(req: Request, bdf: str) -> BaseException | None:
    """The error a completed request's status byte stands for (None: VIRTIO_BLK_S_OK)."""
    if req.status == BlkStatus.VIRTIO_BLK_S_OK:
        return None
    if req.status == BlkStatus.VIRTIO_BLK_S_UNSUPP:
        return Unsupported(f"{bdf}: the device does not support {req} "
                           "(VIRTIO_BLK_S_UNSUPP)")
    return BlkIOError(f"{bdf}: I/O error on {req} (VIRTIO_BLK_S_IOERR)",
                      int(req.status or 0), req.sector, req.count)


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


class _PipelinePort:
    """The device as the bounce-buffer pipeline sees it (``pipeline.Port``)."""

    def __init__(self, dev: VirtioBlk, rtype: ReqType) -> None:
        self.dev, self.rtype = dev, rtype

    def request(self, sector: int, count: int, buf: DmaBuffer) -> Request:
        return Request(self.rtype, sector, count, buf, count * SECTOR_SIZE)

    def room(self) -> int:
        return self.dev.queue.num_free

    def cost(self, buf: DmaBuffer, nbytes: int) -> int:
        return self.dev._descriptors(buf, nbytes)

    def submit(self, requests: Sequence[Request]) -> None:
        self.dev.submit(requests)

    def reap(self, mine: dict[int, Request]) -> list[Request]:
        return self.dev._reap_own(mine)

    def in_flight(self) -> int:
        return self.dev.queue.in_flight

    def error(self, req: Request) -> BaseException | None:
        return status_error(req, self.dev.bdf)


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
