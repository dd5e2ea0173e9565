"""virtio-user shell against QEMU's virtio-blk: the README's session, fed from a file.

One disk in the lab guest (tests/lab.py), at the README's address. The image on the host is the oracle: what ``reap`` shows
of a read is the host's bytes, and a submitted write is on the host afterwards.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

import docpages
from images import make_image
from virtio_user.cli import HexDump
from lab import Bay
from virtio_user.host import CommandResult, Disk

pytestmark = pytest.mark.qemu

SECTOR = 512
BDF = "0000:00:10.0"
PROMPT = f"virtio-user {BDF}> "
SECTOR0 = b"virtio-user: hello from sector 0 of the host image\n"
REPLAY = f"virtio-user --device {BDF} shell < session.txt"  # as the README shows it


def shell_section() -> str:
    return docpages.section("cli.md", "## Exploring the ring: virtio-user shell")


def readme_session() -> list[str]:
    """The commands typed at the prompt in docs/cli.md's shell transcript."""
    block = shell_section().split("```\n", 2)[1]
    return [line[len(PROMPT):] for line in block.splitlines() if line.startswith(PROMPT)]


def lab_disks(d: Path) -> dict[str, Disk]:
    """The README's transcript names the address, so the disk is pinned there."""
    image = make_image(d / "disk.img", 16)
    with image.open("r+b") as f:
        f.write(SECTOR0)
        f.seek(100 * SECTOR)
        f.write(bytes(range(256)) * 4)
    return {"disk": Disk(image, extra={"addr": "0x" + BDF[8:10]})}


class Guest:
    def __init__(self, bay: Bay) -> None:
        self.bay, self.image = bay, bay.images["disk"]
        assert bay.bdfs["disk"] == BDF

    def shell(self, lines: list[str]) -> CommandResult:
        """``virtio-user shell`` with ``lines`` on its standard input (not a terminal)."""
        (self.bay.dir / "session.txt").write_text("".join(f"{x}\n" for x in lines))
        return self.bay.run(["sh", "-c", REPLAY], timeout=300)

    def sectors(self, first: int, count: int) -> bytes:
        with self.image.open("rb") as f:
            f.seek(first * SECTOR)
            return f.read(count * SECTOR)


@pytest.fixture(scope="module")
def guest(bay: Bay) -> Guest:
    return Guest(bay)


def hexdump(data: bytes) -> str:
    out = io.StringIO()
    dump = HexDump(out)
    dump.feed(data)
    dump.end()
    return out.getvalue()


def test_the_readme_session(guest: Guest) -> None:
    assert f"\n{REPLAY}\n" in shell_section()  # what Guest.shell runs
    assert f"\n{REPLAY}\n" in docpages.text("README.md")  # the README's tour shows it too
    lines = readme_session()
    assert lines == ["submit read 0 1", "submit write 2048 8 --pattern 0x5a", "ring", "reap",
                     "id"]
    before = guest.sectors(0, 1)
    # One more reap: the README's may find the write not yet done (the device's pace).
    r = guest.shell(lines + ["reap"])
    assert r.status == 0, r.err
    assert r.err == ""
    out = r.out
    assert PROMPT not in out  # no prompt when the input is not a terminal
    assert "submitted IN sectors 0..0: head 0, avail.idx 1, 1 in flight\n" in out
    assert "submitted OUT sectors 2048..2055: head 1, avail.idx 2, 2 in flight\n" in out
    ring = out.split("split ring:", 1)[1].split("\nreaped ", 1)[0].splitlines()
    assert "avail (driver writes): flags 0x1 idx 2 used_event 65535" in ring
    assert re.search(r"^used  \(device writes\): flags 0x0 idx [012] avail_event \d+$",
                     "\n".join(ring), re.M)
    assert "requests in flight: 2" in ring
    assert "  head 0: IN sectors 0..0" in ring and "  head 1: OUT sectors 2048..2055" in ring
    flags = [line.split("flags")[1].split()[0] for line in ring if " flags " in line[:60]
             and line.startswith("    ")]
    assert flags == ["INDIRECT", "NEXT", "NEXT|WRITE", "WRITE",  # the read: device writes
                     "INDIRECT", "NEXT", "NEXT", "WRITE"]  # the write: only its status
    # Both reaped once (in the device's order), the read's data as the host wrote it.
    assert out.count("reaped IN sectors 0..0: VIRTIO_BLK_S_OK, head 0, used len 513\n") == 1
    assert out.count("reaped OUT sectors 2048..2055: VIRTIO_BLK_S_OK, head 1, used len 1\n") \
        == 1
    assert hexdump(before) in out
    assert before.startswith(SECTOR0)
    assert "\ndisk.img\n" in out  # id: the serial the harness gives the disk
    assert guest.sectors(2048, 8) == b"\x5a" * 8 * SECTOR


def test_plain_commands_errors_and_the_exit_status(guest: Guest) -> None:
    before = guest.sectors(0, 64)
    r = guest.shell(["read 100 2", "read 32768 1", "write 0 --pattern 300 --count 1",
                     "submit read 0 4096", "id"])
    assert r.stdout.startswith(guest.sectors(100, 2))  # raw bytes into a pipe
    assert r.err.splitlines() == [
        "virtio-user: sectors 32768..32768 exceed capacity 32768",
        "virtio-user: pattern byte 300 is not in 0..255",
        "virtio-user: submit: count 4096 exceeds 2048 sectors (1 MiB), the most one "
        "submitted request carries"]
    assert r.stdout.endswith(b"disk.img\n")  # the commands after the errors still ran
    assert r.status == 1  # the last failing command's
    assert guest.sectors(0, 64) == before
