"""The driver against QEMU's real legacy virtio-blk, for each backend (uio and vfio).

The lab guest (tests/lab.py) holds every disk these tests need, driven through each
backend in turn; the image files on the host are
the oracle: what the guest reads must be what the host wrote, and the reverse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import docpages
from images import make_image, qcow2_to_raw
from lab import Bay
from virtio_user.host import CommandResult, Disk

pytestmark = pytest.mark.qemu

SECTOR = 512
PATTERN = bytes(range(256)) * 2 + b"virtio-user host pattern\n"  # not a power of two


def lab_disks(d: Path) -> dict[str, Disk]:
    """This module's disks in the lab guest (tests/lab.py)."""
    return {"main": Disk(make_image(d / "main.raw", 64, pattern=PATTERN)),
            "qcow2": Disk(make_image(d / "layered.qcow2", 32, "qcow2")),
            "ro": Disk(make_image(d / "readonly.raw", 8, pattern=b"read-only!"),
                       readonly=True),
            "big_queue": Disk(make_image(d / "bigq.raw", 8), queue_size=1024)}


@dataclass
class Guest:
    bay: Bay
    backend: str

    @property
    def images(self) -> dict[str, Path]:
        return self.bay.images

    @property
    def cwd(self) -> Path:
        return self.bay.dir

    def vu(self, disk: str, *args: str | int, timeout: float = 300) -> CommandResult:
        argv = ["virtio-user", "--backend", self.backend, "--device", self.bay.bdfs[disk],
                *map(str, args)]
        return self.bay.run(argv, timeout=timeout)

    def ok(self, disk: str, *args: str | int) -> CommandResult:
        r = self.vu(disk, *args)
        assert r.status == 0, f"{args}: exit {r.status}: {r.err}"
        return r

    def info(self, disk: str) -> dict:
        return json.loads(self.ok(disk, "info", "--json").out)

    def py(self, code: str, timeout: float = 600) -> CommandResult:
        r = self.bay.run(["python", "-c", code], timeout=timeout)
        assert r.status == 0, r.err
        return r


@pytest.fixture(scope="module", params=["uio", "vfio"])
def guest(request: pytest.FixtureRequest, bay: Bay) -> Guest:
    return Guest(bay, request.param)


def image_bytes(g: Guest, disk: str, sector: int, count: int) -> bytes:
    with g.images[disk].open("rb") as f:
        f.seek(sector * SECTOR)
        return f.read(count * SECTOR)


def test_info_reports_the_device(guest: Guest) -> None:
    info = guest.info("main")
    assert info["pci_address"] == guest.bay.bdfs["main"]
    assert info["capacity_sectors"] == 64 * 2048
    assert info["block_size"] == 512
    assert info["queue_size"] == 256
    assert info["read_only"] is False
    assert info["serial"] == "main.raw"
    assert "VIRTIO_BLK_F_FLUSH" in info["features_negotiated"]
    assert set(info["features_negotiated"]) <= set(info["features_offered"])


def test_get_id_returns_the_serial(guest: Guest) -> None:
    assert guest.ok("qcow2", "id").out.strip() == "layered.qcow2"


def test_guest_reads_what_the_host_wrote(guest: Guest) -> None:
    guest.ok("main", "read", "0x64", 16, "-o", "read.bin")
    assert (guest.cwd / "read.bin").read_bytes() == image_bytes(guest, "main", 100, 16)


def test_read_to_a_pipe_gives_raw_bytes(guest: Guest) -> None:
    r = guest.ok("main", "read", 3, 2)
    assert r.stdout == image_bytes(guest, "main", 3, 2)


def test_guest_write_lands_in_the_image(guest: Guest) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(8 * SECTOR))
    (guest.cwd / "w.bin").write_bytes(data)
    neighbours = image_bytes(guest, "main", 1999, 1), image_bytes(guest, "main", 2008, 1)
    guest.ok("main", "write", 2000, "-i", "w.bin")
    assert image_bytes(guest, "main", 2000, 8) == data
    # Exactly the 8 sectors: the ones on either side still hold the host's pattern.
    assert (image_bytes(guest, "main", 1999, 1), image_bytes(guest, "main", 2008, 1)) == \
        neighbours
    assert neighbours[0] != data[:SECTOR] and neighbours[1] != data[-SECTOR:]


def test_pattern_write_and_read_back(guest: Guest) -> None:
    guest.ok("main", "write", 3000, "--pattern", "0x5a", "--count", 3)
    assert guest.ok("main", "read", 3000, 3).stdout == b"\x5a" * 3 * SECTOR
    assert image_bytes(guest, "main", 3000, 3) == b"\x5a" * 3 * SECTOR


def test_qcow2_round_trip(guest: Guest, tmp_path: Path) -> None:
    guest.ok("qcow2", "write", 777, "--pattern", "0xc3", "--count", 5)
    assert guest.ok("qcow2", "read", 776, 7).stdout == (
        bytes(SECTOR) + b"\xc3" * 5 * SECTOR + bytes(SECTOR))
    guest.ok("qcow2", "flush")
    raw = qcow2_to_raw(guest.images["qcow2"], tmp_path / "converted.raw")
    assert raw[777 * SECTOR:782 * SECTOR] == b"\xc3" * 5 * SECTOR


def test_request_larger_than_device_limits_is_split(guest: Guest) -> None:
    info = guest.info("main")
    per_request = info["seg_max"] * max(info.get("size_max") or 4096, 4096)
    count = 2 * per_request // SECTOR + 9
    guest.ok("main", "read", 5, count, "-o", "big.bin")
    assert (guest.cwd / "big.bin").read_bytes() == image_bytes(guest, "main", 5, count)


def test_last_sector_reads_and_one_past_is_out_of_range(guest: Guest) -> None:
    last = 64 * 2048 - 1
    assert guest.ok("main", "read", last, 1).stdout == image_bytes(guest, "main", last, 1)
    r = guest.vu("main", "read", last, 2)
    assert r.status == 22
    assert f"exceed capacity {64 * 2048}" in r.err


def test_read_only_device_refuses_writes(guest: Guest) -> None:
    before = guest.images["ro"].read_bytes()
    assert guest.info("ro")["read_only"] is True
    for args in (("write", 0, "--pattern", 1, "--count", 1), ("discard", 0, 8),
                 ("write-zeroes", 0, 8)):
        r = guest.vu("ro", *args)
        assert r.status == 7, (args, r.err)
    assert guest.ok("ro", "read", 0, 1).stdout == before[:SECTOR]
    assert guest.images["ro"].read_bytes() == before


def test_flush_discard_and_write_zeroes(guest: Guest) -> None:
    # QEMU 7.2's virtio-blk offers both (discard=on, write-zeroes=on by default), and
    # the harness's -blockdev has discard=unmap: a discard punches a hole in the raw file.
    guest.ok("big_queue", "write", 64, "--pattern", "0xee", "--count", 24)
    guest.ok("big_queue", "flush")
    assert image_bytes(guest, "big_queue", 64, 24) == b"\xee" * 24 * SECTOR
    offered = guest.info("big_queue")["features_offered"]
    assert {"VIRTIO_BLK_F_WRITE_ZEROES", "VIRTIO_BLK_F_DISCARD"} <= set(offered)
    guest.ok("big_queue", "write-zeroes", 64, 8)
    assert guest.ok("big_queue", "read", 64, 16).stdout == (
        bytes(8 * SECTOR) + b"\xee" * 8 * SECTOR)
    assert image_bytes(guest, "big_queue", 64, 8) == bytes(8 * SECTOR)
    guest.ok("big_queue", "discard", 72, 8)
    assert image_bytes(guest, "big_queue", 72, 8) == bytes(8 * SECTOR)
    assert image_bytes(guest, "big_queue", 80, 8) == b"\xee" * 8 * SECTOR


def test_queue_size_1024_is_used_as_reported(guest: Guest) -> None:
    assert guest.info("big_queue")["queue_size"] == 1024
    guest.ok("big_queue", "write", 1000, "--pattern", "0x11", "--count", 1)
    assert image_bytes(guest, "big_queue", 1000, 1) == b"\x11" * SECTOR


def test_70000_requests_wrap_the_ring_indices(bay: Bay) -> None:
    """Past 65536 the 16-bit ring indices wrap; 32 requests in flight at a time keep it
    quick. The index arithmetic is the ring's, not the backend's: one backend does."""
    guest = Guest(bay, "uio")
    code = f"""
from virtio_user import Request, VirtioBlk
from virtio_user.spec import ReqType
with VirtioBlk.open("{bay.bdfs['main']}", backend="{guest.backend}") as dev:
    bufs = [dev.alloc_buffer(512) for _ in range(32)]
    done = 0
    while done < 70000:
        batch = [Request(ReqType.VIRTIO_BLK_T_IN, sector=(done + i) % 4096, count=1,
                         buffer=bufs[i], nbytes=512) for i in range(min(32, 70000 - done))]
        dev.submit(batch)
        while dev.in_flight:
            for req in dev.reap(timeout=30):
                assert req.status == 0, req.status
        done += len(batch)
    # the last request read sector 69999 % 4096 into buffer 69999 % 32
    print(bytes(bufs[69999 % 32].mv[:512]).hex())
    print(dev.queue.avail_idx, dev.queue.used_idx, dev.requests_completed)
"""
    last, indices = guest.py(code, timeout=900).out.splitlines()
    assert bytes.fromhex(last) == image_bytes(guest, "main", 69999 % 4096, 1)
    avail, used, done = map(int, indices.split())
    assert done == 70000
    assert avail == used == 70000 % 65536


def test_python_api_page_example_runs(guest: Guest) -> None:
    code = "\n".join(docpages.block("python-api.md", "# The Python API", "python"))
    # The lab's disk sits at another address than the documented guest has it.
    main = guest.bay.bdfs["main"]
    code = code.replace('VirtioBlk.open("0000:00:10.0")',
                        f'VirtioBlk.open("{main}", backend="{guest.backend}")')
    code = code.replace("VirtioBlk.open()", f'VirtioBlk.open("{main}", backend="{guest.backend}")')
    r = guest.py(code)
    assert r.out.splitlines()[0] == f"{64 * 2048} 256 main.raw"
    lines = r.out.splitlines()
    assert len(lines) == 41
    assert lines[33:] == [f"{s} 0" for s in range(0, 56, 8)] + ["56"]
    assert image_bytes(guest, "main", 100, 1) == b"\x5a" * SECTOR
