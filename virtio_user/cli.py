"""``virtio-user``: the command line's entry point.

Every argument is checked before the device is touched; errors print one line (a
traceback only with ``--debug``) and exit with the code ``errors.exit_code`` gives:
0 ok, 1 bad arguments, 3 I/O error, 5 unsupported, 7 read-only, 15 cannot open or use
the device or a file, 22 out of capacity, 33 timeout, 99 other, 128+N on signal N.

The subcommands and their parser are in ``commands``; this module adds ``shell``,
which runs them at a prompt, and opens the device for whichever was chosen.

Start-up: this module imports only ``sys`` (and, for ``--help``, ``help_text``), so that
``virtio-user --help`` prints without argparse, ``typing`` or ``commands`` (under TCG
they cost as much as starting the interpreter). Everything else is imported by
``main`` once it knows it needs the parser. ``tests/unit/test_startup.py`` holds the
text to what the parser prints, and the imports to that list.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows it)
if TYPE_CHECKING:
    import argparse
    import contextlib
    from typing import Any, Callable, Iterator, Sequence

    from .blk import VirtioBlk
    from .commands import HexDump as HexDump  # where the guest-side tests look for it
    from .commands import Parser
    from .subcommand import Subcommand

    Opener = Callable[[argparse.Namespace], VirtioBlk]
    COMMANDS: dict[str, Subcommand]


def __getattr__(name: str) -> object:
    """``COMMANDS`` and ``HexDump`` come from ``commands`` (argparse, dataclasses), so
    they are made on first use rather than when the entry point imports this module."""
    if name == "COMMANDS":
        return _commands()
    if name == "HexDump":
        from .commands import HexDump
        return HexDump
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_shell(dev: VirtioBlk, args: argparse.Namespace, _: Any) -> int:
    from .shell import Shell
    return Shell(dev, args).run()


_COMMANDS: dict[str, Subcommand] | None = None
_PARSER: Parser | None = None


def _commands() -> dict[str, Subcommand]:
    """``commands.COMMANDS`` and ``shell``: what main() runs, made once."""
    global _COMMANDS
    if _COMMANDS is None:
        from . import commands
        from .subcommand import Subcommand
        _COMMANDS = {
            **commands.COMMANDS,
            "shell": Subcommand(lambda p: None, commands.no_prepare, _run_shell,
                                "one device, many commands: a prompt with submit, reap "
                                "and ring"),
        }
    return _COMMANDS


def build_parser() -> Parser:
    from . import commands
    return commands.build_parser(_commands())


def _parser() -> Parser:
    """main()'s parser, built once per process: building one (argparse and its gettext
    look-ups) costs more than most commands under TCG, and main() runs many times in
    one process under the benchmark's guest side and the CLI fuzz test."""
    global _PARSER
    if _PARSER is None:
        _PARSER = build_parser()
    return _PARSER


def _columns() -> int:
    """The width argparse formats help for, by ``shutil.get_terminal_size``'s rule
    (COLUMNS if set and positive, else the terminal on the original stdout, else 80),
    without importing shutil (and, through it, bz2 and lzma)."""
    import os  # loaded with the interpreter: a dictionary look-up
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _print_precomputed_help(argv: list[str]) -> None:
    """For the top-level ``--help`` alone, print ``help_text.TEXT`` and exit 0, as the
    parser's help action would, if that text is what the parser would print here: made
    by this Python's argparse for this width (the test keeps it made by this parser).
    Otherwise return, and the parser answers."""
    if argv not in (["--help"], ["-h"]):
        return
    from . import help_text
    if sys.version_info[:2] != help_text.PYTHON or _columns() != help_text.COLUMNS:
        return
    try:  # argparse's _print_message, which the help action uses
        (sys.stdout or sys.stderr).write(help_text.TEXT)
    except (AttributeError, OSError):
        pass
    sys.exit(0)


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
    import contextlib
    if isinstance(plan, contextlib.AbstractContextManager):
        return plan
    return contextlib.nullcontext()


def _sigterm_raises() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises Interrupted, so ``with dev`` resets the device on the way out."""
    import contextlib
    import signal

    from .errors import Interrupted

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    @contextlib.contextmanager
    def raising() -> Iterator[None]:
        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
    return raising()


def main(argv: Sequence[str] | None = None, opener: Opener | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _print_precomputed_help(argv)
    from .commands import report_error
    from .errors import Interrupted
    from .subcommand import Finished
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        if args.device is not None:
            from .pci import parse_bdf
            args.device = parse_bdf(args.device)
        cmd = _commands()[args.command]
        plan = cmd.prepare(args)
        if isinstance(plan, Finished):
            return plan.status
        # A plan may hold files opened before the device (read -o, write -i).
        with _closing(plan), _sigterm_raises():
            try:
                with (opener or default_opener)(args) as dev:
                    return cmd.run(dev, args, plan)
            except KeyboardInterrupt as exc:
                import signal
                raise Interrupted(signal.SIGINT) from exc
    except BrokenPipeError:
        return 0
    except Exception as exc:
        return report_error(exc, debug)


if __name__ == "__main__":
    sys.exit(main())
