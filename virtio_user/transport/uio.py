"""The uio backend: the device bound to uio_pci_generic, BAR0 through sysfs ``resource0``,
PCI config through sysfs ``config``, DMA memory from hugetlbfs with physical addresses.

uio_pci_generic gives no address translation and no protection: the device DMAs to
guest-physical addresses, which /proc/self/pagemap provides (memory.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CannotOpen
from ..memory import DmaRegion
from ..regs import Registers
from .pci_backend import PciBackend


class UioBackend(PciBackend):
    """Owns one legacy virtio-blk device through uio_pci_generic."""

    name = "uio"
    DRIVER = "uio_pci_generic"

    def _open_registers(self) -> tuple[Registers, Registers]:
        self._fds: list[int] = []
        return (Registers(*self._open("resource0"), f"{self.bdf} BAR0"),
                Registers(*self._open("config"), f"{self.bdf} PCI config"))

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

    def _release(self) -> None:
        for fd in getattr(self, "_fds", []):
            os.close(fd)
        self._fds = []
