"""A device this project did not write: qemu-storage-daemon's vhost-user-blk export,
driven through the modern transport, checked against the host image; and the daemon's
end, always (after a session, a forced timeout, a QEMU that would not start)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from images import RUN_IN_QEMU, make_image
from virtio_user.host import Disk, GuestSession, VhostUserDisk

pytestmark = pytest.mark.qemu

SECTOR = 512
PATTERN = bytes(range(256)) * 2  # one sector; sector n holds it rotated by n
VHOST_BDF = "0000:00:11.0"  # after the one --disk at 00:10.0


def sector_pattern(n: int) -> bytes:
    k = n % SECTOR
    return PATTERN[k:] + PATTERN[:k]


def daemons(marker: Path, name: str = "qemu-storage-daemon") -> list[str]:
    out = subprocess.run(["pgrep", "-af", name], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if str(marker) in ln]


def qemus(marker: Path) -> list[str]:
    return daemons(marker, "qemu-system")


def run_in_qemu(args: list[str], cwd: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUN_IN_QEMU), *args], cwd=cwd, text=True, capture_output=True,
                          env=dict(os.environ, TMPDIR=str(tmpdir)), timeout=300)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vhost-user")
    path = make_image(d / "served.raw", 4)
    path.write_bytes(b"".join(sector_pattern(n) for n in range(4 << 11)))
    return path


@pytest.fixture(scope="module")
def vm(image: Path, tmp_path_factory: pytest.TempPathFactory):
    cwd = tmp_path_factory.mktemp("vhost-user-cwd")
    legacy = make_image(cwd / "legacy.raw", 1)
    with GuestSession([Disk(legacy)], vhost_user_disks=[VhostUserDisk(image)],
                      cwd=cwd, warm_start=True) as session:
        yield session


def test_guest_sees_a_modern_vhost_user_blk_after_the_disks(vm: GuestSession) -> None:
    pci = f"/sys/bus/pci/devices/{VHOST_BDF}"
    r = vm.run(f"cat {pci}/vendor {pci}/device /sys/bus/pci/devices/0000:00:10.0/device")
    assert r.status == 0, r.err
    assert r.out.split() == ["0x1af4", "0x1042", "0x1001"]


# Separate `virtio-user` processes, as a user runs them: each one binds the device,
# initialises it and resets it on exit. uio_pci_generic leaves Interrupt Disable set
# after the line fired in one process; unless the next clears it before DRIVER_OK,
# QEMU starts the daemon's queue without a call eventfd and libvhost-user drops the
# device at the first notification ("vu_panic: Error writing eventfd").
def cli(bdf: str, *args: str) -> list[str]:
    return ["virtio-user", "--transport", "modern", "--device", bdf, *args]


def daemon_log(vm: GuestSession) -> str:
    return (vm.machine.tmp / "vhost-user0.log").read_text(errors="replace")


def test_consecutive_processes_read_write_and_flush_against_the_host_image(
        vm: GuestSession, image: Path) -> None:
    before = image.read_bytes()
    first = vm.run(cli(VHOST_BDF, "read", "1000", "24"), timeout=120)
    assert first.status == 0, first.err
    # host pattern -> guest read
    assert first.stdout == before[1000 * SECTOR:1024 * SECTOR]
    assert first.stdout[:SECTOR] == sector_pattern(1000)
    for args in (["write", "2000", "--count", "9", "--pattern", "0x5a"], ["flush"]):
        r = vm.run(cli(VHOST_BDF, *args), timeout=120)
        assert r.status == 0, (args, r.err, daemon_log(vm))
    after = image.read_bytes()
    # guest write -> bytes in the image, and nothing else changed
    assert after[2000 * SECTOR:2009 * SECTOR] == b"\x5a" * 9 * SECTOR
    assert after[:2000 * SECTOR] == before[:2000 * SECTOR]
    assert after[2009 * SECTOR:] == before[2009 * SECTOR:]
    last = vm.run(cli(VHOST_BDF, "read", "1999", "11"), timeout=120)
    assert last.status == 0, (last.err, daemon_log(vm))
    assert last.stdout == after[1999 * SECTOR:2010 * SECTOR]
    assert "vu_panic" not in daemon_log(vm)


def test_daemon_and_socket_are_gone_after_the_session(vm: GuestSession) -> None:
    """Last in this module: it ends the module's session."""
    socket = vm.machine.vhost_user_socket(0)
    assert socket.exists() and daemons(vm.machine.tmp)
    vm.close()
    assert daemons(vm.machine.tmp) == []
    assert not vm.machine.tmp.exists()


def test_daemon_is_stopped_after_a_forced_timeout(tmp_path: Path, image: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = run_in_qemu(["--vhost-user-disk", str(image), "--timeout", "12", "--",
                     "sleep", "600"], tmp_path, tmpdir)
    assert r.returncode == 124, r.stderr
    assert "timed out after" in r.stderr
    assert "last lines of the guest serial console" in r.stderr
    assert list(tmpdir.iterdir()) == []
    assert daemons(tmpdir) == [] and qemus(tmpdir) == []


def test_daemon_is_stopped_when_qemu_does_not_start(tmp_path: Path, image: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = run_in_qemu(["--vhost-user-disk", str(image), "--qemu-arg", "-device",
                     "--qemu-arg", "no-such-device", "--", "true"], tmp_path, tmpdir)
    assert r.returncode == 125, r.stderr
    assert "no-such-device" in r.stderr
    assert list(tmpdir.iterdir()) == []
    assert daemons(tmpdir) == []


def test_missing_image_is_a_clear_harness_error(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    image = tmp_path / "missing.raw"
    r = run_in_qemu(["--vhost-user-disk", str(image), "--", "true"], tmp_path, tmpdir)
    assert r.returncode == 125, r.stderr
    assert f"vhost-user disk {image}: no such file" in r.stderr
    assert list(tmpdir.iterdir()) == []
