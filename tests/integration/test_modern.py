"""The modern (virtio 1.x) transport against QEMU's real virtio-blk: modern-only and
transitional devices, on uio and on vfio, and real DMA isolation through the emulated
IOMMU with VIRTIO_F_ACCESS_PLATFORM (``iommu_platform=on``).

The lab guest (tests/lab.py) holds the devices; both backends drive them. The image files
on the host are the oracle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from images import make_image
from lab import Bay
from virtio_user.host import CommandResult, Disk, GuestSession

pytestmark = pytest.mark.qemu

SECTOR = 512
MODERN = {"disable-legacy": "on", "disable-modern": "off"}
TRANSITIONAL = {"disable-legacy": "off", "disable-modern": "off"}
ISOLATED = {**MODERN, "iommu_platform": "on"}
PATTERN = b"modern transport host pattern\n"

NXVIRTQ = """
import sys
from virtio_user.blk import VirtioBlk
from virtio_user.errors import DeviceError
from virtio_user.transport import initialize, open_backend, open_transport
backend_name, bdf, kind = sys.argv[1:]
backend = open_backend(backend_name, bdf, transport=kind)
try:
    t = open_transport(backend, kind)
    def set_up(features):
        print("queue 64 size", t.queue_size(64))
        t.setup_queue(64, 256, 0x100000, 0x101000, 0x102000)
    try:
        initialize(t, 0, set_up)
    except DeviceError as exc:
        print("error:", exc)
    t.reset()
finally:
    backend.close()
with VirtioBlk.open(bdf, backend=backend_name, transport=kind) as dev:
    print("then", dev.transport.kind, dev.read(0, 1)[:8].hex())
"""

# Point the data descriptor of a request at an address the IOMMU does not map: the
# physical address of our own buffer, which a device without isolation would reach.
UNMAPPED = """
import sys
from virtio_user.blk import VirtioBlk
from virtio_user.spec import BLK_OUTHDR, ReqType
bdf, rtype = sys.argv[1], ReqType[sys.argv[2]]
with VirtioBlk.open(bdf, backend="vfio", transport="modern") as dev:
    assert dev.transport.iommu
    target = dev.alloc_buffer(4096)
    target.mv[:] = b"S" * 4096
    phys = target.chunk.region.physical(target.chunk.offset)
    assert phys != target.chunk.bus
    ctl = dev.alloc_buffer(4096)
    BLK_OUTHDR.pack_into(ctl.mv, 0, rtype, 0, 8)
    writes = rtype == ReqType.VIRTIO_BLK_T_IN
    segs = [(ctl.chunk.bus, 16, False), (phys, 4096, writes), (ctl.chunk.bus + 16, 1, True)]
    dev.queue.add(segs, "probe", 4097 if writes else 1)
    dev.queue.kick()
    print("completed", dev.queue.wait(10.0))
    print(f"fault addr {phys:#x}")
    print("target untouched", bytes(target.mv) == b"S" * 4096)
"""


@dataclass
class Guest:
    bay: Bay
    backend: str

    @property
    def vm(self) -> GuestSession:
        return self.bay.vm

    @property
    def images(self) -> dict[str, Path]:
        return self.bay.images

    @property
    def bdfs(self) -> dict[str, str]:
        return self.bay.bdfs

    def vu(self, disk: str, *args: str | int, transport: str | None = None) -> CommandResult:
        opts = ["--transport", transport] if transport else []
        return self.vm.run(["virtio-user", "--backend", self.backend, *opts,
                            "--device", self.bdfs[disk], *map(str, args)], timeout=300)

    def ok(self, disk: str, *args: str | int, transport: str | None = None) -> CommandResult:
        r = self.vu(disk, *args, transport=transport)
        assert r.status == 0, f"{args}: exit {r.status}: {r.err}"
        return r

    def info(self, disk: str, transport: str | None = None) -> dict:
        return json.loads(self.ok(disk, "info", "--json", transport=transport).out)

    def py(self, code: str, *args: str) -> CommandResult:
        r = self.vm.run(["python", "-c", code, *args], timeout=300)
        assert r.status == 0, r.err
        return r

    def image(self, disk: str, sector: int, count: int) -> bytes:
        with self.images[disk].open("rb") as f:
            f.seek(sector * SECTOR)
            return f.read(count * SECTOR)

    def read_digest(self, disk: str, sector: int, count: int,
                    transport: str | None = None) -> str:
        """What the guest reads, as a SHA-256 (the data stays in the guest)."""
        self.ok(disk, "read", sector, count, "-o", "/tmp/r.bin", transport=transport)
        r = self.vm.run(["sha256sum", "/tmp/r.bin"])
        assert r.status == 0, r.err
        return r.out.split()[0]


def lab_disks(d: Path) -> dict[str, Disk]:
    """This module's disks in the lab guest (tests/lab.py)."""
    disks = {"modern": MODERN, "transitional": TRANSITIONAL, "isolated": ISOLATED}
    return {name: Disk(make_image(d / f"{name}.raw", 8, pattern=PATTERN + name.encode()),
                       extra=extra) for name, extra in disks.items()}


@pytest.fixture(scope="module")
def uio(bay: Bay) -> Guest:
    return Guest(bay, "uio")


@pytest.fixture(scope="module")
def vfio(bay: Bay) -> Guest:
    return Guest(bay, "vfio")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_write_read(g: Guest, disk: str, sector: int, byte: int,
                     transport: str | None = None) -> None:
    """Write a pattern, flush, see it in the host image (and nothing around it); read
    it back in the guest."""
    around = g.image(disk, sector - 8, 8), g.image(disk, sector + 16, 8)
    g.ok(disk, "write", sector, "--pattern", byte, "--count", 16, transport=transport)
    g.ok(disk, "flush", transport=transport)
    assert g.image(disk, sector, 16) == bytes([byte]) * 16 * SECTOR
    assert (g.image(disk, sector - 8, 8), g.image(disk, sector + 16, 8)) == around
    assert g.read_digest(disk, sector - 8, 32, transport) == sha(g.image(disk, sector - 8, 32))


# -- uio ------------------------------------------------------------------------------

def test_uio_modern_only_device(uio: Guest) -> None:
    info = uio.info("modern")
    assert info["transport"] == "modern" and info["iommu"] is False
    assert "VIRTIO_F_VERSION_1" in info["features_negotiated"]
    assert uio.vm.run(f"cat /sys/bus/pci/devices/{uio.bdfs['modern']}/device").out.strip() \
        == "0x1042"
    assert uio.read_digest("modern", 0, 64) == sha(uio.image("modern", 0, 64))
    check_write_read(uio, "modern", 100, 0x5A)


def test_uio_modern_text_view_names_the_transport(uio: Guest) -> None:
    out = uio.ok("modern", "info").out
    assert any(line.split() == ["transport", "modern"] for line in out.splitlines())
    assert any(line.split() == ["iommu", "False"] for line in out.splitlines())


def test_legacy_on_a_modern_only_device_is_exit_5(uio: Guest) -> None:
    r = uio.vu("modern", "info", transport="legacy")
    assert r.status == 5, r.err
    assert "modern-only" in r.err and "--transport modern" in r.err


@pytest.mark.parametrize("transport", ["legacy", "modern"])
def test_transitional_device_both_ways(uio: Guest, transport: str) -> None:
    info = uio.info("transitional", transport)  # legacy: the README's example
    assert info["transport"] == transport
    assert ("VIRTIO_F_VERSION_1" in info["features_negotiated"]) == (transport == "modern")
    byte = 0x11 if transport == "legacy" else 0x22
    check_write_read(uio, "transitional", 200 if transport == "legacy" else 300, byte,
                     transport)


def test_auto_takes_modern_on_a_transitional_device(uio: Guest) -> None:
    assert uio.info("transitional")["transport"] == "modern"


@pytest.mark.parametrize("transport", ["legacy", "modern"])
def test_nxvirtq(uio: Guest, transport: str) -> None:
    """QEMU's virtio-blk qtest "nxvirtq": a queue that does not exist reads size 0; the
    driver says so, and the device works afterwards. (QEMU gives virtio-blk one queue per
    vCPU by default, so queue 1 exists here; 64 does not.)"""
    r = uio.py(NXVIRTQ, "uio", uio.bdfs["transitional"], transport)
    assert "queue 64 size 0" in r.out
    assert "error:" in r.out and "queue 64 does not exist" in r.out
    assert f"then {transport} " + PATTERN[:8].hex() in r.out


def test_uio_refuses_a_device_behind_the_iommu(uio: Guest) -> None:
    before = uio.image("isolated", 0, 64)
    r = uio.vu("isolated", "write", 0, "--pattern", 0x77, "--count", 8)
    assert r.status == 5, r.err
    assert "VIRTIO_F_ACCESS_PLATFORM" in r.err and "--backend vfio" in r.err
    assert uio.image("isolated", 0, 64) == before


# -- vfio -----------------------------------------------------------------------------

def test_vfio_modern_without_access_platform_is_not_isolated(vfio: Guest) -> None:
    info = vfio.info("modern")
    assert info["transport"] == "modern" and info["iommu"] is False
    assert "VIRTIO_F_ACCESS_PLATFORM" not in info["features_offered"]
    check_write_read(vfio, "modern", 100, 0x3C)


def test_vfio_isolated_device(vfio: Guest) -> None:
    info = vfio.info("isolated", "modern")  # the README's example, as written
    assert info["transport"] == "modern" and info["iommu"] is True
    assert "VIRTIO_F_ACCESS_PLATFORM" in info["features_negotiated"]
    assert vfio.read_digest("isolated", 0, 64) == sha(vfio.image("isolated", 0, 64))
    check_write_read(vfio, "isolated", 500, 0xC3)


@pytest.mark.parametrize("rtype", ["VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_OUT"])
def test_an_unmapped_address_reaches_no_guest_memory(vfio: Guest, rtype: str) -> None:
    """The device cannot reach memory the driver did not map, even at its physical
    address: the IOMMU faults (logged by the guest and by QEMU). QEMU 7.2's virtio-blk
    does not fail such a request: a faulted read gives zeros and the request completes
    with VIRTIO_BLK_S_OK, so an OUT writes zeros, never our bytes, to the image."""
    before = vfio.image("isolated", 0, 64)
    r = vfio.py(UNMAPPED, vfio.bdfs["isolated"], rtype)
    assert "target untouched True" in r.out, r.out
    addr = r.out.split("fault addr ")[1].split()[0]
    access = "Write" if rtype == "VIRTIO_BLK_T_IN" else "Read"
    dmesg = vfio.vm.run("dmesg").out
    assert any(f"DMA {access}" in line and f"fault addr {addr}" in line
               for line in dmesg.splitlines()), dmesg[-2000:]
    assert "vtd_iommu_translate: detected translation failure" in vfio.vm.machine.qemu_output()
    after = vfio.image("isolated", 0, 64)
    if rtype == "VIRTIO_BLK_T_IN":
        assert after == before
    else:
        assert b"S" * 16 not in after[8 * SECTOR:16 * SECTOR]
        assert after[:8 * SECTOR] == before[:8 * SECTOR]
        assert after[16 * SECTOR:] == before[16 * SECTOR:]
    # the device still works (the next open resets it)
    assert vfio.read_digest("isolated", 16, 16) == sha(vfio.image("isolated", 16, 16))
