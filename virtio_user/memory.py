"""Memory the device can reach by DMA: the only user of mmap, hugetlbfs and
/proc/self/pagemap.

A ``DmaRegion`` is one mapping plus the bus address of each 4 KiB page in it. For the uio
backend the bus address is the guest-physical address (uio gives no translation; a
legacy virtio device also ignores an IOMMU). ``DmaRegion.anonymous`` is the same thing
over ordinary memory with made-up addresses, for the fake device in unit tests.
``DmaAllocator`` hands out aligned chunks of a region, each knowing its bus address.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import CannotOpen, DmaError

PAGE = 4096
HUGEPAGE = 2 << 20
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63
_names = itertools.count()


def hugetlbfs_mount() -> str:
    """The first hugetlbfs mount point in /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "hugetlbfs":
                return parts[1]
    raise DmaError("no hugetlbfs mounted: reserve pages with "
                   "'echo 64 > /proc/sys/vm/nr_hugepages' and "
                   "'mount -t hugetlbfs hugetlbfs /dev/hugepages'")


def _address_of(mm: mmap.mmap) -> int:
    """Virtual address of the mapping (mmap objects do not expose it)."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the mapping can be closed later


def _physical_pages(vaddr: int, npages: int) -> np.ndarray:
    """Physical address of each 4 KiB page from /proc/self/pagemap (needs root):
    8 bytes per page, PFN in bits 0-54, present in bit 63."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            raw = os.pread(f.fileno(), 8 * npages, vaddr // PAGE * 8)
    except OSError as exc:
        raise DmaError(f"cannot read /proc/self/pagemap: {exc.strerror}") from exc
    entries = np.frombuffer(raw, "<u8")
    if len(entries) != npages or not np.all(entries & np.uint64(_PRESENT)):
        raise DmaError("DMA pages are not all present in /proc/self/pagemap")
    pfns = entries & np.uint64(_PFN_MASK)
    if not np.all(pfns):
        raise DmaError("/proc/self/pagemap shows no physical addresses (not root?)")
    return pfns * np.uint64(PAGE)


class DmaRegion:
    """A mapping and the bus address of each of its 4 KiB pages."""

    def __init__(self, mm: mmap.mmap, page_bus: np.ndarray, what: str) -> None:
        self.mm = mm
        self.size = len(mm)
        self.what = what
        self._bus = [int(x) for x in page_bus]  # plain ints: cheaper than numpy scalars
        self._offset_of_page = {b: i * PAGE for i, b in enumerate(self._bus)}
        self.vaddr = _address_of(mm)  # for VFIO_IOMMU_MAP_DMA

    @classmethod
    def hugepages(cls, size: int, mount: str | None = None,
                  iova: int | None = None) -> DmaRegion:
        """``size`` bytes (rounded up to 2 MiB) of pinned hugetlbfs memory, zeroed. The
        bus address of each page is its physical address, or, given ``iova``, the
        region is bus-contiguous from ``iova`` (the caller maps it so in an IOMMU).

        The file is unlinked at once: a hugetlbfs file outlives its process with its
        contents, and a run that found the last run's rings there would hand the reset
        device a stale available index (QEMU stops with "Virtqueue size exceeded").
        """
        size = -(-size // HUGEPAGE) * HUGEPAGE
        path = os.path.join(mount or hugetlbfs_mount(),
                            f"virtio-user-{os.getpid()}-{next(_names)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise DmaError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            os.unlink(path)
            os.ftruncate(fd, size)
            # hugetlbfs reserves the pages at mmap time: too few free pages fail here
            # with ENOMEM instead of a SIGBUS on first touch.
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise DmaError(f"cannot map {size >> 20} MiB of hugepages ({exc.strerror}); "
                           "reserve more in /proc/sys/vm/nr_hugepages") from exc
        finally:
            os.close(fd)
        mm[:] = bytes(size)  # touch every page so it is present, and zero it
        if iova is not None:
            page_bus = iova + np.arange(size // PAGE, dtype=np.uint64) * np.uint64(PAGE)
            return cls(mm, page_bus, f"{size >> 20} MiB of hugepages at IOVA {iova:#x}")
        page_bus = _physical_pages(_address_of(mm), size // PAGE)
        return cls(mm, page_bus, f"{size >> 20} MiB of hugepages")

    def physical(self, offset: int) -> int:
        """The physical address of the byte at ``offset`` (pagemap; root only), whatever
        its bus address: to show that an IOVA is not one."""
        page = int(_physical_pages(self.vaddr + offset - offset % PAGE, 1)[0])
        return page + offset % PAGE

    @classmethod
    def anonymous(cls, size: int, base: int = 0x1_0000_0000,
                  contiguous: int = 64 << 10) -> DmaRegion:
        """Ordinary memory with made-up bus addresses for the fake device: runs of
        ``contiguous`` bytes, each followed by a gap, so buffers crossing a run boundary
        must be split into segments just as with real scattered pages."""
        size = -(-size // PAGE) * PAGE
        mm = mmap.mmap(-1, size)
        per_run = contiguous // PAGE
        pages = np.arange(size // PAGE, dtype=np.uint64)
        bus = base + (pages // per_run) * (2 * contiguous) + (pages % per_run) * PAGE
        return cls(mm, bus, f"{size >> 10} KiB of anonymous memory")

    def bus(self, offset: int) -> int:
        """Bus address of the byte at ``offset``."""
        return self._bus[offset // PAGE] + offset % PAGE

    def offset_of(self, bus: int) -> int:
        """Offset of the byte at bus address ``bus`` (for device models); KeyError if
        the address is outside the region."""
        return self._offset_of_page[bus - bus % PAGE] + bus % PAGE

    def segments(self, offset: int, length: int, max_seg: int = 1 << 32) -> list[tuple[int, int]]:
        """(bus, length) runs covering ``[offset, offset+length)``, split where the bus
        addresses jump and at ``max_seg`` bytes."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DmaError(f"{self.what}: range {offset}+{length} outside the region")
        out: list[tuple[int, int]] = []
        end = offset + length
        while offset < end:
            start_bus = self.bus(offset)
            n = min(PAGE - offset % PAGE, end - offset)
            while (offset + n < end and n < max_seg
                   and self.bus(offset + n) == start_bus + n):
                n += min(PAGE, end - offset - n)
            n = min(n, max_seg)
            out.append((start_bus, n))
            offset += n
        return out

    def runs(self) -> list[tuple[int, int, int]]:
        """(offset, bus, length) of each physically contiguous run of the region."""
        out, offset = [], 0
        for bus, length in self.segments(0, self.size):
            out.append((offset, bus, length))
            offset += length
        return out

    def close(self) -> None:
        """Unmap. Callers must have reset the device first: it may still write here."""
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes when the last one does


def map_mmio(fd: int, offset: int, size: int, what: str) -> mmap.mmap:
    """Map ``size`` bytes of a memory BAR: sysfs ``resourceN`` (at 0) or a VFIO region
    (at its region offset in the device fd). Shared, so stores reach the device."""
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)
    except (OSError, ValueError) as exc:
        raise CannotOpen(f"cannot map {what} ({size:#x} bytes at {offset:#x}): {exc}") from exc


@dataclass
class Chunk:
    """An allocated piece of a region."""

    region: DmaRegion
    offset: int
    size: int
    bus: int = field(init=False)

    def __post_init__(self) -> None:
        self.bus = self.region.bus(self.offset)

    @property
    def mv(self) -> memoryview:
        return memoryview(self.region.mm)[self.offset:self.offset + self.size]

    def is_contiguous(self) -> bool:
        return len(self.region.segments(self.offset, self.size)) == 1


class DmaAllocator:
    """First-fit allocator over a region. Allocations happen at set-up, never on the
    hot path; nothing is freed while the device may still use it (the owner frees only
    after a reset, or after the request using the chunk has completed)."""

    def __init__(self, region: DmaRegion) -> None:
        self.region = region
        self._free: list[tuple[int, int]] = [(0, region.size)]  # (offset, size), sorted

    def alloc(self, size: int, align: int = 64) -> Chunk:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation: {size} bytes aligned to {align}")
        for i, (off, n) in enumerate(self._free):
            start = -(-off // align) * align
            if start + size <= off + n:
                pieces = [(off, start - off), (start + size, off + n - start - size)]
                self._free[i:i + 1] = [p for p in pieces if p[1] > 0]
                return Chunk(self.region, start, size)
        raise DmaError(f"{self.region.what}: no room for {size} bytes aligned to {align}")

    def free(self, chunk: Chunk) -> None:
        self._free.append((chunk.offset, chunk.size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((off, n))
        self._free = merged

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)
