"""Repository rules, checked rather than remembered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mypy_strict_is_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_package_at_qemu_root() -> None:
    # qemu.qmp is a namespace package: a qemu/__init__.py here would shadow it.
    assert not (REPO / "qemu" / "__init__.py").exists()


def test_raw_register_and_memory_access_stay_in_their_modules() -> None:
    """pread/pwrite on registers only in regs.py; mmap and pagemap only in memory.py."""
    owners = {"os.pread(": {"regs.py", "memory.py"}, "os.pwrite(": {"regs.py"},
              "mmap.mmap(": {"memory.py"}, 'open("/proc/self/pagemap"': {"memory.py"}}
    for path in (REPO / "virtio_user").rglob("*.py"):
        if "host" in path.parts:
            continue
        text = path.read_text()
        for needle, allowed in owners.items():
            if needle in text:
                assert path.name in allowed, f"{needle} used in {path}"
