"""What a backend gives a transport, what a transport gives the block device, and the
parts written once for both transports: the initialisation handshake (virtio 1.2
"Device Initialization") and the "Device Status Field"."""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import numpy as np

from ..errors import DeviceError
from ..memory import DmaRegion
from ..pci import ConfigSpace, unmask_intx
from ..regs import Mmio, RegisterIO
from ..spec import BLK_CONFIG_DTYPE, IsrBit, Reg, Status

log = logging.getLogger(__name__)


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
    def config(self) -> ConfigSpace:
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


class StatusIO(Protocol):
    """Where a status register is: legacy BAR0 or the modern common config window."""

    def read(self, reg: Reg) -> int: ...

    def write(self, reg: Reg, value: int) -> None: ...


class DeviceStatus:
    """The "Device Status Field" as both transports drive it: the driver only adds bits
    (a write of 0 is a reset, which each transport confirms its own way), and FAILED is
    set without raising, since it is said while giving up on the device."""

    status_io: StatusIO
    STATUS_REG: Reg

    @property
    def status(self) -> int:
        return self.status_io.read(self.STATUS_REG)

    def add_status(self, bits: Status) -> None:
        self.status_io.write(self.STATUS_REG, self.status | bits)

    def fail(self) -> None:
        """Set FAILED: the driver gave up on the device during set-up."""
        try:
            self.add_status(Status.FAILED)
        except DeviceError:
            log.debug("could not set FAILED", exc_info=True)


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
        # Interrupt Disable must be clear at DRIVER_OK, even for a polling driver:
        # uio_pci_generic set it if the line fired for an earlier run (a device signals
        # its first used buffer after every start). QEMU takes MSI-X off plus Interrupt
        # Disable set to mean the driver wants no interrupts (virtio-pci's
        # query_guest_notifiers): at DRIVER_OK it gives a vhost-user back end no call
        # eventfd (VHOST_USER_VRING_NOFD_MASK), and libvhost-user's next notification
        # fails ("vu_panic: Error writing eventfd: Bad file descriptor"), which drops
        # the device for every later driver.
        unmask_intx(t.backend.config)
        t.add_status(Status.DRIVER_OK)
    except BaseException:
        t.fail()
        raise
    return offered, negotiated
