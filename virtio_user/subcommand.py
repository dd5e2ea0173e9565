"""The contract between the command line and the modules that implement a subcommand
(``commands.py``'s own, ``bench.py``, ``nbd``, ``cli.py``'s ``shell``): how one
registers, and how a ``prepare`` says it already did the whole job. It sits below all
of them, so none of them imports the command line back (and ``python -m
virtio_user.cli``, where cli is ``__main__``, sees the same classes as the modules it
loads)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .blk import VirtioBlk


@dataclass
class Subcommand:
    add: Callable[[argparse.ArgumentParser], None]
    prepare: Callable[[argparse.Namespace], Any]  # validates; runs before the device opens
    run: Callable[[VirtioBlk, argparse.Namespace, Any], int]
    help: str


@dataclass
class Finished:
    """What a ``prepare`` returns when it did the whole job (``nbd -d``, the parent of a
    background server): main exits with ``status`` and opens no device."""
    status: int
