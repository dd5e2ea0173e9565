"""What a block request is made of: a ``DmaBuffer`` (device-reachable memory with its
bus segments) and a ``Request`` (type, sectors, buffer, and the status once completed).

virtio 1.2, "Block Device: Device Operation". Shared by the block device, its pipeline,
the NBD server and the shell; it knows nothing of transports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .memory import Chunk
from .spec import ReqType
from .ring.split import SplitQueue


class DmaBuffer:
    """Device-reachable memory for request data, with its bus segments split at the
    device's size_max, cached per length."""

    def __init__(self, chunk: Chunk, size_max: int | None,
                 framed_data: Callable[[int, int, bool], bytes] = SplitQueue.framed_data
                 ) -> None:
        self.chunk = chunk
        self._framed_data = framed_data  # the queue's: split and packed entries differ
        self.size = chunk.size
        self.mv = chunk.mv
        self._size_max = size_max or (1 << 32) - 1
        self._segs: dict[int, list[tuple[int, int]]] = {}
        self._chain: dict[tuple[int, bool], tuple[tuple[int, int, bool], ...]] = {}
        # nbytes * 2 + device_writes -> the packed data descriptor of a framed chain
        # (SplitQueue.framed_data), or None when the data takes more than one segment.
        # Filled only by ``framed``; a plain attribute, not a property, because the block
        # device reads it once per request on the submit path.
        self.framed_descs: dict[int, bytes | None] = {}

    def segments(self, nbytes: int) -> list[tuple[int, int]]:
        segs = self._segs.get(nbytes)
        if segs is None:
            segs = self._segs[nbytes] = self.chunk.region.segments(
                self.chunk.offset, nbytes, self._size_max)
        return segs

    def chain(self, nbytes: int, writable: bool) -> tuple[tuple[int, int, bool], ...]:
        """The data part of a descriptor chain, cached: requests are recycled."""
        key = (nbytes, writable)
        segs = self._chain.get(key)
        if segs is None:
            segs = self._chain[key] = tuple((bus, n, writable)
                                            for bus, n in self.segments(nbytes))
        return segs

    def framed(self, nbytes: int, writable: bool) -> bytes | None:
        """The data descriptor for ``SplitQueue.add_framed``, cached (None: more than one
        segment, use the plain chain)."""
        segs = self.segments(nbytes)
        desc = self._framed_data(segs[0][0], nbytes, writable) if len(segs) == 1 else None
        self.framed_descs[nbytes * 2 + writable] = desc
        return desc


@dataclass(eq=False)
class Request:
    """One block request; reusable. ``count`` is in 512-byte sectors; ``nbytes`` of
    ``buffer`` carry the data (IN, OUT, GET_ID, DISCARD/WRITE_ZEROES ranges)."""

    type: ReqType
    sector: int = 0
    count: int = 0
    buffer: DmaBuffer | None = None
    nbytes: int = 0
    status: int | None = None  # VIRTIO_BLK_S_* once completed
    used_len: int = 0
    tag: Any = None  # the caller's
    head: int = field(default=-1, repr=False)

    def __str__(self) -> str:
        name = ReqType(self.type).name.removeprefix("VIRTIO_BLK_T_")
        if self.type in (ReqType.VIRTIO_BLK_T_FLUSH, ReqType.VIRTIO_BLK_T_GET_ID):
            return name
        return f"{name} sectors {self.sector}..{self.sector + self.count - 1}"
