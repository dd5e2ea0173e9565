"""Errors a vfio user meets, each exit 15 with a clear message. The driver's
functional tests run on vfio too, in test_device.py; these are the vfio-only failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from images import make_image
from virtio_user.host import CommandResult, Disk, GuestSession

pytestmark = pytest.mark.qemu

ALONE = "0000:00:10.0"
# Two disks behind a PCIe-to-PCI bridge share one IOMMU group.
BRIDGED = ("0000:01:01.0", "0000:01:02.0")
HOLD_GROUP = """
import os, sys, time
group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{sys.argv[1]}/iommu_group"))
fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
print("holding", group, flush=True)
time.sleep(120)
"""


def vu(vm: GuestSession, bdf: str, *args: str) -> CommandResult:
    return vm.run(["virtio-user", "--backend", "vfio", "--device", bdf, *args])


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("vfio")
    disks = [Disk(make_image(d / "alone.raw", 8))] + [
        Disk(make_image(d / f"bridged{i}.raw", 8), extra={"bus": "br0", "addr": hex(i)})
        for i in (1, 2)]
    bridge = ["-device", "pcie-pci-bridge,id=br0,bus=pcie.0,addr=0x1e"]
    with GuestSession(disks, backend="vfio", cwd=d, qemu_args=bridge,
                      warm_start=True) as session:
        yield session


def test_vfio_works_on_a_device_alone_in_its_group(vm: GuestSession) -> None:
    r = vu(vm, ALONE, "info")
    assert r.status == 0, r.err
    assert "vfio" in r.out


def test_group_shared_with_a_device_bound_elsewhere(vm: GuestSession) -> None:
    r = vu(vm, BRIDGED[0], "info")
    assert r.status == 15, r.err
    assert "shared with devices bound to other drivers" in r.err
    assert BRIDGED[1] in r.err and "virtio-pci" in r.err


def test_device_already_open(vm: GuestSession) -> None:
    holder = vm.spawn(["python", "-c", HOLD_GROUP, ALONE])
    holder.wait_output(b"holding")
    try:
        r = vu(vm, ALONE, "info")
        assert r.status == 15, r.err
        assert "in use" in r.err
    finally:
        holder.signal(9)
        holder.wait(timeout=30)
    assert vu(vm, ALONE, "info").status == 0


def test_vfio_modules_missing(vm: GuestSession) -> None:
    """Last in this module: the guest cannot load the modules again."""
    assert vm.run(f"echo {ALONE} > /sys/bus/pci/devices/{ALONE}/driver/unbind").status == 0
    r = vm.run("busybox rmmod vfio_pci && busybox rmmod vfio_pci_core")
    assert r.status == 0, r.err
    r = vu(vm, ALONE, "info")
    assert r.status == 15, r.err
    assert "vfio-pci is not loaded" in r.err
    assert vm.run(f"readlink /sys/bus/pci/devices/{ALONE}/driver").status != 0  # untouched


def test_no_iommu_in_the_guest(tmp_path: Path) -> None:
    with GuestSession([Disk(make_image(tmp_path / "d.raw", 8))], cwd=tmp_path,
                      warm_start=True) as uio_vm:
        r = vu(uio_vm, ALONE, "info")
        driver = uio_vm.run(f"readlink /sys/bus/pci/devices/{ALONE}/driver").out
    assert r.status == 15, r.err
    assert "no IOMMU" in r.err
    assert driver.strip().endswith("virtio-pci")  # left with the kernel, not half-bound
