"""The bounce-buffer pipeline on its own, against a port that plays the device in
Python: order of the pieces, buffers never reused while in flight, descriptor room,
errors drained before they are returned, and someone else's requests in the queue."""

from __future__ import annotations

import os
from typing import Any

import pytest

from virtio_user.pipeline import transfer

SECTOR = 512


class Buf:
    def __init__(self, size: int) -> None:
        self.mv = memoryview(bytearray(size))


class Req:
    def __init__(self, sector: int, count: int, buffer: Buf, write: bool) -> None:
        self.sector, self.count, self.buffer = sector, count, buffer
        self.nbytes, self.write = count * SECTOR, write


class FakePort:
    """Completes one request per reap, newest first (the worst order for the caller)."""

    def __init__(self, disk: bytearray, *, write: bool = False, descriptors: int = 64,
                 cost: int = 1, bad_sectors: frozenset[int] = frozenset(),
                 others: int = 0) -> None:
        self.disk, self.writing, self.free, self.each = disk, write, descriptors, cost
        self.bad, self.others = bad_sectors, others  # others: someone else's requests
        self.free -= others * cost
        self.pending: list[Req] = []
        self.busy: set[int] = set()
        self.most_in_flight = 0
        self.error_seen = False

    def request(self, sector: int, count: int, buf: Any) -> Req:
        return Req(sector, count, buf, self.writing)

    def room(self) -> int:
        return self.free

    def cost(self, buf: Any, nbytes: int) -> int:
        return self.each

    def submit(self, requests: list[Req]) -> None:
        assert sum(self.each for _ in requests) <= self.free, "more chains than room"
        assert not self.error_seen, "a piece started after an error was reported"
        for req in requests:
            assert id(req.buffer) not in self.busy, "a buffer reused while in flight"
            self.busy.add(id(req.buffer))
            if req.write:  # the device reads the buffer when it serves the request
                req.data = bytes(req.buffer.mv[:req.nbytes])  # type: ignore[attr-defined]
        self.free -= self.each * len(requests)
        self.pending += requests
        self.most_in_flight = max(self.most_in_flight, len(self.pending))

    def reap(self, mine: dict[int, Req]) -> list[Req]:
        if self.others:  # someone else's request completes first
            self.others -= 1
            self.free += self.each
            return []
        req = self.pending.pop()
        self.busy.discard(id(req.buffer))
        self.free += self.each
        span = slice(req.sector * SECTOR, req.sector * SECTOR + req.nbytes)
        if req.write:
            self.disk[span] = req.data  # type: ignore[attr-defined]
        else:
            req.buffer.mv[:req.nbytes] = self.disk[span]
        return [mine.pop(id(req))]

    def in_flight(self) -> int:
        return len(self.pending) + self.others

    def error(self, req: Req) -> BaseException | None:
        hit = self.bad & set(range(req.sector, req.sector + req.count))
        self.error_seen = self.error_seen or bool(hit)
        return OSError(f"sectors {sorted(hit)}") if hit else None


def pool(n: int = 4, sectors: int = 8) -> list[Buf]:
    return [Buf(sectors * SECTOR) for _ in range(n)]


def test_a_read_comes_back_in_order_through_every_buffer() -> None:
    disk = bytearray(os.urandom(100 * SECTOR))
    port = FakePort(disk)
    out: list[bytes] = []
    assert transfer(port, pool(4, 8), 8, 3, 90, out) is None  # type: ignore[arg-type]
    assert b"".join(out) == disk[3 * SECTOR:93 * SECTOR]
    assert len(out) == 12 and port.most_in_flight == 4 and not port.pending


def test_a_write_copies_each_piece_into_its_buffer() -> None:
    disk = bytearray(100 * SECTOR)
    data = os.urandom(50 * SECTOR)
    port = FakePort(disk, write=True)
    assert transfer(port, pool(3, 16), 16, 10, 50, memoryview(data)) is None  # type: ignore[arg-type]
    assert disk[10 * SECTOR:60 * SECTOR] == data and disk[:10 * SECTOR] == bytes(10 * SECTOR)


def test_batches_are_sized_to_the_free_descriptors() -> None:
    disk = bytearray(os.urandom(64 * SECTOR))
    port = FakePort(disk, descriptors=7, cost=3)  # two direct chains of 3 at a time
    out: list[bytes] = []
    assert transfer(port, pool(4, 8), 8, 0, 64, out) is None  # type: ignore[arg-type]
    assert b"".join(out) == disk and port.most_in_flight == 2


def test_someone_elses_requests_are_waited_out() -> None:
    disk = bytearray(os.urandom(32 * SECTOR))
    port = FakePort(disk, descriptors=6, cost=3, others=2)  # the queue starts full
    out: list[bytes] = []
    assert transfer(port, pool(2, 8), 8, 0, 32, out) is None  # type: ignore[arg-type]
    assert b"".join(out) == disk and port.others == 0


def test_an_error_stops_new_pieces_and_drains_the_rest_first() -> None:
    disk = bytearray(100 * SECTOR)
    port = FakePort(disk, bad_sectors=frozenset({20}))
    out: list[bytes] = []
    error = transfer(port, pool(4, 8), 8, 0, 100, out)  # type: ignore[arg-type]
    assert isinstance(error, OSError) and "20" in str(error)
    assert not port.pending and not port.busy  # nothing of ours left in flight
    assert port.error_seen  # and submit() checked that nothing started after it


@pytest.mark.parametrize("sectors", [1, 7, 8, 9, 64])
def test_any_length_is_covered_once(sectors: int) -> None:
    disk = bytearray(os.urandom(64 * SECTOR))
    port = FakePort(disk)
    out: list[bytes] = []
    assert transfer(port, pool(2, 8), 8, 0, sectors, out) is None  # type: ignore[arg-type]
    assert b"".join(out) == disk[:sectors * SECTOR]
