"""RequestQueue: one virtio-blk request queue's path -- submit, kick, reap -- with its
requests in flight, its request header and status slots and its bounce pool.

virtio 1.2, "Block Device: Device Operation" (request header, data, status byte) on one
virtqueue. A device with VIRTIO_BLK_F_MQ has several; each is driven by one owner (a
thread of control, or a worker process), never two at once, so nothing here locks
(SPDK's bdev_virtio and Linux's blk-mq hardware queues share that rule). The device
(``VirtioBlk``) keeps the configuration, the limits and the set of queues.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Callable, Iterator, NoReturn, Sequence

from . import pipeline
from .blk_setup import Queue, Slots
from .errors import BlkIOError, DeviceError, InvalidArgument, Unsupported
from .request import DmaBuffer, Request
from .spec import BLK_OUTHDR, SECTOR_SIZE, BlkStatus, ReqType
from .ring.core import QueueFull

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


class RequestQueue:
    """Requests on one virtqueue: ``submit`` (checked, all or none, one kick),
    ``reap``/``reap_one`` (completions checked against what the device may write), and
    ``transfer``/``run`` behind the device's plain calls. ``fault`` is the device's: it
    resets the whole device (every queue stops) and says whether the reset took."""

    def __init__(self, index: int, vq: Queue, slots: Slots, pool: list[DmaBuffer],
                 data_segs: int, chunk_sectors: int, bdf: str,
                 fault: Callable[[int, str], bool]) -> None:
        self.index = index
        self.vq = vq
        self.bdf = bdf
        self._mm, self._hdr_off, self._status_off = slots.mm, slots.hdr_off, slots.status_off
        self._hdr_seg, self._status_seg = slots.hdr_seg, slots.status_seg
        self.pool = pool
        self.data_segs = data_segs
        self.chunk_sectors = chunk_sectors
        self._on_fault = fault
        self.closed = False  # set by the device's close()
        self._orphans: list[Request] = []

    def _check_open(self) -> None:
        if self.closed:
            raise DeviceError(f"{self.bdf} is closed")

    # -- submit ---------------------------------------------------------------------
    def submit(self, requests: Sequence[Request], kick: bool = True) -> None:
        """Queue every request and kick once, or none of them (``VirtioBlk.submit``)."""
        if self.closed:
            self._check_open()
        if len(requests) == 1 and self._add_one(requests[0]):
            if kick:
                self.vq.kick()
            return
        framed = self._plan(requests)
        try:
            self._add(requests, framed)
        except BaseException:
            self._interrupted()
            raise
        if kick:
            self.vq.kick()

    def kick(self) -> None:
        """Publish every request submitted with ``kick=False``."""
        if self.closed:
            self._check_open()
        self.vq.kick()

    def _add_one(self, req: Request) -> bool:
        """QD1's case, inline (a Python call costs as much as a dozen operations): queue
        one request whose data is one segment already framed for its buffer, with the
        same checks as _plan. False, with nothing queued, for anything else: the general
        path checks it and says what is wrong. add_framed refuses a full or broken queue
        before any write."""
        q = self.vq
        nbytes, buf, sector = req.nbytes, req.buffer, req.sector
        try:
            into = _INTO[req.type]
            data = buf.framed_descs[2 * nbytes + into]  # type: ignore[union-attr]
        except (KeyError, TypeError, AttributeError):  # bad type, no buffer, unframed
            return False
        # type(sector) is int: a float (or anything struct.pack refuses) would fail only
        # after the chain is in the ring; _plan turns it into InvalidArgument.
        if (data is None or not q.framed or not 0 < nbytes <= buf.size  # type: ignore[union-attr]
                or type(sector) is not int or not 0 <= sector <= _U64_MAX):
            return False
        try:
            head = q.add_framed(data, req, nbytes * into + 1)
            _HDR.pack_into(self._mm, self._hdr_off + 16 * head, req.type, 0, sector)
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
        q = self.vq
        if q.outstanding != q.in_flight and not q.broken:
            q.broken = "a submit was interrupted with requests half queued"
            self._on_fault(self.index, q.broken)

    def _plan(self, requests: Sequence[Request]) -> list[bytes | None]:
        """Check the batch; per request its framed data descriptor (None: a chain of
        its own segments). Raises before anything is queued."""
        q = self.vq
        framed, descriptors, max_segs = q.framed, q.descriptors_needed, self.data_segs
        plan: list[bytes | None] = []
        need = 0
        for req in requests:
            rtype, nbytes, data = req.type, req.nbytes, None
            if rtype not in _REQ_TYPES:
                raise InvalidArgument(f"request type {rtype!r} is not a VIRTIO_BLK_T_* type")
            check_sector(req)
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
        q = self.vq
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
        head = self.vq.next_head()
        nbytes = req.nbytes
        if nbytes:
            into = req.type in _DEVICE_WRITES
            data = req.buffer.chain(nbytes, into)  # type: ignore[union-attr]
            segs = (self._hdr_seg[head], *data, self._status_seg[head])
            writable = nbytes + 1 if into else 1
        else:
            segs = (self._hdr_seg[head], self._status_seg[head])
            writable = 1
        return self.vq.add(segs, req, writable)

    def descriptors(self, buf: DmaBuffer, nbytes: int) -> int:
        """Descriptors a request from ``buf`` takes: header, data segments, status."""
        return self.vq.descriptors_needed(2 + len(buf.segments(nbytes)))

    # -- reap -----------------------------------------------------------------------
    def reap(self, timeout: float) -> list[Request]:
        """Completed requests (waiting up to ``timeout`` for at least one while any is in
        flight), each with ``status`` set (``VirtioBlk.reap``)."""
        if self.closed or self._orphans:
            self._check_open()
            done, self._orphans = self._orphans, []
            return done
        got = self.vq.wait(timeout)
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

    def reap_one(self, timeout: float) -> Request | None:
        """The next completed request, waiting up to ``timeout`` while any is in flight
        (None if none is), checked as ``reap`` checks each."""
        if self.closed or self._orphans:
            self._check_open()
            return self._orphans.pop(0)
        got = self.vq.wait_one(timeout)
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
            self.fault(f"{req}: used len {length} does not cover the data and "
                       "status byte the device must write")
        self.fault(f"{req}: status byte {status:#x} is not a VIRTIO_BLK_S_* value")

    def fault(self, message: str) -> NoReturn:
        """Break this queue, reset the device, raise."""
        self.vq.broken = message
        outcome = ("the device has been reset" if self._on_fault(self.index, message)
                   else "the device did not reset; its memory stays mapped")
        raise DeviceError(f"{self.bdf}: {message}; {outcome}")

    @property
    def in_flight(self) -> int:
        return self.vq.in_flight

    # -- the plain calls' path: a pipeline through the bounce pool -------------------
    @contextlib.contextmanager
    def pool_guard(self) -> Iterator[None]:
        """If a plain call is cut short (a signal, a device error) while its requests
        are still out, their bounce buffers may not be reused: reset the device and
        refuse further use, as after a protocol error."""
        try:
            yield
        except BaseException:
            q = self.vq
            if not self.closed and q.outstanding and not q.broken:
                q.broken = "a call was interrupted with requests in flight"
                self._on_fault(self.index, q.broken)
            raise

    def transfer(self, rtype: ReqType, sector: int, count: int,
                 data: memoryview | list[bytes], timeout: float) -> BaseException | None:
        """Move ``count`` sectors between the device and ``data`` through the pool;
        the first error (pipeline.transfer)."""
        with self.pool_guard():
            return pipeline.transfer(_PipelinePort(self, rtype, timeout), self.pool,
                                     self.chunk_sectors, sector, count, data)

    def run(self, requests: list[Request], timeout: float) -> BaseException | None:
        """Submit ``requests`` and wait for all of them; the first error."""
        inflight = {id(r): r for r in requests}
        error = None
        with self.pool_guard():
            self.submit(requests)
            while inflight:
                for req in self.reap_own(inflight, timeout):
                    error = error or status_error(req, self.bdf)
        return error

    def reap_own(self, inflight: dict[int, Request], timeout: float) -> list[Request]:
        """Reap; requests of the batch API's callers are kept for their next reap()."""
        held, self._orphans = self._orphans, []  # reap() would hand these out first
        try:
            got = self.reap(timeout)
        finally:
            self._orphans = held
        mine = []
        for req in got:
            if inflight.pop(id(req), None) is None:
                self._orphans.append(req)
            else:
                mine.append(req)
        return mine


def check_sector(req: Request) -> None:
    """The sector must be an integer within le64: anything else would fail in
    struct.pack after its chain was in the ring."""
    try:
        sector = operator.index(req.sector)
    except TypeError:
        raise InvalidArgument(f"sector {req.sector!r} is not an integer") from None
    if not 0 <= sector <= _U64_MAX:
        raise InvalidArgument(f"{req}: sector {req.sector} is outside 0..2**64-1")


def status_error(req: Request, bdf: str) -> BaseException | None:
    """The error a completed request's status byte stands for (None: VIRTIO_BLK_S_OK)."""
    if req.status == BlkStatus.VIRTIO_BLK_S_OK:
        return None
    if req.status == BlkStatus.VIRTIO_BLK_S_UNSUPP:
        return Unsupported(f"{bdf}: the device does not support {req} "
                           "(VIRTIO_BLK_S_UNSUPP)")
    return BlkIOError(f"{bdf}: I/O error on {req} (VIRTIO_BLK_S_IOERR)",
                      int(req.status or 0), req.sector, req.count)


class _PipelinePort:
    """A queue as the bounce-buffer pipeline sees it (``pipeline.Port``)."""

    def __init__(self, queue: RequestQueue, rtype: ReqType, timeout: float) -> None:
        self.queue, self.rtype, self.timeout = queue, rtype, timeout

    def request(self, sector: int, count: int, buf: DmaBuffer) -> Request:
        return Request(self.rtype, sector, count, buf, count * SECTOR_SIZE)

    def room(self) -> int:
        return self.queue.vq.num_free

    def cost(self, buf: DmaBuffer, nbytes: int) -> int:
        return self.queue.descriptors(buf, nbytes)

    def submit(self, requests: Sequence[Request]) -> None:
        self.queue.submit(requests)

    def reap(self, mine: dict[int, Request]) -> list[Request]:
        return self.queue.reap_own(mine, self.timeout)

    def in_flight(self) -> int:
        return self.queue.vq.in_flight

    def error(self, req: Request) -> BaseException | None:
        return status_error(req, self.queue.bdf)
