"""The vfio backend's error paths, on fakes of the ioctls and of sysfs: what a failed
set-up leaves behind (issue 22's suspicions)."""

from __future__ import annotations

from typing import Any

import pytest

from virtio_user import pci
from virtio_user.errors import DeviceBusy, DmaError
from virtio_user.memory import HUGEPAGE
from virtio_user.transport import pci_backend, vfio


class Region:
    """A DmaRegion of three physically separate runs."""

    vaddr = 0x7F00_0000_0000
    size = 3 * HUGEPAGE

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def runs(self) -> list[tuple[int, int, int]]:
        return [(i * HUGEPAGE, (i + 1) << 32, HUGEPAGE) for i in range(3)]

    def close(self) -> None:
        self.events.append("region closed")


def test_a_failed_mapping_unmaps_the_runs_mapped_before_it(monkeypatch: Any) -> None:
    """The third run cannot be mapped: the first two must leave the IOMMU then (they pin
    the region's pages), before the region is unmapped, not at close()."""
    events: list[Any] = []
    monkeypatch.setattr(vfio.DmaRegion, "hugepages", staticmethod(lambda size: Region(events)))

    def map_dma(container: int, vaddr: int, iova: int, size: int) -> None:
        if iova == 3 << 32:
            raise OSError(28, "No space left on device")
        events.append(("map", iova))
    monkeypatch.setattr(vfio.ioctl, "map_dma", map_dma)
    monkeypatch.setattr(vfio.ioctl, "unmap_dma",
                        lambda container, iova, size: events.append(("unmap", iova)))
    device = vfio.VfioDevice.__new__(vfio.VfioDevice)
    device.bdf, device.container, device.reserved = "0000:00:10.0", 7, []
    device.mappings = [(0x1000_0000, HUGEPAGE)]  # an earlier region's: it stays
    backend = vfio.VfioBackend.__new__(vfio.VfioBackend)
    backend.vfio, backend.translating = device, False
    with pytest.raises(DmaError, match="No space left"):
        backend.alloc_dma(3 * HUGEPAGE)
    assert events == [("map", 1 << 32), ("map", 2 << 32), ("unmap", 2 << 32),
                      ("unmap", 1 << 32), "region closed"]
    assert device.mappings == [(0x1000_0000, HUGEPAGE)]


def test_rebind_leaves_alone_a_device_another_process_holds(monkeypatch: Any) -> None:
    """--rebind, and the device is already bound to vfio-pci with its IOMMU group open in
    another process: opening fails (busy), and close() must not unbind it from under
    that process (vfio-pci's remove would wait for it to let go)."""
    released: list[str] = []
    monkeypatch.setattr(pci, "release", lambda dev, driver: released.append(driver))
    monkeypatch.setattr(pci_backend.PciBackend, "_lock", lambda self: None)
    monkeypatch.setattr(vfio.VfioBackend, "_preflight", lambda self: None)

    def busy(self: Any) -> Any:
        raise DeviceBusy(f"{self.bdf} is in use: another process has its IOMMU group 5 open")
    monkeypatch.setattr(vfio.VfioBackend, "_open_config", busy)
    monkeypatch.setattr(pci.PciDevice, "driver", property(lambda self: "vfio-pci"))
    dev = pci.PciDevice("0000:00:10.0", 0x1AF4, 0x1001, 2)
    with pytest.raises(DeviceBusy):
        vfio.VfioBackend(dev, rebind=True)
    assert released == [], "the device was unbound from under its owner"
