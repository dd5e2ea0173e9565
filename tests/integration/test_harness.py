"""The QEMU harness itself: run-in-qemu.sh and session mode, against a real TCG guest."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from images import RUN_IN_QEMU, make_image
from virtio_user.host import Disk, GuestSession, GuestTimeout
from virtio_user.host import accel

pytestmark = pytest.mark.qemu


def run_in_qemu(args: list[str], cwd: Path, tmpdir: Path, timeout: float = 300,
                ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.run([str(RUN_IN_QEMU), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def qemu_processes(marker: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if str(marker) in ln]


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("harness-disks")
    return make_image(d / "plain.raw", 8), make_image(d / "layered.qcow2", 8, "qcow2")


@pytest.fixture(scope="module")
def vm(disks: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    cwd = tmp_path_factory.mktemp("harness-cwd")
    with GuestSession(list(disks), cwd=cwd) as session:
        yield session


def test_command_status_and_output_come_back(vm: GuestSession) -> None:
    r = vm.run("echo to-stdout; echo to-stderr >&2; exit 42")
    assert (r.status, r.out, r.err) == (42, "to-stdout\n", "to-stderr\n")


def test_many_commands_in_one_session(vm: GuestSession) -> None:
    outs = [vm.run(["echo", str(i)]).out for i in range(20)]
    assert outs == [f"{i}\n" for i in range(20)]


def test_relative_output_path_lands_in_host_directory(vm: GuestSession) -> None:
    r = vm.run("mkdir -p sub && echo written-in-guest > sub/out.txt")
    assert r.status == 0, r.err
    assert (vm.config.cwd / "sub" / "out.txt").read_text() == "written-in-guest\n"


def test_guest_runs_the_hosts_python_environment(vm: GuestSession) -> None:
    r = vm.run(["python", "-c", "import sys, numpy, pyudev; print(sys.prefix)"])
    assert r.status == 0, r.err
    assert r.out.strip() == os.path.realpath(__import__("sys").prefix)


def test_raw_and_qcow2_disks_are_legacy_virtio_blk(vm: GuestSession) -> None:
    script = ("import pyudev\n"
              "for d in pyudev.Context().list_devices(subsystem='pci'):\n"
              "    if d.properties.get('PCI_ID') == '1AF4:1001': print(d.sys_name)\n")
    r = vm.run(["python", "-c", script])
    assert r.status == 0, r.err
    assert r.out.split() == ["0000:00:10.0", "0000:00:11.0"]


def test_disk_serial_is_file_base_name_cut_to_20_bytes(tmp_path: Path) -> None:
    disk = Disk(tmp_path / ("a-very-long-disk-image-name" + ".raw"))
    assert disk.default_serial() == "a-very-long-disk-ima"
    assert len(disk.default_serial().encode()) == 20


def test_qmp_is_reachable(vm: GuestSession) -> None:
    blocks = vm.qmp.cmd("query-block")
    assert {b["inserted"]["node-name"] for b in blocks} >= {"disk0", "disk1"}
    assert {b["qdev"].split("/")[3] for b in blocks} >= {"vblk0", "vblk1"}


def test_session_command_timeout_is_reported(vm: GuestSession) -> None:
    cmd = vm.spawn(["sleep", "30"])
    with pytest.raises(GuestTimeout):
        cmd.wait(timeout=1)
    cmd.signal(signal.SIGKILL)
    assert cmd.wait(timeout=30).status == 128 + signal.SIGKILL


def test_run_in_qemu_streams_output_and_exit_status(tmp_path: Path) -> None:
    r = run_in_qemu(["--", "sh", "-c", "echo out; echo err >&2; exit 3"], tmp_path, tmp_path)
    assert r.returncode == 3
    assert r.stdout == "out\n"
    assert "err\n" in r.stderr


def test_qemu_arg_passes_values_starting_with_a_dash(tmp_path: Path) -> None:
    img = make_image(tmp_path / "extra.raw", 4)
    r = run_in_qemu(["--qemu-arg", "-blockdev",
                     "--qemu-arg", f"driver=file,node-name=extra,filename={img}",
                     "--qemu-arg", "-device",
                     "--qemu-arg", "virtio-blk-pci,drive=extra,addr=0x18,serial=extra-disk",
                     "--", "sh", "-c", "cd /sys/bus/pci/devices/0000:00:18.0 && "
                                       "cat vendor device virtio*/block/*/serial"],
                    tmp_path, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0x1af4", "0x1001", "extra-disk"]


def test_accel_auto_falls_back_to_tcg_here(tmp_path: Path) -> None:
    start = time.monotonic()
    r = run_in_qemu(["--accel", "auto", "--", "true"], tmp_path, tmp_path)
    assert r.returncode == 0, r.stderr
    if not accel.cpu_has_virt():
        assert "using TCG because the CPU has no vmx/svm flag" in r.stderr
    assert time.monotonic() - start < 120


def test_forced_timeout_is_reported_and_cleans_up(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = run_in_qemu(["--timeout", "20", "--", "sleep", "600"], tmp_path, tmpdir)
    assert r.returncode == 124, r.stderr
    assert "timed out after" in r.stderr
    assert "last lines of the guest serial console" in r.stderr
    assert list(tmpdir.iterdir()) == []
    assert qemu_processes(tmpdir) == []


def test_guest_panic_is_reported(tmp_path: Path) -> None:
    r = run_in_qemu(["--", "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"],
                    tmp_path, tmp_path)
    assert r.returncode == 125, r.stderr
    assert "the guest kernel panicked" in r.stderr
    assert "Kernel panic" in r.stderr


def test_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen([str(RUN_IN_QEMU), "--", "sh", "-c", "echo started; sleep 600"],
                            cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmpdir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert list(tmpdir.iterdir()) == []
    assert qemu_processes(tmpdir) == []
