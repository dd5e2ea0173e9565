"""Disk images for the integration tests (a plain module: two conftest.py files would
both be imported as ``conftest``, so nothing imports from one).

A guest boots in about 8 s under TCG, so integration test modules share one
``GuestSession`` per module (``vm``/``guest`` fixtures) instead of booting one per test.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_IN_QEMU = REPO / "scripts" / "run-in-qemu.sh"


def make_image(path: Path, size_mib: int, fmt: str = "raw", pattern: bytes | None = None) -> Path:
    """A disk image of ``size_mib``; raw ones optionally filled with a repeated pattern."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), f"{size_mib}M"],
                   check=True)
    if pattern is not None:
        assert fmt == "raw"
        size = size_mib << 20
        path.write_bytes((pattern * (size // len(pattern) + 1))[:size])
    return path


def qcow2_to_raw(path: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(out)], check=True)
    return out.read_bytes()
