"""Repository rules, checked rather than remembered."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Raw access to device registers and memory, and the only modules allowed to use it:
# register I/O (pread/pwrite on an I/O BAR, a mapped memory BAR) in regs.py, DMA
# mappings and the pagemap in memory.py.
RAW = {"regs.py", "memory.py"}
RAW_OWNERS = {"os.pread": RAW, "os.pwrite": RAW, "mmap.mmap": RAW,
              "/proc/self/pagemap": {"memory.py"}}


def test_mypy_strict_is_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_package_at_qemu_root() -> None:
    # qemu.qmp is a namespace package: a qemu/__init__.py here would shadow it.
    assert not (REPO / "qemu" / "__init__.py").exists()


def raw_uses(source: str) -> set[str]:
    """Which of RAW_OWNERS' names the module refers to, however it imported them
    (``import os as o; o.pread``, ``from mmap import mmap as m``), called or passed on."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> module
    names: dict[str, str] = {}  # local name -> module.attribute
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in modules:
                used.add(f"{modules[node.value.id]}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in names:
            used.add(names[node.id])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            used.add(node.value)
    return used & RAW_OWNERS.keys()


def test_raw_use_is_found_however_it_is_spelled() -> None:
    assert raw_uses("import os\nos.pread(fd, 4, 0)") == {"os.pread"}
    assert raw_uses("import os as o\nf = o.pwrite") == {"os.pwrite"}
    assert raw_uses("from mmap import mmap as m\nm(-1, 4096)") == {"mmap.mmap"}
    assert raw_uses("from os import pread\nread = functools.partial(pread, fd)") == {"os.pread"}
    assert raw_uses('open("/proc/self/pagemap", "rb")') == {"/proc/self/pagemap"}
    assert raw_uses("import os\nos.read(fd, 4)  # os.pread in a comment") == set()


def test_raw_register_and_memory_access_stay_in_their_modules() -> None:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "virtio_user").rglob("*.py")):
        if "host" in path.relative_to(REPO).parts:
            continue  # the harness on the host touches no device
        for use in raw_uses(path.read_text()):
            found.setdefault(use, set()).add(path.name)
    for use, modules in found.items():
        assert modules <= RAW_OWNERS[use], f"{use} used in {sorted(modules - RAW_OWNERS[use])}"
    assert {"os.pread", "os.pwrite", "mmap.mmap", "/proc/self/pagemap"} <= found.keys(), \
        "the check found no use at all: it is not looking where the code is"
