"""The vfio-pci backend: the device's BAR0 and config space through its VFIO regions, and
the DMA memory mapped into its IOMMU domain.

The IOVA rule for a *legacy* virtio device: legacy virtio has no VIRTIO_F_ACCESS_PLATFORM
("Virtio Over PCI Bus" > "Legacy Interfaces: A Note on PCI Device Layout" has no way to
say otherwise), so the device ignores the IOMMU and puts guest-physical addresses on the
bus. Every DMA mapping therefore uses IOVA == physical address; the mapping still pins
the pages and keeps the VFIO contract, but it is not isolation. ``map_dma`` checks each
mapping against the IOMMU's usable ranges at set-up, so a violation is a clear error
here rather than a request that hangs later.

Real isolation: a modern device that negotiated VIRTIO_F_ACCESS_PLATFORM puts IOVAs on
the bus, translated by the IOMMU ("Reserved Feature Bits"). Then ``enable_translation``
switches the backend to IOVAs of its own choosing, a compact range from ``IOVA_BASE``
that avoids the group's reserved regions, one bus-contiguous range per DmaRegion; the
device can reach exactly what was mapped there and nothing else.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import BackendUnavailable, CannotOpen, DeviceBusy, DeviceError, DmaError
from ..memory import HUGEPAGE, DmaRegion, map_mmio
from ..regs import MappedRegisters, Mmio, Registers
from . import vfio_ioctl as ioctl
from .pci_backend import PciBackend

SYSFS_PCI = Path("/sys/bus/pci/devices")
VFIO_DEV = Path("/dev/vfio")
# Where translated DMA memory goes: 64 GiB, above the physical addresses of the small
# guests this runs in (so an IOVA is visibly not a physical address) and below the
# 39-bit address width of QEMU's emulated Intel IOMMU.
IOVA_BASE = 0x10_0000_0000


def iommu_group(bdf: str) -> int:
    link = SYSFS_PCI / bdf / "iommu_group"
    if not link.exists():
        raise BackendUnavailable(
            f"{bdf} has no IOMMU group: the guest has no IOMMU "
            "(/sys/kernel/iommu_groups is empty); boot it with a virtual IOMMU "
            "(run-in-qemu.sh --backend vfio) or use --backend uio")
    return int(os.path.basename(os.readlink(link)))


def group_blockers(bdf: str, group: int) -> list[str]:
    """Other devices of the group that are bound to a driver other than vfio-pci."""
    blockers = []
    for dev in sorted(os.listdir(f"/sys/kernel/iommu_groups/{group}/devices")):
        drv = SYSFS_PCI / dev / "driver"
        name = os.path.basename(os.readlink(drv)) if drv.exists() else None
        if dev != bdf and name not in (None, "vfio-pci", "pcieport"):
            blockers.append(f"{dev} ({name})")
    return blockers


def reserved_regions(group: int) -> list[tuple[int, int, str]]:
    """(start, end inclusive, type) ranges the IOMMU will not map for this group."""
    text = Path(f"/sys/kernel/iommu_groups/{group}/reserved_regions").read_text()
    return [(int(a, 16), int(b, 16), kind)
            for a, b, kind in (line.split() for line in text.splitlines() if line.strip())]


class VfioDevice:
    """An open VFIO container, group and device fd for one PCI function."""

    def __init__(self, bdf: str) -> None:
        self.bdf = bdf
        self.container = self.group = self.device = -1
        self.mappings: list[tuple[int, int]] = []  # (iova, size)
        self._next_iova = IOVA_BASE
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        if not (VFIO_DEV / "vfio").exists():
            raise BackendUnavailable("/dev/vfio/vfio is missing: the vfio and "
                                 "vfio_iommu_type1 modules are not loaded")
        group = iommu_group(self.bdf)
        self.reserved = reserved_regions(group)
        self.container = os.open(VFIO_DEV / "vfio", os.O_RDWR | os.O_CLOEXEC)
        if ioctl.api_version(self.container) != ioctl.VFIO_API_VERSION \
                or not ioctl.has_type1(self.container):
            raise BackendUnavailable("this kernel's VFIO has no Type 1 IOMMU")
        try:
            self.group = os.open(VFIO_DEV / str(group), os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusy(f"{self.bdf} is in use: another process "
                                     f"has its IOMMU group {group} open") from exc
            raise CannotOpen(f"cannot open /dev/vfio/{group}: "
                                 f"{exc.strerror}") from exc
        if not ioctl.group_viable(self.group):
            blockers = ", ".join(group_blockers(self.bdf, group)) or "unknown devices"
            raise DeviceBusy(f"IOMMU group {group} of {self.bdf} is shared "
                                 f"with devices bound to other drivers: {blockers}; "
                                 "bind them to vfio-pci or unbind them first")
        ioctl.group_set_container(self.group, self.container)
        ioctl.set_iommu_type1(self.container)
        try:
            self.device = ioctl.group_get_device_fd(self.group, self.bdf)
        except OSError as exc:
            raise DeviceBusy(f"{self.bdf} is in use: {exc.strerror}") from exc

    def region(self, index: int) -> tuple[int, int]:
        """(file offset in the device fd, size) of a region such as BAR0 or config."""
        info = ioctl.region_info(self.device, index)
        want = ioctl.VFIO_REGION_INFO_FLAG_READ | ioctl.VFIO_REGION_INFO_FLAG_WRITE
        if info.size == 0 or info.flags & want != want:
            raise BackendUnavailable(f"{self.bdf}: VFIO region {index} cannot be "
                                 "read and written")
        return int(info.offset), int(info.size)

    def map_dma(self, vaddr: int, phys: int, size: int) -> None:
        """Map ``size`` bytes at ``vaddr`` with IOVA == physical address (see the module doc)."""
        for start, end, kind in self.reserved:
            if phys <= end and start < phys + size:
                raise DmaError(
                    f"DMA memory at physical {phys:#x} (+{size:#x}) overlaps "
                    f"the IOMMU's reserved {kind} range {start:#x}-{end:#x}; a legacy virtio "
                    "device needs IOVA == physical address, so it cannot be mapped")
        try:
            ioctl.map_dma(self.container, vaddr, phys, size)
        except OSError as exc:
            raise DmaError(
                f"cannot map DMA memory at IOVA {phys:#x} (+{size:#x}) for "
                f"{self.bdf}: {exc.strerror}. A legacy virtio device ignores the IOMMU, "
                "so its buffers must be mapped at their physical addresses; this one "
                "falls in a range the IOMMU reserves") from exc
        self.mappings.append((phys, size))

    def alloc_iova(self, size: int) -> int:
        """The next free ``size`` bytes of IOVA space (2 MiB aligned) that no reserved
        region of the group touches."""
        iova = self._next_iova
        moved = True
        while moved:
            moved = False
            for start, end, _ in self.reserved:
                if iova <= end and start < iova + size:
                    iova = -(-(end + 1) // HUGEPAGE) * HUGEPAGE
                    moved = True
        self._next_iova = iova + size
        return iova

    def map_iova(self, vaddr: int, iova: int, size: int) -> None:
        """Map ``size`` bytes at ``vaddr`` to ``iova`` (a device behind the IOMMU)."""
        try:
            ioctl.map_dma(self.container, vaddr, iova, size)
        except OSError as exc:
            raise DmaError(f"cannot map DMA memory at IOVA {iova:#x} (+{size:#x}) for "
                           f"{self.bdf}: {exc.strerror}") from exc
        self.mappings.append((iova, size))

    def unmap_all(self, keep: int = 0) -> None:
        """Unmap every mapping but the first ``keep`` (newest first)."""
        while len(self.mappings) > keep:
            iova, size = self.mappings.pop()
            try:
                ioctl.unmap_dma(self.container, iova, size)
            except OSError:
                pass  # closing the container drops the mapping anyway

    def close(self) -> None:
        """Unmap and close; safe after a failed open. The device must be reset first."""
        if self.container >= 0:
            self.unmap_all()
        for fd in (self.device, self.group, self.container):
            if fd >= 0:
                os.close(fd)
        self.container = self.group = self.device = -1


class VfioBackend(PciBackend):
    """Owns one virtio-blk device through vfio-pci: the config space and BARs are VFIO
    regions of the device fd (offsets from VFIO_DEVICE_GET_REGION_INFO), DMA memory is
    hugetlbfs mapped into the container with IOVA == physical address, or at IOVAs of
    our own once ``enable_translation`` was called (see the module doc)."""

    name = "vfio"
    DRIVER = "vfio-pci"
    can_translate = True

    def _preflight(self) -> None:
        if not (VFIO_DEV / "vfio").exists():
            raise BackendUnavailable("/dev/vfio/vfio is missing: the vfio and "
                                     "vfio_iommu_type1 modules are not loaded")
        iommu_group(self.bdf)

    def _open_config(self) -> Registers:
        self.vfio = VfioDevice(self.bdf)
        config = self.vfio.region(ioctl.VFIO_PCI_CONFIG_REGION_INDEX)
        return Registers(self.vfio.device, *config, f"{self.bdf} PCI config (vfio)")

    def enable_translation(self) -> None:
        if self.vfio.mappings:
            raise DeviceError(f"{self.bdf}: DMA memory was mapped before translation was "
                              "negotiated")
        self.translating = True

    def alloc_dma(self, size: int) -> DmaRegion:
        if self.translating:
            return self._alloc_translated(size)
        region = DmaRegion.hugepages(size)
        mapped = len(self.vfio.mappings)
        try:
            for offset, bus, length in region.runs():
                self.vfio.map_dma(region.vaddr + offset, bus, length)
        except BaseException:
            # The runs mapped so far pin the region's pages in the IOMMU until close:
            # they go now, before the region's memory does.
            self.vfio.unmap_all(keep=mapped)
            region.close()
            raise
        return region

    def _alloc_translated(self, size: int) -> DmaRegion:
        """Hugepages mapped at one IOVA range: bus-contiguous whatever the physical pages."""
        size = -(-size // HUGEPAGE) * HUGEPAGE
        iova = self.vfio.alloc_iova(size)
        region = DmaRegion.hugepages(size, iova=iova)
        try:
            self.vfio.map_iova(region.vaddr, iova, region.size)
        except BaseException:
            region.close()
            raise
        return region

    def _open_bar(self, index: int) -> Mmio:
        """The BAR's VFIO region: mmapped when vfio-pci allows it, else pread/pwrite."""
        what = f"{self.bdf} BAR{index} (vfio)"
        try:
            info = ioctl.region_info(self.vfio.device, index)
        except OSError as exc:
            raise DeviceError(f"{what}: no region info: {exc.strerror}") from exc
        if not info.size:
            raise DeviceError(f"{what} is not implemented by the device")
        offset, size = int(info.offset), int(info.size)
        if info.flags & ioctl.VFIO_REGION_INFO_FLAG_MMAP:
            return MappedRegisters(map_mmio(self.vfio.device, offset, size, what), what)
        return Registers(self.vfio.device, offset, size, what)

    def _release(self) -> None:
        if hasattr(self, "vfio"):
            self.vfio.close()
