"""A modern (virtio 1.x) PCI face on the legacy device model, for unit tests: a PCI
config space holding the virtio vendor capabilities, and one memory BAR with the common,
ISR, device-config and notify structures where QEMU 7.2 puts them. The requests are
served by ``FakeBlkDevice`` from the same ring memory.

Tests break things on purpose: ``caps`` (rebuild with ``build_config``) or the bytes of
``config.data`` for malformed capability lists; ``refuse_features_ok``,
``unstable_config`` and ``max_queue_size=0`` for a device that will not cooperate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from virtio_user.errors import DeviceError
from virtio_user.spec import (PCI_CAP_ID_VNDR, PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST,
                    VIRTIO_PCI_MODERN_BLK, VIRTIO_PCI_VENDOR, CommonCfg, Feature, LegacyReg,
                    PciCapType, Status)
from virtio_user.ring.split import legacy_layout
from fake_device import FakeBackend, FakeBlkDevice, FakeConfigSpace

BAR = 4
COMMON, ISR, DEVICE, NOTIFY = 0x0, 0x1000, 0x2000, 0x3000
BAR_SIZE = 0x4000
NOTIFY_MULTIPLIER = 4
FIRST_CAP = 0x40
CAP_STRIDE = 0x18  # room for the 20-byte notify capability, 4-byte aligned
_PCI_CAP_ID_MSIX = 0x11


@dataclass(frozen=True)
class CapSpec:
    """What a test wants written as one capability."""

    cfg_type: int
    bar: int = BAR
    offset: int = 0
    length: int = 0x1000
    multiplier: int = 0
    cap_len: int | None = None  # default: 16, or 20 for notify
    vendor: int = PCI_CAP_ID_VNDR


def default_caps() -> list[CapSpec]:
    """An MSI-X capability first (to be skipped), then the four structures QEMU offers."""
    return [CapSpec(0, vendor=_PCI_CAP_ID_MSIX),
            CapSpec(PciCapType.VIRTIO_PCI_CAP_COMMON_CFG, offset=COMMON),
            CapSpec(PciCapType.VIRTIO_PCI_CAP_ISR_CFG, offset=ISR),
            CapSpec(PciCapType.VIRTIO_PCI_CAP_DEVICE_CFG, offset=DEVICE),
            CapSpec(PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG, offset=NOTIFY,
                    multiplier=NOTIFY_MULTIPLIER)]


def build_config(caps: list[CapSpec], device_id: int = VIRTIO_PCI_MODERN_BLK) -> FakeConfigSpace:
    """A config space with ``caps`` chained from the capabilities pointer."""
    cfg = FakeConfigSpace()
    cfg.write_at(0, 2, VIRTIO_PCI_VENDOR)
    cfg.write_at(2, 2, device_id)
    cfg.write_at(PCI_STATUS, 2, PCI_STATUS_CAP_LIST if caps else 0)
    cfg.write_at(PCI_CAPABILITY_LIST, 1, FIRST_CAP if caps else 0)
    for i, cap in enumerate(caps):
        at = FIRST_CAP + i * CAP_STRIDE
        nxt = at + CAP_STRIDE if i + 1 < len(caps) else 0
        notify = cap.cfg_type == PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG
        cap_len = cap.cap_len if cap.cap_len is not None else (20 if notify else 16)
        for off, width, value in ((0, 1, cap.vendor), (1, 1, nxt), (2, 1, cap_len),
                                  (3, 1, cap.cfg_type), (4, 1, cap.bar),
                                  (8, 4, cap.offset), (12, 4, cap.length),
                                  (16, 4, cap.multiplier)):
            cfg.write_at(at + off, width, value)
    return cfg


@dataclass
class _Queue:
    size: int
    desc: int = 0
    driver: int = 0
    device: int = 0
    enable: int = 0


class FakeModernDevice:
    """The modern register protocol in front of a FakeBlkDevice (its ``blk``)."""

    def __init__(self, blk: FakeBlkDevice | None = None, *, num_queues: int | None = None,
                 max_queue_size: int | None = None,
                 extra_features: int = Feature.VIRTIO_F_VERSION_1,
                 caps: list[CapSpec] | None = None,
                 device_id: int = VIRTIO_PCI_MODERN_BLK) -> None:
        self.blk = blk or FakeBlkDevice()
        self.blk.host_features |= int(extra_features)
        self.max_queue_size = (self.blk.queue_size_reported if max_queue_size is None
                               else max_queue_size)
        # The block model serves as many queues as it has; the register block may
        # pretend to more (then their notifies go nowhere).
        self.num_queues = self.blk.num_queues if num_queues is None else num_queues
        self.config = build_config(default_caps() if caps is None else caps, device_id)
        self.device_id = device_id
        self.refuse_features_ok = False
        self.unstable_config = False
        self.generation = 0
        self.notify_offsets: list[int] = []
        self.reset()

    def reset(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.queues = [_Queue(self.max_queue_size) for _ in range(self.num_queues)]

    # -- the BAR --------------------------------------------------------------------
    def read_at(self, offset: int, width: int) -> int:
        if NOTIFY <= offset:
            return 0
        if DEVICE <= offset:
            if self.unstable_config:
                self.generation += 1
            raw = self.blk.config.tobytes() + b"\0" * 8
            start = offset - DEVICE
            return int.from_bytes(raw[start:start + width], "little")
        if ISR <= offset:
            return self.blk.read(LegacyReg.ISR_STATUS)
        return self._common_read(offset, width)

    def write_at(self, offset: int, width: int, value: int) -> None:
        if NOTIFY <= offset:
            self.notify_offsets.append(offset - NOTIFY)
            assert width == 2, "notify is a 16-bit write"
            assert (offset - NOTIFY) == value * NOTIFY_MULTIPLIER, "notify at the wrong address"
            self.blk.write(LegacyReg.QUEUE_NOTIFY, value)
        elif offset < ISR:
            self._common_write(offset, width, value)
        else:
            raise AssertionError(f"write to read-only BAR offset {offset:#x}")

    def _queue(self) -> _Queue | None:
        return self.queues[self.queue_select] if self.queue_select < self.num_queues else None

    def _common_read(self, offset: int, width: int) -> int:
        q = self._queue()
        c = CommonCfg
        words = {c.QUEUE_DESC.offset: "desc", c.QUEUE_DRIVER.offset: "driver",
                 c.QUEUE_DEVICE.offset: "device"}
        for base, name in words.items():
            if base <= offset < base + 8:
                assert width == 4, "64-bit queue addresses go as two 32-bit halves"
                return (getattr(q, name) >> (8 * (offset - base))) & 0xFFFF_FFFF if q else 0
        value = {
            c.DEVICE_FEATURE_SELECT.offset: self.device_feature_select,
            c.DEVICE_FEATURE.offset: (self.blk.host_features >> (32 * self.device_feature_select)
                                      & 0xFFFF_FFFF) if self.device_feature_select < 2 else 0,
            c.DRIVER_FEATURE_SELECT.offset: self.driver_feature_select,
            c.DRIVER_FEATURE.offset: (self.driver_features >> (32 * self.driver_feature_select)
                                      & 0xFFFF_FFFF),
            c.CONFIG_MSIX_VECTOR.offset: 0xFFFF,
            c.NUM_QUEUES.offset: self.num_queues,
            c.DEVICE_STATUS.offset: self.blk.status,
            c.CONFIG_GENERATION.offset: self.generation & 0xFF,
            c.QUEUE_SELECT.offset: self.queue_select,
            c.QUEUE_SIZE.offset: q.size if q else 0,
            c.QUEUE_MSIX_VECTOR.offset: 0xFFFF,
            c.QUEUE_ENABLE.offset: q.enable if q else 0,
            c.QUEUE_NOTIFY_OFF.offset: self.queue_select,
        }.get(offset, 0)
        return value

    def _common_write(self, offset: int, width: int, value: int) -> None:
        c = CommonCfg
        q = self._queue()
        for name, reg in (("desc", c.QUEUE_DESC), ("driver", c.QUEUE_DRIVER),
                          ("device", c.QUEUE_DEVICE)):
            if reg.offset <= offset < reg.offset + 8 and q is not None:
                shift = 8 * (offset - reg.offset)
                old = getattr(q, name)
                setattr(q, name, old & ~(0xFFFF_FFFF << shift) | value << shift)
                return
        if offset == c.DEVICE_STATUS.offset:
            self._status(value)
        elif offset == c.DEVICE_FEATURE_SELECT.offset:
            self.device_feature_select = value
        elif offset == c.DRIVER_FEATURE_SELECT.offset:
            self.driver_feature_select = value
        elif offset == c.DRIVER_FEATURE.offset and self.driver_feature_select < 2:
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)
                                    | value << shift)
        elif offset == c.QUEUE_SELECT.offset:
            self.queue_select = value
        elif offset == c.QUEUE_SIZE.offset and q is not None:
            q.size = value
        elif offset == c.QUEUE_ENABLE.offset and q is not None and value == 1:
            self._enable(q)

    def _status(self, value: int) -> None:
        if value == 0:
            self.blk.write(LegacyReg.DEVICE_STATUS, 0)
            self.reset()
            return
        if value & Status.FEATURES_OK and not self.blk.status & Status.FEATURES_OK:
            assert not self.driver_features & ~self.blk.host_features, \
                "driver accepted a feature not offered"
            if self.refuse_features_ok:
                value &= ~Status.FEATURES_OK
            else:
                self.blk.guest_features = self.driver_features
        self.blk.write(LegacyReg.DEVICE_STATUS, value)

    def _enable(self, q: _Queue) -> None:
        """The legacy model serves rings laid out as legacy ones: check that layout."""
        lay = legacy_layout(q.size)
        assert q.driver == q.desc + lay.avail and q.device == q.desc + lay.used, \
            "the fake serves only the legacy layout"
        assert self.blk.status & Status.FEATURES_OK, "queue enabled before FEATURES_OK"
        self.blk.queue_size_reported = q.size
        self.blk.set_queue_pfn(self.queue_select, q.desc >> 12)
        self.blk.log.append(f"enable queue {self.queue_select} size {q.size} desc {q.desc:#x}")
        q.enable = 1


class FakeBar:
    """The fake device's BAR as register memory (what ``Backend.bar`` returns)."""

    def __init__(self, device: FakeModernDevice, size: int = BAR_SIZE) -> None:
        self.device = device
        self.size = size
        self.what = f"fake BAR{BAR}"

    def read_at(self, offset: int, width: int) -> int:
        assert 0 <= offset and offset + width <= self.size and offset % width == 0
        return self.device.read_at(offset, width)

    def write_at(self, offset: int, width: int, value: int) -> None:
        assert 0 <= offset and offset + width <= self.size and offset % width == 0
        self.device.write_at(offset, width, value)

    def poker_at(self, offset: int, width: int, value: int) -> Callable[[], None]:
        return lambda: self.write_at(offset, width, value)

    def close(self) -> None:
        pass


class FakeModernBackend(FakeBackend):
    """FakeBackend for a modern device: config space with capabilities, BAR 4, and, with
    ``can_translate``, DMA at made-up IOVAs (one contiguous run per region)."""

    def __init__(self, modern: FakeModernDevice | None = None, *, can_translate: bool = False,
                 contiguous: int = 64 << 10) -> None:
        self.modern = modern or FakeModernDevice()
        super().__init__(self.modern.blk, contiguous=contiguous)
        self.device_id = self.modern.device_id
        self.config = self.modern.config
        self.can_translate = can_translate
        self.bars: dict[int, FakeBar] = {}

    def bar(self, index: int) -> FakeBar:  # type: ignore[override]
        if index != BAR:
            raise DeviceError(f"{self.bdf} BAR{index} is not implemented by the device")
        return self.bars.setdefault(index, FakeBar(self.modern))

    def enable_translation(self) -> None:
        self.translating = True
        self.contiguous = 1 << 30  # an IOVA range per region: bus-contiguous
