"""Interrupt-driven completions against QEMU's virtio-blk: uio INTx on legacy devices,
vfio MSI-X on modern ones; four devices per backend in the lab guest (tests/lab.py).

What the tests show: tens of thousands of I/Os complete with ``--wait interrupt`` (none
lost, none timed out, the bytes checked on the host image); the guest kernel's
/proc/interrupts counter for the device rises with them (interrupts, not polling, drove
the completions); a QMP ``block_resize`` during a bench arrives through the
configuration interrupt; SIGINT while asleep on an interrupt ends with exit 130, the
device reset and the vectors freed, and the next run works.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import time
from pathlib import Path

import pytest

import docpages
from images import make_image
from lab import Bay
from virtio_user.host import CommandResult, Disk

pytestmark = pytest.mark.qemu

SECTOR = 512
DATA, RESIZE, SLOW, NO_MSIX = "data", "resize", "slow", "no_msix"
MODERN = {"disable-legacy": "on", "disable-modern": "off"}  # 1af4:1042
README_DEVICE = "0000:00:10.0"  # where the documented example has its disk


def lab_disks(d: Path) -> dict[str, Disk]:
    """Legacy devices for uio, modern ones for vfio; the fourth has no MSI-X."""
    disks = {}
    for backend, extra in (("uio", {}), ("vfio", MODERN)):
        for name, pattern in ((DATA, b"interrupts"), (RESIZE, b"resize"), (SLOW, b"slow"),
                              (NO_MSIX, b"intx")):
            image = make_image(d / f"{backend}-{name}.raw", 16 if name == DATA else 8,
                               pattern=pattern)
            more = {"vectors": "0"} if name == NO_MSIX else {}
            disks[f"{backend}-{name}"] = Disk(image, extra={**extra, **more})
    return disks


class Guest:
    """One backend's four disks; methods take the disk's short name (DATA, ...)."""

    def __init__(self, bay: Bay, backend: str) -> None:
        self.bay = bay
        self.vm = bay.vm
        self.backend = backend
        self.cwd = bay.dir
        self.images = {name.partition("-")[2]: path for name, path in bay.images.items()
                       if name.startswith(backend + "-")}

    def bdf(self, disk: str) -> str:
        return self.bay.bdfs[f"{self.backend}-{disk}"]

    def argv(self, disk: str, *args: object) -> list[str]:
        return ["virtio-user", "--backend", self.backend, "--device", self.bdf(disk),
                *map(str, args)]

    def spawn(self, argv: list[str]):  # type: ignore[no-untyped-def]
        return self.bay.spawn(argv)

    def vu(self, disk: str, *args: object, timeout: float = 300) -> CommandResult:
        return self.bay.run(self.argv(disk, *args), timeout=timeout)

    def irq_count(self, disk: str) -> int | None:
        """The guest kernel's count for the device's queue interrupt: uio's INTx line,
        or vfio's MSI-X vector 1 (which exists only while a process holds it)."""
        bdf = self.bdf(disk)
        if self.backend == "uio":
            irq = self.vm.run(["cat", f"/sys/bus/pci/devices/{bdf}/irq"]).out.strip()
            label = re.compile(rf"^\s*{irq}:")
        else:
            label = re.compile(rf"vfio-msix\[1\]\({re.escape(bdf)}\)")
        for line in self.vm.run(["cat", "/proc/interrupts"]).out.splitlines():
            if label.search(line):
                return sum(int(f) for f in line.split(":", 1)[1].split() if f.isdigit())
        return None

    def wait_interrupts(self, disk: str, above: int = 0, timeout: float = 120) -> int:
        """Until the device's interrupt count exceeds ``above`` (a process is running
        and the device interrupts it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = self.irq_count(disk)
            if count is not None and count > above:
                return count
            time.sleep(0.5)
        raise AssertionError(f"{self.bdf(disk)}: no interrupts counted within {timeout:g} s")


@pytest.fixture(scope="module", params=["uio", "vfio"])
def guest(request: pytest.FixtureRequest, bay: Bay) -> Guest:
    return Guest(bay, request.param)


def readme_example() -> list[str]:
    """The command docs/how-it-works.md's "Waiting" section shows (for vfio), as argv."""
    (line,) = docpages.block("how-it-works.md", "## Waiting: poll, interrupt, hybrid", "sh")
    return shlex.split(line)


def test_tens_of_thousands_of_ios_driven_by_interrupts(guest: Guest) -> None:
    """The documented example, word for word on vfio but for the lab's address of the disk
    (uio: its --backend changed too)."""
    before = guest.irq_count(DATA) or 0  # uio: the line's count; vfio: no vector yet
    original = guest.images["data"].read_bytes()
    argv = readme_example()
    assert argv[argv.index("--device") + 1] == README_DEVICE and "20000" in argv
    argv[argv.index("--backend") + 1] = guest.backend
    argv[argv.index("--device") + 1] = guest.bdf(DATA)
    cmd = guest.spawn(argv)
    during = guest.wait_interrupts(DATA, above=before)
    r = cmd.wait(timeout=900)
    assert r.status == 0, r.err
    result = json.loads(r.out)
    assert result["ios"] == 20000 and result["verified_blocks"] == 256
    assert result["wait"] == "interrupt"
    assert result["irq"] == ("uio-intx" if guest.backend == "uio" else "vfio-msix")
    assert result["interrupts"] > 100  # at QD16 many completions share one interrupt
    assert result["cpu_s_per_io"] > 0
    if guest.backend == "uio":  # the kernel counted at least the interrupts we saw
        assert (guest.irq_count(DATA) or 0) - before >= result["interrupts"]
    else:  # the vector was counting while the bench ran, and is freed now
        assert during > 0 and guest.irq_count(DATA) is None
    # The host image is the oracle: what the guest reads back in interrupt mode is it.
    back = guest.cwd / "back.bin"
    r = guest.vu(DATA, "--wait", "interrupt", "read", 0, 32768, "-o", back)
    assert r.status == 0, r.err
    image = guest.images["data"].read_bytes()
    assert back.read_bytes() == image
    assert image != original  # the 20000 writes reached the image


def test_hybrid_reads_match_the_host_image(guest: Guest) -> None:
    r = guest.vu(DATA, "--wait", "hybrid", "bench", "--rw", "randread", "--iodepth", 4,
                 "--ios", 5000, "--verify", "--json")
    assert r.status == 0, r.err
    result = json.loads(r.out)
    assert result["ios"] == 5000 and result["wait"] == "hybrid"
    assert result["irq"] in ("uio-intx", "vfio-msix") and result["verified_blocks"] >= 256
    r = guest.vu(DATA, "--wait", "hybrid", "read", 1000, 8, "-o",
                 guest.cwd / "hybrid.bin")
    assert r.status == 0, r.err
    image = guest.images["data"].read_bytes()
    assert (guest.cwd / "hybrid.bin").read_bytes() == \
        image[1000 * SECTOR:1008 * SECTOR]


def test_resize_during_a_bench_arrives_by_the_config_interrupt(guest: Guest) -> None:
    """bench uses only submit/reap, which never look at the config: the new capacity
    can only come from the configuration-change interrupt."""
    cmd = guest.spawn(guest.argv(RESIZE, "--wait", "interrupt", "bench", "--rw",
                                    "randread", "--runtime", 8))
    guest.wait_interrupts(RESIZE, above=guest.irq_count(RESIZE) or 0)
    node = guest.bay.nodes[f"{guest.backend}-{RESIZE}"]
    guest.vm.qmp.cmd("block_resize", **{"node-name": node, "size": 16 << 20})
    r = cmd.wait(timeout=300)
    assert r.status == 0, r.err
    assert "config change: capacity 16384 -> 32768 sectors" in r.out
    assert f"{guest.bdf(RESIZE)}: capacity changed from 16384 to 32768 sectors" in r.err


def sleeping_in_poll(guest: Guest) -> bool:
    """Whether the virtio-user process is asleep in poll(2) right now."""
    # comm, not cmdline: a warm-started command runs in the warm interpreter's argv.
    # Shell builtins only (read, test): a grep per process took seconds under TCG. wchan
    # has no newline, so its read fails but still sets w.
    r = guest.vm.run("for p in /proc/[0-9]*; do read c < $p/comm 2>/dev/null && "
                     "[ \"$c\" = virtio-user ] && { read w < $p/wchan; echo \"$w\"; }; done")
    return "poll" in r.out


def test_sigint_while_asleep_ends_cleanly_and_the_next_run_works(guest: Guest) -> None:
    qdev = guest.bay.ids[f"{guest.backend}-{SLOW}"]
    throttle = {"id": f"/machine/peripheral/{qdev}/virtio-backend", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops_rd": 0,
                "iops_wr": 0}
    guest.vm.qmp.cmd("block_set_io_throttle", iops=2, **throttle)  # a request: ~0.5 s
    try:
        cmd = guest.spawn(guest.argv(SLOW, "--wait", "interrupt", "--timeout", 60,
                                        "bench", "--runtime", 120))
        guest.wait_interrupts(SLOW, above=guest.irq_count(SLOW) or 0)
        deadline = time.monotonic() + 60
        while not sleeping_in_poll(guest):
            assert time.monotonic() < deadline, "never seen asleep in poll"
        cmd.signal(signal.SIGINT)
        r = cmd.wait(timeout=120)
    finally:
        guest.vm.qmp.cmd("block_set_io_throttle", iops=0, **throttle)
    assert r.status == 130, r.err
    assert "Traceback" not in r.err
    if guest.backend == "vfio":
        assert guest.irq_count(SLOW) is None  # the vectors were freed
    r = guest.vu(SLOW, "--wait", "interrupt", "bench", "--ios", 500, "--verify", "--json")
    assert r.status == 0, r.err
    assert json.loads(r.out)["ios"] == 500
    r = guest.vu(SLOW, "--wait", "interrupt", "read", 0, 16, "-o",
                 guest.cwd / "slow.bin")
    assert r.status == 0, r.err
    assert (guest.cwd / "slow.bin").read_bytes() == \
        guest.images["slow"].read_bytes()[:16 * SECTOR]


def test_without_msix_the_device_interrupts_through_intx(guest: Guest) -> None:
    """vectors=0: the device has no MSI-X capability, so vfio falls back to INTx through
    an eventfd (vfio-pci masks the line, we unmask with SET_IRQS), as uio always does."""
    r = guest.vu(NO_MSIX, "--wait", "interrupt", "bench", "--rw", "randwrite", "--iodepth",
                 4, "--ios", 3000, "--verify", "--json")
    assert r.status == 0, r.err
    result = json.loads(r.out)
    assert result["irq"] == ("uio-intx" if guest.backend == "uio" else "vfio-intx")
    assert result["ios"] == 3000 and result["interrupts"] > 0
    back = guest.cwd / "no_msix.bin"
    r = guest.vu(NO_MSIX, "--wait", "interrupt", "read", 0, 16384, "-o", back)
    assert r.status == 0, r.err
    assert back.read_bytes() == guest.images["no_msix"].read_bytes()
