"""The README contract, checked rather than remembered: every ``--option`` the README
shows is used by some test, in the form the README shows it.

The same scan as the before-stop hook (the hook's regular expression over README.md),
stricter in two ways: an option must appear as a whole token (``--cache`` is not
satisfied by ``--cache-dir``), and an option the README writes as ``--opt VALUE`` must
appear in a test in that space form at least once, not only as ``--opt=VALUE``.
"""

from __future__ import annotations

import re
from pathlib import Path

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
