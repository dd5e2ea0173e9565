"""The modern (virtio 1.x) PCI transport against a fake config space and BAR: the
capability walk and its malformed cases, the handshake, queues, and VirtioBlk on top."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import pytest

from virtio_user import cli
from virtio_user.blk import VirtioBlk
from virtio_user.errors import DeviceError, Unsupported, exit_code
from virtio_user.spec import (VIRTIO_PCI_LEGACY_BLK, Feature, PciCapType, feature_names)
from virtio_user.transport import initialize, open_transport
from fake_device import FakeBackend, FakeBlkDevice
from fake_modern import (BAR, BAR_SIZE, CAP_STRIDE, DEVICE, FIRST_CAP,
                                               ISR, NOTIFY, NOTIFY_MULTIPLIER, CapSpec,
                                               FakeModernBackend, FakeModernDevice,
                                               build_config, default_caps)
from virtio_user.transport.legacy import LegacyTransport
from virtio_user.transport.modern import ModernTransport, find_capabilities

SECTOR = 512
BDF = "0000:00:10.0"
COMMON_T, NOTIFY_T, ISR_T, DEVICE_T = (PciCapType.VIRTIO_PCI_CAP_COMMON_CFG,
                                       PciCapType.VIRTIO_PCI_CAP_NOTIFY_CFG,
                                       PciCapType.VIRTIO_PCI_CAP_ISR_CFG,
                                       PciCapType.VIRTIO_PCI_CAP_DEVICE_CFG)


@pytest.fixture
def opened() -> Any:
    devices: list[VirtioBlk] = []
    yield devices
    for blk in devices:
        blk.close()


def open_blk(opened: list[VirtioBlk], backend: FakeBackend, **kwargs: Any) -> VirtioBlk:
    blk = VirtioBlk(backend, timeout=0.2, **kwargs)
    opened.append(blk)
    return blk


def with_caps(caps: list[CapSpec], **kwargs: Any) -> FakeModernBackend:
    return FakeModernBackend(FakeModernDevice(caps=caps, **kwargs))


def statuses(dev: FakeBlkDevice) -> list[int]:
    return [int(e.split()[1], 16) for e in dev.log if e.startswith("status ")]


# -- the capability walk ----------------------------------------------------------------

def test_walk_finds_each_structure_and_skips_other_capabilities() -> None:
    caps = find_capabilities(build_config(default_caps()), BDF)
    assert caps.common is not None and caps.notify is not None
    assert caps.isr is not None and caps.device is not None
    assert (caps.common.bar, caps.common.offset, caps.common.length) == (BAR, 0, 0x1000)
    assert (caps.isr.offset, caps.device.offset, caps.notify.offset) == (ISR, DEVICE, NOTIFY)
    assert caps.notify.notify_off_multiplier == NOTIFY_MULTIPLIER
    assert caps.common.at == FIRST_CAP + CAP_STRIDE  # the MSI-X capability came first
    assert not caps.ignored


def test_the_first_capability_of_a_type_wins() -> None:
    second_common = CapSpec(COMMON_T, offset=0x800, length=0x100)
    caps = find_capabilities(build_config(default_caps() + [second_common]), BDF)
    assert caps.common is not None and caps.common.offset == 0


def test_no_capability_list_is_the_legacy_interface() -> None:
    backend = FakeBackend()
    assert not find_capabilities(backend.config, BDF).present
    assert isinstance(open_transport(backend), LegacyTransport)
    with pytest.raises(Unsupported, match="no modern virtio interface"):
        open_transport(backend, "modern")


def test_a_loop_in_the_capability_list_is_a_device_error() -> None:
    cfg = build_config(default_caps())
    last = FIRST_CAP + (len(default_caps()) - 1) * CAP_STRIDE
    cfg.data[last + 1] = FIRST_CAP + CAP_STRIDE  # back to the second capability
    with pytest.raises(DeviceError, match="capability list loops"):
        find_capabilities(cfg, BDF)


def test_a_capability_pointing_at_itself_is_a_loop() -> None:
    cfg = build_config(default_caps())
    cfg.data[FIRST_CAP + 1] = FIRST_CAP
    with pytest.raises(DeviceError, match="loops"):
        find_capabilities(cfg, BDF)


@pytest.mark.parametrize("pointer", [0x10, 0x3C])
def test_a_pointer_outside_the_capability_area_is_a_device_error(pointer: int) -> None:
    cfg = build_config(default_caps())
    cfg.data[FIRST_CAP + 1] = pointer
    with pytest.raises(DeviceError, match=f"pointer {pointer & ~3:#x} is outside"):
        find_capabilities(cfg, BDF)


def test_a_truncated_capability_is_a_device_error() -> None:
    caps = default_caps()
    caps[4] = replace(caps[4], cap_len=16)  # notify without its multiplier
    with pytest.raises(DeviceError, match="NOTIFY_CFG capability at config .* is 16 bytes, "
                                          "needs 20"):
        find_capabilities(build_config(caps), BDF)


def test_a_bar_index_above_5_is_ignored_and_named_in_the_error() -> None:
    caps = default_caps()
    caps[1] = replace(caps[1], bar=7)
    backend = with_caps(caps)
    found = find_capabilities(backend.config, BDF)
    assert found.common is None and "BAR index 7 is reserved" in found.ignored[0]
    with pytest.raises(DeviceError, match="lacks the required common capability.*BAR index 7"):
        open_transport(backend)


@pytest.mark.parametrize("missing", [COMMON_T, NOTIFY_T, ISR_T, DEVICE_T])
def test_a_missing_required_capability_is_a_device_error(missing: int) -> None:
    caps = [c for c in default_caps() if c.cfg_type != missing]
    name = PciCapType(missing).name
    with pytest.raises(DeviceError, match=f"lacks the required .* capability \\({name}\\)"):
        open_transport(with_caps(caps))


@pytest.mark.parametrize("index,spec", [
    (4, CapSpec(NOTIFY_T, offset=NOTIFY, length=0x2000, multiplier=4)),
    (2, CapSpec(ISR_T, offset=BAR_SIZE, length=1)),
    (1, CapSpec(COMMON_T, offset=0xFFFF_FFF0, length=0x40)),
])
def test_a_structure_past_the_end_of_its_bar_is_a_device_error(index: int, spec: CapSpec) -> None:
    caps = default_caps()
    caps[index] = spec
    with pytest.raises(DeviceError, match="runs past the end of BAR 4"):
        open_transport(with_caps(caps))


def test_a_bar_the_device_does_not_implement_is_a_device_error() -> None:
    caps = default_caps()
    caps[3] = replace(caps[3], bar=2)
    with pytest.raises(DeviceError, match="BAR2 is not implemented"):
        open_transport(with_caps(caps))


def test_a_short_common_structure_is_a_device_error() -> None:
    caps = default_caps()
    caps[1] = replace(caps[1], length=0x20)
    with pytest.raises(DeviceError, match="shorter than the 56 bytes"):
        open_transport(with_caps(caps))


def test_an_odd_notify_multiplier_is_a_device_error() -> None:
    caps = default_caps()
    caps[4] = replace(caps[4], multiplier=3)
    with pytest.raises(DeviceError, match="notify_off_multiplier 3"):
        open_transport(with_caps(caps))


# -- handshake and features -------------------------------------------------------------

def test_modern_device_reads_writes_and_flushes(opened: list[VirtioBlk]) -> None:
    backend = FakeModernBackend()
    blk = open_blk(opened, backend)
    data = os.urandom(40 * SECTOR)
    blk.write(100, data)
    blk.flush()
    assert backend.device.disk[100 * SECTOR:140 * SECTOR] == data
    assert blk.read(100, 40) == data
    info = blk.info()
    assert info["transport"] == "modern" and info["iommu"] is False
    assert "VIRTIO_F_VERSION_1" in info["features_negotiated"]
    assert backend.modern.notify_offsets and set(backend.modern.notify_offsets) == {0}


def test_handshake_order_is_the_specs() -> None:
    """"Device Initialization": reset, ACKNOWLEDGE, DRIVER, FEATURES_OK (then the queue
    is enabled), DRIVER_OK."""
    backend = FakeModernBackend()
    blk = VirtioBlk(backend)
    try:
        log = backend.device.log
        enable = next(i for i, e in enumerate(log) if e.startswith("enable queue 0"))
        assert statuses(backend.device)[:5] == [0, 0x1, 0x3, 0xB, 0xF]
        assert log.index("status 0xb") < enable < log.index("status 0xf")
    finally:
        blk.close()
    assert backend.device.status == 0


def test_no_version_1_is_a_device_error_and_the_device_gets_failed() -> None:
    backend = FakeModernBackend(FakeModernDevice(extra_features=0))
    with pytest.raises(DeviceError, match="does not offer VIRTIO_F_VERSION_1"):
        VirtioBlk(backend)
    assert 0x83 in statuses(backend.device)  # ACKNOWLEDGE | DRIVER | FAILED
    assert backend.device.status == 0 and backend.closed


def test_features_ok_not_accepted_is_unsupported() -> None:
    modern = FakeModernDevice()
    modern.refuse_features_ok = True
    backend = FakeModernBackend(modern)
    with pytest.raises(Unsupported, match="FEATURES_OK reads back clear") as err:
        VirtioBlk(backend)
    assert exit_code(err.value) == 5
    assert any(s & 0x80 for s in statuses(backend.device))
    assert not any(e.startswith("enable") for e in backend.device.log)


def test_a_queue_that_does_not_exist_is_a_clear_error() -> None:
    """QEMU's virtio-blk qtest "nxvirtq": select a queue past the last one."""
    t = open_transport(FakeModernBackend())
    assert isinstance(t, ModernTransport)

    def set_up(features: int) -> None:
        assert t.queue_size(1) == 0
        t.setup_queue(1, 256, 0x10000, 0x11000, 0x12000)
    with pytest.raises(DeviceError, match="queue 1 does not exist"):
        initialize(t, 0, set_up)


def test_queue_size_0_is_a_clear_error() -> None:
    backend = FakeModernBackend(FakeModernDevice(max_queue_size=0))
    with pytest.raises(DeviceError, match="reports no queue 0"):
        VirtioBlk(backend)


def test_a_maximum_that_is_not_a_power_of_2_gives_the_power_of_2_below(
        opened: list[VirtioBlk]) -> None:
    blk = open_blk(opened, FakeModernBackend(FakeModernDevice(max_queue_size=1000)))
    assert blk.queue_size == 512
    blk.write(0, b"p" * SECTOR)
    assert blk.read(0, 1) == b"p" * SECTOR


def test_device_config_is_read_under_config_generation() -> None:
    modern = FakeModernDevice(FakeBlkDevice(capacity=4096))
    t = open_transport(FakeModernBackend(modern))
    assert int(t.read_config()["capacity"]) == 4096
    modern.unstable_config = True
    with pytest.raises(DeviceError, match="config keeps changing"):
        t.read_config()


def test_a_short_device_config_reads_missing_fields_as_0() -> None:
    caps = default_caps()
    caps[3] = replace(caps[3], length=21)  # up to blk_size's first byte
    t = open_transport(with_caps(caps))
    cfg = t.read_config()
    assert int(cfg["capacity"]) == 2048 and int(cfg["max_discard_sectors"]) == 0


def test_access_platform_needs_a_backend_that_can_translate() -> None:
    modern = FakeModernDevice(extra_features=Feature.VIRTIO_F_VERSION_1
                              | Feature.VIRTIO_F_ACCESS_PLATFORM)
    backend = FakeModernBackend(modern)
    with pytest.raises(Unsupported, match="VIRTIO_F_ACCESS_PLATFORM .*use --backend vfio"):
        VirtioBlk(backend)
    assert backend.device.status == 0


def test_access_platform_is_negotiated_and_dma_is_translated(opened: list[VirtioBlk]) -> None:
    modern = FakeModernDevice(extra_features=Feature.VIRTIO_F_VERSION_1
                              | Feature.VIRTIO_F_ACCESS_PLATFORM)
    blk = open_blk(opened, FakeModernBackend(modern, can_translate=True))
    info = blk.info()
    assert info["iommu"] is True
    assert "VIRTIO_F_ACCESS_PLATFORM" in info["features_negotiated"]
    data = os.urandom(300 * SECTOR)
    blk.write(5, data)
    assert blk.read(5, 300) == data


# -- choosing the transport ------------------------------------------------------------

def test_legacy_on_a_modern_only_device_is_unsupported() -> None:
    with pytest.raises(Unsupported, match="modern-only .* use --transport modern"):
        open_transport(FakeModernBackend(), "legacy")


@pytest.mark.parametrize("choice,kind", [("legacy", "legacy"), ("modern", "modern"),
                                         ("auto", "modern")])
def test_a_transitional_device_can_be_driven_either_way(opened: list[VirtioBlk], choice: str,
                                                        kind: str) -> None:
    backend = FakeModernBackend(FakeModernDevice(device_id=VIRTIO_PCI_LEGACY_BLK))
    blk = open_blk(opened, backend, transport=choice)
    assert blk.transport.kind == kind
    blk.write(7, b"t" * SECTOR * 3)
    assert backend.device.disk[7 * SECTOR:10 * SECTOR] == b"t" * SECTOR * 3
    assert ("VIRTIO_F_VERSION_1" in blk.info()["features_negotiated"]) == (kind == "modern")


def test_feature_names_cover_the_high_bits() -> None:
    bits = (Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_F_ACCESS_PLATFORM
            | Feature.VIRTIO_F_RING_PACKED | 1 << 50)
    assert feature_names(bits) == ["VIRTIO_F_VERSION_1", "VIRTIO_F_ACCESS_PLATFORM",
                                   "VIRTIO_F_RING_PACKED", "bit 50"]


def test_cli_transport_option(capsys: Any) -> None:
    def opener(args: Any) -> VirtioBlk:
        return VirtioBlk(FakeModernBackend(), transport=args.transport)
    assert cli.main(["--transport", "legacy", "info"], opener=opener) == 5
    assert "modern-only" in capsys.readouterr().err
    assert cli.main(["--transport", "modern", "info", "--json"], opener=opener) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["transport"] == "modern" and info["iommu"] is False
    assert cli.main(["--transport", "modern", "info"], opener=opener) == 0
    text = capsys.readouterr().out
    assert "transport" in text and "modern" in text and "VIRTIO_F_VERSION_1" in text


def test_legacy_on_a_modern_only_device_is_refused_before_binding(capsys: Any,
                                                                   monkeypatch: Any) -> None:
    from virtio_user import pci
    modern = pci.PciDevice("0000:00:10.0", 0x1AF4, 0x1042, 0x1102)
    monkeypatch.setattr(pci, "list_devices", lambda: [modern])

    def no_bind(*args: Any) -> None:
        raise AssertionError("the device was taken from its driver")
    monkeypatch.setattr(pci, "bind", no_bind)
    assert cli.main(["--transport", "legacy", "info"]) == 5
    assert "0000:00:10.0 (device 0x1042) is a modern-only" in capsys.readouterr().err


def test_translated_dma_goes_to_a_compact_range_around_reserved_regions() -> None:
    from virtio_user.transport.vfio import IOVA_BASE, VfioDevice
    dev = VfioDevice.__new__(VfioDevice)
    dev.reserved = [(IOVA_BASE + 0x300000, IOVA_BASE + 0x3FFFFF, "reserved"),
                    (0xFEE00000, 0xFEEFFFFF, "msi")]
    dev._next_iova = IOVA_BASE
    first = dev.alloc_iova(2 << 20)
    second = dev.alloc_iova(4 << 20)  # would overlap the reserved range: moved past it
    assert first == IOVA_BASE
    assert second == IOVA_BASE + (4 << 20)
    assert dev.alloc_iova(2 << 20) == IOVA_BASE + (8 << 20)
