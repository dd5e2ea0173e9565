"""The uio backend: the device bound to uio_pci_generic, BAR0 through sysfs ``resource0``,
PCI config through sysfs ``config``, DMA memory from hugetlbfs with physical addresses.

uio_pci_generic gives no address translation and no protection: the device DMAs to
guest-physical addresses, which /proc/self/pagemap provides (memory.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .. import pci
from ..errors import CannotOpen, DeviceBusy
from ..memory import DmaRegion
from ..regs import Registers

DRIVER = "uio_pci_generic"
REBIND_DRIVER = "virtio-pci"
_PCI_STATUS, _STATUS_CAP_LIST, _CAP_PTR, _CAP_MSIX = 6, 1 << 4, 0x34, 0x11


def _lock_dir() -> str:
    for d in ("/run/lock", "/run", "/tmp"):
        if os.access(d, os.W_OK):
            return d
    return "/tmp"


class UioBackend:
    """Owns one legacy virtio-blk device through uio_pci_generic."""

    name = "uio"

    def __init__(self, dev: pci.PciDevice, *, rebind: bool = False) -> None:
        self.dev = dev
        self.bdf = dev.bdf
        self.rebind = rebind
        self._fds: list[int] = []
        self._lock_fd: int | None = self._lock()
        try:
            if dev.driver != DRIVER:
                pci.check_unused(dev)
                pci.bind(dev, DRIVER)
            self.bar0 = Registers(*self._open("resource0"), f"{self.bdf} BAR0")
            self.config = Registers(*self._open("config"), f"{self.bdf} PCI config")
            cmd = self.config.read_at(pci.COMMAND_REG, 2)
            self.config.write_at(pci.COMMAND_REG, 2,
                                 cmd | pci.COMMAND_IO | pci.COMMAND_BUS_MASTER)
            self.msix_enabled = self._msix_enabled()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, bdf: str | None, *, rebind: bool = False) -> UioBackend:
        return cls(pci.find(bdf), rebind=rebind)

    def _lock(self) -> int:
        """One process per device: a second would reset the first one's queue."""
        path = os.path.join(_lock_dir(), f"virtio-user-{self.bdf}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DeviceBusy(f"{self.bdf} is in use by another virtio-user process "
                             f"(lock {path})") from None
        return fd

    def _open(self, name: str) -> tuple[int, int, int]:
        path = Path(self.dev.path, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CannotOpen(f"cannot open {path}: {exc.strerror}") from exc
        self._fds.append(fd)
        return fd, 0, os.fstat(fd).st_size

    def _msix_enabled(self) -> bool:
        """Whether MSI-X is on (then the legacy device config moves from 20 to 24)."""
        if not self.config.read_at(_PCI_STATUS, 2) & _STATUS_CAP_LIST:
            return False
        ptr, seen = self.config.read_at(_CAP_PTR, 1) & ~3, set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            if self.config.read_at(ptr, 1) == _CAP_MSIX:
                return bool(self.config.read_at(ptr + 2, 2) & 0x8000)
            ptr = self.config.read_at(ptr + 1, 1) & ~3
        return False

    def alloc_dma(self, size: int) -> DmaRegion:
        return DmaRegion.hugepages(size)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        try:
            if self.rebind:
                pci.release(self.dev, REBIND_DRIVER)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
