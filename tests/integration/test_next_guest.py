"""The "next" lab (tests/lab.py): bookworm-backports' kernel 6.12 under QEMU 10.0, both
fetched into the cache on first use, with one representative per device-facing feature
rather than a copy of every module: the legacy and modern transports, the split and
packed rings, uio and vfio, interrupts (uio INTx, vfio MSI-X), the packed ring behind
the IOMMU, a 10.0-only device property (``in_order``), and vhost-user-blk served by
QEMU 10.0's own qemu-storage-daemon. The host image files are the oracle.

The same guest is where ublk runs (kernel 6.12 builds ``ublk_drv``; 6.1 does not).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from images import REPO, RUN_IN_QEMU, make_image
from lab import Bay
from virtio_user.host import CommandResult, Disk, VhostUserDisk, assets

pytestmark = pytest.mark.qemu

LAB_GUEST = "next"
SECTOR = 512
PATTERN = bytes(range(253)) + b"next lab\n"  # not a power of two


def lab_disks(d: Path) -> dict[str, Disk]:
    """One disk per transport and ring, in the ``--disk`` spec form."""
    specs = {"legacy": "", "modern": ",transport=modern",
             "packed": ",transport=modern,packed=on",
             "isolated": ",transport=modern,iommu_platform=on,packed=on",
             "in_order": ",transport=modern"}
    disks = {name: Disk.parse(str(make_image(d / f"{name}.raw", 8,
                                             pattern=name.encode() + PATTERN)) + options)
             for name, options in specs.items()}
    disks["in_order"].extra["in_order"] = "on"  # QEMU 9.1+: VIRTIO_F_IN_ORDER
    return disks


def lab_vhost_user_disks(d: Path) -> dict[str, VhostUserDisk]:
    return {"served": VhostUserDisk(make_image(d / "served.raw", 4, pattern=PATTERN))}


def vu(bay: Bay, disk: str, *args: object, backend: str = "uio",
       transport: str = "auto") -> CommandResult:
    bdf = bay.bdfs.get(disk) or bay.vhost_user_bdfs[disk]
    return bay.run(["virtio-user", "--backend", backend, "--transport", transport,
                    "--device", bdf, *map(str, args)], timeout=300)


def ok(bay: Bay, disk: str, *args: object, **kw: str) -> CommandResult:
    r = vu(bay, disk, *args, **kw)
    assert r.status == 0, (disk, args, r.err)
    return r


def image(bay: Bay, disk: str) -> bytes:
    path = bay.images.get(disk) or bay.vhost_user_disks[disk].path
    return path.read_bytes()


def write_read(bay: Bay, disk: str, sector: int, byte: int, flush: bool = False,
               **kw: str) -> None:
    """A pattern written (and flushed) lands in the host image, nothing around it moves,
    and the guest reads the image's bytes back. Two or three commands: each costs about
    2 s under TCG, and this module's time is added to every suite run."""
    before = image(bay, disk)
    ok(bay, disk, "write", sector, "--pattern", byte, "--count", 16, **kw)
    if flush:
        ok(bay, disk, "flush", **kw)
    after = image(bay, disk)
    assert after[sector * SECTOR:(sector + 16) * SECTOR] == bytes([byte]) * 16 * SECTOR
    assert after[:sector * SECTOR] == before[:sector * SECTOR]
    assert after[(sector + 16) * SECTOR:] == before[(sector + 16) * SECTOR:]
    back = ok(bay, disk, "read", sector - 4, 24, **kw).stdout
    assert back == after[(sector - 4) * SECTOR:(sector + 20) * SECTOR]


def info(bay: Bay, disk: str, **kw: str) -> dict:
    return json.loads(ok(bay, disk, "info", "--json", **kw).out)


def test_the_guest_is_kernel_6_12_under_qemu_10_with_ublk(bay: Bay) -> None:
    r = bay.run("uname -r; ls -d /sys/module/ublk_drv; ls /dev/ublk-control; "
                "test -e /sys/module/virtio_pci/initstate || echo virtio_pci built in")
    assert r.status == 0, r.err
    release, *rest = r.out.splitlines()
    assert release.startswith("6.12.")
    assert rest == ["/sys/module/ublk_drv", "/dev/ublk-control", "virtio_pci built in"]
    version = bay.vm.qmp.cmd("query-version")["qemu"]
    assert (version["major"], version["minor"]) == (10, 0)


def test_legacy_transport_split_ring_over_uio(bay: Bay) -> None:
    got = info(bay, "legacy")
    assert (got["transport"], got["ring"], got["backend"]) == ("legacy", "split", "uio")
    write_read(bay, "legacy", 100, 0x4C, flush=True)


def test_modern_split_ring_over_vfio_driven_by_msix(bay: Bay) -> None:
    r = ok(bay, "modern", "--wait", "interrupt", "bench", "--rw", "randread",
           "--iodepth", 4, "--ios", 1000, "--verify", "--json", backend="vfio")
    result = json.loads(r.out)
    assert result["ios"] == 1000 and result["irq"] == "vfio-msix"
    assert (result["backend"], result["ring"]) == ("vfio", "split")
    assert result["interrupts"] > 0 and result["verified_blocks"] > 0
    write_read(bay, "modern", 200, 0x6D, backend="vfio", transport="modern")


def test_packed_ring_over_uio_driven_by_intx(bay: Bay) -> None:
    r = ok(bay, "packed", "--wait", "interrupt", "bench", "--rw", "randread",
           "--iodepth", 4, "--ios", 1000, "--verify", "--json")
    result = json.loads(r.out)
    assert result["ios"] == 1000 and result["irq"] == "uio-intx"
    assert (result["backend"], result["ring"]) == ("uio", "packed")
    assert result["interrupts"] > 0 and result["verified_blocks"] > 0
    write_read(bay, "packed", 300, 0x70)


def test_packed_ring_behind_the_iommu_over_vfio(bay: Bay) -> None:
    got = info(bay, "isolated", backend="vfio")
    assert got["iommu"] is True and got["ring"] == "packed"
    assert "VIRTIO_F_ACCESS_PLATFORM" in got["features_negotiated"]
    write_read(bay, "isolated", 400, 0x1A, backend="vfio")


def test_qemu_10_offers_in_order_and_ring_reset(bay: Bay) -> None:
    """``in_order=on`` exists from QEMU 9.1; QEMU offers RING_RESET by default (7.2
    too). Whatever the driver negotiates of them, its I/O still lands."""
    got = info(bay, "in_order")
    assert {"VIRTIO_F_IN_ORDER", "VIRTIO_F_RING_RESET"} <= set(
        got["features_offered"])
    write_read(bay, "in_order", 500, 0x10)


def test_vhost_user_blk_through_qemu_10s_storage_daemon(bay: Bay) -> None:
    """The daemon is QEMU 10.0's (qemu-utils in 10.0), not the system's 7.2."""
    out = subprocess.run(["pgrep", "-f", "qemu-storage-daemon"], capture_output=True,
                         text=True).stdout.split()
    socket_dir = str(bay.vm.machine.tmp)
    exes = [os.readlink(f"/proc/{pid}/exe") for pid in out
            if socket_dir in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert len(exes) == 1 and "/qemu-10.0/" in exes[0], exes
    write_read(bay, "served", 600, 0x5E, flush=True, transport="modern")


def test_run_in_qemu_kernel_6_12_qemu_10_as_the_docs_show_it(tmp_path: Path) -> None:
    """docs/kernels-and-qemu.md's command, word for word."""
    r = subprocess.run([str(RUN_IN_QEMU), "--kernel", "6.12", "--qemu", "10.0", "--",
                        "uname", "-r"], cwd=tmp_path, text=True, capture_output=True,
                       timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("6.12.") and r.stdout.endswith("-amd64\n")


def device_properties(qemu: assets.Qemu) -> dict[str, str]:
    """``-device virtio-blk-pci,help``: property name to its help text."""
    out = subprocess.run([qemu.binary("qemu-system-x86_64"), *qemu.args(), "-device",
                          "virtio-blk-pci,help"], capture_output=True, text=True,
                         timeout=60, env=qemu.env(), check=True).stdout
    return {line.split("=", 1)[0].strip(): line.split("=", 1)[1]
            for line in out.splitlines() if line.startswith("  ") and "=" in line}


def test_the_docs_property_table_is_what_each_qemu_shows() -> None:
    """docs/kernels-and-qemu.md's virtio-blk-pci table against both QEMUs' own help:
    each row's presence, and its default where the table gives one."""
    text = (REPO / "docs" / "kernels-and-qemu.md").read_text()
    table = text.split("| `virtio-blk-pci` property |", 1)[1].split("\n\n", 1)[0]
    props = {version: device_properties(assets.find_qemu(version))
             for version in ("7.2", "10.0")}
    rows = 0
    for row in table.splitlines()[2:]:
        names, on72, on100 = (cell.strip() for cell in row.strip("|").split("|")[:3])
        for name in names.replace("`", "").split(", "):
            for version, cell in (("7.2", on72), ("10.0", on100)):
                assert (name in props[version]) == cell.startswith("yes"), (name, version)
                default = cell.partition("(")[2].rstrip(")")
                if default in ("on", "off"):
                    shown = props[version][name]
                    assert f"default: {default}" in shown or \
                        f"default: {'true' if default == 'on' else 'false'}" in shown, \
                        (name, version, shown)
            rows += 1
    assert rows >= 9


def test_qemu_7_2_names_a_property_it_does_not_have(tmp_path: Path) -> None:
    """The docs' word: ``extra={"in_order": "on"}`` on 7.2 stops QEMU at start, and QEMU
    names the property."""
    r = subprocess.run(["qemu-system-x86_64", "-machine", "q35", "-display", "none",
                        "-nodefaults", "-device", "virtio-blk-pci,in_order=on"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Property 'virtio-blk-pci.in_order' not found" in r.stderr
