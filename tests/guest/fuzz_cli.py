"""Guest side of test_generated_bad_input_with_hypothesis: the real CLI, in this one
process, on a real device of 16384 sectors (opened once), with generated arguments:
sectors and counts, junk where numbers go, and bad option values (timeouts, bench
sizes, output files). Every case must get its documented exit code and a message
without a traceback; valid writes are never generated (the host checks the image is
unchanged). Prints the number of cases run; the host asks for at least 1,000."""

import contextlib
import io
import os
import re
import sys
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_user import VirtioBlk, cli

BDF = sys.argv[1]
CAPACITY = 16384
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
NUMBER = re.compile(r"\s*[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)\s*", re.ASCII)
examples = 0

numbers = st.one_of(st.integers(-2**80, 2**80), st.integers(-3, 3),
                    st.integers(CAPACITY - 3, CAPACITY + 3), st.integers(2**63 - 2, 2**64 + 2))
spellings = st.sampled_from([str, hex])
junk = st.one_of(
    st.text(min_size=0, max_size=12),
    st.sampled_from(["\u00b2", "\u0664\u0660\u0669\u0666", "1_000", "0x", "0x-1", "--1",
                     "+", "nan", "inf", "1e3", "\uff11", "1.5", " ", "0b101"]),
).filter(lambda text: not NUMBER.fullmatch(text) and text.strip() != "--help")


class KeepOpen:
    """The device, opened once for every case: binding and set-up cost more than a
    case under TCG, and what is tested here is the CLI's handling of its input."""

    def __init__(self) -> None:
        self.dev = VirtioBlk.open(BDF)

    def __call__(self, args: object) -> "KeepOpen":
        return self

    def __enter__(self) -> VirtioBlk:
        return self.dev

    def __exit__(self, *exc: object) -> None:
        pass


def run(argv: list[str]) -> tuple[int, str]:
    global examples
    examples += 1
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--device", BDF, *argv], opener=OPENER)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def check(argv: list[str], want: int) -> None:
    code, err = run(argv)
    assert code == want, (argv, code, err)
    assert want == 0 or err.strip(), (argv, "no message")
    # Junk can spell a real option: --debug asks for the traceback behind the message.
    assert "Traceback" not in err or "--debug" in argv, (argv, err)
    assert "internal error" not in err, (argv, err)


def expected(sector: int, count: int) -> int:
    if sector < 0 or count <= 0:
        return 1
    if sector + count > CAPACITY:
        return 22
    return 0


@settings(max_examples=450, **SETTINGS)
@given(cmd=st.sampled_from(["read", "write", "discard", "write-zeroes"]),
       sector=numbers, count=numbers, spell=spellings)
def test_numbers(cmd: str, sector: int, count: int, spell) -> None:
    want = expected(sector, count)
    if want == 0 and (cmd != "read" or count > 64):
        return  # a valid write would change the image; a long read is not bad input
    s, c = spell(sector), spell(count)
    argv = {"read": ["read", s, c, "-o", "/dev/null"],
            "write": ["write", s, "--pattern", "0x5a", "--count", c]}.get(cmd, [cmd, s, c])
    check(argv, want)


@settings(max_examples=300, **SETTINGS)
@given(cmd=st.sampled_from(["read", "write", "discard", "write-zeroes"]),
       text=junk, where=st.sampled_from(["sector", "count"]))
def test_junk_numbers(cmd: str, text: str, where: str) -> None:
    if cmd == "write":
        argv = (["write", text, "--pattern", "1", "--count", "1"] if where == "sector"
                else ["write", "0", "--pattern", "1", "--count", text])
    else:
        argv = [cmd, text, "1"] if where == "sector" else [cmd, "0", text]
    check(argv, 1)


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


@settings(max_examples=300, **SETTINGS)
@given(option=st.sampled_from(sorted(BAD_OPTION)),
       value=st.one_of(junk, st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e999",
                                              "513", "2M", "0x0", "1", "4k"])))
def test_bad_option_values(option: str, value: str) -> None:
    check(BAD_OPTION[option](value), 1)


@settings(max_examples=60, **SETTINGS)
@given(target=st.sampled_from(["/dev/full", "/proc/version", "dangling", "no-such-dir",
                               "directory"]),
       sector=st.integers(0, CAPACITY - 1))
def test_unusable_output_files(target: str, sector: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = {"dangling": os.path.join(tmp, "link"), "directory": tmp,
                "no-such-dir": os.path.join(tmp, "missing", "out")}.get(target, target)
        if target == "dangling":
            os.symlink("/nonexistent/dir/file", path)
        check(["read", str(sector), "1", "-o", path], 15)


if __name__ == "__main__":
    OPENER = KeepOpen()
    test_numbers()
    test_junk_numbers()
    test_bad_option_values()
    test_unusable_output_files()
    OPENER.dev.close()
    print(f"{examples} examples")
