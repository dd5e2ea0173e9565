"""Numbers typed by a person: one parser for every count, size and duration the CLI
takes, so no option accepts what another refuses (``²``, ``٤``, ``1_000``, ``nan``).

Only ASCII digits and ASCII blanks count: ``str.isdigit`` and ``int`` also take other
scripts' digits, superscripts and underscores, and ``str.strip`` drops a no-break space
(U+00A0) or an em space, which no shell user means as part of a number. Imports nothing
heavy: the CLI parses arguments before it loads the driver.
"""

from __future__ import annotations

import math

from .errors import InvalidArgument

_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_UNITS = {"k": 1 << 10, "m": 1 << 20}
BLANKS = " \t\n\r\f\v"
# More digits than any count, size or sector needs (2**64 has 20): longer input is
# refused before int() sees it, which would take quadratic time on a huge decimal string
# and refuses more than 4,300 digits with a bare ValueError.
MAX_DIGITS = 40
# Every duration the CLI and the harness take: the OS calls a timeout ends up in
# (epoll_wait's milliseconds are an int, about 24.8 days; socket.settimeout and
# select overflow on 1e300) all accept this, so no wait needs its own clamp.
MAX_SECONDS = 1_000_000
_SHOWN = 24  # characters of a refused argument repeated in its message


def shown(text: str) -> str:
    """``text`` for an error message: quoted, and cut if long (a megabyte of junk must
    not come back as a megabyte of message)."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}... ({len(text)} characters)"


def parse_number(text: str, what: str) -> int:
    """Decimal or 0x-hex integer, possibly negative (so the message can say so)."""
    body = text.strip(BLANKS)
    sign = -1 if body.startswith("-") else 1
    digits = body[1:] if body[:1] in ("+", "-") else body
    hexadecimal = digits[:2].lower() == "0x"
    base, digits = (16, digits[2:]) if hexadecimal else (10, digits)
    if digits and set(digits) <= (_HEX_DIGITS if hexadecimal else _DIGITS):
        significant = digits.lstrip("0") or "0"
        if len(significant) > MAX_DIGITS:
            raise InvalidArgument(f"{what} {shown(text)} has more than {MAX_DIGITS} digits")
        return sign * int(significant, base)
    raise InvalidArgument(f"{what} {shown(text)} is not a number (decimal, or hex with 0x)")


def parse_size(text: str, what: str) -> int:
    """A byte count: a number, optionally followed by k (KiB) or M (MiB)."""
    body = text.strip(BLANKS)
    mult = _UNITS.get(body[-1:].lower(), 1)
    digits = body[:-1] if mult > 1 else body
    try:
        return parse_number(digits, what) * mult
    except InvalidArgument:
        raise InvalidArgument(f"{what} {shown(text)} is not a number of bytes "
                              "(e.g. 4096, 4k or 1M)") from None


def parse_seconds(text: str, what: str) -> float:
    """A positive number of seconds, at most MAX_SECONDS (``nan`` and ``inf`` would
    never expire, ``1e300`` overflows the OS calls a timeout reaches)."""
    body = text.strip(BLANKS)
    plain = body.replace(".", "", 1).replace("e", "", 1).replace("E", "", 1)
    plain = plain.replace("-", "", 1).replace("+", "", 1)
    try:
        if not plain or not set(plain) <= _DIGITS or len(plain) > MAX_DIGITS:
            raise ValueError(text)
        seconds = float(body)
    except ValueError:
        raise InvalidArgument(f"{what} {shown(text)} is not a number of seconds") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise InvalidArgument(f"{what} {shown(text)} must be a number of seconds above 0 "
                              f"and at most {MAX_SECONDS}")
    return seconds
