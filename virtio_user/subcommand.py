"""The contract between the command line and the modules that implement a subcommand
(``commands.py``'s own, ``bench.py``, ``nbd``, ``cli.py``'s ``shell``): how one
registers, and how a ``prepare`` says it already did the whole job. It sits below all
of them, so none of them imports the command line back (and ``python -m
virtio_user.cli``, where cli is ``__main__``, sees the same classes as the modules it
loads).

Plain classes, not dataclasses: the command line loads this module to parse, and
``dataclasses`` brings ``inspect`` (with ``ast``, ``dis``, ``tokenize``), which costs
a tenth of a second under TCG.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows it)
if TYPE_CHECKING:
    import argparse
    from typing import Any, Callable

    from .blk import VirtioBlk


class Subcommand:
    __slots__ = ("add", "prepare", "run", "help")

    def __init__(self, add: Callable[[argparse.ArgumentParser], None],
                 prepare: Callable[[argparse.Namespace], Any],  # validates; before the device opens
                 run: Callable[[VirtioBlk, argparse.Namespace, Any], int],
                 help: str) -> None:
        self.add, self.prepare, self.run, self.help = add, prepare, run, help

    def __repr__(self) -> str:
        return f"Subcommand({self.help!r})"


class Finished:
    """What a ``prepare`` returns when it did the whole job (``nbd -d``, the parent of a
    background server): main exits with ``status`` and opens no device."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status

    def __repr__(self) -> str:
        return f"Finished(status={self.status!r})"
