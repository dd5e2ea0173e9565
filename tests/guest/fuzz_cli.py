"""Guest side of test_generated_bad_input_with_hypothesis: the real CLI, in process, on a
real device of 16384 sectors, with generated sectors and counts. Every invalid request
must get its documented exit code; valid writes are never generated (the host checks
that the image is unchanged)."""

import contextlib
import io
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtio_user import cli

BDF = sys.argv[1]
CAPACITY = 16384
examples = 0

numbers = st.one_of(st.integers(-2**80, 2**80), st.integers(-3, 3),
                    st.integers(CAPACITY - 3, CAPACITY + 3), st.integers(2**63 - 2, 2**64 + 2))
spellings = st.sampled_from([str, hex])


def expected(sector: int, count: int) -> int:
    if sector < 0 or count <= 0:
        return 1
    if sector + count > CAPACITY:
        return 22
    return 0


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--device", BDF, *argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(cmd=st.sampled_from(["read", "write", "discard", "write-zeroes"]),
       sector=numbers, count=numbers, spell=spellings)
def test_numbers(cmd: str, sector: int, count: int, spell) -> None:
    global examples
    want = expected(sector, count)
    if want == 0 and cmd != "read":
        return
    examples += 1
    s, c = spell(sector), spell(count)
    argv = {"read": ["read", s, c, "-o", "/dev/null"],
            "write": ["write", s, "--pattern", "0x5a", "--count", c]}.get(cmd, [cmd, s, c])
    code, err = run(argv)
    assert code == want, (argv, code, err)
    assert want == 0 or err.strip(), (argv, "no message")
    assert "Traceback" not in err


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(cmd=st.sampled_from(["read", "write", "discard", "write-zeroes"]),
       junk=st.text(min_size=0, max_size=12).filter(lambda t: not t.strip().lstrip("-+")
                                                    .replace("_", "").isdigit()))
def test_junk(cmd: str, junk: str) -> None:
    global examples
    examples += 1
    argv = ([cmd, junk, "--pattern", "1", "--count", "1"] if cmd == "write"
            else [cmd, junk, "1"])
    code, err = run(argv)
    assert code == 1, (argv, code, err)
    assert "Traceback" not in err


if __name__ == "__main__":
    test_numbers()
    test_junk()
    print(f"{examples} examples")
