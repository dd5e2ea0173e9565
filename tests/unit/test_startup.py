"""Start-up: what the command line loads before it needs the driver.

Under TCG, importing numpy costs seconds; ``--help`` and bad arguments must answer
without it, and the guest-side command never loads the host harness. Each case runs in
a fresh interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, json, sys
from virtio_user import cli
status = None
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        status = cli.main(sys.argv[1:], opener=lambda args: 1 / 0)
    except SystemExit as exc:
        status = exc.code
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def loaded(*argv: str) -> tuple[object, set[str]]:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                       text=True, timeout=120, check=True)
    result = json.loads(r.stdout)
    return result["status"], set(result["modules"])


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules
            if m.split(".")[0] in ("numpy", "pyudev", "qemu")
            or m.startswith(("virtio_user.host", "virtio_user.blk", "virtio_user.bench",
                             "virtio_user.shell", "virtio_user.nbd", "virtio_user.transport"))}


@pytest.mark.parametrize("argv,status", [
    ((), 1),  # no command: usage error
    (("--help",), 0),
    (("read", "--help"), 0),
    (("write", "--help"), 0),
    (("read", "-1", "8"), 1),  # refused before the device is opened
    (("write", "0", "--pattern", "300", "--count", "1"), 1),
    (("nosuch",), 1),
])
def test_help_and_bad_arguments_load_neither_numpy_nor_the_driver(
        argv: tuple[str, ...], status: int) -> None:
    got, modules = loaded(*argv)
    assert got == status
    assert heavy(modules) == set()


def test_bench_arguments_are_built_when_bench_is_chosen() -> None:
    got, modules = loaded("bench", "--bs", "1000", "--ios", "1")
    assert got == 1  # the bench's own check ran, so its options were there
    assert "virtio_user.bench" in modules
    assert not any(m.startswith("virtio_user.host") for m in modules)


def test_no_guest_side_module_loads_the_host_harness() -> None:
    """The driver, the CLI and its commands run in the guest: none of them may pull in
    the QEMU harness or its dependencies (QMP, ELF parsing, plotting)."""
    code = """
import importlib, json, pathlib, sys
import virtio_user
root = pathlib.Path(virtio_user.__file__).parent
for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root.parent).with_suffix("").parts
    if "host" not in parts:
        importlib.import_module(".".join(p for p in parts if p != "__init__"))
print(json.dumps(sorted(sys.modules)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True)
    modules = set(json.loads(r.stdout))
    assert "virtio_user.cli" in modules and "virtio_user.shell" in modules
    assert {m for m in modules if m.startswith("virtio_user.host")
            or m.split(".")[0] in ("qemu", "elftools", "matplotlib")} == set()
