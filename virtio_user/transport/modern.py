"""The modern (virtio 1.x) PCI transport: the structures the vendor capabilities point at.

virtio 1.2, "Virtio Over PCI Bus": "Virtio Structure PCI Capabilities" (where each
structure lives: BAR, offset, length), "Common configuration structure layout" (features
through select registers, status, per-queue registers), "Notification structure layout"
(queue_notify_off * notify_off_multiplier), "ISR status capability" and
"Device-specific configuration" (read under config_generation).

The capability list is device-controlled data: it is walked with a bound and a visited
set, each capability is parsed once into a frozen record and checked against its BAR,
and everything after that works from the records. Anything malformed is a DeviceError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import DeviceError, Unsupported
from ..pci import ConfigSpace
from ..regs import Window
from ..spec import (BLK_CONFIG_DTYPE, COMMON_CFG_MIN_LENGTH, MAX_QUEUE_SIZE,
                    PCI_CAP_ID_VNDR, PCI_CAPABILITY_LIST, PCI_CFG_SPACE_SIZE,
                    PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_STD_HEADER_SIZEOF,
                    PCI_STD_NUM_BARS, VIRTIO_PCI_CAP_DTYPE, VIRTIO_PCI_NOTIFY_CAP_LEN,
                    CommonCfg, Feature, IsrBit, PciCapType, Status)
from .base import Backend, DeviceStatus


# At most this many capabilities fit after the standard header, 4-byte aligned: a longer
# walk has visited some capability twice.
MAX_CAPS = (PCI_CFG_SPACE_SIZE - PCI_STD_HEADER_SIZEOF) // 4
RESET_TIMEOUT = 1.0  # "the driver SHOULD wait for device_status to read 0" - not forever
CONFIG_RETRIES = 16  # config_generation changes this often in a row: the device is broken
_WANTED = {PciCapType.VIRTIO_PCI_CAP_COMMON_CFG: "common",
           PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG: "notify",
           PciCapType.VIRTIO_PCI_CAP_ISR_CFG: "isr",
           PciCapType.VIRTIO_PCI_CAP_DEVICE_CFG: "device"}
# Minimum structure lengths: through queue_device; one le16 notify; one ISR byte.
_MIN_LENGTH = {"common": COMMON_CFG_MIN_LENGTH, "notify": 2, "isr": 1, "device": 1}
# "Virtqueue Alignment" for split queues: descriptor table 16, driver area 2, device area 4.
_AREA_ALIGN = (("descriptor", 16), ("driver", 2), ("device", 4))


@dataclass(frozen=True)
class VirtioCap:
    """One vendor capability ("Virtio Structure PCI Capabilities"), as read."""

    cfg_type: int
    bar: int
    offset: int  # within the BAR
    length: int
    at: int  # where the capability is in PCI config space, for messages
    notify_off_multiplier: int = 0

    def describe(self) -> str:
        return (f"{PciCapType(self.cfg_type).name} capability at config {self.at:#x} "
                f"(BAR {self.bar}, offset {self.offset:#x}, length {self.length:#x})")


@dataclass(frozen=True)
class Capabilities:
    """The first usable capability of each structure the driver needs (the spec lets a
    device list several, preferred first), and what was passed over and why."""

    common: VirtioCap | None = None
    notify: VirtioCap | None = None
    isr: VirtioCap | None = None
    device: VirtioCap | None = None
    ignored: tuple[str, ...] = ()

    @property
    def present(self) -> bool:
        """Whether the device has a modern interface at all (usable or not)."""
        return bool(self.common or self.notify or self.isr or self.device or self.ignored)


def find_capabilities(config: ConfigSpace, bdf: str) -> Capabilities:
    """Walk the PCI capability list from the capabilities pointer and parse the virtio
    vendor capabilities (0x09). A loop, a pointer into the standard header or past the
    config space, or a truncated capability is a DeviceError."""
    found: dict[str, VirtioCap] = {}
    ignored: list[str] = []
    if not config.read_at(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return Capabilities()
    ptr = config.read_at(PCI_CAPABILITY_LIST, 1) & ~3
    seen: set[int] = set()
    while ptr:
        if ptr in seen or len(seen) >= MAX_CAPS:
            raise DeviceError(f"{bdf}: the PCI capability list loops (back to {ptr:#x})")
        if not PCI_STD_HEADER_SIZEOF <= ptr <= PCI_CFG_SPACE_SIZE - 4:
            raise DeviceError(f"{bdf}: PCI capability pointer {ptr:#x} is outside "
                              f"{PCI_STD_HEADER_SIZEOF:#x}..{PCI_CFG_SPACE_SIZE - 4:#x}")
        seen.add(ptr)
        if config.read_at(ptr, 1) == PCI_CAP_ID_VNDR:
            cap = _parse_vendor_cap(config, ptr, bdf)
            if cap is not None:
                name = _WANTED[PciCapType(cap.cfg_type)]
                if cap.bar >= PCI_STD_NUM_BARS:
                    # "The driver MUST ignore any vendor-specific capability structure
                    # which has a reserved bar value."
                    ignored.append(f"{cap.describe()}: BAR index {cap.bar} is reserved "
                                   f"(0..{PCI_STD_NUM_BARS - 1})")
                else:
                    found.setdefault(name, cap)
        ptr = config.read_at(ptr + 1, 1) & ~3
    return Capabilities(**found, ignored=tuple(ignored))


def _parse_vendor_cap(config: ConfigSpace, ptr: int, bdf: str) -> VirtioCap | None:
    """The record for a virtio structure capability at ``ptr`` (None: a type the driver
    does not use, such as PCI_CFG or shared memory)."""
    cfg_type = config.read_at(ptr + 3, 1)
    if cfg_type not in _WANTED:
        return None
    need = (VIRTIO_PCI_NOTIFY_CAP_LEN if cfg_type == PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG
            else VIRTIO_PCI_CAP_DTYPE.itemsize)
    cap_len = config.read_at(ptr + 2, 1)
    if cap_len < need or ptr + need > PCI_CFG_SPACE_SIZE:
        raise DeviceError(f"{bdf}: {PciCapType(cfg_type).name} capability at config "
                          f"{ptr:#x} is {cap_len} bytes, needs {need} within the config "
                          "space")
    fields = VIRTIO_PCI_CAP_DTYPE.fields
    assert fields is not None
    return VirtioCap(
        cfg_type=cfg_type, bar=config.read_at(ptr + fields["bar"][1], 1),
        offset=config.read_at(ptr + fields["offset"][1], 4),
        length=config.read_at(ptr + fields["length"][1], 4), at=ptr,
        notify_off_multiplier=(config.read_at(ptr + VIRTIO_PCI_CAP_DTYPE.itemsize, 4)
                               if cfg_type == PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG else 0))


class ModernTransport(DeviceStatus):
    """Status, 64-bit features, per-queue registers, notify, ISR and device config of a
    virtio 1.x PCI device, through the windows its capabilities describe."""

    kind = "modern"
    STATUS_REG = CommonCfg.DEVICE_STATUS

    def __init__(self, backend: Backend, caps: Capabilities) -> None:
        self.backend = backend
        self.bdf = backend.bdf
        self.caps = caps
        self.common = self._window(caps.common, "common")
        self.status_io = self.common
        self.notify = self._window(caps.notify, "notify")
        self.isr_window = self._window(caps.isr, "isr")
        self.device_cfg = self._window(caps.device, "device")
        assert caps.notify is not None
        self.notify_multiplier = caps.notify.notify_off_multiplier
        if self.notify_multiplier & 1 and self.notify_multiplier != 1:
            # "The device MUST either present notify_off_multiplier as an even power of
            # 2, or present notify_off_multiplier as 0."
            raise DeviceError(f"{self.bdf}: notify_off_multiplier "
                              f"{self.notify_multiplier} is not an even power of 2 or 0")
        self._notify_offsets: dict[int, int] = {}

    def _window(self, cap: VirtioCap | None, name: str) -> Window:
        """The BAR window of a required structure, checked to fit its BAR."""
        if cap is None:
            why = "".join(f"; ignored {reason}" for reason in self.caps.ignored)
            raise DeviceError(f"{self.bdf}: the modern interface lacks the required "
                              f"{name} capability ({_cap_name(name)}){why}")
        if cap.length < _MIN_LENGTH[name]:
            raise DeviceError(f"{self.bdf}: {cap.describe()} is shorter than the "
                              f"{_MIN_LENGTH[name]} bytes of the structure")
        bar = self.backend.bar(cap.bar)
        if cap.offset + cap.length > bar.size:
            raise DeviceError(f"{self.bdf}: {cap.describe()} runs past the end of BAR "
                              f"{cap.bar} ({bar.size:#x} bytes)")
        return Window(bar, cap.offset, cap.length, f"{self.bdf} {name} config")

    @property
    def iommu(self) -> bool:
        return self.backend.translating

    # -- status -------------------------------------------------------------------
    def reset(self) -> None:
        """Write 0 to device_status and wait (bounded) until it reads 0: only then has
        the device stopped using the queues ("Device Reset")."""
        self.common.write(CommonCfg.DEVICE_STATUS, 0)
        deadline = time.monotonic() + RESET_TIMEOUT
        while (status := self.status) != 0:
            if time.monotonic() > deadline:
                raise DeviceError(f"{self.bdf}: status reads {status:#x} "
                                  f"{RESET_TIMEOUT:g} s after reset")
            time.sleep(0.001)

    # -- features -----------------------------------------------------------------
    def device_features(self) -> int:
        features = 0
        for word in (0, 1):
            self.common.write(CommonCfg.DEVICE_FEATURE_SELECT, word)
            features |= self.common.read(CommonCfg.DEVICE_FEATURE) << (32 * word)
        return features

    def transport_features(self, offered: int) -> int:
        """VIRTIO_F_VERSION_1 always (a modern interface without it is broken), and
        VIRTIO_F_ACCESS_PLATFORM when offered, which needs a backend that maps DMA
        through the IOMMU: the device will translate every address it is given."""
        if not offered & Feature.VIRTIO_F_VERSION_1:
            raise DeviceError(f"{self.bdf}: the modern interface does not offer "
                              "VIRTIO_F_VERSION_1")
        bits = int(Feature.VIRTIO_F_VERSION_1)
        if offered & Feature.VIRTIO_F_ACCESS_PLATFORM:
            if not self.backend.can_translate:
                raise Unsupported(
                    f"{self.bdf} offers VIRTIO_F_ACCESS_PLATFORM (QEMU iommu_platform=on): "
                    "its DMA goes through the IOMMU, which the "
                    f"{self.backend.name} backend cannot program; use --backend vfio")
            bits |= Feature.VIRTIO_F_ACCESS_PLATFORM
        return bits

    def set_driver_features(self, features: int) -> None:
        if features & Feature.VIRTIO_F_ACCESS_PLATFORM:
            self.backend.enable_translation()
        for word in (0, 1):
            self.common.write(CommonCfg.DRIVER_FEATURE_SELECT, word)
            self.common.write(CommonCfg.DRIVER_FEATURE, features >> (32 * word) & 0xFFFF_FFFF)

    def features_ok(self) -> None:
        """Set FEATURES_OK and read it back: a device that clears it does not support
        the subset we wrote ("Device Initialization", step 6)."""
        self.add_status(Status.FEATURES_OK)
        if not self.status & Status.FEATURES_OK:
            raise Unsupported(f"{self.bdf}: the device did not accept our features "
                              "(FEATURES_OK reads back clear)")

    # -- queues -------------------------------------------------------------------
    def _select(self, index: int) -> int:
        """Select queue ``index`` and return its size register (0: no such queue, which
        the device says by a size of 0, and num_queues should agree)."""
        self.common.write(CommonCfg.QUEUE_SELECT, index)
        size = self.common.read(CommonCfg.QUEUE_SIZE)
        return size if index < self.common.read(CommonCfg.NUM_QUEUES) else 0

    def queue_size(self, index: int) -> int:
        """The largest power of 2 not above the device's maximum ("Split Virtqueues":
        a power of 2 up to 32768; the driver may pick a smaller size than the maximum)."""
        maximum = min(self._select(index), MAX_QUEUE_SIZE)
        return 1 << (maximum.bit_length() - 1) if maximum else 0

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        maximum = self._select(index)
        if not maximum:
            raise DeviceError(f"{self.bdf}: queue {index} does not exist (its size reads 0)")
        if not 0 < size <= min(maximum, MAX_QUEUE_SIZE) or size & (size - 1):
            raise DeviceError(f"{self.bdf}: queue {index} size {size} is not a power of 2 "
                              f"up to the device's maximum {maximum}")
        for (name, align), addr in zip(_AREA_ALIGN, (desc, driver, device)):
            if addr % align:
                raise DeviceError(f"{self.bdf}: queue {index} {name} area {addr:#x} is not "
                                  f"{align}-byte aligned")
        c = self.common
        c.write(CommonCfg.QUEUE_SIZE, size)
        c.write(CommonCfg.QUEUE_DESC, desc)
        c.write(CommonCfg.QUEUE_DRIVER, driver)
        c.write(CommonCfg.QUEUE_DEVICE, device)
        got = (c.read(CommonCfg.QUEUE_SIZE), c.read(CommonCfg.QUEUE_DESC),
               c.read(CommonCfg.QUEUE_DRIVER), c.read(CommonCfg.QUEUE_DEVICE))
        if got != (size, desc, driver, device):
            raise DeviceError(f"{self.bdf}: queue {index} did not take size {size} and "
                              f"areas {desc:#x}/{driver:#x}/{device:#x} (reads {got})")
        self._notify_offsets[index] = self._notify_offset(index)
        c.write(CommonCfg.QUEUE_ENABLE, 1)
        if c.read(CommonCfg.QUEUE_ENABLE) != 1:
            raise DeviceError(f"{self.bdf}: queue {index} did not enable")

    def _notify_offset(self, index: int) -> int:
        """"Notification structure layout": cap.offset + queue_notify_off *
        notify_off_multiplier, within the notify structure."""
        off = self.common.read(CommonCfg.QUEUE_NOTIFY_OFF) * self.notify_multiplier
        if off + 2 > self.notify.length:
            raise DeviceError(f"{self.bdf}: queue {index} notify offset {off:#x} is past "
                              f"the notify structure ({self.notify.length:#x} bytes)")
        return off

    def notifier(self, index: int) -> Callable[[], None]:
        """The kick: the queue's index written (le16) at its notify address."""
        off = self._notify_offsets.get(index)
        if off is None:
            self._select(index)
            off = self._notify_offset(index)
        return self.notify.poker_at(off, 2, index)

    def set_config_vector(self, vector: int) -> int:
        """config_msix_vector, read back ("MSI-X Vector Configuration": a device that
        cannot map the vector reads VIRTIO_MSI_NO_VECTOR)."""
        self.common.write(CommonCfg.CONFIG_MSIX_VECTOR, vector)
        return self.common.read(CommonCfg.CONFIG_MSIX_VECTOR)

    def set_queue_vector(self, index: int, vector: int) -> int:
        """queue_msix_vector of queue ``index``, read back as ``set_config_vector``."""
        self.common.write(CommonCfg.QUEUE_SELECT, index)
        self.common.write(CommonCfg.QUEUE_MSIX_VECTOR, vector)
        return self.common.read(CommonCfg.QUEUE_MSIX_VECTOR)

    def isr(self) -> IsrBit:
        return IsrBit(self.isr_window.read_at(0, 1) & (IsrBit.QUEUE | IsrBit.CONFIG))

    # -- device config ------------------------------------------------------------
    def read_config(self, dtype: np.dtype = BLK_CONFIG_DTYPE) -> np.void:
        """The device-specific config, consistent: config_generation read before and
        after must agree ("Device Configuration Space"). Fields beyond the structure's
        length read as 0 (the device has no such field)."""
        n = min(dtype.itemsize, self.device_cfg.length)
        for _ in range(CONFIG_RETRIES):
            before = self.common.read(CommonCfg.CONFIG_GENERATION)
            raw = b"".join(self.device_cfg.read_at(off, w).to_bytes(w, "little")
                           for off, w in _steps(n))
            if self.common.read(CommonCfg.CONFIG_GENERATION) == before:
                record: np.void = np.frombuffer(raw.ljust(dtype.itemsize, b"\0"), dtype)[0]
                return record
        raise DeviceError(f"{self.bdf}: device config keeps changing "
                          f"(config_generation moved {CONFIG_RETRIES} times)")


def _steps(n: int) -> list[tuple[int, int]]:
    """(offset, width) reads covering ``n`` bytes: 4 bytes at a time, then single bytes."""
    whole = n - n % 4
    return [(off, 4) for off in range(0, whole, 4)] + [(off, 1) for off in range(whole, n)]


def _cap_name(name: str) -> str:
    return next(t.name for t, n in _WANTED.items() if n == name)
