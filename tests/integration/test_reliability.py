"""Reliability against the real device: injected errors, resize, bad input, interruptions,
data integrity, flush durability and hot-unplug.

Scripts the guest runs live in tests/guest/; the host checks image files as the oracle.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import pytest

import cli_fuzz
from images import make_image, qcow2_to_raw
from virtio_user.host import CommandResult, Disk, GuestSession

pytestmark = pytest.mark.qemu

SECTOR = 512
GUEST_SCRIPTS = Path(__file__).resolve().parents[1] / "guest"
EIO_READ, EIO_WRITE, RESIZE, LONG, MOUNTED, PLAIN = (
    f"0000:00:{0x10 + i:02x}.0" for i in range(6))
HOTPLUG = "0000:01:00.0"  # behind the pcie-root-port
SMALL_DIRECT = "0000:00:17.0"  # queue size 16, no indirect descriptors
SOAK_LEGACY, SOAK_MODERN = "0000:00:18.0", "0000:00:19.0"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Guest:
    def __init__(self, vm: GuestSession, images: dict[str, Path]) -> None:
        self.vm = vm
        self.images = images

    def vu(self, bdf: str, *args: object, timeout: float = 300) -> CommandResult:
        return self.vm.run(["virtio-user", "--device", bdf, *map(str, args)], timeout=timeout)

    def script(self, name: str, *args: object, timeout: float = 600) -> CommandResult:
        return self.vm.run(["python", str(GUEST_SCRIPTS / name), *map(str, args)],
                           timeout=timeout)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("reliability")
    images = {name: make_image(d / f"{name}.raw", size, pattern=name.encode())
              for name, size in (("eio_read", 8), ("eio_write", 8), ("resize", 8),
                                 ("long", 128), ("mounted", 16), ("plain", 8),
                                 ("hotplug", 8), ("small_direct", 8),
                                 ("soak_legacy", 32), ("soak_modern", 32))}
    disks = [Disk(images["eio_read"], inject_errors=[("read_aio", 100)]),
             Disk(images["eio_write"], inject_errors=[("write_aio", 200)]),
             Disk(images["resize"]), Disk(images["long"]), Disk(images["mounted"]),
             Disk(images["plain"]),
             Disk(images["hotplug"], extra={"bus": "hp0", "addr": "0x0"}),
             Disk(images["small_direct"], queue_size=16, indirect_desc=False),
             Disk(images["soak_legacy"]), Disk(images["soak_modern"], transport="modern")]
    root_port = ["-device", "pcie-root-port,id=hp0,chassis=1,bus=pcie.0,addr=0x1c"]
    with GuestSession(disks, cwd=d, qemu_args=root_port, warm_start=True) as vm:
        yield Guest(vm, images)


# -- 1. device errors ------------------------------------------------------------------

def test_injected_read_error_is_exit_3_and_names_the_sectors(guest: Guest) -> None:
    r = guest.vu(EIO_READ, "read", 96, 8)
    assert r.status == 3, r.err
    assert "96" in r.err and "103" in r.err
    assert guest.vu(EIO_READ, "read", 0, 96).status == 0  # just before the bad sector
    assert guest.vu(EIO_READ, "read", 101, 50).status == 0  # just after it
    assert guest.vu(EIO_READ, "write", 100, "--pattern", 1, "--count", 1).status == 0


def test_injected_write_error_is_exit_3_and_other_writes_succeed(guest: Guest) -> None:
    before = guest.images["eio_write"].read_bytes()
    r = guest.vu(EIO_WRITE, "write", 200, "--pattern", 0x42, "--count", 1)
    assert r.status == 3, r.err
    assert "200" in r.err
    assert guest.vu(EIO_WRITE, "write", 300, "--pattern", 0x42, "--count", 1).status == 0
    after = guest.images["eio_write"].read_bytes()
    assert after[300 * SECTOR:301 * SECTOR] == b"\x42" * SECTOR
    assert after[200 * SECTOR:201 * SECTOR] == before[200 * SECTOR:201 * SECTOR]


# -- 2. capacity change ----------------------------------------------------------------

def test_block_resize_grow_and_shrink_while_open(guest: Guest) -> None:
    cwd = guest.vm.config.cwd
    cmd = guest.vm.spawn(["python", str(GUEST_SCRIPTS / "resize.py"), RESIZE, str(cwd)])
    cmd.wait_output(b"capacity 16384")
    guest.vm.qmp.cmd("block_resize", **{"node-name": "disk2", "size": 16 << 20})
    (cwd / "grown").touch()
    cmd.wait_output(b"capacity 32768")
    guest.vm.qmp.cmd("block_resize", **{"node-name": "disk2", "size": 4 << 20})
    (cwd / "shrunk").touch()
    r = cmd.wait(timeout=120)
    assert r.status == 0, r.err
    assert r.out.splitlines() == [
        "capacity 16384", "capacity 32768", "read 32767 ok", "capacity 8192",
        "read 8192 refused: out of range"]


# -- 4. bad input ----------------------------------------------------------------------

BAD_INPUT = [  # (args, exit code, text the message must contain)
    (["read", "-1", "1"], 1, "-1"),
    (["read", "0", "0"], 1, "count"),
    (["read", "0", "-5"], 1, "-5"),
    (["read", "abc", "1"], 1, "abc"),
    (["read", "0", str(2**64)], 22, "capacity"),
    (["read", str(2**70), "1"], 22, "capacity"),
    (["read", "16383", "2"], 22, "16383..16384 exceed capacity 16384"),
    (["write", "0", "--pattern", "256", "--count", "1"], 1, "256"),
    (["write", "0", "--pattern", "1", "--count", "0"], 1, "count"),
    (["write", "0", "-i", "odd.bin"], 1, "512"),
    (["write", "0", "-i", "missing.bin"], 15, "missing.bin"),
    (["write", "16384", "--pattern", "1", "--count", "1"], 22, "capacity"),
    (["write", "0"], 1, ""),
    (["discard", "0", "0"], 1, "count"),
    (["write-zeroes", "-3", "1"], 1, "-3"),
    (["frobnicate"], 1, ""),
]


@pytest.mark.parametrize("args,code,text", BAD_INPUT, ids=[" ".join(a) for a, _, _ in BAD_INPUT])
def test_bad_input_gets_its_exit_code_and_leaves_the_image(guest: Guest, args: list[str],
                                                           code: int, text: str) -> None:
    cwd = guest.vm.config.cwd
    (cwd / "odd.bin").write_bytes(b"x" * 700)
    before = sha(guest.images["plain"])
    r = guest.vu(PLAIN, *args)
    assert r.status == code, r.err
    assert text in r.err
    assert "Traceback" not in r.err
    assert sha(guest.images["plain"]) == before


@pytest.mark.parametrize("bdf,code", [
    ("0000:00:10", 1), ("zz:zz", 1), ("0000:00:05.0", 15),  # malformed, absent
    ("0000:00:1f.2", 15), ("0000:00:01.0", 15),  # SATA controller, virtio-serial
])
def test_wrong_or_malformed_pci_address(guest: Guest, bdf: str, code: int) -> None:
    r = guest.vu(bdf, "info")
    assert r.status == code, r.err
    assert bdf in r.err
    assert "Traceback" not in r.err


def test_unreadable_input_file(guest: Guest) -> None:
    before = sha(guest.images["plain"])
    r = guest.vm.run(f"mkdir -p /tmp/indir && virtio-user --device {PLAIN} write 0 -i /tmp/indir")
    assert r.status == 15, r.err  # a directory cannot be read as data
    assert "cannot read /tmp/indir" in r.err
    # Permissions do not stop root: a mode-000 file is read, and its length is wrong.
    r = guest.vm.run("mkdir -p /tmp/noperm && echo x > /tmp/noperm/f && chmod 000 /tmp/noperm"
                     f" && virtio-user --device {PLAIN} write 0 -i /tmp/noperm/f")
    assert r.status == 1, r.err
    assert "2 bytes" in r.err
    assert sha(guest.images["plain"]) == before


def test_generated_bad_input_with_hypothesis(guest: Guest) -> None:
    """Over 1,000 cases drawn by hypothesis (tests/cli_fuzz.py), run in one guest
    process: each gets its documented exit code and a message, no traceback."""
    before = sha(guest.images["plain"])
    where = guest.images["plain"].parent / "fuzz"  # the guest sees it at this path
    where.mkdir(exist_ok=True)
    cases = cli_fuzz.draw_cases(where)
    assert len(cases) >= 1000
    (where / "cases.json").write_text(json.dumps([argv for argv, _ in cases]))
    r = guest.script("run_cli_cases.py", PLAIN, where / "cases.json", where / "results.json",
                     timeout=900)
    assert r.status == 0, r.err
    results = json.loads((where / "results.json").read_text())
    assert len(results) == len(cases)
    wrong = [(argv, why, err) for (argv, want), (code, err) in zip(cases, results)
             if (why := cli_fuzz.problem((argv, want), code, err))]
    assert not wrong, f"{len(wrong)} of {len(cases)} cases wrong, first: {wrong[:5]}"
    assert sha(guest.images["plain"]) == before


# -- 4b. a small queue without indirect descriptors, odd files -------------------------

def test_small_queue_without_indirect_descriptors(guest: Guest) -> None:
    r = guest.vu(SMALL_DIRECT, "read", 0, 8192)  # 4 MiB through a 16-entry direct queue
    assert r.status == 0, r.err
    assert r.stdout == guest.images["small_direct"].read_bytes()[:8192 * SECTOR]


def test_output_that_refuses_writes_is_exit_15(guest: Guest) -> None:
    for target in ("/dev/full", "/proc/version"):
        r = guest.vu(SMALL_DIRECT, "read", 0, 8, "-o", target)
        assert r.status == 15, r.err
        assert f"cannot write {target}" in r.err


def test_write_from_dev_zero_stops_at_the_end_of_the_device(guest: Guest) -> None:
    r = guest.vu(SMALL_DIRECT, "write", 0, "-i", "/dev/zero")
    assert r.status == 22, r.err
    assert "beyond the end of the device" in r.err
    assert guest.images["small_direct"].read_bytes() == bytes(8 << 20)


def test_device_bound_to_the_kernel_and_mounted_is_refused(guest: Guest) -> None:
    before = guest.vm.run(f"""set -e
        dev=$(ls /sys/bus/pci/devices/{MOUNTED}/virtio*/block)
        mkfs.ext4 -q -F /dev/$dev && mkdir -p /tmp/mnt && mount /dev/$dev /tmp/mnt
        echo $dev""")
    assert before.status == 0, before.err
    r = guest.vu(MOUNTED, "info")
    assert r.status == 15, r.err
    assert "mounted" in r.err
    assert guest.vm.run("cat /proc/mounts").out.count("/tmp/mnt") == 1
    assert guest.vm.run(f"umount /tmp/mnt").status == 0


# -- 5. interruptions ------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_long_write_resets_and_reports(guest: Guest, signum: int) -> None:
    sectors = 128 * 2048
    cmd = guest.vm.spawn(["virtio-user", "--device", LONG, "--progress", "write", "0",
                          "--pattern", "0x77", "--count", str(sectors)])
    cmd.wait_output(b"written")
    cmd.signal(signum)
    r = cmd.wait(timeout=120)
    assert r.status == 128 + signum, r.err
    assert "interrupted" in r.err and "sectors" in r.err
    assert guest.vu(LONG, "read", 0, 1).stdout == b"\x77" * SECTOR  # the next run works


def test_kill_9_then_next_run_recovers(guest: Guest) -> None:
    cmd = guest.vm.spawn(["virtio-user", "--device", LONG, "--progress", "write", "0",
                          "--pattern", "0x66", "--count", str(128 * 2048)])
    cmd.wait_output(b"written")
    cmd.signal(signal.SIGKILL)
    assert cmd.wait(timeout=60).status == 128 + signal.SIGKILL
    r = guest.vu(LONG, "read", 0, 1)
    assert r.status == 0, r.err
    assert r.stdout == b"\x66" * SECTOR


# -- 9. hot-unplug ---------------------------------------------------------------------

def test_hot_unplugged_device_fails_cleanly(guest: Guest) -> None:
    assert guest.vu(HOTPLUG, "info").status == 0
    guest.vm.qmp.cmd("device_del", id="vblk6")
    event = guest.vm.qmp.pull_event(wait=60)
    while event is not None and event["event"] != "DEVICE_DELETED":
        event = guest.vm.qmp.pull_event(wait=60)
    assert event is not None
    r = guest.vu(HOTPLUG, "info", timeout=60)
    assert r.status == 15, r.err
    assert HOTPLUG in r.err


# -- 6. integrity soak; 7. flush durability (its own guest: QEMU has to go away) --------

SOAK_WRITES = 10_000


def test_integrity_soak_guest_and_host_agree(guest: Guest) -> None:
    """The same random writes on a legacy and a modern-only device, in one guest
    process, alternately one at a time and in batches of up to 16; each image checked
    byte for byte against what the guest wrote."""
    legacy, modern = guest.images["soak_legacy"], guest.images["soak_modern"]
    cwd = legacy.parent
    r = guest.script("soak.py", SOAK_WRITES, f"{SOAK_LEGACY},legacy,expected-legacy.raw",
                     f"{SOAK_MODERN},modern,expected-modern.raw", timeout=2400)
    assert r.status == 0, r.out + r.err
    reports = [json.loads(line) for line in r.out.splitlines() if line.startswith("{")]
    assert [(x["transport"], x["writes"], x["mismatches"]) for x in reports] == [
        ("legacy", SOAK_WRITES, 0), ("modern", SOAK_WRITES, 0)]
    assert legacy.read_bytes() == (cwd / "expected-legacy.raw").read_bytes()
    assert modern.read_bytes() == (cwd / "expected-modern.raw").read_bytes()


def test_flushed_data_survives_kill_9_of_qemu(tmp_path: Path) -> None:
    image = make_image(tmp_path / "durable.qcow2", 64, "qcow2")
    with GuestSession([Disk(image, cache="writeback")], cwd=tmp_path, warm_start=True) as vm:
        for sector in (0, 4096, 65536):  # fresh clusters: qcow2 metadata must be written
            r = vm.run(["virtio-user", "write", str(sector), "--pattern", "0x3c",
                        "--count", "8"])
            assert r.status == 0, r.err
        assert vm.run(["virtio-user", "flush"]).status == 0
        vm.machine.proc.send_signal(signal.SIGKILL)
        vm.machine.proc.wait(30)
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = qcow2_to_raw(image, tmp_path / "durable.raw")
    for sector in (0, 4096, 65536):
        assert raw[sector * SECTOR:(sector + 8) * SECTOR] == b"\x3c" * 8 * SECTOR
