"""Transports: the legacy virtio-PCI register protocol (``legacy.py``) on top of a
backend that owns the device: ``uio.py`` (uio_pci_generic), ``fake.py`` (a Python device
model for unit tests) and ``vfio.py`` (vfio-pci behind an IOMMU).

A backend is small on purpose; a vfio backend implements exactly this:
"""

from __future__ import annotations

from typing import Protocol

from ..memory import DmaRegion
from ..regs import RegisterIO


class Backend(Protocol):
    """What the legacy transport needs from whoever owns the PCI device."""

    name: str  # "uio", "vfio", "fake"
    bdf: str  # PCI address, e.g. "0000:00:10.0"
    msix_enabled: bool  # device config at 24 instead of 20

    @property
    def bar0(self) -> RegisterIO:
        """The legacy register block."""
        ...

    def alloc_dma(self, size: int) -> DmaRegion:
        """Memory the device can reach, with each page's bus address (for vfio: mapped
        with IOVA == physical address, since a legacy device bypasses the IOMMU)."""
        ...

    def close(self) -> None:
        """Release the device (and optionally hand it back to its kernel driver). Only
        called after the device has been reset and every DmaRegion closed."""
        ...


def open_backend(name: str, bdf: str | None, *, rebind: bool = False) -> Backend:
    """The backend called ``name`` ("uio" or "vfio") owning the device at ``bdf`` (or the
    first legacy virtio-blk device)."""
    from ..errors import InvalidArgument
    if name == "uio":
        from .uio import UioBackend
        return UioBackend.open(bdf, rebind=rebind)
    if name == "vfio":
        from .vfio import VfioBackend
        return VfioBackend.open(bdf, rebind=rebind)
    raise InvalidArgument(f"unknown backend {name!r}: choose uio or vfio")
