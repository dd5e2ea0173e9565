"""The packed virtqueue against QEMU's real virtio-blk with ``packed=on`` (modern-only
devices), for each backend (uio and vfio), in the lab guest (tests/lab.py).

The host image files are the oracle: what the guest reads must be what the host holds,
and what it writes must land there. Enough requests go through to wrap the ring (and so
both wrap counters) many times, on a 256-entry and a 1024-entry queue. One more device
puts the packed ring behind the emulated IOMMU (``iommu_platform=on``): the ring, the
indirect tables and the data all reach the device as IOVAs through vfio.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from images import make_image
from lab import Bay
from virtio_user.host import CommandResult, Disk

pytestmark = pytest.mark.qemu

SECTOR = 512
PATTERN = bytes(range(251)) + b"packed ring pattern\n"  # not a power of two
MODERN = {"disable-legacy": "on", "disable-modern": "off"}
# VIRTIO_F_ACCESS_PLATFORM: QEMU accepts it only on a modern-only device.
ISOLATED_PACKED = {**MODERN, "packed": "on", "iommu_platform": "on"}
ISOLATED_PATTERN = b"packed ring behind the IOMMU\n" + bytes(range(0, 256, 3))


def lab_disks(d: Path) -> dict[str, Disk]:
    """This module's disks in the lab guest (tests/lab.py)."""
    return {"packed": Disk(make_image(d / "packed.raw", 16, pattern=PATTERN),
                           extra={**MODERN, "packed": "on"}),
            "packed_1024": Disk(make_image(d / "packed1024.raw", 16, pattern=PATTERN[::-1]),
                                extra={**MODERN, "packed": "on", "queue-size": "1024"}),
            "split": Disk(make_image(d / "split.raw", 8, pattern=PATTERN), extra=MODERN),
            "isolated": Disk(make_image(d / "isolated.raw", 16, pattern=ISOLATED_PATTERN),
                             extra=ISOLATED_PACKED)}


@dataclass
class Guest:
    bay: Bay
    backend: str

    @property
    def images(self) -> dict[str, Path]:
        return self.bay.images

    def vu(self, disk: str, *args: str | int, ring: str | None = None,
           timeout: float = 600) -> CommandResult:
        argv = ["virtio-user", "--backend", self.backend, "--device", self.bay.bdfs[disk]]
        if ring is not None:
            argv += ["--ring", ring]
        return self.bay.run([*argv, *map(str, args)], timeout=timeout)

    def ok(self, disk: str, *args: str | int, ring: str | None = None) -> CommandResult:
        r = self.vu(disk, *args, ring=ring)
        assert r.status == 0, f"{args}: exit {r.status}: {r.err}"
        return r

    def info(self, disk: str, ring: str | None = None) -> dict:
        return json.loads(self.ok(disk, "info", "--json", ring=ring).out)


@pytest.fixture(scope="module", params=["uio", "vfio"])
def guest(request: pytest.FixtureRequest, bay: Bay) -> Guest:
    return Guest(bay, request.param)


def image_bytes(g: Guest, disk: str, sector: int, count: int) -> bytes:
    with g.images[disk].open("rb") as f:
        f.seek(sector * SECTOR)
        return f.read(count * SECTOR)


def test_auto_takes_the_packed_ring_where_offered(guest: Guest) -> None:
    info = guest.info("packed")
    assert info["transport"] == "modern" and info["ring"] == "packed"
    assert "VIRTIO_F_RING_PACKED" in info["features_negotiated"]
    assert info["queue_size"] == 256
    big = guest.info("packed_1024", ring="packed")
    assert big["ring"] == "packed" and big["queue_size"] == 1024
    split = guest.info("split")
    assert split["ring"] == "split"
    assert "VIRTIO_F_RING_PACKED" not in split["features_offered"]


def test_ring_split_on_a_packed_device_negotiates_split(guest: Guest) -> None:
    info = guest.info("packed", ring="split")
    assert info["ring"] == "split"
    assert "VIRTIO_F_RING_PACKED" in info["features_offered"]
    assert "VIRTIO_F_RING_PACKED" not in info["features_negotiated"]
    r = guest.ok("packed", "read", 100, 9, ring="split")
    assert r.stdout == image_bytes(guest, "packed", 100, 9)


def test_ring_packed_on_a_split_only_device_exits_5(guest: Guest) -> None:
    before = guest.images["split"].read_bytes()
    r = guest.vu("split", "write", 0, "--pattern", "0x55", "--count", 1, ring="packed")
    assert r.status == 5, r.err
    assert "VIRTIO_F_RING_PACKED" in r.err and guest.bay.bdfs["split"] in r.err
    assert guest.images["split"].read_bytes() == before


def test_reads_match_the_host_image(guest: Guest) -> None:
    # One sector, an odd length, and 3 MiB: several requests through the bounce pool.
    for disk in ("packed", "packed_1024"):
        for sector, count in ((0, 1), (777, 13), (2048, 6144)):
            r = guest.ok(disk, "read", sector, count)
            assert r.stdout == image_bytes(guest, disk, sector, count), (disk, sector)


def test_writes_land_in_the_host_image(guest: Guest) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(40 * SECTOR))
    src = guest.images["packed"].parent / "in.bin"
    src.write_bytes(data)
    for disk, sector in (("packed", 5000), ("packed_1024", 123)):
        guest.ok(disk, "write", sector, "--input", str(src))
        assert image_bytes(guest, disk, sector, 40) == data, disk
        assert guest.ok(disk, "read", sector, 40).stdout == data


@pytest.mark.parametrize("backend,disk,depth,ios", [("uio", "packed", 32, 20000),
                                                    ("vfio", "packed_1024", 1024, 30000)])
def test_many_ring_laps_with_verify(bay: Bay, backend: str, disk: str, depth: int,
                                    ios: int) -> None:
    """Tens of thousands of requests: the 256 ring wraps ~80 times, the 1024 ring ~30,
    written and read back by the driver, then the whole image compared with the host's.
    The wrap arithmetic is the ring's, so each backend takes one of the two rings."""
    guest = Guest(bay, backend)
    for rw in ("randwrite", "randread"):
        r = guest.ok(disk, "bench", "--rw", rw, "--bs", "4096", "--iodepth", depth,
                     "--ios", ios, "--verify", "--json", ring="packed")
        result = json.loads(r.out)
        assert result["ios"] >= ios and result["verified_blocks"] > 0, result
    sectors = guest.images[disk].stat().st_size // SECTOR
    guest.ok(disk, "read", 0, sectors, "-o", "/tmp/whole.bin")  # guest tmpfs, not 9p
    r = bay.run(["busybox", "sha256sum", "/tmp/whole.bin"])
    assert r.status == 0, r.err
    host = hashlib.sha256(guest.images[disk].read_bytes()).hexdigest()
    assert r.out.split()[0] == host


def test_write_zeroes_and_discard(guest: Guest) -> None:
    guest.ok("packed", "write", 64, "--pattern", "0xee", "--count", 24)
    offered = guest.info("packed")["features_offered"]
    assert "VIRTIO_BLK_F_WRITE_ZEROES" in offered and "VIRTIO_BLK_F_DISCARD" in offered
    guest.ok("packed", "write-zeroes", 64, 8)
    assert image_bytes(guest, "packed", 64, 8) == bytes(8 * SECTOR)
    assert image_bytes(guest, "packed", 72, 16) == b"\xee" * 16 * SECTOR
    guest.ok("packed", "discard", 72, 8)
    guest.ok("packed", "write-zeroes", 80, 8, "--unmap")
    assert image_bytes(guest, "packed", 80, 8) == bytes(8 * SECTOR)
    assert guest.ok("packed", "read", 64, 24).stdout[:8 * SECTOR] == bytes(8 * SECTOR)


# -- the packed ring behind the IOMMU (VIRTIO_F_ACCESS_PLATFORM) ------------------------

def assert_no_dma_fault(g: Guest, disk: str) -> None:
    """Neither the guest's IOMMU driver nor QEMU saw a DMA fault from this device: every
    address on the ring was an IOVA the driver had mapped. The guest logs faults, rate
    limited but never none ("DMAR: [DMA Read ...] Request device [00:SS.0] fault addr
    ..."; a fault made on purpose showed up so on this device); QEMU logs only the
    first translation failure of its life (error_report_once), so its log is a witness
    only while no other test of the lab has made a device fault."""
    bus, slot, func = g.bay.bdfs[disk][5:].replace(".", ":").split(":")
    r = g.bay.run("dmesg")
    assert r.status == 0, r.err
    faults = [line for line in r.out.splitlines()
              if "DMAR" in line and f"[{bus}:{slot}.{func}]" in line]
    assert not faults, faults
    qemu = g.bay.vm.machine.qemu_output()
    assert f"translation failure (dev={bus}:{slot}:{int(func):02x}" not in qemu, qemu[-2000:]


@pytest.fixture(scope="module")
def vfio(bay: Bay) -> Guest:
    return Guest(bay, "vfio")


def test_uio_refuses_the_packed_ring_behind_the_iommu(bay: Bay) -> None:
    """uio cannot program the IOMMU, so the driver refuses the device (exit 5) before
    DRIVER_OK, whichever ring is asked for, and nothing reaches the image."""
    uio = Guest(bay, "uio")
    before = uio.images["isolated"].read_bytes()
    for ring in (None, "packed"):
        r = uio.vu("isolated", "write", 0, "--pattern", "0x77", "--count", 8, ring=ring)
        assert r.status == 5, r.err
        assert "VIRTIO_F_ACCESS_PLATFORM" in r.err and "--backend vfio" in r.err, r.err
    assert uio.images["isolated"].read_bytes() == before


def test_vfio_negotiates_packed_and_access_platform(vfio: Guest) -> None:
    for ring in (None, "packed"):  # auto takes the packed ring here too
        info = vfio.info("isolated", ring=ring)
        assert info["transport"] == "modern" and info["ring"] == "packed", info
        assert info["iommu"] is True and info["queue_size"] == 256, info
        negotiated = info["features_negotiated"]
        assert "VIRTIO_F_RING_PACKED" in negotiated, negotiated
        assert "VIRTIO_F_ACCESS_PLATFORM" in negotiated, negotiated
    assert_no_dma_fault(vfio, "isolated")


def test_vfio_packed_behind_the_iommu_reads_and_writes(vfio: Guest) -> None:
    # One sector, an odd length, and 3 MiB (several requests through the bounce pool).
    for sector, count in ((0, 1), (777, 13), (2048, 6144)):
        r = vfio.ok("isolated", "read", sector, count, ring="packed")
        assert r.stdout == image_bytes(vfio, "isolated", sector, count), sector
    data = bytes((i * 11 + 5) & 0xFF for i in range(40 * SECTOR))
    src = vfio.images["isolated"].parent / "isolated-in.bin"
    src.write_bytes(data)
    around = image_bytes(vfio, "isolated", 3000 - 8, 8), image_bytes(vfio, "isolated", 3040, 8)
    vfio.ok("isolated", "write", 3000, "--input", str(src), ring="packed")
    assert image_bytes(vfio, "isolated", 3000, 40) == data
    assert (image_bytes(vfio, "isolated", 3000 - 8, 8),
            image_bytes(vfio, "isolated", 3040, 8)) == around
    assert vfio.ok("isolated", "read", 3000, 40, ring="packed").stdout == data
    assert_no_dma_fault(vfio, "isolated")


@pytest.mark.parametrize("rw,depth", [("randwrite", 256), ("randread", 100)])
def test_vfio_packed_behind_the_iommu_wraps_the_ring(vfio: Guest, rw: str,
                                                     depth: int) -> None:
    """12000 requests on the 256-entry ring: about 47 laps, so both wrap counters flip
    many times with every descriptor an IOVA. The writes fill the whole ring (depth
    256); the reads' depth of 100 puts the batch edges at a different slot each lap.
    Afterwards the whole image, read in the guest, is the host's."""
    ios = 12000
    r = vfio.ok("isolated", "bench", "--rw", rw, "--bs", "4096", "--iodepth", depth,
                "--ios", ios, "--verify", "--json", ring="packed")
    result = json.loads(r.out)
    assert result["ring"] == "packed" and result["backend"] == "vfio", result
    assert result["ios"] >= ios and result["verified_blocks"] > 0, result
    sectors = vfio.images["isolated"].stat().st_size // SECTOR
    vfio.ok("isolated", "read", 0, sectors, "-o", "/tmp/isolated.bin", ring="packed")
    r = vfio.bay.run(["busybox", "sha256sum", "/tmp/isolated.bin"])  # guest tmpfs, not 9p
    assert r.status == 0, r.err
    host = hashlib.sha256(vfio.images["isolated"].read_bytes()).hexdigest()
    assert r.out.split()[0] == host
    assert_no_dma_fault(vfio, "isolated")
