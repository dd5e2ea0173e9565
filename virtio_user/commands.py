"""The subcommands that work on a device, their arguments and checks, and the parser.

Both the command line (``cli.main``) and the shell's prompt run them from COMMANDS, so
each checks, says and does the same in both. A subcommand registers an ``add`` function
for its arguments, a ``prepare(args)`` that validates before the device opens, and
``run(dev, args, plan)``. Start-up matters (under TCG every import is slow): nothing
that needs numpy (the driver, ``spec``, ``bench``) is imported before a command needs
it, and a subcommand's arguments are built only when it is the one chosen, so
``--help`` and a bad option answer without loading the driver. For the same reason the
plans are plain classes (``dataclasses`` loads ``inspect``) and ``typing`` is for mypy
only.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from .errors import (FileAccessError, Interrupted, InvalidArgument, OutOfRange, VirtioError,
                     exit_code)
from .numbers import parse_number, parse_seconds
from .options import BACKENDS, DEFAULT_TIMEOUT, MAX_QUEUES, RINGS, TRANSPORTS, WAIT_MODES
from .subcommand import Subcommand

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows it)
if TYPE_CHECKING:
    from typing import IO, Any, Callable, Iterator, Sequence

    from .bench import BenchSpec
    from .blk import VirtioBlk

PIECE_SECTORS = 8192  # the CLI moves 4 MiB at a time: bounded memory, progress, resumable


class Parser(argparse.ArgumentParser):
    """argparse, but bad usage is exit code 1 with one line, like every other error.

    A subcommand's parser gets its arguments from ``populate`` on first use (parsing, or
    a caller that wants its options, such as the shell's completion)."""

    def __init__(self, *args: Any,
                 populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate
        self.subcommands: dict[str, Parser] = {}  # filled by build_parser

    def populate(self) -> Parser:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return self

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        self.populate()
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("virtio-user").strip()
        raise InvalidArgument(f"{command}: {message}" if command else message)


def _range_args(args: argparse.Namespace) -> tuple[int, int]:
    sector = parse_number(args.sector, "sector")
    count = parse_number(args.count, "count")
    if sector < 0:
        raise InvalidArgument(f"sector {sector} is negative")
    if count <= 0:
        raise InvalidArgument(f"count {count} must be at least 1")
    return sector, count


# -- subcommands ---------------------------------------------------------------------

def _add_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("sector", metavar="SECTOR", help="first sector (decimal or 0x hex)")
    p.add_argument("count", metavar="COUNT", help="number of 512-byte sectors")


def no_prepare(args: argparse.Namespace) -> None:
    return None


def _run_info(dev: VirtioBlk, args: argparse.Namespace, _: Any) -> int:
    info = dev.info()
    if args.json:
        import json
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, list):
                value = " ".join(value) or "-"
            print(f"{key:20} {value}")
    return 0


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_read(p: argparse.ArgumentParser) -> None:
    _add_range(p)
    p.add_argument("-o", "--output", metavar="FILE", help="write raw bytes to FILE")


class ReadPlan:
    """What ``read`` does; its output file is open (and known writable) before the
    device is touched, and closed by ``main`` on the way out."""

    def __init__(self, sector: int, count: int,
                 output: IO[bytes] | None,  # None: standard output
                 name: str) -> None:
        self.sector, self.count, self.output, self.name = sector, count, output, name

    def __enter__(self) -> ReadPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.output is not None:
            self.output.close()


def _prepare_read(args: argparse.Namespace) -> ReadPlan:
    sector, count = _range_args(args)
    if args.output is None:
        _probe_writable(sys.stdout, "standard output")
        return ReadPlan(sector, count, None, "standard output")
    try:
        out = open(args.output, "wb")
    except OSError as exc:
        raise FileAccessError(f"cannot write {args.output}: {exc.strerror}") from exc
    try:
        _probe_writable(out, args.output)
    except BaseException:
        out.close()
        raise
    return ReadPlan(sector, count, out, args.output)


def _probe_writable(stream: IO[Any], name: str) -> None:
    """A write of no bytes: the kernel still says no for files that refuse every write
    (/dev/full: ENOSPC, /proc files: EIO), and it changes nothing anywhere else."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return  # not a file (a test's capture): its writes are checked as they happen
    try:
        os.write(fd, b"")
    except OSError as exc:
        raise FileAccessError(f"cannot write {name}: {exc.strerror}") from exc


def _run_read(dev: VirtioBlk, args: argparse.Namespace, plan: ReadPlan) -> int:
    sector, count = plan.sector, plan.count
    dev.check_range(sector, count)
    tty = plan.output is None and sys.stdout.isatty()
    out: IO[Any] = plan.output or (sys.stdout if tty else sys.stdout.buffer)
    dump = HexDump(out) if tty else None
    try:
        for start in range(sector, sector + count, PIECE_SECTORS):
            data = dev.read(start, min(PIECE_SECTORS, sector + count - start))
            if dump:
                dump.feed(data)
            else:
                out.write(data)
        if dump:
            dump.end()
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise FileAccessError(f"cannot write {plan.name}: {exc.strerror}") from exc
    return 0


class HexDump:
    """``hexdump -C``: offset, 16 bytes in two groups of 8, ASCII; repeats as ``*``."""

    def __init__(self, out: IO[str]) -> None:
        self.out, self.offset, self.last, self.starred, self.rest = out, 0, b"", False, b""

    def feed(self, data: bytes) -> None:
        data = self.rest + data
        whole = len(data) - len(data) % 16
        for i in range(0, whole, 16):
            self._line(data[i:i + 16])
        self.rest = data[whole:]

    def _line(self, line: bytes) -> None:
        if line == self.last and len(line) == 16:
            if not self.starred:
                self.out.write("*\n")
                self.starred = True
        else:
            hexes = " ".join(f"{b:02x}" for b in line[:8]).ljust(23) + "  " + \
                " ".join(f"{b:02x}" for b in line[8:]).ljust(23)
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in line)
            self.out.write(f"{self.offset:08x}  {hexes}  |{text}|\n")
            self.starred = False
        self.last = line
        self.offset += len(line)

    def end(self) -> None:
        if self.rest:
            self._line(self.rest)
        self.out.write(f"{self.offset:08x}\n")


def _add_write(p: argparse.ArgumentParser) -> None:
    p.add_argument("sector", metavar="SECTOR", help="first sector (decimal or 0x hex)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", "--input", metavar="FILE",
                     help="raw bytes to write (a multiple of 512 bytes)")
    src.add_argument("--pattern", metavar="BYTE", help="fill with this byte (0..255)")
    p.add_argument("--count", metavar="N", help="sectors to fill (with --pattern)")


class WritePlan:
    """What ``write`` does. The input is read in pieces of PIECE_SECTORS as they are
    written: a regular file's length is checked up front, a stream (a pipe, /dev/zero)
    is bounded by the capacity as it comes."""

    def __init__(self, sector: int,
                 count: int | None,  # None: a stream, as long as it turns out to be
                 source: IO[bytes] | None,  # None: the pattern
                 pattern: int = 0, name: str = "") -> None:
        self.sector, self.count, self.source = sector, count, source
        self.pattern, self.name = pattern, name

    def __enter__(self) -> WritePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.source is not None:
            self.source.close()


def _prepare_write(args: argparse.Namespace) -> WritePlan:
    sector = parse_number(args.sector, "sector")
    if sector < 0:
        raise InvalidArgument(f"sector {sector} is negative")
    if args.input is not None:
        if args.count is not None:
            raise InvalidArgument("--count goes with --pattern, not with -i")
        return _input_plan(sector, args.input)
    if args.count is None:
        raise InvalidArgument("--pattern needs --count N")
    byte = parse_number(args.pattern, "pattern byte")
    if not 0 <= byte <= 255:
        raise InvalidArgument(f"pattern byte {byte} is not in 0..255")
    count = parse_number(args.count, "count")
    if count <= 0:
        raise InvalidArgument(f"count {count} must be at least 1")
    return WritePlan(sector, count, None, byte)


def _input_plan(sector: int, path: str) -> WritePlan:
    from .spec import SECTOR_SIZE
    try:
        source = open(path, "rb")
        info = os.fstat(source.fileno())
    except OSError as exc:
        raise FileAccessError(f"cannot read {path}: {exc.strerror}") from exc
    regular = stat.S_ISREG(info.st_mode)
    if regular and (not info.st_size or info.st_size % SECTOR_SIZE):
        source.close()
        raise InvalidArgument(f"{path} is {info.st_size} bytes, not a positive multiple "
                              f"of {SECTOR_SIZE}; it is not padded")
    return WritePlan(sector, info.st_size // SECTOR_SIZE if regular else None, source,
                     name=path)


def _run_write(dev: VirtioBlk, args: argparse.Namespace, plan: WritePlan) -> int:
    from .spec import SECTOR_SIZE
    dev.check_writable("write")
    if plan.count is not None:
        dev.check_range(plan.sector, plan.count)
    done = 0
    total = "?" if plan.count is None else plan.count
    try:
        for piece in _pieces(plan):
            fits = _room(dev, plan, done, len(piece))
            if fits:
                dev.write(plan.sector + done, piece[:fits])
                done += fits // SECTOR_SIZE
                if args.progress:
                    print(f"written {done}/{total} sectors", file=sys.stderr, flush=True)
            if fits < len(piece):
                raise _beyond_end(dev, plan, done)
    except (Interrupted, KeyboardInterrupt) as exc:
        import signal
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} after "
                          f"{done} of {total} sectors written "
                          f"(sectors {plan.sector}..{plan.sector + done - 1} are done)") from exc
    return 0


def _pieces(plan: WritePlan) -> Iterator[bytes]:
    """The data to write, at most PIECE_SECTORS at a time, each a whole number of
    sectors (a stream's odd tail is refused before it is written)."""
    from .spec import SECTOR_SIZE
    if plan.source is None:
        assert plan.count is not None
        fill = bytes([plan.pattern]) * SECTOR_SIZE * min(PIECE_SECTORS, plan.count)
        for done in range(0, plan.count, PIECE_SECTORS):
            yield fill[:min(PIECE_SECTORS, plan.count - done) * SECTOR_SIZE]
        return
    done = 0
    while plan.count is None or done < plan.count:
        # A regular file was checked at its length then: if it grew since, the
        # sectors past that were not checked and are not written.
        sectors = PIECE_SECTORS if plan.count is None else min(PIECE_SECTORS,
                                                                plan.count - done)
        try:
            piece = plan.source.read(sectors * SECTOR_SIZE)
        except OSError as exc:
            raise FileAccessError(f"cannot read {plan.name}: {exc.strerror}") from exc
        if len(piece) % SECTOR_SIZE or (not piece and not done):
            raise InvalidArgument(f"{plan.name} ends after {done * SECTOR_SIZE + len(piece)} "
                                  f"bytes, not a positive multiple of {SECTOR_SIZE}; the "
                                  f"{done} whole sectors before it are written")
        if not piece:
            if plan.count is not None:  # the file shrank under us
                raise FileAccessError(f"{plan.name} ended after {done} of {plan.count} "
                                      "sectors")
            return
        done += len(piece) // SECTOR_SIZE
        yield piece


def _room(dev: VirtioBlk, plan: WritePlan, done: int, nbytes: int) -> int:
    """How much of a piece fits before the end of the device (a stream is written up
    to there; a regular file was checked whole before the first write)."""
    from .spec import SECTOR_SIZE
    if plan.count is not None:
        return nbytes
    return max(0, min(nbytes, (dev.capacity - plan.sector - done) * SECTOR_SIZE))


def _beyond_end(dev: VirtioBlk, plan: WritePlan, done: int) -> OutOfRange:
    start = plan.sector + done
    written = (f"sectors {plan.sector}..{start - 1} were written" if done
               else "nothing was written")
    return OutOfRange(f"{plan.name} goes beyond the end of the device (capacity "
                      f"{dev.capacity} sectors); {written}", start, 1, dev.capacity)


def _run_flush(dev: VirtioBlk, args: argparse.Namespace, _: Any) -> int:
    dev.flush()
    return 0


def _run_id(dev: VirtioBlk, args: argparse.Namespace, _: Any) -> int:
    print(dev.get_id())
    return 0


def _prepare_range(args: argparse.Namespace) -> tuple[int, int]:
    return _range_args(args)


def _run_discard(dev: VirtioBlk, args: argparse.Namespace, plan: tuple[int, int]) -> int:
    dev.discard(*plan)
    return 0


def _add_write_zeroes(p: argparse.ArgumentParser) -> None:
    _add_range(p)
    p.add_argument("--unmap", action="store_true", help="allow the device to deallocate")


def _run_write_zeroes(dev: VirtioBlk, args: argparse.Namespace, plan: tuple[int, int]) -> int:
    dev.write_zeroes(*plan, unmap=args.unmap)
    return 0


def _add_bench(p: argparse.ArgumentParser) -> None:
    from . import bench
    bench.add_args(p)


def _prepare_bench(args: argparse.Namespace) -> BenchSpec:
    from . import bench
    return bench.prepare(args)


def _run_bench(dev: VirtioBlk, args: argparse.Namespace, spec: BenchSpec) -> int:
    from . import bench
    bench.print_result(bench.run(dev, spec), args.json)
    return 0


def _add_nbd(p: argparse.ArgumentParser) -> None:
    from . import nbd
    nbd.add_args(p)


def _prepare_nbd(args: argparse.Namespace) -> Any:
    from . import nbd
    return nbd.prepare(args)


def _run_nbd(dev: VirtioBlk, args: argparse.Namespace, plan: Any) -> int:
    from . import nbd
    return nbd.run(dev, args, plan)


def _add_ublk(p: argparse.ArgumentParser) -> None:
    from . import ublk
    ublk.add_args(p)


def _prepare_ublk(args: argparse.Namespace) -> Any:
    from . import ublk
    return ublk.prepare(args)


def _run_ublk(dev: VirtioBlk, args: argparse.Namespace, plan: Any) -> int:
    from . import ublk
    return ublk.run(dev, args, plan)


COMMANDS: dict[str, Subcommand] = {
    "info": Subcommand(_add_info, no_prepare, _run_info, "show the device and its features"),
    "read": Subcommand(_add_read, _prepare_read, _run_read, "read sectors"),
    "write": Subcommand(_add_write, _prepare_write, _run_write, "write sectors"),
    "flush": Subcommand(lambda p: None, no_prepare, _run_flush, "flush the write cache"),
    "id": Subcommand(lambda p: None, no_prepare, _run_id, "print the device ID (GET_ID)"),
    "discard": Subcommand(_add_range, _prepare_range, _run_discard, "discard sectors"),
    "write-zeroes": Subcommand(_add_write_zeroes, _prepare_range, _run_write_zeroes,
                               "zero sectors"),
    "bench": Subcommand(_add_bench, _prepare_bench, _run_bench,
                        "measure IOPS, bandwidth and latency at a queue depth"),
    "nbd": Subcommand(_add_nbd, _prepare_nbd, _run_nbd,
                      "serve the device to the kernel as /dev/nbdN (mkfs, mount)"),
    "ublk": Subcommand(_add_ublk, _prepare_ublk, _run_ublk,
                       "serve the device to the kernel as /dev/ublkbN (add, del N, list)"),
}


def _timeout(text: str) -> float:
    return parse_seconds(text, "--timeout")


def _queues(text: str) -> int:
    n = parse_number(text, "--queues")
    if not 1 <= n <= MAX_QUEUES:
        raise InvalidArgument(f"--queues {n} must be from 1 to {MAX_QUEUES}")
    return n


def build_parser(commands: dict[str, Subcommand] | None = None) -> Parser:
    """The global options and a parser per subcommand of ``commands`` (by default the
    ones that work on a device, COMMANDS), each filled in when it is chosen.

    A global option or a subcommand added here changes the top-level ``--help``, which
    ``cli`` prints from ``help_text.py``: make that file again with
    ``VIRTIO_USER_REGENERATE_HELP=1 python -m pytest tests/unit/test_startup.py -k
    precomputed`` (the test fails until then)."""
    parser = Parser(prog="virtio-user", allow_abbrev=False,
                     description="A user-space driver for virtio-blk PCI devices, "
                     "legacy (1af4:1001) and modern (1af4:1042).")
    parser.add_argument("--device", metavar="BDF", help="PCI address (default: the first "
                        "virtio-blk device, 1af4:1001 or 1af4:1042)")
    parser.add_argument("--backend", choices=BACKENDS, default="uio",
                        help="who owns the PCI function: uio_pci_generic (the default) "
                        "or vfio-pci behind an IOMMU")
    parser.add_argument("--transport", choices=TRANSPORTS, default="auto",
                        help="virtio interface: modern (virtio 1.x) where the device has "
                        "it (auto, the default), or insist on one")
    parser.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"per-wait deadline (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--rebind", action="store_true",
                        help="hand the device back to virtio-pci afterwards")
    parser.add_argument("--wait", choices=WAIT_MODES, default="poll",
                        help="how to wait for completions: spin on the ring (default), "
                        "sleep until the device interrupts, or spin briefly then sleep")
    parser.add_argument("--ring", choices=RINGS, default="auto",
                        help="virtqueue layout: packed where the device offers "
                        "VIRTIO_F_RING_PACKED (auto, the default), or insist on one")
    parser.add_argument("--queues", type=_queues, metavar="N",
                        help="request queues to set up on a VIRTIO_BLK_F_MQ device "
                        "(default: as many as it offers, at most one per CPU)")
    parser.add_argument("--progress", action="store_true", help="report progress on stderr")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    for name, cmd in (COMMANDS if commands is None else commands).items():
        p = sub.add_parser(name, help=cmd.help, add_help=False, allow_abbrev=False,
                           populate=cmd.add)
        p.add_argument("--help", action="help", help="show this help")  # no -h: see fuzz
        parser.subcommands[name] = p
    return parser




def report_error(exc: Exception, debug: bool) -> int:
    """Print the one-line message for ``exc`` (with its traceback if ``debug``) and
    return its exit code: the same words at the shell's prompt as on the command line."""
    if debug:
        import traceback
        traceback.print_exc()
    if isinstance(exc, VirtioError):
        print(f"virtio-user: {exc}", file=sys.stderr)
        return exit_code(exc)
    print(f"virtio-user: internal error: {exc!r} (run with --debug for details)",
          file=sys.stderr)
    return 99

