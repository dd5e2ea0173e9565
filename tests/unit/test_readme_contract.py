"""The documentation contract, checked rather than remembered, over README.md and every
page in docs/: every ``--option`` they show is used by some test, in the form shown.

The same scan as the before-stop hook (the hook's regular expression over README.md and
docs/*.md), stricter in two ways: an option must appear as a whole token (``--cache`` is
not satisfied by ``--cache-dir``), and an option the docs write as ``--opt VALUE`` must
appear in a test in that space form at least once, not only as ``--opt=VALUE``.

The synopses: each bracketed option of the ``virtio-user``, ``run-in-qemu.sh`` and
``bench.sh`` synopsis blocks (wherever they stand: docs/cli.md, docs/harness.md,
docs/benchmarks.md) is given to that program's own parser exactly as written there
(``--opt VALUE``, each choice of ``a|b``, twice where ``...`` says repeatable), and must
change what the parser returns. The integration tests run them for real.

The links: every relative link in the README and the pages resolves to a file, and one
with ``#anchor`` to a heading of that page; the README links every page and stays short.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Sequence

import pytest

import docpages
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


def documented_text() -> str:
    return "\n".join(p.read_text() for p in docpages.pages())


def test_the_pages_are_found() -> None:
    names = {p.name for p in docpages.pages()}
    assert {"README.md", "cli.md", "harness.md", "benchmarks.md"} <= names


def test_every_documented_option_is_used_by_a_test_as_documented() -> None:
    tests = all_test_sources()
    missing = []
    for option, followers in sorted(readme_options(documented_text()).items()):
        if option in EXCLUDED:
            continue
        space_form = followers != {"="}  # the README shows it other than as --opt=X
        if not uses(option, tests, space_form):
            missing.append(option if space_form else f"{option}=")
    assert not missing, "documented options no test uses in the documented form: " \
        + " ".join(missing)


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
    blocks = documented_text().split("```")[1::2]
    found = {}
    for block in blocks:
        text = block.removeprefix("sh").strip()
        for start in PROGRAMS:
            # The program's synopsis, the first block that starts with it (docs/cli.md's
            # before ublk.md's usage of one subcommand): its own options, up to COMMAND.
            if text.startswith(start):
                found.setdefault(start, text.split("COMMAND", 1)[0])
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


# -- the links ---------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_LINES = 250


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and most renderers make it: lower case, punctuation
    but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            found.add(slug(line.lstrip("#")))
    return found


def links(page: Path) -> list[str]:
    prose = "".join(page.read_text().split("```")[0::2])  # not inside code blocks
    return [m.group(1) for m in LINK.finditer(prose)]


def test_slug_is_the_renderers() -> None:
    assert slug(" Profile: where the time goes (TCG, 2 vCPUs)") == \
        "profile-where-the-time-goes-tcg-2-vcpus"
    assert slug(" `scripts/run-in-qemu.sh`") == "scriptsrun-in-qemush"
    assert slug(" Waiting: poll, interrupt, hybrid") == "waiting-poll-interrupt-hybrid"


@pytest.mark.parametrize("page", docpages.pages(), ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL: not ours to check offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links: {broken}"


def test_the_readme_links_every_page_and_stays_short() -> None:
    readme = docpages.README
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme)}
    missing = [p.name for p in sorted(docpages.DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES


def test_every_page_has_a_title() -> None:
    """A page opens with its title: what a reader arriving from a link sees first."""
    for page in docpages.DOCS.glob("*.md"):
        assert page.read_text().startswith("# "), page.name


def test_the_readme_mount_is_the_nbd_pages_mount() -> None:
    """The README's tour shows the lines docs/nbd.md shows, which test_nbd.py runs."""
    tour = docpages.section("README.md", "## A short tour")
    mount = tour.split("**A filesystem through the driver**", 1)[1]
    lines = mount.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    page = docpages.block("nbd.md", "## Usage", "sh")
    assert lines == page
    nbd_test = (REPO / "tests" / "integration" / "test_nbd.py").read_text()
    for line in lines[1:3]:
        assert f'"{line}"' in nbd_test, line
