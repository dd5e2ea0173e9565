"""What the two kernel exports' integration modules (test_nbd.py, test_ublk.py) share:
the images each serves (an ext4 image to fill, one with a failing sector, a read-only one,
a scratch one), the host-side oracle (mkfs, debugfs) and the guest they run in."""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from images import make_image
from virtio_user.host import CommandResult, Disk, GuestSession

FS_MIB = 32  # ext4's smallest comfortable size: every MiB is formatted through TCG
# A process runs (a zombie does not: nobody may reap an orphaned server in the guest).
ALIVE = "(test -e /proc/{pid} && ! grep -q '^State:.*[ZX]' /proc/{pid}/status)"


@dataclass
class ExportGuest:
    vm: GuestSession
    dir: Path
    images: dict[str, Path]
    tree: dict[str, bytes]  # path under /tree -> content
    bad_file: str  # on the eio image, holding the failing sector

    def sh(self, script: str | list[str], timeout: float = 300) -> CommandResult:
        """A shell script, or an argv (virtio-user ones start warm)."""
        return self.vm.run(script, timeout=timeout)

    def ok(self, script: str | list[str], timeout: float = 300) -> str:
        r = self.sh(script, timeout)
        assert r.status == 0, f"{script!r}: exit {r.status}\n{r.out}\n{r.err}"
        return r.out


def make_tree(seed: int) -> dict[str, bytes]:
    rnd = random.Random(seed)
    tree = {f"small/{i:02d}.txt": f"file {i}\n".encode() * rnd.randrange(1, 400)
            for i in range(40)}
    tree["deep/a/b/c/odd.bin"] = rnd.randbytes(1_000_003)  # not a whole block
    tree["big.bin"] = rnd.randbytes(2 << 20)  # several requests, each split
    tree["empty"] = b""
    return tree


def write_tree(root: Path, tree: dict[str, bytes]) -> Path:
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def mkfs(image: Path, source: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(source), str(image)],
                   check=True, timeout=60)


def sector_of(image: Path, path: str, block: int) -> int:
    """The 512-byte sector holding 4 KiB block ``block`` of file ``path`` in ``image``."""
    out = subprocess.run(["debugfs", "-R", f"bmap {path} {block}", str(image)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(out.split()[0]) * 8 + 3


def debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                          check=True, timeout=60).stdout


def export_disks(d: Path, through: str, seed: int, scratch_mib: int,
                 scratch_pattern: bytes) -> tuple[dict[str, Path], dict[str, bytes], list[Disk]]:
    """In ``d``: the tree to copy in (``d/tree``), the four images and their disks, in
    the order fs, eio (read errors injected at ``bad.bin``), ro, scratch."""
    tree = make_tree(seed)
    write_tree(d / "tree", tree)
    eio_src = write_tree(d / "eio-src", {"good.txt": b"still readable\n" * 1000,
                                         "bad.bin": bytes(range(256)) * 1024})
    ro_src = write_tree(d / "ro-src", {"hello.txt": f"read-only through {through}\n".encode()})
    images = {"fs": make_image(d / "fs.raw", FS_MIB), "eio": make_image(d / "eio.raw", 32),
              "ro": make_image(d / "ro.raw", 16),
              "scratch": make_image(d / "scratch.raw", scratch_mib, pattern=scratch_pattern)}
    mkfs(images["eio"], eio_src)
    mkfs(images["ro"], ro_src)
    bad_sector = sector_of(images["eio"], "/bad.bin", 5)
    disks = [Disk(images["fs"]), Disk(images["eio"], inject_errors=[("read_aio", bad_sector)]),
             Disk(images["ro"], readonly=True), Disk(images["scratch"])]
    return images, tree, disks
