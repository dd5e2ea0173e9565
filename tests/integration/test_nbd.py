"""A filesystem through the driver: ``virtio-user nbd`` serves QEMU's virtio-blk to the
guest kernel's nbd driver, and ext4 lives on it.

One guest holds every disk. The host is the oracle: ``e2fsck -fn`` on the image and
``debugfs -R "cat PATH"`` for each file written through /dev/nbd0 in the guest.
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
NBD = {"fs": "/dev/nbd0", "eio": "/dev/nbd1", "ro": "/dev/nbd2", "scratch": "/dev/nbd3"}
SCRATCH_PATTERN = b"scratch through nbd\n" * 3 + b"!"  # 61 bytes: not a power of two


class Guest(ExportGuest):
    def connect(self, disk: str, *extra: str) -> int:
        """``virtio-user nbd`` in the background form; the server's pid."""
        out = self.ok(["virtio-user", "--device", DISKS[disk], "nbd", *extra, NBD[disk]])
        assert f"{NBD[disk]}: connected, server pid" in out, out
        assert int(self.ok(f"cat /sys/block/{NBD[disk][5:]}/size")) > 0
        return int(out.rsplit(maxsplit=1)[-1])

    def disconnect(self, disk: str) -> None:
        self.ok(["virtio-user", "nbd", "-d", NBD[disk]])
        assert self.ok(f"cat /sys/block/{NBD[disk][5:]}/size").strip() == "0"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("nbd")
    images, tree, disks = export_disks(d, "nbd", 14, 32, SCRATCH_PATTERN)
    with GuestSession(disks, cwd=d, warm_start=True) as vm:
        yield Guest(vm, d, images, tree, "bad.bin")


def test_mkfs_mount_write_and_the_host_reads_the_image(guest: Guest) -> None:
    g = guest
    g.connect("fs")  # the README's lines, as written there
    g.ok("mkfs.ext4 -q -F /dev/nbd0 && mkdir -p /tmp/fs && mount /dev/nbd0 /tmp/fs")
    g.ok("cp -a tree /tmp/fs/tree && sync && umount /tmp/fs")
    g.disconnect("fs")
    fsck = subprocess.run(["e2fsck", "-fn", str(g.images["fs"])], capture_output=True,
                          text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for rel, data in g.tree.items():
        assert debugfs_cat(g.images["fs"], f"/tree/{rel}") == data, rel


def test_a_second_connection_reads_the_files_back(guest: Guest) -> None:
    g = guest
    g.connect("fs")
    g.ok("mkdir -p /tmp/fs && mount /dev/nbd0 /tmp/fs && echo 3 > /proc/sys/vm/drop_caches"
         f" && diff -r {g.dir}/tree /tmp/fs/tree && umount /tmp/fs")
    g.disconnect("fs")
    info = json.loads(g.ok(["virtio-user", "--device", DISKS["fs"], "info", "--json"]))
    assert info["capacity_sectors"] == FS_MIB * 2048, "the device binds again after nbd -d"


def test_an_eio_sector_fails_its_file_only(guest: Guest) -> None:
    g = guest
    log = g.dir / "eio-server.log"
    pid = g.connect("eio", "--log", str(log))
    g.ok("mkdir -p /tmp/eio && mount -o ro /dev/nbd1 /tmp/eio")
    bad = g.sh(f"cat /tmp/eio/{g.bad_file} > /dev/null")
    assert bad.status != 0 and "Input/output error" in bad.err, bad.err
    assert g.ok("cat /tmp/eio/good.txt") == "still readable\n" * 1000
    assert g.sh(ALIVE.format(pid=pid)).status == 0, "the server keeps serving"
    g.ok("umount /tmp/eio")
    g.disconnect("eio")
    text = log.read_text()
    assert "VIRTIO_BLK_S_IOERR" in text and "gets EIO" in text, text


def test_a_read_only_image_mounts_read_only(guest: Guest) -> None:
    g = guest
    g.connect("ro")
    assert g.ok("blockdev --getro /dev/nbd2").strip() == "1"
    g.ok("mkdir -p /tmp/ro && mount /dev/nbd2 /tmp/ro")
    assert " ro," in g.ok("grep nbd2 /proc/mounts")
    assert g.ok("cat /tmp/ro/hello.txt") == "read-only through nbd\n"
    assert g.sh("touch /tmp/ro/new").status != 0
    g.ok("umount /tmp/ro")
    g.disconnect("ro")


READ_UNTIL_EIO = r"""
import json, mmap, os, signal, sys, threading, time
dev, server, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
os.preadv(fd, [buf], 0)
first = bytes(buf[:64])
result = {}
def reader():
    i = 0
    while True:
        try:
            os.preadv(fd, [buf], (i % 1024) * 4096)
        except OSError as exc:
            result["errno"] = exc.errno
            result["after"] = time.monotonic() - killed
            return
        i += 1
t = threading.Thread(target=reader, daemon=True)
killed = time.monotonic()
t.start()
time.sleep(0.5)
killed = time.monotonic()
os.kill(server, signal.SIGKILL)
t.join(limit)
result["hung"] = t.is_alive()
result["first"] = first.hex()
print(json.dumps(result), flush=True)
os._exit(0)
"""


def test_kill_9_fails_io_within_the_timeout_and_nbd_works_again(guest: Guest) -> None:
    g = guest
    pid = g.connect("scratch", "--kernel-timeout", "10")
    (g.dir / "read_until_eio.py").write_text(READ_UNTIL_EIO)
    out = json.loads(g.ok(f"python3 {g.dir}/read_until_eio.py /dev/nbd3 {pid} 40"))
    assert bytes.fromhex(out["first"]) == (SCRATCH_PATTERN * 2)[:64]
    assert not out["hung"] and out["errno"] == 5, out
    assert out["after"] < 10 + 5, out
    g.ok(f"sleep 1; ! {ALIVE.format(pid=pid)}")
    g.connect("scratch")
    data = g.ok("dd if=/dev/nbd3 bs=4096 count=1 iflag=direct status=none | head -c 20")
    assert data == "scratch through nbd\n"
    g.disconnect("scratch")


def test_sigterm_flushes_and_disconnects(guest: Guest) -> None:
    g = guest
    log = g.dir / "sigterm-server.log"
    pid = g.connect("scratch", "--log", str(log))
    g.ok("printf 'written before SIGTERM' | dd of=/dev/nbd3 bs=4096 seek=100 conv=sync "
         f"oflag=direct status=none && kill -TERM {pid}")
    g.ok(f"for i in $(seq 100); do {ALIVE.format(pid=pid)} || exit 0; sleep 0.2; done; exit 1")
    assert g.ok("cat /sys/block/nbd3/size").strip() == "0"
    with g.images["scratch"].open("rb") as f:
        f.seek(100 * 4096)
        assert f.read(22) == b"written before SIGTERM"
    text = log.read_text()
    assert "stop requested" in text and "NBD_CMD_DISC" in text, text


def test_foreground_serves_until_nbd_d(guest: Guest) -> None:
    g = guest
    server = g.vm.spawn(["virtio-user", "--device", DISKS["scratch"], "nbd", "--foreground",
                         "/dev/nbd3"])
    server.wait_output(b"/dev/nbd3: connected, serving in the foreground", timeout=120)
    data = g.ok("dd if=/dev/nbd3 bs=4096 count=1 iflag=direct status=none | head -c 20")
    assert data == "scratch through nbd\n"
    assert server.status is None, "still serving"
    g.disconnect("scratch")
    done = server.wait(60)
    assert done.status == 0, done.err
    assert "NBD_CMD_DISC" in done.err, "its log goes to stderr"


def test_refusals_leave_connections_alone(guest: Guest) -> None:
    g = guest
    pid = g.connect("scratch")
    busy = g.sh(["virtio-user", "--device", DISKS["fs"], "nbd", "/dev/nbd3"])
    assert busy.status == 15 and "/dev/nbd3 is already connected" in busy.err, busy.err
    wrong = g.sh(["virtio-user", "--device", "0000:00:1f.0", "nbd", "/dev/nbd4"])  # the LPC bridge
    assert wrong.status == 15 and "virtio-user: " in wrong.err, wrong.err
    assert g.ok("cat /sys/block/nbd4/size").strip() == "0"
    assert g.sh(ALIVE.format(pid=pid)).status == 0
    data = g.ok("dd if=/dev/nbd3 bs=4096 count=1 iflag=direct status=none | head -c 20")
    assert data == "scratch through nbd\n", "the first connection still serves"
    g.disconnect("scratch")
    gone = g.sh(["virtio-user", "nbd", "-d", "/dev/nbd3"])
    assert gone.status == 15 and "/dev/nbd3 is not connected" in gone.err, gone.err


# Ctrl-C in the parent while the forked server starts (it runs cold, so the child takes
# seconds importing the driver: the signal lands in start-up). Prints what is left.
CTRL_C_AT_START = r"""
import json, os, signal, subprocess, sys, time
bdf, dev = sys.argv[1], sys.argv[2]
parent = subprocess.Popen(["virtio-user", "--device", bdf, "nbd", dev],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
def children():
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == parent.pid:
                    found.append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    return found
deadline = time.monotonic() + 60
server = []
while not server and parent.poll() is None and time.monotonic() < deadline:
    server = children()
    time.sleep(0.02)
parent.send_signal(signal.SIGINT)
out, err = parent.communicate(timeout=120)
alive = bool(server) and os.path.exists(f"/proc/{server[0]}")
name = dev[5:]
size = open(f"/sys/block/{name}/size").read().strip()
print(json.dumps({"status": parent.returncode, "out": out, "err": err, "server": server,
                  "alive": alive, "size": size,
                  "pid_file": os.path.exists(f"/sys/block/{name}/pid")}), flush=True)
"""


def test_ctrl_c_during_start_up_stops_the_server(guest: Guest) -> None:
    g = guest
    (g.dir / "ctrl_c_at_start.py").write_text(CTRL_C_AT_START)
    out = json.loads(g.ok(f"python3 {g.dir}/ctrl_c_at_start.py {DISKS['scratch']} "
                          f"{NBD['scratch']}", timeout=200))
    assert out["server"], f"no server was forked: {out}"
    assert out["status"] == 130, out
    assert "/dev/nbd3 is not connected" in out["err"] and "Traceback" not in out["err"], out
    assert not out["alive"], f"the server still runs: {out}"
    g.ok("sleep 2")  # a server left behind would connect within this
    assert g.ok("cat /sys/block/nbd3/size").strip() == "0"
    assert g.sh("test -e /sys/block/nbd3/pid").status != 0
    g.connect("scratch")  # the device was given back: reset, unlocked
    g.disconnect("scratch")
