"""Transports and backends.

A *backend* owns the PCI function: ``uio.py`` (uio_pci_generic), ``vfio.py`` (vfio-pci
behind an IOMMU); the tests' device models live in tests/unit. A *transport*
speaks one virtio register protocol over it: ``legacy.py`` ("Legacy Interfaces: A Note
on PCI Device Layout", the I/O BAR0 block) or ``modern.py`` ("Virtio Over PCI Bus", the
structures the vendor capabilities point at). The block device talks to a ``Transport``
only; the initialisation handshake and the status field are written once for both
transports, in ``base.py`` (``initialize``, ``DeviceStatus``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidArgument, Unsupported
from ..options import BACKENDS, TRANSPORTS
from .base import Backend, Transport, initialize

if TYPE_CHECKING:
    from ..pci import PciDevice



def open_transport(backend: Backend, choice: str = "auto") -> Transport:
    """The transport ``choice`` ("auto", "legacy" or "modern") over ``backend``. Auto
    takes the modern interface when the device has its capabilities."""
    from .legacy import LegacyTransport
    from .modern import ModernTransport, find_capabilities
    if choice not in TRANSPORTS:
        raise InvalidArgument(f"unknown transport {choice!r}: choose {', '.join(TRANSPORTS)}")
    if choice == "legacy":
        check_legacy(backend.bdf, backend.device_id)
        return LegacyTransport(backend)
    caps = find_capabilities(backend.config, backend.bdf)
    if not caps.present:
        if choice == "modern":
            raise Unsupported(f"{backend.bdf} has no modern virtio interface (no virtio "
                              "PCI capabilities); use --transport legacy")
        check_legacy(backend.bdf, backend.device_id)
        return LegacyTransport(backend)
    return ModernTransport(backend, caps)


def check_legacy(bdf: str, device_id: int) -> None:
    """Only a transitional device (1af4:1001) has the legacy register block."""
    from ..spec import VIRTIO_PCI_LEGACY_BLK
    if device_id != VIRTIO_PCI_LEGACY_BLK:
        raise Unsupported(f"{bdf} (device {device_id:#06x}) is a modern-only virtio device "
                          "with no legacy interface; use --transport modern or auto")


def open_backend(name: str, bdf: str | None, *, rebind: bool = False,
                 transport: str = "auto") -> Backend:
    """The backend called ``name`` ("uio" or "vfio") owning the device at ``bdf`` (or the
    first virtio-blk device). A transport choice the device cannot have is refused
    before the device is taken from its kernel driver."""
    from .. import pci
    if name not in BACKENDS:
        raise InvalidArgument(f"unknown backend {name!r}: choose {' or '.join(BACKENDS)}")
    if transport not in TRANSPORTS:
        raise InvalidArgument(f"unknown transport {transport!r}: choose "
                              f"{', '.join(TRANSPORTS)}")
    dev: PciDevice = pci.find(bdf)
    if transport == "legacy":
        check_legacy(dev.bdf, dev.device)
    if name == "uio":
        from .uio import UioBackend
        return UioBackend(dev, rebind=rebind)
    from .vfio import VfioBackend
    return VfioBackend(dev, rebind=rebind)


__all__ = ["Backend", "Transport", "initialize", "open_backend", "open_transport"]
