"""A filesystem through ublk: ``virtio-user ublk add`` serves QEMU's virtio-blk to the
guest kernel's ublk driver (Linux 6.12, ``ublk_drv``), and ext4, fio and dd use
/dev/ublkbN like any disk.

One 6.12 guest holds every disk. The host is the oracle: ``e2fsck -fn`` on the image,
``debugfs -R "cat PATH"`` for each file written through /dev/ublkb0, and the image's
bytes for what dd wrote.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from export_fs import ALIVE, FS_MIB, ExportGuest, debugfs_cat, export_disks
from virtio_user.host import GuestSession

pytestmark = pytest.mark.qemu

DISKS = {"fs": "0000:00:10.0", "eio": "0000:00:11.0", "ro": "0000:00:12.0",
         "scratch": "0000:00:13.0"}
SCRATCH_PATTERN = b"scratch through ublk\n" * 3 + b"!"  # 64 bytes
KILL_LIMIT = 30.0  # seconds for I/O to fail after kill -9 of the server


class Guest(ExportGuest):
    def add(self, disk: str, *extra: str, wait: str = "poll") -> tuple[str, int]:
        """``virtio-user ublk add`` in the background form: (/dev/ublkbN, server pid)."""
        before = [] if wait == "poll" else ["--wait", wait]
        out = self.ok(["virtio-user", *before, "--device", DISKS[disk], "ublk", "add", *extra])
        path, _, rest = out.strip().partition(": ready, server pid ")
        assert path.startswith("/dev/ublkb") and rest.isdigit(), out
        assert int(self.ok(f"cat /sys/block/{path[5:]}/size")) > 0
        return path, int(rest)

    def delete(self, path: str) -> None:
        number = path.removeprefix("/dev/ublkb")
        out = self.ok(["virtio-user", "ublk", "del", number])
        assert f"ublk device {number} removed" in out, out
        self.ok(f"! test -e /sys/block/ublkb{number}")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("ublk")
    images, tree, disks = export_disks(d, "ublk", 24, 64, SCRATCH_PATTERN)
    with GuestSession(disks, cwd=d, warm_start=True, kernel="6.12") as vm:
        yield Guest(vm, d, images, tree, "bad.bin")


def test_mkfs_mount_a_tree_del_and_the_host_reads_it_back(guest: Guest) -> None:
    g = guest
    assert g.add("fs")[0] == "/dev/ublkb0"  # the docs' lines, as written there
    g.ok("mkfs.ext4 -q -F /dev/ublkb0 && mkdir -p /tmp/fs && mount /dev/ublkb0 /tmp/fs")
    g.ok("cp -a tree /tmp/fs/tree && sync")  # tree: a directory in the current one
    listed = g.ok(["virtio-user", "ublk", "list"])
    assert listed.startswith("/dev/ublkb0: LIVE, ") and "server pid" in listed, listed
    busy = g.sh(["virtio-user", "ublk", "del", "0"])
    assert busy.status == 15 and "/dev/ublkb0 is mounted on /tmp/fs" in busy.err, busy.err
    g.ok("umount /tmp/fs")
    g.delete("/dev/ublkb0")
    assert g.ok(["virtio-user", "ublk", "list"]) == ""
    fsck = subprocess.run(["e2fsck", "-fn", str(g.images["fs"])], capture_output=True,
                          text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for rel, data in g.tree.items():
        assert debugfs_cat(g.images["fs"], f"/tree/{rel}") == data, rel
    info = json.loads(g.ok(["virtio-user", "--device", DISKS["fs"], "info", "--json"]))
    assert info["capacity_sectors"] == FS_MIB * 2048, "the device binds again after del"


def test_fio_verify_at_qd32(guest: Guest) -> None:
    g = guest
    path, _ = g.add("scratch", "--number", "3")
    assert path == "/dev/ublkb3"
    out = g.ok(f"fio --name=v --filename={path} --direct=1 --ioengine=io_uring "
               "--rw=randwrite --bsrange=4k-256k --iodepth=32 --size=16M "
               "--verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=json",
               timeout=600)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 8 << 20, job
    assert job["read"]["io_bytes"] == job["write"]["io_bytes"], "every block read back"
    g.delete(path)


def test_an_eio_sector_fails_its_file_only(guest: Guest) -> None:
    g = guest
    log = g.dir / "eio-server.log"
    # served with the device's interrupt polled through the ring (--wait interrupt)
    path, pid = g.add("eio", "--log", str(log), wait="interrupt")
    g.ok(f"mkdir -p /tmp/eio && mount -o ro {path} /tmp/eio")
    bad = g.sh(f"cat /tmp/eio/{g.bad_file} > /dev/null")
    assert bad.status != 0 and "Input/output error" in bad.err, bad.err
    assert g.ok("cat /tmp/eio/good.txt") == "still readable\n" * 1000
    assert g.sh(ALIVE.format(pid=pid)).status == 0, "the server keeps serving"
    g.ok("umount /tmp/eio")
    g.delete(path)
    text = log.read_text()
    assert "ublk tag" in text and "gets EIO" in text, text


def test_a_read_only_image_is_a_read_only_disk(guest: Guest) -> None:
    g = guest
    path, _ = g.add("ro")
    assert g.ok(f"blockdev --getro {path}").strip() == "1"
    g.ok(f"mkdir -p /tmp/ro && mount -o ro {path} /tmp/ro")
    assert g.ok("cat /tmp/ro/hello.txt") == "read-only through ublk\n"
    assert g.sh(f"dd if=/dev/zero of={path} bs=4096 count=1 oflag=direct").status != 0
    g.ok("umount /tmp/ro")
    g.delete(path)


def test_kill_9_fails_io_in_bounded_time_and_del_cleans_up(guest: Guest) -> None:
    g = guest
    path, pid = g.add("scratch")
    g.ok(f"kill -9 {pid}; for i in $(seq 100); do {ALIVE.format(pid=pid)} || exit 0; "
         "sleep 0.1; done; exit 1")
    r = g.sh(f"timeout {KILL_LIMIT:g} dd if={path} of=/dev/null bs=4096 count=1 "
             "iflag=direct", timeout=KILL_LIMIT + 30)
    assert r.status not in (0, 124), f"I/O after kill -9: exit {r.status} {r.err}"
    out = g.ok(["virtio-user", "ublk", "del", path.removeprefix("/dev/ublkb")])
    assert "removed (its server had gone)" in out, out
    g.ok(f"! test -e /sys/block/{path[5:]}")
    path, _ = g.add("scratch")  # the virtio device binds again
    data = g.ok(f"dd if={path} bs=4096 count=1 iflag=direct status=none | od -An -tx1 -v")
    with g.images["scratch"].open("rb") as f:
        assert bytes.fromhex("".join(data.split())) == f.read(4096)
    g.delete(path)


@pytest.mark.parametrize("signal", ["TERM", "INT"])
def test_a_signal_flushes_and_removes_the_foreground_server(guest: Guest, signal: str) -> None:
    g = guest
    server = g.vm.spawn(["virtio-user", "--device", DISKS["scratch"], "ublk", "add",
                         "--foreground"])
    server.wait_output(b"/dev/ublkb0: ready, serving in the foreground", timeout=120)
    server.wait_output(b")\n", timeout=30)  # the whole line, with the pid
    assert server.status is None, server.wait(1).err
    pid = int(server.stdout.decode().rpartition("(pid ")[2].split(")")[0])
    text = f"written before SIG{signal}".encode()
    g.ok(f"printf '{text.decode()}' | dd of=/dev/ublkb0 bs=4096 seek=100 conv=sync "
         "status=none")  # through the page cache: the kernel's flush at the end writes it
    g.ok(f"kill -{signal} {pid}")  # as Ctrl-C or a service manager would
    done = server.wait(90)
    assert done.status == 0, done.err
    assert "stop requested" in done.err and "deleted" in done.err, done.err
    g.ok("! test -e /sys/block/ublkb0")
    with g.images["scratch"].open("rb") as f:
        f.seek(100 * 4096)
        assert f.read(len(text)) == text
