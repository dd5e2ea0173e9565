"""What every backend that owns a real PCI function does, whatever the kernel driver:
one process per device (a lock), refuse a device the kernel is using, bind it to the
backend's driver, turn on I/O decoding and bus mastering, find out whether MSI-X is on,
and on close optionally hand the device back to virtio-pci.

Subclasses say which driver (``DRIVER``), how the config space is reached
(``_open_config``), how BARs are mapped (``_open_bar``; BAR0 is the legacy register
block, which a modern-only device does not have) and where DMA memory comes from
(``alloc_dma``).
"""

from __future__ import annotations

import fcntl
import os

from .. import pci
from ..errors import DeviceBusy
from ..memory import DmaRegion
from ..errors import DeviceError
from ..regs import Mmio, Registers
from ..spec import PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST

REBIND_DRIVER = "virtio-pci"
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS_ENABLE = 1 << 15  # in the MSI-X capability's Message Control (le16 at +2)


def _lock_dir() -> str:
    for d in ("/run/lock", "/run", "/tmp"):
        if os.access(d, os.W_OK):
            return d
    return "/tmp"


class PciBackend:
    """Owns one virtio-blk PCI function through the kernel driver ``DRIVER``."""

    name = "pci"
    DRIVER = ""
    can_translate = False  # can map DMA at IOVAs != physical addresses (vfio)

    def __init__(self, dev: pci.PciDevice, *, rebind: bool = False) -> None:
        self.dev = dev
        self.bdf = dev.bdf
        self.device_id = dev.device
        self.rebind = rebind
        self.translating = False
        self._bars: dict[int, Mmio] = {}
        # Whether close() may hand the device to another driver (--rebind): only once it
        # is ours, bound by us or opened. A device already bound to our driver that would
        # not open (another process holds its VFIO group) stays where it is: unbinding it
        # would pull it from under that process.
        self._taken = False
        self._lock_fd: int | None = self._lock()
        try:
            self._preflight()
            if dev.driver != self.DRIVER:
                pci.check_unused(dev)
                self._taken = True
                pci.bind(dev, self.DRIVER)
            self.config = self._open_config()
            self._taken = True
            pci.enable_command(self.config, pci.COMMAND_IO | pci.COMMAND_BUS_MASTER)
            self.msix_enabled = self._msix_enabled()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, bdf: str | None, *, rebind: bool = False) -> PciBackend:
        return cls(pci.find(bdf), rebind=rebind)

    def _preflight(self) -> None:
        """Refuse, before the device is taken from its driver, what cannot work."""

    def _open_config(self) -> Registers:
        """The PCI config space."""
        raise NotImplementedError

    @property
    def bar0(self) -> Registers:
        """The legacy register block: an I/O BAR, reached by pread/pwrite."""
        bar = self.bar(0)
        if not isinstance(bar, Registers):
            raise DeviceError(f"{self.bdf}: BAR0 is not the legacy I/O register block")
        return bar

    def alloc_dma(self, size: int) -> DmaRegion:
        raise NotImplementedError

    def bar(self, index: int) -> Mmio:
        """BAR ``index``, mapped on first use and kept until close."""
        if not 0 <= index < 6:
            raise DeviceError(f"{self.bdf}: there is no BAR {index}")
        if index not in self._bars:
            self._bars[index] = self._open_bar(index)
        return self._bars[index]

    def _open_bar(self, index: int) -> Mmio:
        raise NotImplementedError

    def enable_translation(self) -> None:
        raise DeviceError(f"{self.bdf}: the {self.name} backend cannot translate DMA")

    def _close_bars(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars = {}

    def _release(self) -> None:
        """Close what ``_open_config``, ``_open_bar`` and ``alloc_dma`` opened."""

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

    def refresh_msix(self) -> bool:
        """Look again whether MSI-X is on (after vectors were set up or torn down)."""
        self.msix_enabled = self._msix_enabled()
        return self.msix_enabled

    def _msix_enabled(self) -> bool:
        """Whether MSI-X is on (then the legacy device config moves from 20 to 24)."""
        if not self.config.read_at(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return False
        ptr, seen = self.config.read_at(PCI_CAPABILITY_LIST, 1) & ~3, set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            if self.config.read_at(ptr, 1) == PCI_CAP_ID_MSIX:
                return bool(self.config.read_at(ptr + 2, 2) & PCI_MSIX_FLAGS_ENABLE)
            ptr = self.config.read_at(ptr + 1, 1) & ~3
        return False

    def close(self) -> None:
        """Only after the device reset and every DmaRegion closed (see Backend)."""
        try:
            self._close_bars()
            self._release()
            if self.rebind and self._taken:
                pci.release(self.dev, REBIND_DRIVER)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
