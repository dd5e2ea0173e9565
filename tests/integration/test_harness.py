"""The QEMU harness itself: run-in-qemu.sh and session mode, against a real TCG guest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from images import REPO, RUN_IN_QEMU, make_image
from lab import Bay
from virtio_user.host import Disk, GuestSession, GuestTimeout
from virtio_user.host import accel

pytestmark = pytest.mark.qemu


def run_in_qemu(args: list[str], cwd: Path, tmpdir: Path, timeout: float = 300,
                ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.run([str(RUN_IN_QEMU), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def qemu_processes(marker: Path, name: str = "qemu-system") -> list[str]:
    out = subprocess.run(["pgrep", "-af", name], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if str(marker) in ln]


def storage_daemons(marker: Path) -> list[str]:
    return qemu_processes(marker, "qemu-storage-daemon")


# Each --disk form for modern devices, with the features the guest kernel's own driver
# then negotiates (bit 28 INDIRECT_DESC, 29 EVENT_IDX, 32 VERSION_1, 33 ACCESS_PLATFORM,
# 34 RING_PACKED), so a property that did not reach QEMU shows.
MODERN_FORMS = [  # (options after PATH, PCI device id, {feature bit: negotiated})
    ("transport=modern", "0x1042", {28: 1, 29: 1, 32: 1, 33: 0, 34: 0}),
    ("transport=transitional", "0x1001", {28: 1, 29: 1, 32: 1, 33: 0, 34: 0}),
    ("transport=modern,iommu_platform=on,packed=on", "0x1042", {32: 1, 33: 1, 34: 1}),
    ("transport=transitional,packed=on", "0x1001", {32: 1, 34: 1}),
    ("indirect_desc=off,event_idx=off", "0x1001", {28: 0, 29: 0, 32: 0}),
]


def lab_disks(d: Path) -> dict[str, Disk]:
    """The session-mode tests run in the lab guest (tests/lab.py); its disks are given
    in the ``--disk`` spec form, parsed as run-in-qemu.sh parses them."""
    specs = {"plain": str(make_image(d / "plain.raw", 8)),
             "qcow2": str(make_image(d / "layered.qcow2", 8, "qcow2"))}
    for i, (options, _, _) in enumerate(MODERN_FORMS):
        specs[f"form{i}"] = f"{make_image(d / f'form{i}.raw', 1)},{options}"
    return {name: Disk.parse(spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def vm(bay: Bay) -> Bay:
    return bay


def test_command_status_and_output_come_back(vm: Bay) -> None:
    r = vm.run("echo to-stdout; echo to-stderr >&2; exit 42")
    assert (r.status, r.out, r.err) == (42, "to-stdout\n", "to-stderr\n")


def test_many_commands_in_one_session(vm: Bay) -> None:
    outs = [vm.run(["echo", str(i)]).out for i in range(20)]
    assert outs == [f"{i}\n" for i in range(20)]


def test_relative_output_path_lands_in_host_directory(vm: Bay) -> None:
    r = vm.run("mkdir -p sub && echo written-in-guest > sub/out.txt")
    assert r.status == 0, r.err
    assert (vm.dir / "sub" / "out.txt").read_text() == "written-in-guest\n"


def test_guest_runs_the_hosts_python_environment(vm: Bay) -> None:
    r = vm.run(["python", "-c", "import sys, numpy, pyudev; print(sys.prefix)"])
    assert r.status == 0, r.err
    assert r.out.strip() == os.path.realpath(__import__("sys").prefix)


def test_raw_and_qcow2_disks_are_legacy_virtio_blk(vm: Bay) -> None:
    r = vm.run(f"cd /sys/bus/pci/devices && cat {vm.bdfs['plain']}/device "
               f"{vm.bdfs['qcow2']}/device")
    assert r.status == 0, r.err
    assert r.out.split() == ["0x1001", "0x1001"]


@pytest.mark.parametrize("index", range(len(MODERN_FORMS)))
def test_disk_transport_and_feature_options_reach_the_device(vm: Bay,
                                                             index: int) -> None:
    options, device, bits = MODERN_FORMS[index]
    pci = f"/sys/bus/pci/devices/{vm.bdfs[f'form{index}']}"
    r = vm.run(f"cat {pci}/device {pci}/virtio*/features")
    assert r.status == 0, r.err
    got_device, features = r.out.split()
    assert got_device == device, options
    assert {bit: int(features[bit]) for bit in bits} == bits, options


def test_guest_has_nbd_and_ext4_at_boot(vm: Bay) -> None:
    r = vm.run("ls -d /sys/module/nbd /sys/module/ext4 /dev/nbd0 && grep -w ext4 "
               "/proc/filesystems")
    assert r.status == 0, r.err
    assert sorted(r.out.split()) == ["/dev/nbd0", "/sys/module/ext4", "/sys/module/nbd",
                                     "ext4"]


def test_disk_serial_is_file_base_name_cut_to_20_bytes(tmp_path: Path) -> None:
    disk = Disk(tmp_path / ("a-very-long-disk-image-name" + ".raw"))
    assert disk.default_serial() == "a-very-long-disk-ima"
    assert len(disk.default_serial().encode()) == 20


def test_qmp_is_reachable(vm: Bay) -> None:
    blocks = vm.vm.qmp.cmd("query-block")
    assert {b["inserted"]["node-name"] for b in blocks} >= {vm.nodes["plain"],
                                                            vm.nodes["qcow2"]}
    assert {b["qdev"].split("/")[3] for b in blocks} >= {vm.ids["plain"], vm.ids["qcow2"]}


def test_session_command_timeout_is_reported(vm: Bay) -> None:
    cmd = vm.spawn(["sleep", "30"])
    with pytest.raises(GuestTimeout):
        cmd.wait(timeout=1)
    cmd.signal(signal.SIGKILL)
    assert cmd.wait(timeout=30).status == 128 + signal.SIGKILL


# The names of the warm interpreter's children: the oldest process with warm.py in its
# command line (its children have it too, being forks).
WARM_CHILDREN = ("for c in $(cat /proc/$(pgrep -o -f 'qemu/warm[.]py')/task/*/children); "
                 "do cat /proc/$c/comm; done")


def test_warm_and_cold_commands_agree(vm: Bay) -> None:
    """The lab runs virtio-user warm (GuestSession(warm_start=True)): the same status,
    stdout and stderr as a cold start, for output, data and a refused input."""
    plain = vm.bdfs["plain"]
    for args in (["info", "--json"], ["read", "0", "3"], ["write", "0", "--pattern", "300"]):
        argv = ["virtio-user", "--device", plain, *args]
        warm, cold = vm.run(argv), vm.run(argv, warm=False)
        assert (warm.status, warm.stdout, warm.stderr) == \
            (cold.status, cold.stdout, cold.stderr), args
    # ... and a warm command is a child of the warm interpreter, and a signal reaches it.
    cmd = vm.spawn(["virtio-user", "--device", plain, "bench", "--runtime", "60"])
    deadline = time.monotonic() + 60
    while "virtio-user" not in vm.run(WARM_CHILDREN).out.split():
        assert time.monotonic() < deadline, "no virtio-user child of the warm interpreter"
    cmd.signal(signal.SIGINT)
    r = cmd.wait(timeout=60)
    assert r.status == 130 and "interrupted by SIGINT" in r.err, r.err


def test_a_dead_warm_interpreter_fails_its_command_and_is_replaced(vm: Bay) -> None:
    plain = vm.bdfs["plain"]
    cmd = vm.spawn(["virtio-user", "--device", plain, "bench", "--runtime", "5"])
    deadline = time.monotonic() + 60
    while "virtio-user" not in vm.run(WARM_CHILDREN).out.split():
        assert time.monotonic() < deadline, "no virtio-user child of the warm interpreter"
    assert vm.run("kill -9 $(pgrep -o -f 'qemu/warm[.]py')").status == 0
    r = cmd.wait(timeout=60)
    assert r.status == 255 and "warm interpreter (qemu/warm.py) ended" in r.err, r.err
    again = vm.run(["virtio-user", "--device", plain, "read", "0", "1"])
    assert again.status == 0 and len(again.stdout) == 512, again.err


def test_options_in_space_form_and_commas_in_paths(tmp_path: Path) -> None:
    """One boot for: the command's exit status and output, --qemu-arg values starting
    with '-', --memory, and commas in the disk's file name, the current directory and
    TMPDIR (QEMU's sockets and serial log live there), none of which may inject an
    option into QEMU's command line."""
    where = tmp_path / "c,logfile=injected"
    tmpdir = tmp_path / "t,addr=0x5"  # short: a unix socket path has 107 bytes at most
    where.mkdir()
    tmpdir.mkdir()
    img = make_image(where / "disk,addr=0x6.raw", 4)
    extra = make_image(tmp_path / "extra.raw", 4)
    script = ("for d in 10.0 18.0; do cd /sys/bus/pci/devices/0000:00:$d && "
              "cat vendor device virtio*/block/*/serial; echo; done; "
              "ls /sys/bus/pci/devices | grep -c -e ':05.0' -e ':06.0'; "
              "awk '/MemTotal/ {print $2 < 768 * 1024}' /proc/meminfo; "
              "echo to-stderr >&2; exit 3")
    r = run_in_qemu(["--disk", str(img).replace(",", ",,"), "--memory", "768",
                     "--qemu-arg", "-blockdev",
                     "--qemu-arg", f"driver=file,node-name=extra,filename={extra}",
                     "--qemu-arg", "-device",
                     "--qemu-arg", "virtio-blk-pci,drive=extra,addr=0x18,serial=extra-disk",
                     "--", "sh", "-c", script], where, tmpdir)
    assert r.returncode == 3, r.stderr  # the command's own status, its output streamed
    assert r.stdout.split() == ["0x1af4", "0x1001", "disk,addr=0x6.raw",
                                "0x1af4", "0x1001", "extra-disk", "0", "1"]
    assert "to-stderr\n" in r.stderr
    assert list(tmpdir.iterdir()) == []
    assert not (where / "injected").exists() and not Path("injected").exists()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel built from a copy of the project, installed without its dependencies in a
    fresh venv; the driver's dependencies and the harness's are linked in two folders,
    so each half can be imported with or without the other's."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("qemu", "virtio_user"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)],
                   check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp / "dist").glob("virtio_user-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    site = Path(numpy.__file__).parents[1]
    folders = {"driver": ["numpy", "numpy.libs", "pyudev"], "host": ["qemu", "elftools"]}
    for folder, names in folders.items():
        (tmp / folder).mkdir()
        for name in names:
            if (site / name).exists():
                (tmp / folder / name).symlink_to(site / name)
    return {"python": venv / "bin" / "python", "driver": tmp / "driver",
            "host": tmp / "host", "cwd": tmp}


def installed_run(installed: dict[str, Path], argv: list[str], *folders: str,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``argv`` with the installed wheel's python, outside the checkout."""
    env = dict(os.environ, PYTHONPATH=":".join(str(installed[f]) for f in folders))
    return subprocess.run([str(installed["python"]), *argv], cwd=installed["cwd"], env=env,
                          text=True, capture_output=True, timeout=timeout)


def test_installed_driver_imports_without_the_harness_dependencies(
        installed: dict[str, Path]) -> None:
    script = ("import importlib.util as u, virtio_user, virtio_user.cli\n"
              "print(virtio_user.__file__)\n"
              "print([m for m in ('qemu', 'elftools', 'matplotlib') if u.find_spec(m)])\n")
    r = installed_run(installed, ["-c", script], "driver")
    assert r.returncode == 0, r.stderr
    where, missing = r.stdout.splitlines()
    assert where.startswith(str(installed["cwd"] / "venv")) and missing == "[]"
    r = installed_run(installed, ["-m", "virtio_user.cli", "--help"], "driver")
    assert r.returncode == 0 and r.stdout.startswith("usage: virtio-user"), r.stderr
    r = installed_run(installed, ["-c", "import virtio_user.host"], "driver")
    assert "the QEMU harness needs elftools: pip install 'virtio-user[host]'" in r.stderr


def test_installed_harness_finds_its_guest_files(installed: dict[str, Path]) -> None:
    script = ("from virtio_user.host import assets\n"
              "print(assets.GUEST_DIR)\n"
              "print(sorted(p.name for p in assets.GUEST_DIR.glob('[!_]*')))\n")
    r = installed_run(installed, ["-c", script], "driver", "host")
    assert r.returncode == 0, r.stderr
    where, names = r.stdout.splitlines()
    assert where.startswith(str(installed["cwd"] / "venv"))
    assert names == str(["agent.py", "demo.sh", "init.sh", "kernel.conf", "modules.txt",
                          "warm.py"])


def test_installed_harness_boots_with_accel_auto_falling_back_to_tcg_here(
        installed: dict[str, Path]) -> None:
    """The installed wheel, outside the checkout, boots a guest: its own init.sh, agent
    and modules list, and the venv under /tmp visible in the guest."""
    start = time.monotonic()
    r = installed_run(installed, ["-m", "virtio_user.host.run", "--accel", "auto", "--",
                                  "sh", "-c", "echo $VIRTUAL_ENV"], "driver", "host",
                      timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{installed['cwd'] / 'venv'}\n"
    if not accel.cpu_has_virt():
        assert "using TCG because the CPU has no vmx/svm flag" in r.stderr
    assert time.monotonic() - start < 120


# A forced timeout (exit 124) is tested in test_vhost_user.py, with a vhost-user disk.
def test_guest_panic_is_reported_and_stops_the_storage_daemon(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    image = make_image(tmp_path / "served.raw", 1)
    r = run_in_qemu(["--vhost-user-disk", str(image), "--",
                     "sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"], tmp_path, tmpdir)
    assert r.returncode == 125, r.stderr
    assert "the guest kernel panicked" in r.stderr
    assert "Kernel panic" in r.stderr
    assert list(tmpdir.iterdir()) == []
    assert qemu_processes(tmpdir) == [] and storage_daemons(tmpdir) == []


def _sigint_as_at_a_terminal() -> None:
    """A suite started in the background of a non-interactive shell (``... &``) runs
    with SIGINT ignored, and a child inherits that: Python then installs no
    KeyboardInterrupt handler and the harness, rightly, ignores Ctrl-C. Give the child
    the default disposition that a terminal's Ctrl-C finds."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_or_sighup_leaves_nothing_behind(tmp_path: Path, signum: int,
                                               status: int) -> None:
    """Ctrl-C, or SIGHUP from a closed terminal or ssh session: QEMU and the storage
    daemon stopped, the temporary directory gone."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    image = make_image(tmp_path / "served.raw", 1)
    proc = subprocess.Popen([str(RUN_IN_QEMU), "--vhost-user-disk", str(image),
                             "--", "sh", "-c", "echo started; sleep 600"],
                            cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmpdir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(signum)
    # Bounded: 30 s for the guest to power off, then QEMU and the daemon are killed
    # (seen past 60 s once in CI, on a guest slow to power off with the daemon attached).
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert list(tmpdir.iterdir()) == []
    assert qemu_processes(tmpdir) == [] and storage_daemons(tmpdir) == []
