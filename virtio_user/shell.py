"""``virtio-user shell``: one device, bound once, and a prompt to drive it by hand.

The command line's subcommands work at the prompt with the same arguments, checks and
messages (``read 0 8``, ``info --json``). Three more look inside the queue, for a person
learning virtio:

- ``submit read SECTOR COUNT``, ``submit write SECTOR COUNT --pattern BYTE``,
  ``submit flush``: put one request in flight (its descriptors written, its head made
  available, the device notified) without reaping it;
- ``reap``: take what the device has completed so far (waiting up to ``--timeout`` for
  one while any is in flight), showing each request's status and, for a read, its data;
- ``ring``: the queue as both sides see it: indices, event-idx fields, the free list,
  requests in flight and their descriptor chains (split ring), or the descriptor slots
  in flight, wrap counters and event suppression structures (packed ring).

From a terminal it has a prompt, history and completion (readline). From a pipe it runs
the lines without a prompt and exits with the status of the last command that failed
(0 if none did). An error prints the command line's message and leaves the device as
the command line would: untouched after bad input, reset after a device fault. Ctrl-C
cancels the command; if it had requests on the device, the device is reset to take their
buffers back and the shell ends (exit 130) saying so. Ctrl-D, ``quit`` or SIGTERM end
it; closing the device resets it.
"""

from __future__ import annotations

import argparse
import cmd
import shlex
import signal
import sys
from typing import IO, Any, Callable

import numpy as np

from . import commands
from .blk import VirtioBlk
from .request import DmaBuffer, Request
from .errors import Interrupted, InvalidArgument, Unsupported
from .numbers import parse_number
from .ring.packed import PackedQueue
from .spec import (SECTOR_SIZE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, BlkStatus, DescFlag,
                   Feature, ReqType)
from .ring.split import DESC_DTYPE, SplitQueue

MAX_SUBMIT_SECTORS = 2048  # one submitted request carries at most 1 MiB
SHOWN = 16  # ring entries and free ids listed before "..."
EXTRA_HELP = {
    "submit": "put a request in flight without reaping: submit read SECTOR COUNT | "
              "submit write SECTOR COUNT --pattern BYTE | submit flush",
    "reap": "take the completed requests off the used ring (waits for one if none)",
    "ring": "show the queue: indices, event-idx fields, free list, chains in flight",
    "help": "list the commands, or show one's options: help [COMMAND]",
    "quit": "reset the device and leave (also Ctrl-D)",
}
# Not at the prompt: the shell itself, and nbd, which holds the device until the kernel
# disconnects (or goes to the background).
NOT_HERE = {"shell": "already in the shell",
            "nbd": "not at the prompt: it serves the device until disconnected"}


class Shell(cmd.Cmd):
    """The prompt. ``run()`` returns the exit status: that of the last failing command."""

    identchars = cmd.Cmd.identchars + "-"  # write-zeroes is one word

    def __init__(self, dev: VirtioBlk, args: argparse.Namespace,
                 stdin: IO[str] | None = None) -> None:
        stdin = stdin or sys.stdin
        super().__init__(stdin=stdin)
        self.interactive = stdin.isatty()
        self.use_rawinput = self.interactive  # input() and readline only on a terminal
        self.prompt = f"virtio-user {dev.bdf}> " if self.interactive else ""
        self.dev = dev
        self.args = args
        self.parser = commands.build_parser()
        self.submit_parser = _submit_parser()
        self.status = 0
        self.pending: dict[int, Request] = {}  # submitted here, not reaped yet
        self.spare: dict[int, list[DmaBuffer]] = {}  # reaped buffers by size, reused
        self.builtin: dict[str, Callable[[list[str]], int]] = {
            "submit": self.submit, "reap": self.reap, "ring": self.ring, "help": self.help}

    def run(self) -> int:
        while True:
            try:
                self.cmdloop()
                return self.status
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as in sh
                print("^C")

    def preloop(self) -> None:
        if self.interactive:
            import readline
            readline.set_completer_delims(" \t\n")

    # -- dispatch -----------------------------------------------------------------
    def onecmd(self, line: str) -> bool:
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            self.status = commands.report_error(InvalidArgument(str(exc)), self.args.debug)
            return False
        if not words:
            return False  # an empty line does nothing (cmd.Cmd would repeat the last)
        name, rest = words[0], words[1:]
        if name in ("quit", "exit", "EOF"):
            if name == "EOF" and self.interactive:
                print()
            return True
        sys.stdout.flush()
        code = self._guarded(name, rest)
        if code:
            self.status = code
        return self._unusable(code)

    def _unusable(self, code: int) -> bool:
        """True (end the shell) when a Ctrl-C left the queue broken: the driver reset the
        device to take back the buffers of the interrupted requests, and every later
        command would fail with exit 15. Saying so once beats that."""
        broken = self.dev.queue.broken
        if broken and code == 128 + signal.SIGINT:
            print(f"virtio-user: the device was reset ({broken}); the shell ends, start it "
                  "again to go on", file=sys.stderr, flush=True)
            return True
        return False

    def _guarded(self, name: str, rest: list[str]) -> int:
        try:
            return self.dispatch(name, rest)
        except SystemExit as exc:  # argparse after --help (0) or, never here, an error
            return exc.code if isinstance(exc.code, int) else 0
        except KeyboardInterrupt:
            return commands.report_error(Interrupted(signal.SIGINT), self.args.debug)
        except Interrupted as exc:
            if exc.signum != signal.SIGINT:
                raise  # SIGTERM ends the shell (the device is reset on the way out)
            return commands.report_error(exc, self.args.debug)
        except Exception as exc:
            return commands.report_error(exc, self.args.debug)
        finally:
            sys.stdout.flush()

    def dispatch(self, name: str, rest: list[str]) -> int:
        if name in self.builtin:
            return self.builtin[name](rest)
        if name in NOT_HERE:
            raise InvalidArgument(f"{name}: {NOT_HERE[name]}")
        if name not in commands.COMMANDS:
            raise InvalidArgument(f"unknown command {name!r} (help lists them)")
        # The session's global options, the subcommand's own from this line.
        ns = self.parser.parse_args([name, *rest], namespace=argparse.Namespace(**vars(self.args)))
        sub = commands.COMMANDS[name]
        return sub.run(self.dev, ns, sub.prepare(ns))

    # -- completion -----------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted({*commands.COMMANDS, *self.builtin, "quit"} - NOT_HERE.keys())

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        return [n for n in self.names() if n.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        name = line.split()[0]
        if name == "help":
            words = self.names()
        elif name == "submit":
            words = ["read", "write", "flush", "--pattern"]
        elif name in commands.COMMANDS and name not in NOT_HERE:
            words = _option_strings(self._subparser(name))
        else:
            words = []
        return [w for w in words if w.startswith(text)]

    def _subparser(self, name: str) -> commands.Parser:
        return self.parser.subcommands[name].populate()

    # -- help -----------------------------------------------------------------------
    def help(self, rest: list[str]) -> int:
        if not rest:
            for name in self.names():
                sub = commands.COMMANDS.get(name)
                print(f"  {name:14} {sub.help if sub else EXTRA_HELP[name]}")
            return 0
        name = rest[0]
        if name in commands.COMMANDS and name not in NOT_HERE:
            print(self._subparser(name).format_help(), end="")
        elif name in EXTRA_HELP:
            print(f"{name}: {EXTRA_HELP[name]}")
        else:
            raise InvalidArgument(f"unknown command {name!r} (help lists them)")
        return 0

    # -- submit and reap ------------------------------------------------------------
    def submit(self, rest: list[str]) -> int:
        a = self.submit_parser.parse_args(rest)
        dev = self.dev
        if a.kind == "flush":
            if not dev.has(Feature.VIRTIO_BLK_F_FLUSH):
                raise Unsupported(f"{dev.bdf} does not offer VIRTIO_BLK_F_FLUSH")
            req = Request(ReqType.VIRTIO_BLK_T_FLUSH)
        else:
            req = self._data_request(a)
        try:
            dev.submit([req])
        except BaseException:
            if req.buffer is not None:  # not on the device: ours to reuse
                self.spare.setdefault(req.buffer.size, []).append(req.buffer)
            raise
        self.pending[id(req)] = req
        q = dev.queue
        print(f"submitted {req}: head {req.head}, avail.idx {q.avail_idx}, "
              f"{q.in_flight} in flight")
        return 0

    def _data_request(self, a: argparse.Namespace) -> Request:
        dev = self.dev
        sector = parse_number(a.sector, "sector")
        count = parse_number(a.count, "count")
        if count > MAX_SUBMIT_SECTORS:
            raise InvalidArgument(f"submit: count {count} exceeds {MAX_SUBMIT_SECTORS} "
                                  "sectors (1 MiB), the most one submitted request carries")
        writing = a.kind == "write"
        if writing:
            byte = parse_number(a.pattern, "pattern byte")
            if not 0 <= byte <= 255:
                raise InvalidArgument(f"pattern byte {byte} is not in 0..255")
            dev.check_writable("write")
        dev.check_range(sector, count)
        nbytes = count * SECTOR_SIZE
        buf = self._buffer(nbytes)
        if writing:
            buf.mv[:nbytes] = bytes([byte]) * nbytes
        rtype = ReqType.VIRTIO_BLK_T_OUT if writing else ReqType.VIRTIO_BLK_T_IN
        return Request(rtype, sector, count, buf, nbytes)

    def _buffer(self, nbytes: int) -> DmaBuffer:
        spare = self.spare.get(nbytes)
        return spare.pop() if spare else self.dev.alloc_buffer(nbytes)

    def reap(self, rest: list[str]) -> int:
        if rest:
            raise InvalidArgument("reap: takes no arguments")
        done = self.dev.reap()
        if not done:
            print("nothing to reap: no request in flight")
        for req in done:
            self.pending.pop(id(req), None)
            print(f"reaped {req}: {_status_name(req.status)}, head {req.head}, "
                  f"used len {req.used_len}")
            buf = req.buffer
            if buf is None:
                continue
            if req.type == ReqType.VIRTIO_BLK_T_IN and req.status == BlkStatus.VIRTIO_BLK_S_OK:
                dump = commands.HexDump(sys.stdout)
                dump.feed(bytes(buf.mv[:req.nbytes]))
                dump.end()
            self.spare.setdefault(buf.size, []).append(buf)
        return 0

    # -- ring -------------------------------------------------------------------------
    def ring(self, rest: list[str]) -> int:
        if rest:
            raise InvalidArgument("ring: takes no arguments")
        q = self.dev.queue
        if isinstance(q, SplitQueue):
            print("\n".join(describe_split(q, self.pending.values())))
        else:
            print("\n".join(describe_packed(q, self.pending.values())))
        return 0


def _submit_parser() -> commands.Parser:
    p = commands.Parser(prog="virtio-user submit", add_help=False, allow_abbrev=False)
    sub = p.add_subparsers(dest="kind", metavar="read|write|flush", required=True,
                           parser_class=commands.Parser)
    read = sub.add_parser("read", add_help=False)
    read.add_argument("sector", metavar="SECTOR")
    read.add_argument("count", metavar="COUNT")
    write = sub.add_parser("write", add_help=False)
    write.add_argument("sector", metavar="SECTOR")
    write.add_argument("count", metavar="COUNT")
    write.add_argument("--pattern", metavar="BYTE", required=True)
    sub.add_parser("flush", add_help=False)
    return p


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    # argparse keeps its actions private; the shell only reads their option strings.
    return [o for action in parser._actions for o in action.option_strings]


def _status_name(status: int | None) -> str:
    if status is None:
        return "no status"
    try:
        return BlkStatus(status).name
    except ValueError:
        return f"status {status}"


def _flags(flags: int) -> str:
    names = [f.name.removeprefix("VIRTQ_DESC_F_") for f in DescFlag if flags & f and f.name]
    return "|".join(names) or "-"


def _desc_line(index: int, d: Any) -> str:
    return (f"[{index:3}] addr {int(d['addr']):#014x} len {int(d['len']):6} "
            f"flags {_flags(int(d['flags'])):14} next {int(d['next'])}")


def _listed(values: list[int]) -> str:
    shown = " ".join(map(str, values[:SHOWN]))
    return shown + (f" ... ({len(values)} in all)" if len(values) > SHOWN else "")


def describe_split(q: SplitQueue[Any], pending: Any) -> list[str]:
    """The split ring, read through the queue's numpy views and public state."""
    avail_idx, used_idx = int(q.avail["idx"]), int(q.used["idx"])
    waiting = (used_idx - q.used_idx) & 0xFFFF
    lines = [
        f"split ring: {q.size} descriptors at bus {q.ring.bus:#x}, indirect "
        f"{'on' if q.indirect else 'off'}, event_idx {'on' if q.event_idx else 'off'}",
        f"avail (driver writes): flags {int(q.avail['flags']):#x} idx {avail_idx} "
        f"used_event {int(q.avail['used_event'])}",
        f"used  (device writes): flags {int(q.used['flags']):#x} idx {used_idx} "
        f"avail_event {int(q.used['avail_event'])}",
        f"driver: published {q.avail_idx}, reaped up to {q.used_idx} ({waiting} completed "
        f"and not reaped), {q.in_flight} in flight, {q.num_free} free, {q.kicks} kicks",
        f"free list (next first): {_listed(q.free_ids())}",
    ]
    lines += _recent(q, "avail.ring", avail_idx,
                     lambda i: str(int(q.avail["ring"][i])))
    lines += _recent(q, "used.ring", used_idx,
                     lambda i: f"{int(q.used['ring'][i]['id'])}/{int(q.used['ring'][i]['len'])}",
                     " (id/len)")
    reqs = sorted(pending, key=lambda r: r.head)
    lines.append(f"requests in flight: {len(reqs)}" if reqs else "requests in flight: none")
    for req in reqs:
        lines.append(f"  head {req.head}: {req}")
        lines += ["    " + line for line in _chain(q, req.head)]
    return lines


def _recent(q: SplitQueue[Any], name: str, idx: int, entry: Callable[[int], str],
            note: str = "") -> list[str]:
    """The last ring entries before ``idx`` (at most SHOWN), oldest first."""
    n = min(idx, SHOWN, q.size)
    if not n:
        return [f"{name}: empty"]
    first = (idx - n) & 0xFFFF
    items = [entry((first + k) % q.size) for k in range(n)]
    return [f"{name}[{first}..{(idx - 1) & 0xFFFF}]{note}: {' '.join(items)}"]


def _chain(q: SplitQueue[Any], head: int) -> list[str]:
    """The descriptors of the chain at ``head``: following NEXT in the ring, or into the
    indirect table an INDIRECT descriptor points at."""
    lines: list[str] = []
    index, seen = head, set[int]()
    while index not in seen and len(seen) < q.size:
        seen.add(index)
        d = q.desc[index]
        lines.append(_desc_line(index, d))
        flags = int(d["flags"])
        if flags & DescFlag.VIRTQ_DESC_F_INDIRECT:
            lines += ["  " + line for line in _indirect(q, int(d["addr"]), int(d["len"]))]
        if not flags & DescFlag.VIRTQ_DESC_F_NEXT:
            break
        index = int(d["next"])
    return lines


def _indirect(q: SplitQueue[Any], bus: int, nbytes: int) -> list[str]:
    region = q.ring.region
    n = nbytes // DESC_DTYPE.itemsize
    try:
        offset = region.offset_of(bus)
    except KeyError:
        return [f"(indirect table at {bus:#x} is outside the queue's memory)"]
    if not 0 < n <= 256 or offset + nbytes > region.size:
        return [f"(indirect table of {nbytes} bytes at {bus:#x} not shown)"]
    table = np.ndarray((n,), DESC_DTYPE, region.mm, offset)
    return [_desc_line(i, table[i]) for i in range(n)]


def describe_packed(q: PackedQueue[Any], pending: Any) -> list[str]:
    """The packed ring, read through the queue's numpy views and public state: the
    slots from the next used one up to the next available one hold what is in flight."""
    avail, used = q.avail_idx, q.used_idx  # slot, wrap counter in bit 15
    lines = [
        f"packed ring: {q.size} descriptors at bus {q.ring.bus:#x}, indirect "
        f"{'on' if q.indirect else 'off'}, event_idx {'on' if q.event_idx else 'off'}",
        f"driver event suppression (driver writes): off_wrap "
        f"{int(q.driver_event['off_wrap']):#06x} flags {int(q.driver_event['flags'])}",
        f"device event suppression (device writes): off_wrap "
        f"{int(q.device_event['off_wrap']):#06x} flags {int(q.device_event['flags'])}",
        f"driver: next avail slot {avail & 0x7FFF} (wrap {avail >> 15}), next used slot "
        f"{used & 0x7FFF} (wrap {used >> 15}), {q.in_flight} in flight, {q.num_free} "
        f"free, {q.kicks} kicks",
        f"free buffer ids (next first): {_listed(q.free_ids())}",
    ]
    first, count = used & 0x7FFF, ((avail & 0x7FFF) - (used & 0x7FFF)) % q.size
    if not count and q.outstanding:
        count = q.size  # the whole ring is in flight
    lines.append(f"slots in flight: {count}")
    for k in range(min(count, 4 * SHOWN)):
        slot = (first + k) % q.size
        d = q.desc[slot]
        lines.append(f"  [{slot:3}] addr {int(d['addr']):#014x} len {int(d['len']):6} "
                     f"id {int(d['id']):3} flags {_packed_flags(int(d['flags']))}")
    reqs = sorted(pending, key=lambda r: r.head)
    lines.append(f"requests in flight: {len(reqs)}" if reqs else "requests in flight: none")
    lines += [f"  buffer id {req.head}: {req}" for req in reqs]
    return lines


def _packed_flags(flags: int) -> str:
    names = [name for bit, name in ((VIRTQ_DESC_F_AVAIL, "AVAIL"), (VIRTQ_DESC_F_USED, "USED"))
             if flags & bit]
    return "|".join(names + [_flags(flags & 0x7)] if flags & 0x7 else names) or "-"
