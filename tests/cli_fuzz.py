"""Generated bad input for the CLI (test_generated_bad_input_with_hypothesis): sectors
and counts, junk where numbers go, bad option values (timeouts, bench sizes) and output
files that refuse writes, each with the exit code the README documents.

Hypothesis draws the cases here, on the host; tests/guest/run_cli_cases.py runs them all
through the real CLI in one guest process. Under TCG, hypothesis's own work per case cost
five times the CLI's, so drawing them in the guest made this the suite's slowest test.
Valid writes are never drawn (the host checks the image is unchanged).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CAPACITY = 16384  # sectors of the device the cases run on
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
NUMBER = re.compile(r"\s*[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)\s*", re.ASCII)

Case = tuple[list[str], int]  # argv after --device, the exit code it must get

numbers = st.one_of(st.integers(-2**80, 2**80), st.integers(-3, 3),
                    st.integers(CAPACITY - 3, CAPACITY + 3), st.integers(2**63 - 2, 2**64 + 2))
spellings = st.sampled_from([str, hex])
junk = st.one_of(
    st.text(min_size=0, max_size=12),
    st.sampled_from(["\u00b2", "\u0664\u0660\u0669\u0666", "1_000", "0x", "0x-1", "--1",
                     "+", "nan", "inf", "1e3", "\uff11", "1.5", " ", "0b101", "0\u00a0"]),
).filter(lambda text: not NUMBER.fullmatch(text) and text.strip() != "--help")

# Each value goes where a later argument is surely bad (a zero count, --runtime with
# --ios), so a value that happens to be valid never runs a bench or writes: exit 1
# either way, and the value is still parsed first.
BAD_OPTION = {
    "--timeout": lambda v: ["--timeout", v, "read", "0", "0"],
    "--pattern": lambda v: ["write", "0", "--pattern", v, "--count", "0"],
    "--bs": lambda v: ["bench", "--bs", v, "--runtime", "1", "--ios", "1"],
    "--iodepth": lambda v: ["bench", "--iodepth", v, "--runtime", "1", "--ios", "1"],
    "--runtime": lambda v: ["bench", "--runtime", v, "--ios", "1"],
    "--ios": lambda v: ["bench", "--ios", v, "--runtime", "1"],
}


def expected(sector: int, count: int) -> int:
    if sector < 0 or count <= 0:
        return 1
    if sector + count > CAPACITY:
        return 22
    return 0


def unusable_outputs(where: Path) -> dict[str, str]:
    """Output files the guest cannot write, some made in ``where`` (a directory the
    guest sees at the same path)."""
    link = where / "dangling"
    if not link.is_symlink():
        os.symlink("/nonexistent/dir/file", link)
    return {"/dev/full": "/dev/full", "/proc/version": "/proc/version",
            "dangling": str(link), "directory": str(where),
            "no-such-dir": str(where / "missing" / "out")}


def draw_cases(where: Path) -> list[Case]:
    """Every case, drawn by hypothesis (about 1,100)."""
    cases: list[Case] = []

    @settings(max_examples=450, **SETTINGS)
    @given(cmd=st.sampled_from(["read", "write", "discard", "write-zeroes"]),
           sector=numbers, count=numbers, spell=spellings)
    def sectors_and_counts(cmd: str, sector: int, count: int, spell) -> None:
        want = expected(sector, count)
        if want == 0 and (cmd != "read" or count > 64):
            return  # a valid write would change the image; a long read is not bad input
        s, c = spell(sector), spell(count)
        argv = {"read": ["read", s, c, "-o", "/dev/null"],
                "write": ["write", s, "--pattern", "0x5a", "--count", c]}.get(cmd, [cmd, s, c])
        cases.append((argv, want))

    @settings(max_examples=300, **SETTINGS)
    @given(cmd=st.sampled_from(["read", "write", "discard", "write-zeroes"]),
           text=junk, where=st.sampled_from(["sector", "count"]))
    def junk_numbers(cmd: str, text: str, where: str) -> None:
        if cmd == "write":
            argv = (["write", text, "--pattern", "1", "--count", "1"] if where == "sector"
                    else ["write", "0", "--pattern", "1", "--count", text])
        else:
            argv = [cmd, text, "1"] if where == "sector" else [cmd, "0", text]
        cases.append((argv, 1))

    @settings(max_examples=300, **SETTINGS)
    @given(option=st.sampled_from(sorted(BAD_OPTION)),
           value=st.one_of(junk, st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e999",
                                                  "513", "2M", "0x0", "1", "4k"])))
    def bad_option_values(option: str, value: str) -> None:
        cases.append((BAD_OPTION[option](value), 1))

    outputs = unusable_outputs(where)

    @settings(max_examples=60, **SETTINGS)
    @given(target=st.sampled_from(sorted(outputs)), sector=st.integers(0, CAPACITY - 1))
    def unusable_output_files(target: str, sector: int) -> None:
        cases.append((["read", str(sector), "1", "-o", outputs[target]], 15))

    for draw in (sectors_and_counts, junk_numbers, bad_option_values, unusable_output_files):
        draw()
    return cases


def problem(case: Case, code: int, err: str) -> str | None:
    """What is wrong with one case's outcome, or None."""
    argv, want = case
    if code != want:
        return f"exit {code}, want {want}"
    if want != 0 and not err.strip():
        return "no message"
    # Junk can spell a real option: --debug asks for the traceback behind the message.
    if "Traceback" in err and "--debug" not in argv:
        return "a traceback"
    if "internal error" in err:
        return "an internal error"
    return None
