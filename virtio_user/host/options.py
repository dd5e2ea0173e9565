"""Option strings: QEMU's ``key=value,...`` syntax both ways, and checked values."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .errors import BadOption

SWITCH = {"on": True, "off": False}


def qemu_escape(value: str) -> str:
    """``value`` inside a QEMU option string (``key=value,...``): a comma is written
    twice, or a path with one in it would end the value and start an option of its own."""
    return value.replace(",", ",,")


def split_spec(spec: str) -> list[str]:
    """Split ``PATH,key=value,...`` on single commas; ``,,`` is a comma of the text, as in
    QEMU's own option strings."""
    parts = [""]
    i = 0
    while i < len(spec):
        if spec.startswith(",,", i):
            parts[-1] += ","
            i += 2
        elif spec[i] == ",":
            parts.append("")
            i += 1
        else:
            parts[-1] += spec[i]
            i += 1
    return parts


def ascii_int(text: str) -> int:
    """A plain decimal number (ASCII digits only: ``int()`` also takes ``"٤"`` and ``" 4"``)."""
    if not text or not all("0" <= c <= "9" for c in text):
        raise ValueError(text)
    return int(text)


def switch(key: str, value: str, where: str) -> bool:
    """``on`` or ``off``, exactly: QEMU also reads yes/true/... and a typo must not turn
    into the default (a writable disk that was meant to be read-only)."""
    if value not in SWITCH:
        raise BadOption(f"{where}: {key}={value}: use {key}=on or {key}=off")
    return SWITCH[value]


def image_format(path: Path, what: str) -> str:
    """The image's format as ``qemu-img info`` detects it."""
    if not path.is_file():
        raise BadOption(f"{what} {path}: no such file")
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise BadOption(f"{what} {path}: {out.stderr.strip()}")
    return str(json.loads(out.stdout)["format"])
