"""``scripts/run-in-qemu.sh``: boot a guest, run one command in it, exit with its status.

Exit status: the command's own, or 124 when --timeout ran out, 125 when the harness
itself failed (QEMU would not start, the guest died, any bad harness option), 130 on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from . import assets
from .errors import BadOption, GuestTimeout, HarnessError
from .machine import Disk
from .options import ascii_int
from .vhost_user import VhostUserDisk
from .session import GuestSession, sink_to_stdio

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125
DEMO = assets.GUEST_DIR / "demo.sh"
SCRATCH_MIB = 64
MEMORY_MIB = (256, 1 << 20)
# The harness's options that take a value (the command's own options come after it).
VALUE_OPTIONS = ("--disk", "--vhost-user-disk", "--accel", "--backend", "--memory",
                 "--qemu-arg", "--timeout", "--kernel", "--qemu")


def split_qemu_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take ``--qemu-arg X`` and ``--qemu-arg=X`` out of ``argv`` (up to the command):
    their values may be anything, ``-device`` or ``--`` included, which argparse would
    read as options. Returns (the other words, the QEMU arguments in order); the value
    of every other harness option is joined to it (``--opt=VALUE``) for the same reason."""
    rest: list[str] = []
    qemu: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--" or not word.startswith("-"):
            return rest + argv[i:], qemu  # the command starts here
        if word.startswith("--qemu-arg="):
            qemu.append(word.partition("=")[2])
        elif word in VALUE_OPTIONS and i + 1 < len(argv):
            if word == "--qemu-arg":
                qemu.append(argv[i + 1])
            else:
                rest.append(f"{word}={argv[i + 1]}")
            i += 1
        else:
            rest.append(word)  # argparse says what is wrong with it
        i += 1
    return rest, qemu


class Parser(argparse.ArgumentParser):
    """Every bad option exits with the harness's own status (125), not argparse's 2,
    which a command run in the guest could return too."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_HARNESS, f"{self.prog}: error: {message}\n")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a finite number of seconds > 0")
    return value


def mebibytes(text: str) -> int:
    try:
        value = ascii_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    low, high = MEMORY_MIB
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text}: give {low} to {high} MiB")
    return value


def disk(spec: str) -> Disk:
    try:
        return Disk.parse(spec)
    except BadOption as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("disk ")) from None


def vhost_user_disk(spec: str) -> VhostUserDisk:
    try:
        return VhostUserDisk.parse(spec)
    except BadOption as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("vhost-user disk ")) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(
        prog="run-in-qemu.sh", allow_abbrev=False,
        description="Boot a QEMU guest with virtio-blk disks and run COMMAND in it "
                    "(default: the virtio-user demo).")
    p.add_argument("--disk", action="append", default=[], metavar="PATH", type=disk,
                   help="disk image (raw or qcow2, detected); repeatable; options may "
                        "follow: PATH[,format=F][,readonly=on|off][,cache=M]"
                        "[,queue-size=N][,serial=S][,transport=legacy|modern|transitional]"
                        "[,iommu_platform=on][,packed=on][,indirect_desc=off]"
                        "[,event_idx=off] (',,' is a comma in PATH or S)")
    p.add_argument("--vhost-user-disk", action="append", default=[], metavar="PATH",
                   type=vhost_user_disk,
                   help="disk image served by qemu-storage-daemon (vhost-user-blk), seen "
                        "as a modern vhost-user-blk-pci device after the --disk devices; "
                        "repeatable; PATH[,readonly=on|off]")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--backend", choices=("uio", "vfio"), default="uio")
    p.add_argument("--kernel", choices=assets.KERNELS, default=assets.DEFAULT_KERNEL,
                   help="guest kernel: Debian 12's 6.1 (default) or bookworm-backports' "
                        "6.12 (fetched into the cache on first use)")
    p.add_argument("--qemu", choices=assets.QEMUS, default=assets.DEFAULT_QEMU,
                   help="QEMU: the system's 7.2 (default) or bookworm-backports' 10.0 "
                        "(unpacked into the cache on first use)")
    p.add_argument("--memory", type=mebibytes, default=1024, metavar="MIB",
                   help=f"guest memory ({MEMORY_MIB[0]} to {MEMORY_MIB[1]}, default 1024)")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for QEMU's command line, even one starting "
                        "with '-' (--qemu-arg -device --qemu-arg virtio-blk-pci,...); "
                        "repeatable")
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="SECONDS",
                   help="bound on the whole run, boot included (default 600)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    words, qemu_args = split_qemu_args(argv)
    args = p.parse_args(words)
    args.qemu_arg = qemu_args
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return args


def scratch_image(folder: Path) -> Path:
    path = folder / "scratch.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), f"{SCRATCH_MIB}M"],
                   check=True)
    with path.open("r+b") as f:
        f.write(b"virtio-user scratch disk: sector 0\n".ljust(512, b"\0"))
    return path


def run(args: argparse.Namespace, scratch_dir: Path) -> int:
    disks: list[Disk] = args.disk
    command = args.command
    if not command:
        command = ["sh", str(DEMO)]
        if not disks:
            disks = [Disk(scratch_image(scratch_dir))]
    deadline = time.monotonic() + args.timeout
    vm = GuestSession(disks, vhost_user_disks=args.vhost_user_disk,
                      accel=args.accel, backend=args.backend,
                      kernel=args.kernel, qemu=args.qemu,
                      memory_mib=args.memory, qemu_args=args.qemu_arg,
                      boot_timeout=args.timeout)
    with vm:
        env = {"VIRTIO_USER_BACKEND": args.backend}
        result = vm.run(command, env=env, sink=sink_to_stdio,
                        timeout=max(1.0, deadline - time.monotonic()))
        return result.status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM takes the same way out as Ctrl-C, through every context manager.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with tempfile.TemporaryDirectory(prefix="virtio-user-run-") as tmp:
            return run(args, Path(tmp))
    except GuestTimeout as exc:
        print(f"run-in-qemu: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except HarnessError as exc:
        print(f"run-in-qemu: {exc}", file=sys.stderr)
        return EXIT_HARNESS
    except KeyboardInterrupt:
        print("run-in-qemu: interrupted; QEMU stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
