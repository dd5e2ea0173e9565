"""The bounce-buffer pipeline behind the block device's plain calls (read, write).

A transfer is cut into pieces of at most one pool buffer. As many pieces as there are
free buffers, and free descriptors for their chains, go to the device in one batch; each
completion frees its buffer for the next piece, so every buffer stays busy. A failed
piece stops new ones, but the pipeline keeps reaping until none of its pieces is in
flight: a buffer the device may still write is never reused or handed back.

The pipeline knows no device: it talks to a ``Port`` (``VirtioBlk`` supplies one), so it
is tested on its own (tests/unit/test_pipeline.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from .errors import VirtioError
from .spec import SECTOR_SIZE

if TYPE_CHECKING:
    from .request import DmaBuffer, Request


class Port(Protocol):
    """What the pipeline asks of the device."""

    def request(self, sector: int, count: int, buf: DmaBuffer) -> Request:
        """A request for ``count`` sectors at ``sector`` through ``buf``."""
        ...

    def room(self) -> int:
        """Descriptors free now."""
        ...

    def cost(self, buf: DmaBuffer, nbytes: int) -> int:
        """Descriptors a request of ``nbytes`` from ``buf`` takes."""
        ...

    def submit(self, requests: Sequence[Request]) -> None: ...

    def reap(self, mine: dict[int, Request]) -> list[Request]:
        """Wait for completions; return those among ``mine`` (by id) and remove them
        from it. Other completions belong to someone else and are kept for them."""
        ...

    def in_flight(self) -> int:
        """Requests of anyone's on the device now."""
        ...

    def error(self, req: Request) -> BaseException | None:
        """The error a completed request stands for, if any."""
        ...


def transfer(port: Port, pool: Sequence[DmaBuffer], step: int, sector: int, count: int,
             data: memoryview | list[bytes]) -> BaseException | None:
    """Move ``count`` sectors from ``sector`` in pieces of at most ``step`` sectors
    between the device and ``data``: a view to write from, or a list that collects what
    is read, in order. Returns the first error, once nothing of ours is in flight."""
    starts = range(sector, sector + count, step)
    taken = 0  # pieces submitted so far
    free = list(pool)
    mine: dict[int, Request] = {}
    error: BaseException | None = None
    while True:
        batch = _fill(port, free, starts, taken, sector + count, data, sector) \
            if error is None else []
        taken += len(batch)
        if batch:
            port.submit(batch)
            mine.update((id(r), r) for r in batch)
        if not mine:
            if taken == len(starts) or error is not None:
                return error
            # Someone else's requests hold the descriptors the next piece needs.
            if not port.in_flight():
                raise VirtioError(f"a {step}-sector piece does not fit an idle queue")
            port.reap(mine)
            continue
        for req in port.reap(mine):
            buf = req.buffer
            assert buf is not None
            free.append(buf)
            err = port.error(req)
            if err is not None:
                error = error or err  # keep reaping: buffers may not be reused early
            elif isinstance(data, list):
                data[(req.sector - sector) // step] = bytes(buf.mv[:req.nbytes])


def _fill(port: Port, free: list[DmaBuffer], starts: range, taken: int, end: int,
          data: memoryview | list[bytes], first: int) -> list[Request]:
    """The next batch: pieces while a buffer is free and their chains fit the queue
    (without indirect tables a small queue holds few chains)."""
    batch: list[Request] = []
    room = port.room()
    for start in starts[taken:]:
        if not free:
            break
        n = min(starts.step, end - start)
        need = port.cost(free[-1], n * SECTOR_SIZE)
        if need > room:
            break
        room -= need
        buf = free.pop()
        req = port.request(start, n, buf)
        if isinstance(data, memoryview):
            off = (start - first) * SECTOR_SIZE
            buf.mv[:req.nbytes] = data[off:off + req.nbytes]
        else:
            data.append(b"")  # its place, filled when it completes
        batch.append(req)
    return batch
