"""The block device's part of "Device Initialization": what ``VirtioBlk`` does between
FEATURES_OK and DRIVER_OK (``transport.initialize`` does the rest).

virtio 1.2, "Block Device": "Device configuration layout" read into ``Limits``; the
ring chosen from the negotiated features ("Packed Virtqueues" or "Split Virtqueues");
one DMA region holding the queue, a request header and status byte per descriptor head,
and the bounce buffers; the queue's areas given to the transport; and, for the sleeping
wait modes, interrupt vectors routed before DRIVER_OK.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import DeviceError, InvalidArgument, Unsupported
from .memory import DmaAllocator, DmaRegion
from .options import MAX_QUEUES, RINGS, WAIT_MODES
from .ring.packed import PackedQueue, packed_layout
from .request import DmaBuffer, Request
from .spec import SECTOR_SIZE, Feature
from .transport import Backend, Transport
from .ring.split import SplitQueue

if TYPE_CHECKING:
    from .interrupts import IrqSource, Waiter

log = logging.getLogger(__name__)

MAX_DATA_SEGS = 14  # data descriptors per request; with header and status: 16 per table
MAX_CHUNK = 1 << 20  # the most one request carries from the bounce pool
POOL_BUFFERS = 4
DWZ_MAX_SECTORS = 0xFFFF_FFFF  # virtio_blk_discard_write_zeroes.num_sectors is le32
Queue = SplitQueue[Request] | PackedQueue[Request]


@dataclass(frozen=True)
class Limits:
    """What the device allows, from its config and the negotiated features."""

    capacity: int
    block_size: int
    size_max: int | None
    seg_max: int | None
    max_discard_sectors: int
    max_write_zeroes_sectors: int
    discard_sector_alignment: int = 1
    num_queues: int = 1  # request queues offered (VIRTIO_BLK_F_MQ), else 1


def read_limits(transport: Transport, features: int, bdf: str) -> Limits:
    """The device config; a field counts only when its feature was negotiated."""
    cfg = transport.read_config()
    block = int(cfg["blk_size"]) if features & Feature.VIRTIO_BLK_F_BLK_SIZE else SECTOR_SIZE
    if block < SECTOR_SIZE or block & (block - 1):
        log.warning("%s: ignoring block size %d", bdf, block)
        block = SECTOR_SIZE
    return Limits(
        capacity=int(cfg["capacity"]), block_size=block,
        size_max=int(cfg["size_max"]) or None if features & Feature.VIRTIO_BLK_F_SIZE_MAX
        else None,
        seg_max=int(cfg["seg_max"]) or None if features & Feature.VIRTIO_BLK_F_SEG_MAX
        else None,
        max_discard_sectors=int(cfg["max_discard_sectors"]) or DWZ_MAX_SECTORS,
        max_write_zeroes_sectors=int(cfg["max_write_zeroes_sectors"]) or DWZ_MAX_SECTORS,
        discard_sector_alignment=int(cfg["discard_sector_alignment"]) or 1,
        # "Device configuration layout": num_queues counts only with VIRTIO_BLK_F_MQ; a
        # device that says 0 has one (Linux's init_vq reads it the same way).
        num_queues=max(1, int(cfg["num_queues"])) if features & Feature.VIRTIO_BLK_F_MQ
        else 1)


def check_queues(queues: int | None) -> None:
    """--queues before anything is touched: 1..MAX_QUEUES, or None for the default."""
    if queues is not None and (type(queues) is not int or not 1 <= queues <= MAX_QUEUES):
        raise InvalidArgument(f"queues {queues!r} must be an integer from 1 to {MAX_QUEUES}")


def default_queues() -> int:
    """How many queues to use when not told: one per CPU this process may run on. A
    queue is driven by one worker process at a time, and a worker without a CPU of its
    own only takes turns with another (Linux's virtio_blk caps its queues at the CPU
    count for the same reason)."""
    return max(1, len(os.sched_getaffinity(0)))


def choose_queues(requested: int | None, offered: int, bdf: str) -> int:
    """The queues to set up: what was asked for (at most what the device offers), or
    the offer capped at ``default_queues()`` and MAX_QUEUES."""
    if requested is None:
        return min(offered, default_queues(), MAX_QUEUES)
    if requested > offered:
        raise InvalidArgument(f"--queues {requested} exceeds the {offered} request "
                              f"queue{'s' if offered > 1 else ''} {bdf} offers "
                              "(num_queues, VIRTIO_BLK_F_MQ)")
    return requested


def check_ring(ring: str) -> None:
    if ring not in RINGS:
        raise InvalidArgument(f"unknown ring {ring!r}: choose {', '.join(RINGS)}")


def ring_features(ring: str) -> int:
    """The ring feature to ask for: VIRTIO_F_RING_PACKED unless ``--ring split``
    (negotiated only where the device offers it, which needs the modern interface)."""
    return 0 if ring == "split" else int(Feature.VIRTIO_F_RING_PACKED)


def use_packed(ring: str, features: int, bdf: str, transport_kind: str) -> bool:
    """Whether the negotiated features say packed ring; ``--ring packed`` on a device
    that does not offer it is refused ("Packed Virtqueues" needs the modern
    interface: a legacy device has no feature bit 34)."""
    packed = bool(features & Feature.VIRTIO_F_RING_PACKED)
    if ring == "packed" and not packed:
        raise Unsupported(f"{bdf}: the device does not offer VIRTIO_F_RING_PACKED "
                          f"({transport_kind} transport); use --ring auto or split")
    return packed


def data_segments(limits: Limits, qsize: int, indirect: bool, bdf: str) -> int:
    """Data descriptors one request may use: seg_max, our table size and, without
    indirect tables, the ring (header and status take two). Limits under which no
    request carries a block are refused before anything is allocated: a hostile
    size_max of 1 would otherwise cost a segment list per byte."""
    data_segs = min(limits.seg_max or MAX_DATA_SEGS, MAX_DATA_SEGS)
    if not indirect:
        data_segs = max(1, min(data_segs, qsize - 2))
    if limits.size_max is not None and limits.size_max * data_segs < limits.block_size:
        raise DeviceError(f"{bdf}: size_max {limits.size_max} and seg_max "
                          f"{limits.seg_max} leave no room for a "
                          f"{limits.block_size}-byte block")
    return data_segs


def dma_bytes(qsize: int, pool_buffers: int, packed: bool = False) -> int:
    """The one DMA region's size: ring, indirect tables, request slots, bounce pool."""
    from .ring.split import legacy_layout
    tables = qsize * 16 * (MAX_DATA_SEGS + 2)
    slots = qsize * (16 + 1) + 4096
    ring = packed_layout(qsize).total if packed else legacy_layout(qsize).total
    return (ring + tables + slots + 2 * 4096
            + (pool_buffers + 1) * MAX_CHUNK)


@dataclass
class Slots:
    """One request header and one status byte per descriptor head, preallocated: a
    request only rewrites type and sector. Offsets are into ``mm``, the region's map."""

    mm: Any
    hdr_off: int
    status_off: int
    hdr_seg: list[tuple[int, int, bool]]  # (bus, len, device-writable) per head
    status_seg: list[tuple[int, int, bool]]


def alloc_slots(alloc: DmaAllocator, queue: Queue) -> Slots:
    region, qsize = alloc.region, queue.size
    hdrs = alloc.alloc(16 * qsize, 16)
    stat = alloc.alloc(qsize, 64)
    slots = Slots(region.mm, hdrs.offset, stat.offset,
                  [(region.bus(hdrs.offset + 16 * i), 16, False) for i in range(qsize)],
                  [(region.bus(stat.offset + i), 1, True) for i in range(qsize)])
    if queue.indirect and queue.max_chain >= 3:
        queue.frame(slots.hdr_seg, slots.status_seg)
    return slots


def chunk_limit(pool: Sequence[DmaBuffer], limits: Limits, data_segs: int, bdf: str) -> int:
    """The most bytes one request can carry from any pool buffer within ``data_segs``
    segments of at most size_max bytes, a whole number of blocks."""
    best = MAX_CHUNK
    size_max = limits.size_max
    for buf in pool:
        # Only the bytes the first data_segs segments can cover are looked at.
        span = buf.size if size_max is None else min(buf.size, size_max * data_segs)
        segs = buf.segments(span)[:data_segs]
        best = min(best, sum(n for _, n in segs))
    best -= best % limits.block_size
    if best <= 0:
        raise DeviceError(f"{bdf}: size_max {limits.size_max} and seg_max "
                          f"{limits.seg_max} leave no room for a block")
    return best


@dataclass
class QueueSetup:
    """One request queue as the block device drives it, and what was allocated with it."""

    queue: Queue
    data_segs: int
    slots: Slots
    pool: list[DmaBuffer]
    chunk_sectors: int


def set_up_queue(transport: Transport, limits: Limits, features: int, ring: str,
                 index: int, pool_buffers: int, alloc_dma: Callable[[int], DmaRegion],
                 on_fault: Callable[[], bool | None], bdf: str) -> QueueSetup:
    """Queue ``index`` (at the size the device reports for it), its request slots and
    its bounce pool in one region from ``alloc_dma``, and the queue's areas given to
    the device."""
    qsize = transport.queue_size(index)
    if not qsize:
        raise DeviceError(f"{bdf}: the device reports no queue {index}")
    indirect = bool(features & Feature.VIRTIO_RING_F_INDIRECT_DESC)
    data_segs = data_segments(limits, qsize, indirect, bdf)
    packed = use_packed(ring, features, bdf, transport.kind)
    alloc = DmaAllocator(alloc_dma(dma_bytes(qsize, pool_buffers, packed)))
    queue_class = PackedQueue if packed else SplitQueue
    queue: Queue = queue_class(
        alloc, qsize, transport.notifier(index), indirect=indirect,
        event_idx=bool(features & Feature.VIRTIO_RING_F_EVENT_IDX),
        on_fault=on_fault, max_chain=data_segs + 2)
    slots = alloc_slots(alloc, queue)
    pool = [DmaBuffer(alloc.alloc(MAX_CHUNK, MAX_CHUNK), limits.size_max, queue.framed_data)
            for _ in range(pool_buffers)]
    chunk = chunk_limit(pool, limits, data_segs, bdf)
    transport.setup_queue(index, qsize, *queue_areas(queue))
    return QueueSetup(queue, data_segs, slots, pool, chunk // SECTOR_SIZE)


def ring_name(queue: Queue) -> str:
    return "packed" if isinstance(queue, PackedQueue) else "split"


def queue_areas(queue: Any) -> tuple[int, int, int]:
    """Bus addresses of the queue's descriptor, driver and device areas."""
    areas = getattr(queue, "areas", None)
    if areas is not None:
        return tuple(areas)
    ring, lay = queue.ring.bus, queue.layout
    return ring + lay.desc, ring + lay.avail, ring + lay.used


def open_waiters(wait_mode: str, backend: Backend, transport: Transport,
                 queues: Sequence[Queue], on_config: Callable[[], None]
                 ) -> tuple[IrqSource | None, list[Waiter]]:
    """For the interrupt and hybrid wait modes: vectors routed (before DRIVER_OK, as
    "per-bus setup" in "Device Initialization"; one per queue where the device has
    them), and a waiter per queue, each sleeping on its queue's vector. (None, []) for
    polling."""
    from .interrupts import Waiter, calibrate_spins, open_source, queue_source, HYBRID_SPIN_SECONDS
    if wait_mode not in WAIT_MODES:
        raise InvalidArgument(f"unknown wait mode {wait_mode!r}: choose "
                              f"{', '.join(WAIT_MODES)}")
    if wait_mode == "poll":
        return None, []
    source = open_source(backend, transport, len(queues))
    spins = calibrate_spins(HYBRID_SPIN_SECONDS) if wait_mode == "hybrid" else 0
    waiters = []
    for index, queue in enumerate(queues):
        waiter = Waiter(wait_mode, queue_source(source, index), on_config=on_config,
                        spins=spins)
        queue.waiter = waiter
        waiters.append(waiter)
    log.debug("%s: waiting by %s through %s", backend.bdf, wait_mode, source.kind)
    return source, waiters
