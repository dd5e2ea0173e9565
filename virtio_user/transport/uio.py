"""The uio backend: the device bound to uio_pci_generic, BAR0 through sysfs ``resource0``,
PCI config through sysfs ``config``, DMA memory from hugetlbfs with physical addresses.

uio_pci_generic gives no address translation and no protection: the device DMAs to
guest-physical addresses, which /proc/self/pagemap provides (memory.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CannotOpen, DeviceError
from ..memory import DmaRegion, map_mmio
from ..regs import MappedRegisters, Mmio, Registers
from .pci_backend import PciBackend

IORESOURCE_IO = 0x100  # flags in sysfs ``resource`` (include/linux/ioport.h)
IORESOURCE_MEM = 0x200


class UioBackend(PciBackend):
    """Owns one virtio-blk device through uio_pci_generic (no IOMMU: physical addresses)."""

    name = "uio"
    DRIVER = "uio_pci_generic"

    def _open_config(self) -> Registers:
        self._fds: list[int] = []
        return Registers(*self._open("config"), f"{self.bdf} PCI config")

    def _open(self, name: str) -> tuple[int, int, int]:
        path = Path(self.dev.path, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CannotOpen(f"cannot open {path}: {exc.strerror}") from exc
        self._fds.append(fd)
        return fd, 0, os.fstat(fd).st_size

    def alloc_dma(self, size: int) -> DmaRegion:
        return DmaRegion.hugepages(size)

    def _open_bar(self, index: int) -> Mmio:
        """A memory BAR is mmapped from ``resourceN``; an I/O BAR is read and written
        through it (x86 cannot mmap I/O ports)."""
        try:
            lines = Path(self.dev.path, "resource").read_text().splitlines()
            start, end, flags = (int(x, 16) for x in lines[index].split())
        except (OSError, IndexError, ValueError) as exc:
            raise DeviceError(f"{self.bdf}: cannot read BAR {index} from sysfs: {exc}") from exc
        what = f"{self.bdf} BAR{index}"
        if not end or not flags & (IORESOURCE_IO | IORESOURCE_MEM):
            raise DeviceError(f"{what} is not implemented by the device")
        fd, _, size = self._open(f"resource{index}")
        if flags & IORESOURCE_IO:
            return Registers(fd, 0, size, what)
        return MappedRegisters(map_mmio(fd, 0, size, what), what)

    def _release(self) -> None:
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []
