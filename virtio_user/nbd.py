"""Serving a VirtioBlk to the kernel's nbd driver: the disk becomes ``/dev/nbdN``.

As SPDK's lib/nbd does, there is no network: one end of a socketpair goes to the kernel
with the nbd ioctls (include/uapi/linux/nbd.h), the other end is served here, in this
process. The kernel speaks the NBD transmission phase with simple replies (the NBD
protocol, doc/proto.md, "Transmission phase"); each request becomes one or more
virtqueue requests through ``VirtioBlk.submit``/``reap``, so many are on the device at
once, and replies go back as completions arrive, in any order.

Layers, top to bottom of this file: the wire (constants and the two structs),
``KernelNbd`` (the ioctls and the thread that blocks in NBD_DO_IT), ``NbdServer`` (the
protocol loop over the socket and the queue), the CLI glue (``add_args``, ``prepare``,
``run``: a server in the background, ``-d``).
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import logging
import os
import re
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from .blk import VirtioBlk
from .request import Request
from .errors import (CannotOpen, DeviceBusy, DeviceTimeout, FileAccessError, InvalidArgument,
                     ProtocolError, VirtioError, exit_code)
from .spec import (BLK_DWZ_DTYPE, SECTOR_SIZE, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, BlkStatus,
                   Feature, ReqType)
from .virtqueue import QueueFull

if TYPE_CHECKING:
    from .request import DmaBuffer

log = logging.getLogger(__name__)

# -- the wire (include/uapi/linux/nbd.h; doc/proto.md "Transmission phase") ----------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
# struct nbd_request: magic (be32), type (be32: command flags << 16 | command),
# cookie (8 bytes, echoed in the reply), from (be64, bytes), len (be32, bytes)
REQUEST = struct.Struct(">II8sQI")
# struct nbd_reply: magic (be32), error (be32, an errno), cookie (8 bytes)
REPLY = struct.Struct(">II8s")


class Cmd(IntEnum):
    """NBD_CMD_*: the low 16 bits of a request's type."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    WRITE_ZEROES = 6


class CmdFlag(IntFlag):
    """NBD_CMD_FLAG_*: the high 16 bits of a request's type, as the kernel sends them."""

    FUA = 1 << 16
    NO_HOLE = 1 << 17  # write zeroes: do not deallocate


class Flag(IntFlag):
    """NBD_FLAG_*: the transmission flags (NBD_SET_FLAGS)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6


class Ioctl(IntEnum):
    """The nbd ioctls: _IO(0xab, nr)."""

    SET_SOCK = 0xAB00
    SET_BLKSIZE = 0xAB01
    DO_IT = 0xAB03
    CLEAR_SOCK = 0xAB04
    CLEAR_QUE = 0xAB05
    SET_SIZE_BLOCKS = 0xAB07
    DISCONNECT = 0xAB08
    SET_TIMEOUT = 0xAB09
    SET_FLAGS = 0xAB0A


class NbdRequest(NamedTuple):
    cmd: int
    flags: int  # CmdFlag bits
    cookie: bytes
    offset: int
    length: int


def parse_request(raw: bytes | bytearray | memoryview) -> NbdRequest:
    """One request header; ProtocolError for a bad magic or a command we do not know."""
    magic, type_, cookie, offset, length = REQUEST.unpack(raw)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#010x} (expected {REQUEST_MAGIC:#010x})")
    cmd = type_ & 0xFFFF
    if cmd not in _COMMANDS:
        raise ProtocolError(f"unknown command {cmd} (type {type_:#x})")
    return NbdRequest(cmd, type_ & 0xFFFF0000, cookie, offset, length)


_COMMANDS = frozenset(int(c) for c in Cmd)
# Plain ints and names for the per-request path: an enum lookup or an IntFlag operation
# runs Python code in the enum module, and under TCG each costs tens of microseconds.
_CMD_NAMES = {int(c): c.name for c in Cmd}
_FUA, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
_NEEDS_FLAG = {int(Cmd.TRIM): int(Flag.SEND_TRIM),
               int(Cmd.WRITE_ZEROES): int(Flag.SEND_WRITE_ZEROES)}


def pack_reply(error: int, cookie: bytes) -> bytes:
    return REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def transmission_flags(dev: VirtioBlk) -> Flag:
    """What the kernel may send, from what the device negotiated."""
    flags = Flag.HAS_FLAGS
    if dev.read_only:
        return flags | Flag.READ_ONLY
    if dev.has(Feature.VIRTIO_BLK_F_FLUSH):
        flags |= Flag.SEND_FLUSH | Flag.SEND_FUA
    if dev.has(Feature.VIRTIO_BLK_F_DISCARD):
        flags |= Flag.SEND_TRIM
    if dev.has(Feature.VIRTIO_BLK_F_WRITE_ZEROES):
        flags |= Flag.SEND_WRITE_ZEROES
    return flags


# -- the kernel side -----------------------------------------------------------------

KERNEL_TIMEOUT = 30  # seconds before the kernel fails a request without a reply
READY_TIMEOUT = 30.0  # for /dev/nbdN to have its size after NBD_DO_IT
DISCONNECT_TIMEOUT = 30.0  # for the server to end after NBD_DISCONNECT
_NBD_PATH = re.compile(r"/dev/(nbd\d+)")


def nbd_name(path: str) -> str:
    """``nbd0`` for ``/dev/nbd0``; InvalidArgument for anything else."""
    m = _NBD_PATH.fullmatch(path)
    if m is None:
        raise InvalidArgument(f"{path!r} is not an NBD device: give /dev/nbdN")
    return m.group(1)


def server_pid(name: str) -> int | None:
    """The process serving nbdN (the kernel names the thread in NBD_DO_IT), or None."""
    try:
        with open(f"/sys/block/{name}/pid") as f:
            tid = int(f.read())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended: its parent may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _ioctl(fd: int, request: Ioctl, arg: int = 0) -> None:
    fcntl.ioctl(fd, request, arg)


class KernelNbd:
    """``/dev/nbdN`` configured through the ioctls, with a thread blocked in NBD_DO_IT
    (it returns when the connection ends)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = nbd_name(path)
        self.error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._ours = False  # our socket is set: clearing it cannot cut another connection
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CannotOpen(f"cannot open {path}: {exc.strerror}") from exc

    def configure(self, sock: socket.socket, *, block_size: int, size_bytes: int,
                  flags: Flag, timeout: int) -> None:
        blocks = size_bytes // block_size
        if blocks >= 1 << 31:  # the ioctl's argument goes through a C int
            raise InvalidArgument(f"{size_bytes} bytes in {block_size}-byte blocks is more "
                                  "than the nbd ioctls take (2^31 blocks)")
        steps = ((Ioctl.SET_BLKSIZE, block_size), (Ioctl.SET_SIZE_BLOCKS, blocks),
                 (Ioctl.SET_TIMEOUT, timeout), (Ioctl.SET_FLAGS, int(flags)),
                 (Ioctl.SET_SOCK, sock.fileno()))
        for request, arg in steps:
            try:
                _ioctl(self.fd, request, arg)
                self._ours = request == Ioctl.SET_SOCK
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise DeviceBusy(f"{self.path} is in use by another NBD connection") from exc
                raise CannotOpen(f"{self.path}: NBD_{request.name} failed: "
                                 f"{exc.strerror}") from exc

    def start(self) -> None:
        self._thread = threading.Thread(target=self._do_it, name=f"{self.name}-do-it",
                                        daemon=True)
        self._thread.start()

    def _do_it(self) -> None:
        # Signals go to the main thread: one arriving here would abort NBD_DO_IT and
        # with it every request in flight.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            _ioctl(self.fd, Ioctl.DO_IT)
        except OSError as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ready(self) -> bool:
        """The kernel has the device up: its server pid and its size are published."""
        try:
            with open(f"/sys/block/{self.name}/size") as f:
                size = int(f.read())
        except (OSError, ValueError):
            return False
        return size > 0 and os.path.exists(f"/sys/block/{self.name}/pid")

    def disconnect(self) -> None:
        """NBD_DISCONNECT from a helper thread: the kernel sends NBD_CMD_DISC down the
        socket, which must not wait on this process's own reading."""
        threading.Thread(target=self._disconnect, daemon=True,
                         name=f"{self.name}-disconnect").start()

    def _disconnect(self) -> None:
        try:
            _ioctl(self.fd, Ioctl.DISCONNECT)
        except OSError as exc:
            log.warning("%s: NBD_DISCONNECT: %s", self.path, exc.strerror)

    def close(self, timeout: float = DISCONNECT_TIMEOUT) -> None:
        """Wait (bounded) for NBD_DO_IT to return, then clear the socket and the queue
        as nbd-client does; NBD_CLEAR_SOCK also ends a NBD_DO_IT still waiting."""
        if self._thread is not None:
            self._thread.join(timeout)
        for request in (Ioctl.CLEAR_QUE, Ioctl.CLEAR_SOCK) if self._ours else ():
            try:
                _ioctl(self.fd, request)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        os.close(self.fd)


def disconnect(path: str, timeout: float = DISCONNECT_TIMEOUT) -> int:
    """``nbd -d``: ask the kernel to disconnect (the server flushes and ends), then wait
    for the server process to end."""
    name = nbd_name(path)
    pid = server_pid(name)
    if pid is None:
        raise CannotOpen(f"{path} is not connected")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise CannotOpen(f"cannot open {path}: {exc.strerror}") from exc
    try:
        _ioctl(fd, Ioctl.DISCONNECT)
    except OSError as exc:
        raise CannotOpen(f"{path}: NBD_DISCONNECT failed: {exc.strerror}") from exc
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise DeviceTimeout(f"{path}: the server (pid {pid}) did not end within "
                                f"{timeout:g} s of NBD_DISCONNECT")
        time.sleep(0.05)
    return 0


# -- the server ----------------------------------------------------------------------

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
    data: bytearray | None = None  # READ: reply header and data


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
        # The same bound the plain API's pipeline uses: size_max and seg_max over these
        # buffers, whole blocks.
        self._piece_sectors = dev._chunk_limit(self._free) // SECTOR_SIZE
        self._capacity_bytes = dev.capacity * SECTOR_SIZE
        self._align = dev.block_size
        self._rx = bytearray(RX_BYTES)
        self._rxv = memoryview(self._rx)
        self._rx_start = self._rx_end = 0
        self._payload: _Payload | None = None
        self._waiting: collections.deque[_Piece] = collections.deque()
        self._ready: list[Request] = []
        self._out: collections.deque[memoryview] = collections.deque()
        # per _out entry: the reply buffer to reuse once it is sent, or None
        self._out_done: collections.deque[bytearray | None] = collections.deque()
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
        name = _CMD_NAMES[req.cmd]
        self.stats.by_cmd[name] = self.stats.by_cmd.get(name, 0) + 1
        if req.cmd == Cmd.DISC:
            self._end("the kernel asked to disconnect (NBD_CMD_DISC)")
            return
        job = _Job(req, fua=bool(req.flags & _FUA))
        self._jobs += 1
        job.error = self._refuse(req)
        if req.cmd == Cmd.WRITE and req.length:
            # Even a refused write's reply waits until its payload has been read.
            job.complete = False
            self._payload = _Payload(job, req.length, skip=bool(job.error))
        elif job.error:
            self._reply(job)
        elif req.cmd == Cmd.READ:
            job.data = self._reply_buffer(REPLY.size + req.length)
            self._held += len(job.data)
            self._split(job, ReqType.VIRTIO_BLK_T_IN, self._piece_sectors)
        elif req.cmd == Cmd.FLUSH:
            self._flush_job(job)
        elif req.cmd == Cmd.TRIM:
            self._split(job, ReqType.VIRTIO_BLK_T_DISCARD, self.dev.limits.max_discard_sectors)
        else:
            unmap = 0 if req.flags & _NO_HOLE else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            self._split(job, ReqType.VIRTIO_BLK_T_WRITE_ZEROES,
                        self.dev.limits.max_write_zeroes_sectors, unmap)

    def _refuse(self, req: NbdRequest) -> int:
        """The errno a request gets without reaching the device, or 0."""
        if req.cmd == Cmd.FLUSH:
            return 0
        if req.cmd != Cmd.READ and self._read_only:
            log.warning("refusing %s at %d: the device is read-only", _CMD_NAMES[req.cmd],
                        req.offset)
            return errno.EPERM
        if not self._flags & _NEEDS_FLAG.get(req.cmd, self._flags):
            return errno.EINVAL
        end = req.offset + req.length
        if (not req.length or req.offset % self._align or req.length % self._align
                or end > self._capacity_bytes):
            log.warning("refusing %s of %d bytes at %d: outside the %d-byte device or not "
                        "in %d-byte blocks", _CMD_NAMES[req.cmd], req.length, req.offset,
                        self._capacity_bytes, self._align)
            return errno.EINVAL
        if req.cmd in (Cmd.READ, Cmd.WRITE) and req.length > MAX_REQUEST:
            log.warning("refusing %s of %d bytes: more than %d", _CMD_NAMES[req.cmd],
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
        if self._socket_dead:
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
                        self._give_back(done)
                else:
                    self._out[0] = head[sent:]
                    sent = 0
        if self._socket_dead:
            self._held -= sum(len(v) for v in self._out)
            self._out.clear()
            self._out_done.clear()

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
            self.sock.setblocking(True)
            self.sock.settimeout(self.dev.timeout)
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


# -- the command line ----------------------------------------------------------------

@dataclass
class NbdPlan:
    path: str
    kernel_timeout: int
    ready_fd: int | None = None  # the background child tells its parent here
    log_file: str | None = None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("nbd_device", metavar="/dev/nbdN", help="the kernel's NBD device")
    p.add_argument("-d", "--disconnect", action="store_true",
                   help="flush, disconnect and wait for the server to end")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until disconnected (default: background)")
    p.add_argument("--kernel-timeout", metavar="SECONDS", default=str(KERNEL_TIMEOUT),
                   help="the kernel fails a request not answered within SECONDS "
                   f"(NBD_SET_TIMEOUT, default {KERNEL_TIMEOUT})")
    p.add_argument("--log", metavar="FILE", help="append the background server's log to FILE")


def prepare(args: argparse.Namespace) -> Any:
    """Checks before the device is taken; ``-d`` and the parent of a background server
    finish here (subcommand.Finished)."""
    from .numbers import parse_number
    from .subcommand import Finished
    path = args.nbd_device
    name = nbd_name(path)
    if not os.path.exists(f"/sys/block/{name}"):
        raise CannotOpen(f"{path}: no such NBD device (is the nbd module loaded?)")
    timeout = parse_number(args.kernel_timeout, "--kernel-timeout")
    if not 1 <= timeout <= 86400:
        raise InvalidArgument(f"--kernel-timeout {timeout} is not in 1..86400 seconds")
    if args.disconnect:
        return Finished(disconnect(path))
    pid = server_pid(name)
    if pid is not None:
        raise DeviceBusy(f"{path} is already connected (server pid {pid})")
    if not os.path.exists(path):
        raise CannotOpen(f"{path}: no such device node")
    if args.log is not None:
        try:
            open(args.log, "a").close()
        except OSError as exc:
            raise FileAccessError(f"cannot write {args.log}: {exc.strerror}") from exc
    plan = NbdPlan(path, timeout, log_file=args.log)
    if args.foreground:
        return plan
    return _background(plan, Finished)


def _background(plan: NbdPlan, finished: Callable[[int], Any]) -> Any:
    """Fork a detached child that becomes the server; the parent returns once the child
    says /dev/nbdN is usable, or with the child's exit status if it failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()  # out of the caller's session and process group
        plan.ready_fd = w
        return plan
    os.close(w)
    try:
        return finished(_await_ready(pid, r, plan.path))
    finally:
        os.close(r)


def _await_ready(pid: int, fd: int, path: str) -> int:
    deadline = time.monotonic() + READY_TIMEOUT + 30.0  # the child also opens the device
    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.2)
        if readable:
            line = os.read(fd, 64)
            if line.startswith(b"ready"):
                print(f"{path}: connected, server pid {pid}")
                return 0
            _, status = os.waitpid(pid, 0)  # it failed and said why on stderr
            code = os.waitstatus_to_exitcode(status)
            return code if code > 0 else 128 - code if code < 0 else 99
    os.kill(pid, signal.SIGTERM)
    raise DeviceTimeout(f"{path}: the server did not get ready within "
                        f"{READY_TIMEOUT + 30.0:g} s")


def run(dev: VirtioBlk, args: argparse.Namespace, plan: NbdPlan) -> int:
    """Connect ``dev`` to the kernel as plan.path and serve until disconnected."""
    _log_to_stderr()
    try:
        code = _serve(dev, plan)
    except BaseException as exc:
        if plan.ready_fd is None:
            raise
        # The background child reports as the CLI would, then leaves without returning
        # into the caller of main().
        print(f"virtio-user: {exc}", file=sys.stderr)
        code = exit_code(exc) if isinstance(exc, VirtioError) else 99
    if plan.ready_fd is None:
        return code
    dev.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(dev: VirtioBlk, plan: NbdPlan) -> int:
    kernel = KernelNbd(plan.path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()
    ready = False
    started = time.monotonic()

    def tick() -> None:
        nonlocal ready
        if ready:
            return
        if kernel.error is not None:
            raise CannotOpen(f"{plan.path}: NBD_DO_IT failed: {kernel.error.strerror}")
        if kernel.ready():
            ready = True
            _announce(plan, dev)
        elif time.monotonic() - started > READY_TIMEOUT:
            raise DeviceTimeout(f"{plan.path} did not come up within {READY_TIMEOUT:g} s")

    previous = {s: signal.signal(s, lambda signum, frame: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = NbdServer(dev, ours, wait=max(dev.timeout, plan.kernel_timeout))
        grow_buffers(theirs)  # the kernel sends whole large writes through it
        kernel.configure(theirs, block_size=dev.block_size,
                         size_bytes=dev.capacity * SECTOR_SIZE, flags=server.flags,
                         timeout=plan.kernel_timeout)
        theirs.close()  # the kernel holds its own reference now
        kernel.start()
        reason = server.serve(stop=stop.is_set, on_stop=kernel.disconnect, tick=tick)
        log.info("%s: %s; %d requests, %d errors", plan.path, reason,
                 server.stats.requests, server.stats.errors)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        theirs.close()
        ours.close()
        kernel.close()


def _announce(plan: NbdPlan, dev: VirtioBlk) -> None:
    if plan.ready_fd is None:
        print(f"{plan.path}: connected, serving in the foreground (pid {os.getpid()})",
              flush=True)
    else:
        _detach(plan)
    log.info("%s: serving %s (%d sectors)", plan.path, dev.bdf, dev.capacity)


def _detach(plan: NbdPlan) -> None:
    assert plan.ready_fd is not None
    os.write(plan.ready_fd, b"ready\n")
    os.close(plan.ready_fd)
    # Detach from the caller's output: whoever waits for its end must not wait for us.
    target = os.open(plan.log_file or os.devnull,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    os.close(devnull)


def _log_to_stderr() -> None:
    if any(getattr(h, "_virtio_user_nbd", False) for h in log.handlers):
        return
    handler = logging.StreamHandler()  # sys.stderr at each write: follows the dup2
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s virtio-user nbd[{os.getpid()}]: %(levelname)s %(message)s"))
    handler._virtio_user_nbd = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
