"""The packed virtqueue against QEMU's real virtio-blk with ``packed=on`` (modern-only
devices), for each backend (uio and vfio), in the lab guest (tests/lab.py).

The host image files are the oracle: what the guest reads must be what the host holds,
and what it writes must land there. Enough requests go through to wrap the ring (and so
both wrap counters) many times, on a 256-entry and a 1024-entry queue.
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


def lab_disks(d: Path) -> dict[str, Disk]:
    """This module's disks in the lab guest (tests/lab.py)."""
    return {"packed": Disk(make_image(d / "packed.raw", 16, pattern=PATTERN),
                           extra={**MODERN, "packed": "on"}),
            "packed_1024": Disk(make_image(d / "packed1024.raw", 16, pattern=PATTERN[::-1]),
                                extra={**MODERN, "packed": "on", "queue-size": "1024"}),
            "split": Disk(make_image(d / "split.raw", 8, pattern=PATTERN), extra=MODERN)}


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
