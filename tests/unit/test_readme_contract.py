"""The README contract, checked rather than remembered: every ``--option`` the README
shows is used by some test, in the form the README shows it.

The same scan as the before-stop hook (the hook's regular expression over README.md),
stricter in two ways: an option must appear as a whole token (``--cache`` is not
satisfied by ``--cache-dir``), and an option the README writes as ``--opt VALUE`` must
appear in a test in that space form at least once, not only as ``--opt=VALUE``.

And the synopses: each bracketed option of the ``virtio-user``, ``run-in-qemu.sh`` and
``bench.sh`` synopsis blocks is given to that program's own parser exactly as written
there (``--opt VALUE``, each choice of ``a|b``, twice where ``...`` says repeatable), and
must change what the parser returns. The integration tests run them for real.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Sequence

import pytest

from virtio_user import cli
from virtio_user.host import bench_harness, run

REPO = Path(__file__).resolve().parents[2]
OPTION = re.compile(r"--[a-z][a-z0-9-]+")  # the hook's: grep -oE -- "--[a-z][a-z0-9-]+"

# Options the README shows that no test needs to use, each with its reason.
EXCLUDED: dict[str, str] = {
}


def readme_options(text: str) -> dict[str, set[str]]:
    """Each option in the README -> the characters that follow it there."""
    found: dict[str, set[str]] = {}
    for m in OPTION.finditer(text):
        found.setdefault(m.group(), set()).add(text[m.end():m.end() + 1])
    return found


def uses(option: str, text: str, space_form: bool) -> bool:
    tail = r"(?![a-z0-9-])" + (r"(?!=)" if space_form else "")
    return re.search(re.escape(option) + tail, text) is not None


def all_test_sources() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "tests").rglob("*.py")))


def test_every_readme_option_is_used_by_a_test_as_documented() -> None:
    tests = all_test_sources()
    missing = []
    for option, followers in sorted(readme_options((REPO / "README.md").read_text()).items()):
        if option in EXCLUDED:
            continue
        space_form = followers != {"="}  # the README shows it other than as --opt=X
        if not uses(option, tests, space_form):
            missing.append(option if space_form else f"{option}=")
    assert not missing, "README options no test uses in the README's form: " + " ".join(missing)


def test_scan_sees_the_forms() -> None:
    found = readme_options("use `--cache MODE`, `--direct=1` and --flag.\n")
    assert found == {"--cache": {" "}, "--direct": {"="}, "--flag": {"."}}
    assert uses("--cache", '["--cache", "none"]', space_form=True)
    assert not uses("--cache", '["--cache=none"]', space_form=True)
    assert uses("--direct", '"--direct=1"', space_form=False)
    assert not uses("--cache", '"--cache-dir"', space_form=False)


# -- the synopses ------------------------------------------------------------------------

Parse = Callable[[list[str]], argparse.Namespace]
PROGRAMS: dict[str, tuple[Parse, list[str]]] = {  # synopsis start -> parser, argv tail
    "virtio-user [": (lambda argv: cli.build_parser().parse_args(argv), ["info"]),
    "scripts/run-in-qemu.sh [": (run.parse_args, ["--", "true"]),
    "scripts/bench.sh [": (bench_harness.parse_args, []),
}
# A value for each metavariable, none of them a default (that would change nothing).
SAMPLES = {"BDF": "0000:00:10.0", "S": "7", "SECONDS": "7", "MIB": "512", "ARG": "-device",
           "N": "2", "DIR": "/tmp/virtio-user-out", "WORKLOAD": "randread-4k-qd1",
           "MODE": "writethrough", "PATH": "disk.img"}
GROUP = re.compile(r"\[(--[a-z][^\[\]]*)\](\.\.\.)?")  # [--opt X | --other], maybe ...


def synopses() -> dict[str, str]:
    blocks = (REPO / "README.md").read_text().split("```")[1::2]
    found = {}
    for block in blocks:
        text = block.removeprefix("sh").strip()
        for start in PROGRAMS:
            if text.startswith(start):  # the program's own options, not its COMMAND's
                found[start] = text.split("COMMAND", 1)[0]
    return found


def synopsis_forms() -> list[tuple[str, list[str], str, str | None, bool]]:
    """(program, argv, dest, choice or None, repeatable) for every option form shown."""
    forms = []
    for start, text in synopses().items():
        for group in GROUP.finditer(text):
            for alternative in group.group(1).split(" | "):
                option, *value = alternative.split()
                dest = option[2:].replace("-", "_")
                repeat = group.group(2) is not None
                if not value:
                    forms.append((start, [option], dest, None, repeat))
                elif "|" in value[0]:
                    forms += [(start, [option, v], dest, v, repeat) for v in value[0].split("|")]
                else:
                    forms.append((start, [option, SAMPLES[value[0]]], dest, None, repeat))
    return forms


def test_the_three_synopses_are_found() -> None:
    assert set(synopses()) == set(PROGRAMS)
    assert len(synopsis_forms()) >= 25


@pytest.mark.parametrize("start,words,dest,choice,repeat", synopsis_forms(),
                         ids=[f"{f[0].split()[0]} {' '.join(f[1])}" for f in synopsis_forms()])
def test_synopsis_option_parses_as_written(start: str, words: list[str], dest: str,
                                           choice: str | None, repeat: bool,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / SAMPLES["PATH"]).write_bytes(bytes(1 << 20))
    parse, tail = PROGRAMS[start]
    args = words * (2 if repeat else 1)
    got, plain = parse(args + tail), parse(tail)
    if choice is not None:  # a repeatable choice collects each one given
        assert getattr(got, dest) == ([choice, choice] if repeat else choice)
    else:
        assert getattr(got, dest) != getattr(plain, dest)
    if repeat:
        assert len(getattr(got, dest)) == 2
