"""The legacy virtio-PCI transport over a backend's BAR0.

virtio 1.2, "Legacy Interfaces: A Note on PCI Device Layout" (the register block),
"Device Initialization" with "Legacy Interface: Device Initialization" (no FEATURES_OK;
the queue is set up before DRIVER_OK) and "Device Status Field".
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..errors import DeviceError
from ..spec import (BLK_CONFIG_DTYPE, LEGACY_CONFIG_OFFSET, LEGACY_CONFIG_OFFSET_MSIX,
                    MAX_QUEUE_SIZE, IsrBit, LegacyReg, Status)
from . import Backend

log = logging.getLogger(__name__)


class LegacyTransport:
    """Status, features, queue registers, ISR and device config of a legacy device."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.regs = backend.bar0
        self.config_offset = (LEGACY_CONFIG_OFFSET_MSIX if backend.msix_enabled
                              else LEGACY_CONFIG_OFFSET)

    # -- status -------------------------------------------------------------------
    def reset(self) -> None:
        """Write 0 to the status register: the device forgets its queues and stops
        touching their memory. Reading back 0 confirms the reset happened."""
        self.regs.write(LegacyReg.DEVICE_STATUS, 0)
        status = self.regs.read(LegacyReg.DEVICE_STATUS)
        if status != 0:
            raise DeviceError(f"{self.backend.bdf}: status reads {status:#x} after reset")

    @property
    def status(self) -> int:
        return self.regs.read(LegacyReg.DEVICE_STATUS)

    def add_status(self, bits: Status) -> None:
        self.regs.write(LegacyReg.DEVICE_STATUS, self.status | bits)

    def fail(self) -> None:
        """Set FAILED: the driver gave up on the device during set-up."""
        try:
            self.add_status(Status.FAILED)
        except DeviceError:
            log.debug("could not set FAILED", exc_info=True)

    # -- features -----------------------------------------------------------------
    def host_features(self) -> int:
        return self.regs.read(LegacyReg.HOST_FEATURES)

    def negotiate(self, wanted: int) -> int:
        """Write the subset of offered features we implement; returns it."""
        accepted = self.host_features() & wanted
        self.regs.write(LegacyReg.GUEST_FEATURES, accepted)
        return accepted

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

    def set_queue_pfn(self, index: int, pfn: int) -> None:
        self.regs.write(LegacyReg.QUEUE_SELECT, index)
        self.regs.write(LegacyReg.QUEUE_ADDRESS, pfn)
        if self.regs.read(LegacyReg.QUEUE_ADDRESS) != pfn:
            raise DeviceError(f"{self.backend.bdf}: queue {index} did not take PFN {pfn:#x}")

    def notifier(self, index: int) -> Callable[[], None]:
        """The kick for queue ``index``: a write of its number to QUEUE_NOTIFY."""
        return self.regs.poker(LegacyReg.QUEUE_NOTIFY, index)

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
