"""The NBD server against a fake kernel side: a socketpair whose other end this test
drives, and a VirtioBlk on the Python device model."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
from typing import Any, Callable

import pytest

from virtio_user import cli
from virtio_user.errors import ProtocolError
from virtio_user.nbd import (REPLY, REQUEST, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Cmd, CmdFlag,
                             Flag, Ioctl, NbdServer, nbd_name, parse_request,
                             transmission_flags)
from virtio_user.nbd import server as server_module
from virtio_user.spec import VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, Feature, ReqType
from fake_device import DEFAULT_FEATURES

SECTOR = 512


def request(cmd: int, offset: int = 0, length: int = 0, cookie: int = 0, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags | cmd, cookie.to_bytes(8, "big"), offset,
                        length) + payload


class FakeKernel:
    """The kernel's end: sends requests, reads simple replies (data only for a read
    that succeeded, as the Linux client does)."""

    def __init__(self, blk: Any, **server_options: Any) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.server = NbdServer(blk, theirs, **server_options)
        self.read_lengths: dict[int, int] = {}
        self.result: dict[str, Any] = {}
        self.thread: threading.Thread | None = None

    def start(self, **serve: Any) -> FakeKernel:
        def target() -> None:
            try:
                self.result["reason"] = self.server.serve(**serve)
            except BaseException as exc:  # handed to the test
                self.result["error"] = exc
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        return self

    def send(self, cmd: int, offset: int = 0, length: int = 0, cookie: int = 0,
             flags: int = 0, payload: bytes = b"") -> None:
        if cmd == Cmd.READ:
            self.read_lengths[cookie] = length
        self.sock.sendall(request(cmd, offset, length, cookie, flags, payload))

    def recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, f"EOF after {len(data)} of {n} bytes"
            data += chunk
        return bytes(data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, error, raw = REPLY.unpack(self.recv_exact(REPLY.size))
        assert magic == SIMPLE_REPLY_MAGIC
        cookie = int.from_bytes(raw, "big")
        n = self.read_lengths.pop(cookie, 0)
        return cookie, error, self.recv_exact(n) if n and not error else b""

    def replies(self, count: int) -> dict[int, tuple[int, bytes]]:
        out = {}
        for _ in range(count):
            cookie, error, data = self.reply()
            out[cookie] = (error, data)
        return out

    def finish(self) -> dict[str, Any]:
        assert self.thread is not None
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server did not end"
        return self.result

    def disconnect(self) -> dict[str, Any]:
        self.send(Cmd.DISC)
        result = self.finish()
        assert self.sock.recv(1) == b"", "the server did not close its end"
        return result


@pytest.fixture
def kernel(make_blk: Callable[..., Any]) -> Callable[..., tuple[FakeKernel, Any]]:
    kernels: list[FakeKernel] = []

    def make(start: bool = True, server: dict[str, Any] | None = None,
             **device: Any) -> tuple[FakeKernel, Any]:
        blk, dev = make_blk(**device)
        k = FakeKernel(blk, **(server or {}))
        kernels.append(k)
        if start:
            k.start()
        return k, dev
    yield make
    for k in kernels:
        k.sock.close()
        if k.thread is not None:
            k.thread.join(10)


# -- the wire ------------------------------------------------------------------------

def test_wire_layout_and_constants() -> None:
    assert REQUEST.size == 28 and REPLY.size == 16  # struct nbd_request, struct nbd_reply
    assert (Ioctl.SET_SOCK, Ioctl.DO_IT, Ioctl.SET_FLAGS) == (0xAB00, 0xAB03, 0xAB0A)
    raw = request(Cmd.WRITE, 4096, 512, cookie=7, flags=CmdFlag.FUA)
    req = parse_request(raw)
    assert (req.cmd, req.offset, req.length) == (Cmd.WRITE, 4096, 512)
    assert req.flags & CmdFlag.FUA and int.from_bytes(req.cookie, "big") == 7
    assert raw[4:8] == b"\x00\x01\x00\x01"  # flags then command, big-endian


@pytest.mark.parametrize("raw, message", [
    (struct.pack(">II8sQI", 0x12345678, 0, b"\0" * 8, 0, 512), "bad request magic"),
    (struct.pack(">II8sQI", REQUEST_MAGIC, 5, b"\0" * 8, 0, 512), "unknown command 5"),
])
def test_malformed_headers_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_request(raw)


def test_flags_follow_the_negotiated_features(make_blk: Callable[..., Any]) -> None:
    blk, _ = make_blk()
    assert transmission_flags(blk) == (Flag.HAS_FLAGS | Flag.SEND_FLUSH | Flag.SEND_FUA
                                       | Flag.SEND_TRIM | Flag.SEND_WRITE_ZEROES)
    blk, _ = make_blk(features=DEFAULT_FEATURES & ~Feature.VIRTIO_BLK_F_FLUSH
                      & ~Feature.VIRTIO_BLK_F_DISCARD)
    assert transmission_flags(blk) == Flag.HAS_FLAGS | Flag.SEND_WRITE_ZEROES
    blk, _ = make_blk(features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_RO)
    assert transmission_flags(blk) == Flag.HAS_FLAGS | Flag.READ_ONLY


def test_nbd_device_names() -> None:
    assert nbd_name("/dev/nbd12") == "nbd12"
    for bad in ("/dev/sda", "nbd0", "/dev/nbd", "/dev/nbd0p1"):
        with pytest.raises(Exception, match="not an NBD device"):
            nbd_name(bad)


# -- serving -------------------------------------------------------------------------

def test_write_then_read_through_the_queue_and_flush_at_disconnect(kernel: Any) -> None:
    k, dev = kernel(capacity=4096)
    data = bytes(range(256)) * (300 * 1024 // 256)  # more than one 128 KiB buffer
    k.send(Cmd.WRITE, 8 * SECTOR, len(data), cookie=1, payload=data)
    assert k.reply() == (1, 0, b"")
    assert dev.disk[8 * SECTOR:8 * SECTOR + len(data)] == data
    k.send(Cmd.READ, 8 * SECTOR, len(data), cookie=2)
    assert k.reply() == (2, 0, data)
    writes = [r for r in dev.requests if r[0] == ReqType.VIRTIO_BLK_T_OUT]
    assert len(writes) == 3, "split into pieces of the buffer size"
    assert k.disconnect()["reason"].startswith("the kernel asked to disconnect")
    assert dev.requests[-1][0] == ReqType.VIRTIO_BLK_T_FLUSH


def test_many_requests_in_flight_answered_out_of_order(kernel: Any) -> None:
    k, dev = kernel(start=False, capacity=4096)
    for i in range(32):
        dev.disk[i * 4096:(i + 1) * 4096] = bytes([i]) * 4096
    dev.reverse = True  # the device completes each batch last first
    for i in range(32):
        k.send(Cmd.READ, i * 4096, 4096, cookie=i)
    k.start()
    order = []
    for _ in range(32):
        cookie, error, data = k.reply()
        assert error == 0 and data == bytes([cookie]) * 4096
        order.append(cookie)
    assert sorted(order) == list(range(32))
    assert order != list(range(32)), "replies follow completions, not requests"
    assert dev.notifies < 32, "requests went to the device in batches"
    k.disconnect()


def test_an_io_error_fails_that_request_only(kernel: Any) -> None:
    k, dev = kernel(capacity=4096)
    dev.ioerr_sectors = {100}
    k.send(Cmd.READ, 96 * SECTOR, 8 * SECTOR, cookie=1)
    k.send(Cmd.READ, 0, 8 * SECTOR, cookie=2)
    k.send(Cmd.WRITE, 100 * SECTOR, SECTOR, cookie=3, payload=b"x" * SECTOR)
    got = k.replies(3)
    assert got[1] == (errno.EIO, b"")
    assert got[2] == (0, bytes(8 * SECTOR))
    assert got[3] == (errno.EIO, b"")
    k.send(Cmd.READ, 200 * SECTOR, SECTOR, cookie=4)
    assert k.reply() == (4, 0, bytes(SECTOR)), "still serving"
    assert k.disconnect()["reason"]


def test_past_the_capacity_is_einval_and_the_payload_is_skipped(kernel: Any) -> None:
    k, dev = kernel(capacity=64)
    k.send(Cmd.READ, 60 * SECTOR, 8 * SECTOR, cookie=1)
    assert k.reply() == (1, errno.EINVAL, b"")
    k.send(Cmd.WRITE, 64 * SECTOR, 2 * SECTOR, cookie=2, payload=b"\xee" * 2 * SECTOR)
    k.send(Cmd.WRITE, 0, SECTOR, cookie=3, payload=b"\x11" * SECTOR)
    assert k.replies(2) == {2: (errno.EINVAL, b""), 3: (0, b"")}
    assert dev.disk[:SECTOR] == b"\x11" * SECTOR and b"\xee" not in dev.disk
    k.send(Cmd.READ, 3, SECTOR, cookie=4)  # not sector-aligned
    assert k.reply() == (4, errno.EINVAL, b"")
    assert not [r for r in dev.requests if r[1] >= 60 and r[0] != ReqType.VIRTIO_BLK_T_FLUSH]
    k.disconnect()


def test_a_malformed_request_ends_the_connection_cleanly(kernel: Any,
                                                          caplog: Any) -> None:
    k, dev = kernel(capacity=64)
    caplog.set_level(logging.ERROR, logger="virtio_user.nbd")
    k.sock.sendall(request(Cmd.READ, 0, SECTOR, cookie=1)
                   + struct.pack(">II8sQI", 0xDEADBEEF, 0, b"\0" * 8, 0, SECTOR))
    k.read_lengths[1] = SECTOR
    assert k.reply() == (1, 0, bytes(SECTOR)), "the request before it is answered"
    assert k.sock.recv(1) == b"", "then the server closes its end"
    error = k.finish()["error"]
    assert isinstance(error, ProtocolError) and "bad request magic 0xdeadbeef" in str(error)
    assert "bad request magic" in caplog.text


def test_fua_is_write_then_flush_and_flush_reaches_the_device(kernel: Any) -> None:
    k, dev = kernel(capacity=64)
    k.send(Cmd.WRITE, 0, SECTOR, cookie=1, flags=CmdFlag.FUA, payload=b"f" * SECTOR)
    assert k.reply() == (1, 0, b"")
    assert [r[0] for r in dev.requests[-2:]] == [ReqType.VIRTIO_BLK_T_OUT,
                                                 ReqType.VIRTIO_BLK_T_FLUSH]
    k.send(Cmd.FLUSH, cookie=2)
    assert k.reply() == (2, 0, b"")
    assert dev.requests[-1][0] == ReqType.VIRTIO_BLK_T_FLUSH
    k.disconnect()


def test_trim_and_write_zeroes_become_ranges(kernel: Any) -> None:
    k, dev = kernel(capacity=1024, max_discard_sectors=128)
    dev.disk[:] = b"\xff" * len(dev.disk)
    k.send(Cmd.TRIM, 0, 300 * SECTOR, cookie=1)
    k.send(Cmd.WRITE_ZEROES, 512 * SECTOR, 16 * SECTOR, cookie=2)
    assert k.replies(2) == {1: (0, b""), 2: (0, b"")}
    assert [(r[1], r[2]) for r in dev.ranges if r[0] == ReqType.VIRTIO_BLK_T_DISCARD] == \
        [(0, 128), (128, 128), (256, 44)], "split at max_discard_sectors"
    assert dev.disk[512 * SECTOR:528 * SECTOR] == bytes(16 * SECTOR)
    k.disconnect()


def test_write_zeroes_unmaps_unless_the_kernel_says_no_hole(kernel: Any) -> None:
    """NBD_CMDFLAG_NO_HOLE: the zeroes must stay allocated, so no
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP; without it the device may unmap."""
    k, dev = kernel(capacity=1024)
    dev.disk[:] = b"\xff" * len(dev.disk)
    k.send(Cmd.WRITE_ZEROES, 0, 8 * SECTOR, cookie=1, flags=CmdFlag.NO_HOLE)
    assert k.reply() == (1, 0, b"")
    k.send(Cmd.WRITE_ZEROES, 64 * SECTOR, 8 * SECTOR, cookie=2)
    assert k.reply() == (2, 0, b"")
    zeroes = [(r, f) for r, f in zip(dev.ranges, dev.range_flags)
              if r[0] == ReqType.VIRTIO_BLK_T_WRITE_ZEROES]
    assert zeroes == [((ReqType.VIRTIO_BLK_T_WRITE_ZEROES, 0, 8), 0),
                      ((ReqType.VIRTIO_BLK_T_WRITE_ZEROES, 64, 8),
                       VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]
    assert dev.disk[:8 * SECTOR] == bytes(8 * SECTOR)
    k.disconnect()


def test_a_read_only_device_refuses_writes(kernel: Any) -> None:
    k, dev = kernel(capacity=64, features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_RO)
    k.send(Cmd.WRITE, 0, SECTOR, cookie=1, payload=b"w" * SECTOR)
    k.send(Cmd.READ, 0, SECTOR, cookie=2)
    assert k.replies(2) == {1: (errno.EPERM, b""), 2: (0, bytes(SECTOR))}
    assert not [r for r in dev.requests if r[0] == ReqType.VIRTIO_BLK_T_OUT]
    k.disconnect()


def test_stop_asks_the_kernel_to_disconnect(kernel: Any) -> None:
    k, dev = kernel(start=False, capacity=64)
    stop = threading.Event()
    k.start(stop=stop.is_set, on_stop=lambda: k.send(Cmd.DISC))
    k.send(Cmd.WRITE, 0, SECTOR, cookie=1, payload=b"s" * SECTOR)
    assert k.reply() == (1, 0, b"")
    stop.set()
    assert "NBD_CMD_DISC" in k.finish()["reason"]
    assert dev.requests[-1][0] == ReqType.VIRTIO_BLK_T_FLUSH


def test_no_nbd_cmd_disc_within_the_grace_period_ends_the_server(
        kernel: Any, monkeypatch: Any) -> None:
    """After asking the kernel to disconnect, the server waits DISC_GRACE for its
    NBD_CMD_DISC, then ends by itself: a kernel that never answers cannot hold it."""
    monkeypatch.setattr(server_module, "DISC_GRACE", 0.3)
    k, dev = kernel(start=False, capacity=64)
    asked = threading.Event()
    k.start(stop=lambda: True, on_stop=asked.set)  # the kernel never sends DISC
    assert asked.wait(5)
    assert k.thread is not None
    k.thread.join(5)
    assert not k.thread.is_alive(), "still waiting for an NBD_CMD_DISC that never comes"
    assert k.result["reason"] == "no NBD_CMD_DISC within 0.3 s of the disconnect"
    assert k.sock.recv(1) == b"", "the server closed its end"


def test_a_huge_timeout_still_disconnects_cleanly(kernel: Any) -> None:
    """A Python caller's timeout of 1e300 reaches socket.settimeout at the disconnect,
    which overflows there: it is clamped to what the OS takes."""
    k, dev = kernel(start=False, capacity=64, timeout=1e300)
    k.start()
    k.send(Cmd.WRITE, 0, SECTOR, cookie=1, payload=b"t" * SECTOR)
    assert k.reply() == (1, 0, b"")
    result = k.disconnect()
    assert "error" not in result, result.get("error")
    assert "NBD_CMD_DISC" in result["reason"]


def test_the_kernel_closing_its_end_stops_the_server(kernel: Any) -> None:
    k, dev = kernel(capacity=64)
    k.send(Cmd.READ, 0, SECTOR, cookie=1)
    assert k.reply()[1] == 0
    k.sock.close()
    assert k.finish()["reason"] == "the kernel closed the connection"


def test_many_large_writes_wait_for_buffers(kernel: Any) -> None:
    """More payload than the DMA buffers hold: reading pauses until completions free
    them, nothing is lost or reordered within a request."""
    k, dev = kernel(capacity=8192, server={"buffers": 2, "buffer_bytes": 8192})
    blobs = {i: bytes([i + 1]) * (64 * 1024) for i in range(8)}
    sender = threading.Thread(target=lambda: [
        k.send(Cmd.WRITE, i * 64 * 1024, len(b), cookie=i, payload=b)
        for i, b in blobs.items()], daemon=True)
    sender.start()
    assert k.replies(8) == {i: (0, b"") for i in blobs}
    sender.join(5)
    for i, b in blobs.items():
        assert dev.disk[i * 64 * 1024:(i + 1) * 64 * 1024] == b
    k.disconnect()



def test_reads_replied_from_dma_buffers_survive_a_full_socket(kernel: Any) -> None:
    """A read that fits one buffer is sent from that buffer, which goes back to the
    pool only once sent: more replies than the socket holds, with two buffers, each
    carries its own sectors."""
    k, dev = kernel(capacity=8192, server={"buffers": 2, "buffer_bytes": 8192})
    dev.disk[:] = os.urandom(len(dev.disk))
    count = 640  # 5 MiB of replies: more than the socket buffers (4 MiB) hold
    offsets = {i: (i * 8192 * 7) % len(dev.disk) for i in range(count)}
    for i, offset in offsets.items():
        k.send(Cmd.READ, offset, 8192, cookie=i)
    got = k.replies(count)
    for i, offset in offsets.items():
        assert got[i] == (0, bytes(dev.disk[offset:offset + 8192])), i
    k.disconnect()

# -- the command line ----------------------------------------------------------------

def _no_device(args: Any) -> Any:
    raise AssertionError("the device must not be opened")


@pytest.mark.parametrize("argv, code, message", [
    (["nbd", "/dev/sda"], 1, "not an NBD device"),
    (["nbd", "/dev/nbd9999"], 15, "no such NBD device"),
    (["nbd", "-d", "/dev/nbd9999"], 15, "no such NBD device"),
])
def test_cli_checks_the_nbd_device_first(argv: list[str], code: int, message: str,
                                         capsys: Any) -> None:
    assert cli.main(argv, opener=_no_device) == code
    assert message in capsys.readouterr().err


def test_ctrl_c_while_the_background_server_starts_stops_it(monkeypatch: Any) -> None:
    """The parent waits for the forked server; Ctrl-C then must stop that server (in a
    session of its own, it never sees the terminal's SIGINT) before the parent ends with
    Interrupted (exit 130), or it goes on to connect /dev/nbdN after the user gave up.
    Here the "server" is a sleeping process standing in for the forked child."""
    from virtio_user.errors import Interrupted
    from virtio_user import daemon
    from virtio_user.nbd import command
    from virtio_user.subcommand import Finished
    child = subprocess.Popen(["sleep", "60"])
    monkeypatch.setattr(daemon.os, "fork", lambda: child.pid)

    def ctrl_c(*args: Any) -> Any:
        raise KeyboardInterrupt
    monkeypatch.setattr(daemon.select, "select", ctrl_c)
    try:
        with pytest.raises((Interrupted, KeyboardInterrupt)) as exc:
            command._background(command.NbdPlan("/dev/nbd7", 30), Finished)
        assert isinstance(exc.value, Interrupted), "Ctrl-C escaped as a traceback"
        assert exc.value.signum == signal.SIGINT
        assert "/dev/nbd7 is not connected" in str(exc.value)
        with pytest.raises(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)  # stopped and reaped
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
