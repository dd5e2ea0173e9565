"""Transports and backends.

A *backend* owns the PCI function: ``uio.py`` (uio_pci_generic), ``vfio.py`` (vfio-pci
behind an IOMMU); the tests' device models live in tests/unit. A *transport*
speaks one virtio register protocol over it: ``legacy.py`` ("Legacy Interfaces: A Note
on PCI Device Layout", the I/O BAR0 block) or ``modern.py`` ("Virtio Over PCI Bus", the
structures the vendor capabilities point at). The block device talks to a ``Transport``
only, and the initialisation handshake is written once, here (``initialize``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from ..errors import InvalidArgument, Unsupported
from ..interrupts import PCI_COMMAND_INTX_DISABLE
from ..memory import DmaRegion
from ..pci import COMMAND_REG
from ..regs import Mmio, RegisterIO
from ..spec import BLK_CONFIG_DTYPE, IsrBit, Reg, Status

if TYPE_CHECKING:
    from ..pci import PciDevice

TRANSPORTS = ("auto", "legacy", "modern")
PCI_COMMAND = Reg("PCI_COMMAND", COMMAND_REG, 2, True)  # PCI config space, le16


class Backend(Protocol):
    """What a transport needs from whoever owns the PCI device."""

    name: str  # "uio", "vfio", "fake"
    bdf: str  # PCI address, e.g. "0000:00:10.0"
    device_id: int  # PCI device ID: 0x1001 transitional, 0x1042 modern-only
    msix_enabled: bool  # legacy device config at 24 instead of 20
    can_translate: bool  # can map DMA at IOVAs of its choosing (vfio)

    @property
    def bar0(self) -> RegisterIO:
        """The legacy register block."""
        ...

    @property
    def config(self) -> RegisterIO:
        """PCI configuration space (where the capability list is)."""
        ...

    def bar(self, index: int) -> Mmio:
        """BAR ``index`` for register access, mapped once and kept until close."""
        ...

    def enable_translation(self) -> None:
        """From now on map DMA memory at IOVAs that are not physical addresses (the
        device negotiated VIRTIO_F_ACCESS_PLATFORM). Only when ``can_translate``."""
        ...

    @property
    def translating(self) -> bool:
        """Whether ``alloc_dma`` gives IOVAs (True) or physical addresses (False)."""
        ...

    def alloc_dma(self, size: int) -> DmaRegion:
        """Memory the device can reach, with each page's bus address: the physical
        address, or an IOVA once ``enable_translation`` was called."""
        ...

    def close(self) -> None:
        """Release the device (and optionally hand it back to its kernel driver). Only
        called after the device has been reset and every DmaRegion closed."""
        ...


class Transport(Protocol):
    """One virtio register protocol over a backend: status, features, queues, ISR and
    device config. Features are 64-bit ints; addresses are bus addresses."""

    kind: str  # "legacy" or "modern"
    backend: Backend

    @property
    def iommu(self) -> bool:
        """True when the device's DMA is translated by an IOMMU (bus address = IOVA,
        not the physical address)."""
        ...

    def reset(self) -> None:
        """Reset the device and confirm it: afterwards it no longer touches queue memory."""
        ...

    @property
    def status(self) -> int: ...

    def add_status(self, bits: Status) -> None: ...

    def fail(self) -> None:
        """Set FAILED, never raising: the driver gives up on the device."""
        ...

    def device_features(self) -> int: ...

    def transport_features(self, offered: int) -> int:
        """The transport's own feature bits the driver accepts from ``offered`` (modern:
        VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM); raises when ``offered`` cannot
        be driven at all."""
        ...

    def set_driver_features(self, features: int) -> None: ...

    def features_ok(self) -> None:
        """Modern: set FEATURES_OK and read it back. Legacy has no such step."""
        ...

    def queue_size(self, index: int) -> int:
        """The size the driver will use for queue ``index``; 0 if there is no such queue."""
        ...

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        """Give the device the bus addresses of the queue's descriptor, driver and device
        areas (legacy: they must form the legacy contiguous layout) and enable it."""
        ...

    def notifier(self, index: int) -> Callable[[], None]:
        """The kick for queue ``index``."""
        ...

    def isr(self) -> IsrBit:
        """Read (and thereby clear) the ISR status: bit 1 means the config changed."""
        ...

    def set_config_vector(self, vector: int) -> int:
        """Route config-change interrupts to MSI-X ``vector`` (MSI-X enabled); returns
        the read-back, VIRTIO_MSI_NO_VECTOR when the device refused."""
        ...

    def set_queue_vector(self, index: int, vector: int) -> int:
        """Route queue ``index``'s interrupts to MSI-X ``vector``; returns the read-back."""
        ...

    def read_config(self, dtype: np.dtype = BLK_CONFIG_DTYPE) -> np.void:
        """The device-specific config as a consistent 0-d structured array."""
        ...


def initialize(transport: Transport, wanted: int,
               set_up: Callable[[int], None]) -> tuple[int, int]:
    """virtio 1.2 "Device Initialization": reset; ACKNOWLEDGE; DRIVER; read the device's
    features and write the subset we understand; FEATURES_OK and read it back (modern
    only: "Legacy Interface: Device Initialization" has no such step); device-specific
    set-up (``set_up(negotiated)``: config, queues); DRIVER_OK. On any error the
    device gets FAILED and the error propagates. Returns (offered, negotiated)."""
    t = transport
    try:
        t.reset()
        t.add_status(Status.ACKNOWLEDGE)
        t.add_status(Status.DRIVER)
        offered = t.device_features()
        negotiated = offered & (wanted | t.transport_features(offered))
        t.set_driver_features(negotiated)
        t.features_ok()
        set_up(negotiated)
        unmask_intx(t.backend.config)
        t.add_status(Status.DRIVER_OK)
    except BaseException:
        t.fail()
        raise
    return offered, negotiated


def unmask_intx(config: RegisterIO) -> None:
    """Clear Interrupt Disable in the PCI Command register; called between the reset
    and DRIVER_OK, when the device raises no interrupt.

    uio_pci_generic sets the bit each time the INTx line fires (a device signals its
    first used buffer after every start, even to a polling driver), and only an
    interrupt waiter clears it again. QEMU takes MSI-X off plus Interrupt Disable set
    to mean the driver wants no interrupts (virtio-pci's query_guest_notifiers): at
    DRIVER_OK it gives a vhost-user back end no call eventfd (vhost_virtqueue_start,
    VHOST_USER_VRING_NOFD_MASK), and libvhost-user's next notification fails
    ("vu_panic: Error writing eventfd: Bad file descriptor"), which drops the device
    for every later driver."""
    cmd = config.read(PCI_COMMAND)
    if cmd & PCI_COMMAND_INTX_DISABLE:
        config.write(PCI_COMMAND, cmd & ~PCI_COMMAND_INTX_DISABLE)


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
    if name not in ("uio", "vfio"):
        raise InvalidArgument(f"unknown backend {name!r}: choose uio or vfio")
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


__all__ = ["Backend", "Transport", "initialize", "open_backend",
           "open_transport"]
