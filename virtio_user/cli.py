"""``virtio-user``: the command line's entry point.

Every argument is checked before the device is touched; errors print one line (a
traceback only with ``--debug``) and exit with the code ``errors.exit_code`` gives:
0 ok, 1 bad arguments, 3 I/O error, 5 unsupported, 7 read-only, 15 cannot open or use
the device or a file, 22 out of capacity, 33 timeout, 99 other, 128+N on signal N.

The subcommands and their parser are in ``commands``; this module adds ``shell``,
which runs them at a prompt, and opens the device for whichever was chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import commands
from .commands import Parser, report_error
from .commands import HexDump as HexDump  # where the guest-side tests look for it
from .errors import Interrupted
from .subcommand import Finished, Subcommand

if TYPE_CHECKING:
    from .blk import VirtioBlk

Opener = Callable[[argparse.Namespace], "VirtioBlk"]


def _run_shell(dev: VirtioBlk, args: argparse.Namespace, _: Any) -> int:
    from .shell import Shell
    return Shell(dev, args).run()


COMMANDS: dict[str, Subcommand] = {
    **commands.COMMANDS,
    "shell": Subcommand(lambda p: None, commands.no_prepare, _run_shell,
                        "one device, many commands: a prompt with submit, reap and ring"),
}


def build_parser() -> Parser:
    return commands.build_parser(COMMANDS)


@functools.cache
def _parser() -> Parser:
    """main()'s parser, built once per process: building one (argparse and its gettext
    look-ups) costs more than most commands under TCG, and main() runs many times in
    one process under the benchmark's guest side and the CLI fuzz test."""
    return build_parser()


def _warnings_to_stderr() -> None:
    """The driver's warnings (a capacity change announced by the device, a failed
    reset) as ``virtio-user: ...`` lines on stderr; once per process."""
    import logging

    class Stderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            print(f"virtio-user: {record.getMessage()}", file=sys.stderr, flush=True)

    logger = logging.getLogger("virtio_user")
    if not any(type(h).__name__ == "Stderr" for h in logger.handlers):
        logger.addHandler(Stderr(logging.WARNING))


def default_opener(args: argparse.Namespace) -> VirtioBlk:
    from .blk import VirtioBlk
    _warnings_to_stderr()
    return VirtioBlk.open(args.device, backend=args.backend, rebind=args.rebind,
                          timeout=args.timeout, wait=args.wait, ring=args.ring,
                          transport=args.transport, queues=args.queues)


def _closing(plan: Any) -> contextlib.AbstractContextManager[Any]:
    if isinstance(plan, contextlib.AbstractContextManager):
        return plan
    return contextlib.nullcontext()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Interrupted, so ``with dev`` resets the device on the way out."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None, opener: Opener | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        if args.device is not None:
            from .pci import parse_bdf
            args.device = parse_bdf(args.device)
        cmd = COMMANDS[args.command]
        plan = cmd.prepare(args)
        if isinstance(plan, Finished):
            return plan.status
        # A plan may hold files opened before the device (read -o, write -i).
        with _closing(plan), _sigterm_raises():
            try:
                with (opener or default_opener)(args) as dev:
                    return cmd.run(dev, args, plan)
            except KeyboardInterrupt as exc:
                raise Interrupted(signal.SIGINT) from exc
    except BrokenPipeError:
        return 0
    except Exception as exc:
        return report_error(exc, debug)


if __name__ == "__main__":
    sys.exit(main())
