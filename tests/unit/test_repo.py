"""Repository rules, checked rather than remembered."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Raw access to device registers and memory, and the only modules allowed to use it:
# register I/O (pread/pwrite on an I/O BAR, a mapped memory BAR) in regs.py, DMA
# mappings and the pagemap in memory.py; io_uring's rings (and a ublk queue's request
# descriptors) in io_uring/uring.py.
RAW = {"regs.py", "memory.py"}
RAW_OWNERS = {"os.pread": RAW, "os.pwrite": RAW, "mmap.mmap": RAW | {"uring.py"},
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


def import_graph() -> dict[str, set[str]]:
    """Which package modules each module imports, wherever the import stands (lazy ones
    in functions too: they are layering all the same), except what a package's
    ``__init__`` re-exports lazily (its ``__getattr__`` and the TYPE_CHECKING imports
    that name those attributes for type checkers)."""
    root = REPO / "virtio_user"
    paths = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        faces = [n for n in tree.body if path.name == "__init__.py" and (
            isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
            or isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")]
        hidden = {id(n) for face in faces for n in ast.walk(face)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while (w := stack.pop()) != v:
                group.add(w)
            if group:
                found.append(group | {v})

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_graph()
    assert "virtio_user.errors" in graph["virtio_user.blk"], "the graph misses imports"
    assert "virtio_user.shell" in graph["virtio_user.cli"], "the graph misses lazy imports"
    assert cycles(graph) == []
