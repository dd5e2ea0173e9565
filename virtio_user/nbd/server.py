"""NbdServer: the transmission-phase loop over the socket, each NBD request turned into
virtqueue requests through ``VirtioBlk.submit``/``reap`` and answered as completions
arrive, in any order, with bounded buffers and bounded waits."""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..blk import VirtioBlk
from ..errors import ProtocolError, VirtioError
from ..numbers import MAX_SECONDS
from ..request import Request
from ..spec import (BLK_DWZ_DTYPE, SECTOR_SIZE, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, BlkStatus,
                   Feature, ReqType)
from ..ring.core import QueueFull

from .wire import (CMD_NAMES, FUA_FLAG, NEEDS_FLAG, NO_HOLE_FLAG, REPLY, REQUEST,
                   SIMPLE_REPLY_MAGIC, Cmd, Flag, NbdRequest, pack_reply, parse_request,
                   transmission_flags)

if TYPE_CHECKING:
    from ..request import DmaBuffer

log = logging.getLogger(__name__)

BUFFER_BYTES = 128 << 10  # one DMA buffer per virtqueue request in flight
MAX_BUFFERS = 64  # at most this many requests on the queue (and never more than it holds)
MAX_REQUEST = 32 << 20  # the kernel's largest nbd request (max_hw_sectors 65536)
MAX_JOBS = 256  # NBD requests accepted and not yet answered
MAX_HELD = 64 << 20  # bytes of read data and replies held before we stop reading
RX_BYTES = 256 << 10
TICK = 0.1  # seconds the loop sleeps in select when the device has nothing in flight
# Counted, not timed: in a TCG guest the clocksource is HPET, and each clock read traps
# into QEMU under the lock the device emulation needs to complete our requests.
SOCKET_LOOKS = 2000  # looks at the socket while waiting for the device, then only at it
RING_LOOKS = 32  # looks at the used ring between two looks at the socket
# Socket buffers (each direction): a whole large request or reply in one system call.
# The default (net.core.wmem_default, about 208 KiB) cut a 1 MiB read reply into
# several sends, each waiting for the kernel's receiver to wake up and drain it.
SOCKET_BYTES = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h; not in Python's socket
SPARE_BYTES = 16 << 20  # read reply buffers kept for reuse (fresh memory faults, slowly)
DISC_GRACE = 10.0  # after asking the kernel to disconnect, for its NBD_CMD_DISC


def grow_buffers(sock: socket.socket, nbytes: int = SOCKET_BYTES) -> None:
    """Both socket buffers to ``nbytes``: the *FORCE options (root) go past
    net.core.[rw]mem_max, the plain ones are capped by it; best effort either way."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                         (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        for option in (force, plain):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, nbytes)
                break
            except OSError:
                continue


@dataclass(eq=False)
class _Job:
    """One NBD request until its reply is queued."""

    req: NbdRequest
    pending: int = 0  # virtqueue requests out (or waiting for a buffer)
    complete: bool = True  # every piece created (a write's payload may still be arriving)
    error: int = 0
    fua: bool = False
    data: bytearray | None = None  # READ in several pieces: reply header and data
    direct: bool = False  # READ in one piece: replied from its DMA buffer, no copy
    buf: DmaBuffer | None = None  # that buffer once the device filled it
    nbytes: int = 0


@dataclass
class _Piece:
    """A virtqueue request not yet given a buffer."""

    job: _Job
    type: ReqType
    sector: int
    count: int
    flags: int = 0


@dataclass
class _Payload:
    """The write payload being received: pieces fill DMA buffers as bytes arrive."""

    job: _Job
    left: int
    skip: bool = False  # the request was refused: read past its bytes, then reply
    req: Request | None = None
    filled: int = 0


@dataclass
class _Stats:
    requests: int = 0
    replies: int = 0
    errors: int = 0
    by_cmd: dict[str, int] = field(default_factory=dict)


class NbdServer:
    """The NBD transmission phase over ``sock`` (the kernel's peer), served by ``dev``."""

    def __init__(self, dev: VirtioBlk, sock: socket.socket, *, wait: float | None = None,
                 buffers: int = MAX_BUFFERS, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.dev = dev
        self._wait = wait or dev.timeout  # for a completion while requests are out
        self.sock = sock
        sock.setblocking(False)
        grow_buffers(sock)
        self.flags = transmission_flags(dev)
        self._flags = int(self.flags)
        self._read_only = bool(self.flags & Flag.READ_ONLY)
        self.reason = ""
        self.stats = _Stats()
        count = max(1, min(buffers, dev.queue_size))
        self._free: list[DmaBuffer] = [dev.alloc_buffer(buffer_bytes) for _ in range(count)]
        # The same bound the plain API's pipeline uses.
        self._piece_sectors = dev.max_request_bytes(self._free) // SECTOR_SIZE
        self._capacity_bytes = dev.capacity * SECTOR_SIZE
        self._align = dev.block_size
        self._rx = bytearray(RX_BYTES)
        self._rxv = memoryview(self._rx)
        self._rx_start = self._rx_end = 0
        self._payload: _Payload | None = None
        self._waiting: collections.deque[_Piece] = collections.deque()
        self._ready: list[Request] = []
        self._out: collections.deque[memoryview] = collections.deque()
        # per _out entry: the reply or DMA buffer to reuse once it is sent, or None
        self._out_done: collections.deque[bytearray | DmaBuffer | None] = collections.deque()
        self._spare: dict[int, list[bytearray]] = {}
        self._spare_bytes = 0
        self._jobs = 0
        self._held = 0
        self._reading = True
        self._socket_dead = False
        self._error: ProtocolError | None = None
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ)
        self._events = selectors.EVENT_READ

    # -- the loop -----------------------------------------------------------------
    def serve(self, *, stop: Callable[[], bool] | None = None,
              on_stop: Callable[[], None] | None = None,
              tick: Callable[[], None] | None = None) -> str:
        """Serve until the kernel disconnects or closes the socket, then flush; returns
        why it ended. ``stop()`` true asks for a disconnect through ``on_stop``; ``tick``
        runs once per turn of the loop. ProtocolError after a malformed request (the
        connection is ended cleanly first)."""
        disc_deadline = 0.0
        try:
            while not self._finished():
                if stop is not None and not disc_deadline and stop():
                    disc_deadline = time.monotonic() + DISC_GRACE
                    log.info("stop requested: disconnecting")
                    if on_stop is not None:
                        on_stop()
                elif disc_deadline and self._reading and time.monotonic() > disc_deadline:
                    self._end(f"no NBD_CMD_DISC within {DISC_GRACE:g} s of the disconnect")
                if tick is not None:
                    tick()
                self._turn()
        finally:
            self._drain()
        self._flush_device()
        self._close_socket()
        if self._error is not None:
            raise self._error
        return self.reason

    def _turn(self) -> None:
        if self._rx_end > self._rx_start:
            self._parse()  # bytes that waited for a buffer or for the admission limits
        self._start_pieces()
        if self.dev.in_flight:
            self._pump(0)
            self._start_pieces()
            if self.dev.in_flight:
                for req in self._await_device():
                    self._complete(req)
                self._send()
        else:
            self._pump(TICK)

    def _await_device(self) -> list[Request]:
        """Completions, looking at the socket between looks at the ring for a while
        (new requests go to the device and replies to the kernel while the device works,
        instead of waiting behind a blocked reap), then waiting on the device alone:
        that wait is the one that fails a silent device after ``self._wait``. With
        ``--wait interrupt`` or ``hybrid`` that wait sleeps: one round only."""
        for _ in range(SOCKET_LOOKS if self.dev.wait_mode == "poll" else 1):
            for _ in range(RING_LOOKS):
                done = self.dev.reap(0)
                if done or not self.dev.in_flight:
                    return done
            self._pump(0)
            self._start_pieces()
            self._send()
            # The kernel's side of each request (fio, the nbd receive worker) needs a
            # CPU too: a server spinning without yielding made QD1 about twice slower.
            os.sched_yield()
        return self.dev.reap(self._wait)

    def _finished(self) -> bool:
        if self._reading or self.dev.in_flight:
            return False
        if self._socket_dead:
            return True
        return not (self._waiting or self._ready or self._out)

    def _pump(self, timeout: float) -> None:
        """Socket I/O: read while there is room, write while replies wait."""
        events = 0
        if self._can_read():
            events |= selectors.EVENT_READ
        if self._out and not self._socket_dead:
            events |= selectors.EVENT_WRITE
        if events != self._events:
            if self._events and events:
                self._sel.modify(self.sock, events)
            elif self._events:
                self._sel.unregister(self.sock)
            else:
                self._sel.register(self.sock, events)
            self._events = events
        if not events:
            if timeout:
                time.sleep(min(timeout, 0.01))
            return
        for _, ready in self._sel.select(timeout):
            if ready & selectors.EVENT_WRITE:
                self._send()
            if ready & selectors.EVENT_READ:
                self._recv()

    def _can_read(self) -> bool:
        if not self._reading or self._socket_dead:
            return False
        if self._rx_end == len(self._rx) and not self._rx_start:
            return False  # full of bytes that wait for buffers
        if self._payload is not None:
            return True
        return self._jobs < MAX_JOBS and self._held < MAX_HELD

    # -- receiving ----------------------------------------------------------------
    def _recv(self) -> None:
        if self._rx_start == self._rx_end:
            self._rx_start = self._rx_end = 0
        elif self._rx_end == len(self._rx):
            n = self._rx_end - self._rx_start
            self._rx[:n] = self._rx[self._rx_start:self._rx_end]
            self._rx_start, self._rx_end = 0, n
        try:
            n = self.sock.recv_into(self._rxv[self._rx_end:])
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(f"the socket failed: {exc.strerror}", dead=True)
            return
        if not n:
            self._end("the kernel closed the connection", dead=True)
            return
        self._rx_end += n
        self._parse()

    def _parse(self) -> None:
        """Take requests and payload bytes from the receive buffer, as far as buffers
        and the admission limits allow."""
        while True:
            avail = self._rx_end - self._rx_start
            if self._payload is not None:
                if not avail or not self._take_payload(avail):
                    return
                continue
            if (not self._reading or avail < REQUEST.size or self._jobs >= MAX_JOBS
                    or self._held >= MAX_HELD):
                return
            start = self._rx_start
            self._rx_start += REQUEST.size
            try:
                req = parse_request(self._rxv[start:start + REQUEST.size])
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            self._handle(req)

    def _take_payload(self, avail: int) -> bool:
        """Move payload bytes into the current piece's buffer; False when stalled for a
        buffer."""
        p = self._payload
        assert p is not None
        if p.skip:
            n = min(avail, p.left)
            self._rx_start += n
            p.left -= n
        else:
            if p.req is None:
                if not self._free:
                    return False
                p.req = self._write_piece(p.job, p.left)
            req = p.req
            assert req.buffer is not None
            n = min(avail, req.nbytes - p.filled)
            req.buffer.mv[p.filled:p.filled + n] = self._rxv[self._rx_start:self._rx_start + n]
            self._rx_start += n
            p.filled += n
            p.left -= n
            if p.filled == req.nbytes:
                self._ready.append(req)
                p.req, p.filled = None, 0
        if not p.left:
            self._payload = None
            p.job.complete = True
            if not p.job.pending:
                self._finish(p.job)
        return True

    def _write_piece(self, job: _Job, left: int) -> Request:
        done = job.req.length - left
        count = min(self._piece_sectors, left // SECTOR_SIZE)
        job.pending += 1
        return Request(ReqType.VIRTIO_BLK_T_OUT, (job.req.offset + done) // SECTOR_SIZE, count,
                       self._free.pop(), count * SECTOR_SIZE, tag=job)

    def _handle(self, req: NbdRequest) -> None:
        self.stats.requests += 1
        name = CMD_NAMES[req.cmd]
        self.stats.by_cmd[name] = self.stats.by_cmd.get(name, 0) + 1
        if req.cmd == Cmd.DISC:
            self._end("the kernel asked to disconnect (NBD_CMD_DISC)")
            return
        job = _Job(req, fua=bool(req.flags & FUA_FLAG))
        self._jobs += 1
        job.error = self._refuse(req)
        if req.cmd == Cmd.WRITE and req.length:
            # Even a refused write's reply waits until its payload has been read.
            job.complete = False
            self._payload = _Payload(job, req.length, skip=bool(job.error))
        elif job.error:
            self._reply(job)
        elif req.cmd == Cmd.READ:
            if req.length <= self._piece_sectors * SECTOR_SIZE:
                job.direct = True
            else:
                job.data = self._reply_buffer(REPLY.size + req.length)
                self._held += len(job.data)
            self._split(job, ReqType.VIRTIO_BLK_T_IN, self._piece_sectors)
        elif req.cmd == Cmd.FLUSH:
            self._flush_job(job)
        elif req.cmd == Cmd.TRIM:
            self._split(job, ReqType.VIRTIO_BLK_T_DISCARD, self.dev.limits.max_discard_sectors)
        else:
            unmap = 0 if req.flags & NO_HOLE_FLAG else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            self._split(job, ReqType.VIRTIO_BLK_T_WRITE_ZEROES,
                        self.dev.limits.max_write_zeroes_sectors, unmap)

    def _refuse(self, req: NbdRequest) -> int:
        """The errno a request gets without reaching the device, or 0."""
        if req.cmd == Cmd.FLUSH:
            return 0
        if req.cmd != Cmd.READ and self._read_only:
            log.warning("refusing %s at %d: the device is read-only", CMD_NAMES[req.cmd],
                        req.offset)
            return errno.EPERM
        if not self._flags & NEEDS_FLAG.get(req.cmd, self._flags):
            return errno.EINVAL
        end = req.offset + req.length
        if (not req.length or req.offset % self._align or req.length % self._align
                or end > self._capacity_bytes):
            log.warning("refusing %s of %d bytes at %d: outside the %d-byte device or not "
                        "in %d-byte blocks", CMD_NAMES[req.cmd], req.length, req.offset,
                        self._capacity_bytes, self._align)
            return errno.EINVAL
        if req.cmd in (Cmd.READ, Cmd.WRITE) and req.length > MAX_REQUEST:
            log.warning("refusing %s of %d bytes: more than %d", CMD_NAMES[req.cmd],
                        req.length, MAX_REQUEST)
            return errno.EINVAL
        return 0

    def _split(self, job: _Job, rtype: ReqType, max_sectors: int, flags: int = 0) -> None:
        """Pieces of at most ``max_sectors`` (whole blocks), each waiting for a buffer."""
        per_block = self._align // SECTOR_SIZE
        step = max(per_block, min(max_sectors, 0xFFFF_FFFF) // per_block * per_block)
        first = job.req.offset // SECTOR_SIZE
        end = first + job.req.length // SECTOR_SIZE
        for sector in range(first, end, step):
            self._waiting.append(_Piece(job, rtype, sector, min(step, end - sector), flags))
            job.pending += 1

    def _flush_job(self, job: _Job) -> None:
        if not self.dev.has(Feature.VIRTIO_BLK_F_FLUSH):
            self._reply(job)  # no volatile cache: nothing to make durable
            return
        job.pending += 1
        self._ready.append(Request(ReqType.VIRTIO_BLK_T_FLUSH, tag=job))

    # -- the device ---------------------------------------------------------------
    def _start_pieces(self) -> None:
        if self._socket_dead:  # nobody to answer: start nothing new
            self._waiting.clear()
        while self._waiting and self._free:
            piece = self._waiting.popleft()
            buf = self._free.pop()
            if piece.type == ReqType.VIRTIO_BLK_T_IN:
                nbytes = piece.count * SECTOR_SIZE
            else:  # one struct virtio_blk_discard_write_zeroes
                entry = np.ndarray((), BLK_DWZ_DTYPE, buf.mv)
                entry["sector"], entry["num_sectors"] = piece.sector, piece.count
                entry["flags"] = piece.flags
                del entry
                nbytes = BLK_DWZ_DTYPE.itemsize
            self._ready.append(Request(piece.type, piece.sector, piece.count, buf, nbytes,
                                       tag=piece.job))
        if self._ready:
            self._submit()

    def _submit(self) -> None:
        try:
            self.dev.submit(self._ready)
            self._ready.clear()
            return
        except QueueFull:
            pass
        while self._ready:  # as many as the ring has room for, the rest next turn
            try:
                self.dev.submit(self._ready[:1])
            except QueueFull:
                return
            self._ready.pop(0)

    def _complete(self, req: Request) -> None:
        job: _Job = req.tag
        buf = req.buffer
        if req.status != BlkStatus.VIRTIO_BLK_S_OK:
            status = BlkStatus(req.status or 0).name
            log.warning("%s: %s (%s): NBD %s at %d gets EIO", self.dev.bdf, req, status,
                        Cmd(job.req.cmd).name, job.req.offset)
            job.error = job.error or errno.EIO
        elif job.direct and buf is not None:
            job.buf, job.nbytes, buf = buf, req.nbytes, None  # ours again once sent
        elif job.data is not None and buf is not None:
            at = REPLY.size + req.sector * SECTOR_SIZE - job.req.offset
            job.data[at:at + req.nbytes] = buf.mv[:req.nbytes]
        if buf is not None:
            self._free.append(buf)
        job.pending -= 1
        if not job.pending and job.complete:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        if job.fua and not job.error and self.dev.has(Feature.VIRTIO_BLK_F_FLUSH):
            job.fua = False  # FUA as write then flush
            self._flush_job(job)
            return
        self._reply(job)

    # -- replying -----------------------------------------------------------------
    def _reply(self, job: _Job) -> None:
        self._jobs -= 1
        self.stats.replies += 1
        if job.error:
            self.stats.errors += 1
        if job.data is not None:
            self._held -= len(job.data)
        if job.buf is not None and (job.error or self._socket_dead):
            self._free.append(job.buf)
            job.buf = None
        if self._socket_dead:
            return
        if job.buf is not None:
            self._out.append(memoryview(pack_reply(0, job.req.cookie)))
            self._out_done.append(None)
            self._out.append(job.buf.mv[:job.nbytes])
            self._out_done.append(job.buf)
            self._held += REPLY.size + job.nbytes
            return
        if job.data is not None and not job.error:
            REPLY.pack_into(job.data, 0, SIMPLE_REPLY_MAGIC, 0, job.req.cookie)
            out = memoryview(job.data)
        else:  # the kernel reads no data after an error
            out = memoryview(pack_reply(job.error, job.req.cookie))
            if job.data is not None:
                self._give_back(job.data)
        self._out.append(out)
        self._out_done.append(job.data if out.obj is job.data else None)
        self._held += len(out)

    def _send(self) -> None:
        while self._out and not self._socket_dead:
            try:
                sent = self.sock.sendmsg(list(islice(self._out, 64)))
            except BlockingIOError:
                return
            except OSError as exc:
                self._end(f"the socket failed: {exc.strerror}", dead=True)
                return
            self._held -= sent
            while sent:
                head = self._out[0]
                if sent >= len(head):
                    sent -= len(head)
                    self._out.popleft()
                    done = self._out_done.popleft()
                    if done is not None:
                        head.release()
                        self._sent(done)
                else:
                    self._out[0] = head[sent:]
                    sent = 0
        if self._socket_dead:
            self._held -= sum(len(v) for v in self._out)
            self._out.clear()
            for done in self._out_done:
                if done is not None:
                    self._sent(done)
            self._out_done.clear()

    def _sent(self, done: bytearray | DmaBuffer) -> None:
        if isinstance(done, bytearray):
            self._give_back(done)
        else:
            self._free.append(done)

    def _reply_buffer(self, nbytes: int) -> bytearray:
        spare = self._spare.get(nbytes)
        if spare:
            self._spare_bytes -= nbytes
            return spare.pop()
        return bytearray(nbytes)

    def _give_back(self, buf: bytearray) -> None:
        if self._spare_bytes + len(buf) <= SPARE_BYTES:
            self._spare.setdefault(len(buf), []).append(buf)
            self._spare_bytes += len(buf)

    # -- ending -------------------------------------------------------------------
    def _end(self, reason: str, dead: bool = False) -> None:
        if not self.reason:
            self.reason = reason
            log.info("ending: %s", reason)
        self._reading = False
        self._socket_dead = self._socket_dead or dead

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.error("malformed request, ending the connection: %s", exc)
        self._error = self._error or exc
        self._end(f"malformed request: {exc}")

    def _drain(self) -> None:
        """Nothing may stay on the device: its buffers are ours until it completes."""
        deadline = time.monotonic() + self._wait
        try:
            while self.dev.in_flight and time.monotonic() < deadline:
                for req in self.dev.reap(self._wait):
                    self._complete(req)
        except VirtioError as exc:  # a broken device has been reset: nothing is out
            log.warning("%s: %s", self.dev.bdf, exc)

    def _flush_device(self) -> None:
        if self.dev.read_only or not self.dev.has(Feature.VIRTIO_BLK_F_FLUSH):
            return
        try:
            self.dev.flush()
        except Exception as exc:  # the connection is over; the flush is best effort
            log.warning("%s: flush at disconnect failed: %s", self.dev.bdf, exc)

    def _close_socket(self) -> None:
        if not self._socket_dead:
            # The CLI keeps --timeout within MAX_SECONDS; a Python caller may not have
            # (settimeout overflows on 1e300).
            self.sock.settimeout(min(self.dev.timeout, MAX_SECONDS))
            try:  # the last replies, then the end of the stream
                for view in self._out:
                    self.sock.sendall(view)
            except OSError:
                pass
        self._out.clear()
        self._sel.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


