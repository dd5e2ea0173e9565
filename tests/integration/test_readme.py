"""The README's and the docs' examples and options, run as they are written, through the
real ``scripts/run-in-qemu.sh``; the image files on the host are the oracle.

The command-line examples are read from the README's tour and docs/cli.md (the same three
lines) and run by the shell, word for word (only ``scripts/run-in-qemu.sh`` becomes this
checkout's absolute path), in a folder holding a ``disk.img``. Every run boots a guest, so
the other harness and driver options the docs show share one run. The Python API example
(docs/python-api.md) runs in test_device.py, the shell transcript (docs/cli.md) in
test_shell.py, the interrupt example (docs/how-it-works.md) in test_interrupts.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import docpages
from images import RUN_IN_QEMU, make_image

pytestmark = pytest.mark.qemu

SECTOR = 512
DISK_MIB = 8
PATTERN = bytes(range(251))  # a prime length: every sector of the image differs
SCRIPT = "scripts/run-in-qemu.sh"
CLI_EXAMPLES = [
    f"{SCRIPT} --disk disk.img -- virtio-user read 0 8 > first-4k.bin",
    f"{SCRIPT} --disk disk.img -- virtio-user write 2048 -i first-4k.bin",
    f"{SCRIPT} --disk disk.img --backend vfio -- virtio-user --backend vfio info --json",
]


def run_line(line: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """One README command line through the shell, as a user would type it in ``cwd``."""
    assert line.startswith(SCRIPT + " ")
    return run_argv(["bash", "-c", str(RUN_IN_QEMU) + line[len(SCRIPT):]], cwd, timeout)


def run_argv(argv: list[str], cwd: Path, timeout: float = 300
             ) -> subprocess.CompletedProcess[bytes]:
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.run(argv, cwd=cwd, env=dict(os.environ, TMPDIR=str(tmp)),
                          capture_output=True, timeout=timeout)


def sectors(image: Path, first: int, count: int) -> bytes:
    with image.open("rb") as f:
        f.seek(first * SECTOR)
        return f.read(count * SECTOR)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    make_image(tmp_path / "disk.img", DISK_MIB, pattern=PATTERN)
    return tmp_path


def test_the_command_line_examples_are_the_ones_tested() -> None:
    assert docpages.block("README.md", "## A short tour", "sh") == CLI_EXAMPLES
    assert docpages.block("cli.md", "## Synopsis", "sh") == CLI_EXAMPLES


def test_the_main_job_runs_the_demo(tmp_path: Path) -> None:
    """The README's first command, bare: a scratch disk, info, a read, a write restored."""
    main_job, test_suite = docpages.block("README.md", "## The two commands", "sh")
    assert main_job.split("#")[0].strip() == SCRIPT
    # The second, scripts/test.sh, is this very suite: CI runs it (.ci/run).
    assert test_suite.split("#")[0].strip() == "scripts/test.sh"
    r = run_line(SCRIPT + " ", tmp_path)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "$ virtio-user --backend uio info\n" in out
    assert "capacity_sectors     131072\n" in out  # the 64 MiB scratch image
    assert "|virtio-user scra|" in out  # sector 0 of the scratch image, hexdump -C
    assert "a5 a5 a5 a5" in out  # sector 1 after the pattern write
    assert "\nhello from ext4 on the user-space driver\n" in out  # mounted through nbd
    assert out.endswith("demo: done; the user-space driver read and wrote the disk "
                        "through its own virtqueue\n")
    assert list((tmp_path / "tmp").iterdir()) == []  # the scratch image is gone


def test_session_mode_example(tmp_path: Path) -> None:
    """docs/harness.md's Python block of "Session mode", verbatim, in a folder holding a
    disk.img."""
    code = "\n".join(docpages.block("harness.md", "## Session mode (Python)", "python"))
    make_image(tmp_path / "disk.img", 64)
    r = run_argv([sys.executable, "-c", code], tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    status, first_json_line = lines[0].split(" ", 1)
    assert (status, first_json_line) == ("0", "{")
    end = lines.index("}")
    assert json.loads("\n".join(["{", *lines[1:end + 1]]))["serial"] == "disk.img"
    # r.out ends in a newline, then print's own; then 128 + SIGINT, the documented status.
    assert lines[end + 1:] == ["", "130"]


def test_read_example_then_write_example(workdir: Path) -> None:
    image = workdir / "disk.img"
    original = image.read_bytes()

    r = run_line(CLI_EXAMPLES[0], workdir)
    assert r.returncode == 0, r.stderr.decode()
    first_4k = (workdir / "first-4k.bin").read_bytes()
    assert first_4k == original[:4096]

    r = run_line(CLI_EXAMPLES[1], workdir)
    assert r.returncode == 0, r.stderr.decode()
    at = 2048 * SECTOR
    assert sectors(image, 2048, 8) == first_4k != original[at:at + 4096]
    after = image.read_bytes()
    assert after[:at] == original[:at] and after[at + 4096:] == original[at + 4096:]


def test_vfio_info_json_example(workdir: Path) -> None:
    before = (workdir / "disk.img").read_bytes()
    r = run_line(CLI_EXAMPLES[2], workdir)
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert (info["pci_address"], info["backend"]) == ("0000:00:10.0", "vfio")
    assert (info["capacity_sectors"], info["serial"]) == (DISK_MIB * 2048, "disk.img")
    assert info["read_only"] is False
    assert (workdir / "disk.img").read_bytes() == before


# One boot for the rest: --disk with the README's options, --memory MIB, and the
# driver's --rebind and write-zeroes --unmap. Each guest command prints its exit status.
GUEST_SCRIPT = """
virtio-user --rebind write-zeroes 8 16 --unmap; echo "status write-zeroes $?"
echo "driver $(basename "$(readlink /sys/bus/pci/devices/0000:00:10.0/driver)")"
echo "kernel-sectors $(cat /sys/bus/pci/devices/0000:00:10.0/virtio*/block/vd*/size)"
virtio-user --device 0000:00:11.0 info --json > ro.json; echo "status info $?"
echo "memtotal-kib $(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
"""
SERIAL = "ro-layer"


def readme_disk_options() -> str:
    """What docs/harness.md shows after ``PATH,`` for --disk, its serial S made a real one."""
    shown = re.search(r"`PATH,([^`]+)`", docpages.text("harness.md"))
    assert shown is not None
    return shown.group(1).replace("serial=S", f"serial={SERIAL}")


def test_disk_options_memory_rebind_and_unmap(workdir: Path) -> None:
    image = workdir / "disk.img"
    original = image.read_bytes()
    layered = make_image(workdir / "layered.qcow2", 16, "qcow2")
    layered_before = layered.read_bytes()

    options = readme_disk_options()
    assert options.startswith("format=qcow2,readonly=on,cache=none,queue-size=1024")
    r = run_argv([str(RUN_IN_QEMU), "--disk", "disk.img",
                  "--disk", f"layered.qcow2,{options}", "--memory", "768",
                  "--", "sh", "-c", GUEST_SCRIPT], workdir)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    report = dict(line.split(" ", 1) for line in lines if not line.startswith("status "))
    assert "status write-zeroes 0" in lines, r.stderr.decode()
    assert "status info 0" in lines, r.stderr.decode()

    # --rebind: the kernel's virtio-pci has the device back, and virtio_blk its disk.
    assert report["driver"] == "virtio-pci"
    assert report["kernel-sectors"] == str(DISK_MIB * 2048)
    # write-zeroes 8 16 --unmap: those sectors read as zeroes on the host, nothing else moved.
    after = image.read_bytes()
    assert sectors(image, 8, 16) == bytes(16 * SECTOR) != original[8 * SECTOR:24 * SECTOR]
    assert after[:8 * SECTOR] == original[:8 * SECTOR]
    assert after[24 * SECTOR:] == original[24 * SECTOR:]

    # PATH,format=qcow2,readonly=on,cache=none,queue-size=1024[,serial=S]: the guest sees
    # all but cache=none (O_DIRECT on the host), which shows only in QEMU starting.
    info = json.loads((workdir / "ro.json").read_text())
    assert info["capacity_sectors"] == 16 * 2048  # qcow2's virtual size, not the file's
    assert info["read_only"] is True
    assert info["queue_size"] == 1024
    assert info["serial"] == (SERIAL if "serial=" in options else "layered.qcow2")
    assert layered.read_bytes() == layered_before

    # --memory 768: the guest has 768 MiB less what the kernel keeps for itself.
    assert 600 * 1024 < int(report["memtotal-kib"]) <= 768 * 1024
