"""Start-up: what the command line loads before it needs the driver.

Under TCG, importing numpy costs seconds; ``--help`` and bad arguments must answer
without it, and the guest-side command never loads the host harness. The top-level
``--help`` loads nothing beyond the interpreter's own start but ``cli`` and its
precomputed text, which must be what the parser prints. Each case runs in a fresh
interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_user import cli, help_text

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
    """What parsing and checking arguments must not load: the driver and its numpy, and
    (each a tenth of a second or more under TCG) dataclasses' inspect and typing."""
    return {m for m in modules
            if m.split(".")[0] in ("numpy", "pyudev", "qemu", "inspect", "dataclasses",
                                   "typing")
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


# -- the precomputed top-level --help ------------------------------------------------

REGENERATE = "VIRTIO_USER_REGENERATE_HELP"
HELP_TEXT = Path(help_text.__file__)


def parser_help(columns: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the parser prints for ``--help`` at this width (argparse asks
    shutil.get_terminal_size, which takes COLUMNS first)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    return cli.build_parser().format_help()


def help_text_source(text: str) -> str:
    assert '"""' not in text and "\\" not in text  # it goes in a plain triple-quoted string
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return f'''"""What ``virtio-user --help`` prints: ``cli.main`` writes this instead of building the
parser (under TCG, importing argparse and the commands and building the parser cost as
much again as starting the interpreter). Made by the parser itself, with the argparse of
Python {python}, for a width of 80 columns (what argparse uses when the output is not
a terminal); ``cli`` prints it only for that Python and that width.

Generated: do not edit. ``tests/unit/test_startup.py`` fails when the parser's help
differs, and says how to make this file again.
"""

PYTHON = ({sys.version_info[0]}, {sys.version_info[1]})
COLUMNS = 80
TEXT = """\\
{text}"""
'''


def test_the_precomputed_help_is_what_the_parser_prints(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """An option or subcommand added to the parser changes its help: then this fails
    until ``help_text.py`` is made again, which this test does when asked."""
    want = help_text_source(parser_help(help_text.COLUMNS, monkeypatch))
    if os.environ.get(REGENERATE) == "1" and HELP_TEXT.read_text() != want:
        HELP_TEXT.write_text(want)
    assert HELP_TEXT.read_text() == want, (
        f"{HELP_TEXT.name} is not what the parser prints for --help; make it again with "
        f"{REGENERATE}=1 python -m pytest tests/unit/test_startup.py -k precomputed")


def run_python(code: str, *argv: str, columns: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, which writes the modules it ended with to stderr
    (from atexit, so after the help's sys.exit too)."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.stderr.write(' '.join(sorted(sys.modules))))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([sys.executable, "-c", probe + code, *argv], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


ENTRY_POINT = "from virtio_user.cli import main\nsys.exit(main())\n"  # the script's


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_loads_nothing_beyond_the_interpreter_but_its_text(flag: str) -> None:
    """Compared with ``python -c pass`` (the same probe, the same interpreter and site):
    argparse, typing, dataclasses, the commands, the driver all stay unloaded."""
    floor = set(run_python("").stderr.split())
    r = run_python(ENTRY_POINT, flag)
    assert (r.returncode, r.stdout) == (0, help_text.TEXT)
    assert set(r.stderr.split()) - floor == {
        "virtio_user", "virtio_user.cli", "virtio_user.help_text"}


@pytest.mark.parametrize("argv,columns", [
    (["--help"], "100"),  # another width: argparse formats it
    (["--debug", "--help"], None),  # not the help alone
    (["info", "--help"], None),  # a subcommand's help
])
def test_other_help_is_the_parsers(argv: list[str], columns: str | None,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    r = run_python(ENTRY_POINT, *argv, columns=columns)
    parser = parser_help(int(columns or 80), monkeypatch) if argv[0] != "info" else None
    assert r.returncode == 0
    if parser is not None:
        assert r.stdout == parser
    assert "argparse" in r.stderr.split()


def test_startup_times_prints_each_command_against_the_floor() -> None:
    """scripts/startup_times.py, as docs/cli.md runs it (here on the host, one run): a
    row for the floor and each default command, each with its ratio to the floor."""
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(repo / "scripts" / "startup_times.py"),
                        "--runs", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line[:34].strip(): line[34:].split() for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {"python -c pass", "virtio-user --help", "virtio-user read --help"}
    assert rows["python -c pass"][-1] == "1.00"
    assert all(float(v[-1]) > 0 for v in rows.values())
