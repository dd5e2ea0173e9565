"""The legacy virtio-PCI transport over a backend's BAR0.

virtio 1.2, "Legacy Interfaces: A Note on PCI Device Layout" (the register block),
"Device Initialization" with "Legacy Interface: Device Initialization" (no FEATURES_OK;
the queue is set up before DRIVER_OK) and "Device Status Field".
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import DeviceError, DmaError
from ..spec import (BLK_CONFIG_DTYPE, LEGACY_CONFIG_OFFSET, LEGACY_CONFIG_OFFSET_MSIX,
                    LEGACY_PFN_SHIFT, LEGACY_QUEUE_ALIGN, MAX_QUEUE_SIZE, IsrBit, LegacyReg)
from .base import Backend, DeviceStatus


class LegacyTransport(DeviceStatus):
    """Status, features, queue registers, ISR and device config of a legacy device."""

    kind = "legacy"
    # A legacy device ignores any IOMMU: its DMA addresses are physical ones.
    iommu = False
    STATUS_REG = LegacyReg.DEVICE_STATUS

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.regs = backend.bar0
        self.status_io = self.regs

    @property
    def config_offset(self) -> int:
        """Where the device config starts: it follows MSI-X being switched on or off."""
        return LEGACY_CONFIG_OFFSET_MSIX if self.backend.msix_enabled else LEGACY_CONFIG_OFFSET

    # -- status -------------------------------------------------------------------
    def reset(self) -> None:
        """Write 0 to the status register: the device forgets its queues and stops
        touching their memory. Reading back 0 confirms the reset happened."""
        self.regs.write(LegacyReg.DEVICE_STATUS, 0)
        status = self.regs.read(LegacyReg.DEVICE_STATUS)
        if status != 0:
            raise DeviceError(f"{self.backend.bdf}: status reads {status:#x} after reset")

    # -- features -----------------------------------------------------------------
    def device_features(self) -> int:
        return self.regs.read(LegacyReg.HOST_FEATURES)

    def transport_features(self, offered: int) -> int:
        return 0  # 32 feature bits, none of them the transport's

    def set_driver_features(self, features: int) -> None:
        self.regs.write(LegacyReg.GUEST_FEATURES, features & 0xFFFF_FFFF)

    def features_ok(self) -> None:
        """"Legacy Interface: Device Initialization": no FEATURES_OK step."""

    # -- queues -------------------------------------------------------------------
    def queue_size(self, index: int) -> int:
        """The size the device reports for a queue (0: no such queue). Legacy drivers
        must use exactly this size; it must be a power of 2 ("Split Virtqueues")."""
        self.regs.write(LegacyReg.QUEUE_SELECT, index)
        size = self.regs.read(LegacyReg.QUEUE_SIZE)
        if size and (size > MAX_QUEUE_SIZE or size & (size - 1)):
            raise DeviceError(f"{self.backend.bdf}: queue {index} size {size} is not a "
                              f"power of 2 up to {MAX_QUEUE_SIZE}")
        return size

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        """A legacy device takes one page frame number: the three areas must be the
        legacy layout ("Legacy Interfaces: A Note on Virtqueue Layout"), contiguous from
        a 4096-byte aligned descriptor table, used ring on the next 4096-byte boundary
        after the available ring."""
        from ..ring.split import legacy_layout
        if not self.queue_size(index):
            raise DeviceError(f"{self.backend.bdf}: queue {index} does not exist (its size "
                              "reads 0)")
        lay = legacy_layout(size)
        if (desc % LEGACY_QUEUE_ALIGN or driver != desc + lay.avail
                or device != desc + lay.used):
            raise DmaError(f"queue {index} areas {desc:#x}/{driver:#x}/{device:#x} are not "
                           f"the legacy layout for size {size}")
        if (desc >> LEGACY_PFN_SHIFT) >> 32:
            raise DmaError(f"queue at {desc:#x} is beyond QUEUE_ADDRESS's 32-bit PFN")
        self.set_queue_pfn(index, desc >> LEGACY_PFN_SHIFT)

    def set_queue_pfn(self, index: int, pfn: int) -> None:
        self.regs.write(LegacyReg.QUEUE_SELECT, index)
        self.regs.write(LegacyReg.QUEUE_ADDRESS, pfn)
        if self.regs.read(LegacyReg.QUEUE_ADDRESS) != pfn:
            raise DeviceError(f"{self.backend.bdf}: queue {index} did not take PFN {pfn:#x}")

    def notifier(self, index: int) -> Callable[[], None]:
        """The kick for queue ``index``: a write of its number to QUEUE_NOTIFY."""
        return self.regs.poker(LegacyReg.QUEUE_NOTIFY, index)

    def set_config_vector(self, vector: int) -> int:
        """Route config-change interrupts to MSI-X ``vector``; returns what the device
        kept (VIRTIO_MSI_NO_VECTOR: refused). Only while MSI-X is enabled."""
        self.regs.write(LegacyReg.CONFIG_MSIX_VECTOR, vector)
        return self.regs.read(LegacyReg.CONFIG_MSIX_VECTOR)

    def set_queue_vector(self, index: int, vector: int) -> int:
        """Route queue ``index``'s used-buffer interrupts to MSI-X ``vector``; returns
        what the device kept, as ``set_config_vector``."""
        self.regs.write(LegacyReg.QUEUE_SELECT, index)
        self.regs.write(LegacyReg.QUEUE_MSIX_VECTOR, vector)
        return self.regs.read(LegacyReg.QUEUE_MSIX_VECTOR)

    def isr(self) -> IsrBit:
        """Read (and thereby clear) the ISR status: bit 1 means the config changed."""
        return IsrBit(self.regs.read(LegacyReg.ISR_STATUS))

    # -- device config ------------------------------------------------------------
    def read_config(self, dtype: np.dtype = BLK_CONFIG_DTYPE) -> np.void:
        """The device-specific config as a 0-d structured array, read in 4-byte steps
        (the only widths the BAR file accepts). Legacy config has no generation counter,
        so read until two passes agree ("Legacy Interface: Device Configuration Space")."""
        previous = None
        for _ in range(10):
            raw = b"".join(self.regs.read_at(self.config_offset + off, 4).to_bytes(4, "little")
                           for off in range(0, dtype.itemsize, 4))
            if raw == previous:
                record: np.void = np.frombuffer(raw, dtype)[0]
                return record
            previous = raw
        raise DeviceError(f"{self.backend.bdf}: device config keeps changing")
