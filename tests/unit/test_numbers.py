"""One set of number rules for every count, size and duration: ``virtio-user``'s
options and ``run-in-qemu.sh --timeout`` alike (issue 22, defects 5 to 7)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from test_cli import Env
from virtio_user.errors import InvalidArgument
from virtio_user.host import run
from virtio_user.numbers import MAX_DIGITS, MAX_SECONDS, parse_number, parse_seconds

HUGE = "7" * 5000  # more digits than int() takes (4,300), which said ValueError: exit 99


@pytest.mark.parametrize("argv, what", [
    (["read", "0", HUGE], "count"), (["read", HUGE, "1"], "sector"),
    (["bench", "--ios", HUGE], "--ios"), (["bench", "--bs", HUGE + "k"], "--bs"),
    (["--timeout", HUGE, "info"], "--timeout"), (["bench", "--runtime", HUGE], "--runtime"),
])
def test_a_huge_decimal_number_is_a_bad_argument(argv: list[str], what: str,
                                                 capsys: Any) -> None:
    env = Env()
    assert env.run(*argv) == 1
    err = capsys.readouterr().err
    assert what in err and "Traceback" not in err
    assert len(err) < 300, "the message quotes the start of the number, not all of it"
    assert env.opened == 0


def test_digit_limit_counts_significant_digits_and_is_fast() -> None:
    assert parse_number("0" * 10_000 + "12", "n") == 12
    assert parse_number("9" * MAX_DIGITS, "n") == 10 ** MAX_DIGITS - 1
    assert parse_number("0x" + "f" * MAX_DIGITS, "n") == 16 ** MAX_DIGITS - 1
    start = time.monotonic()
    for text in ("1" * 10 ** 6, "0x" + "1" * 10 ** 6, "1." + "1" * 10 ** 6):
        with pytest.raises(InvalidArgument, match="(digits|seconds)"):
            (parse_seconds if "." in text else parse_number)(text, "n")
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("text", ["1e300", "1e10", str(MAX_SECONDS + 1), "9" * 30])
def test_a_timeout_past_what_the_os_takes_is_refused(text: str, capsys: Any) -> None:
    """socket.settimeout(1e300) raises OverflowError; epoll_wait takes an int of ms."""
    env = Env()
    assert env.run("--timeout", text, "info") == 1
    assert f"at most {MAX_SECONDS}" in capsys.readouterr().err
    assert parse_seconds(str(MAX_SECONDS), "t") == MAX_SECONDS


def harness_timeout(value: str, capsys: Any) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        run.parse_args(["--timeout", value, "--", "true"])
    code = exc.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["\u0663", "\uff11\uff10", "1_0", "5\xa0", "1e300",
                                   str(MAX_SECONDS + 1), HUGE])
def test_run_in_qemu_timeout_follows_the_same_rules(value: str, capsys: Any) -> None:
    code, err = harness_timeout(value, capsys)
    assert code == run.EXIT_HARNESS
    assert "--timeout" in err and "Traceback" not in err
    with pytest.raises(InvalidArgument):
        parse_seconds(value, "--timeout")


def test_run_in_qemu_timeout_takes_what_virtio_user_takes() -> None:
    for value in ("5", "0.5", " 30 ", "1e3", str(MAX_SECONDS)):
        args = run.parse_args(["--timeout", value, "--", "true"])
        assert args.timeout == parse_seconds(value, "--timeout")
