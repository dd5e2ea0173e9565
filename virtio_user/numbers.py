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


def parse_number(text: str, what: str) -> int:
    """Decimal or 0x-hex integer, possibly negative (so the message can say so)."""
    body = text.strip(BLANKS)
    sign = -1 if body.startswith("-") else 1
    digits = body[1:] if body[:1] in ("+", "-") else body
    if digits[:2].lower() == "0x" and digits[2:] and set(digits[2:]) <= _HEX_DIGITS:
        return sign * int(digits[2:], 16)
    if digits and set(digits) <= _DIGITS:
        return sign * int(digits, 10)
    raise InvalidArgument(f"{what} {text!r} is not a number (decimal, or hex with 0x)")


def parse_size(text: str, what: str) -> int:
    """A byte count: a number, optionally followed by k (KiB) or M (MiB)."""
    body = text.strip(BLANKS)
    mult = _UNITS.get(body[-1:].lower(), 1)
    digits = body[:-1] if mult > 1 else body
    try:
        return parse_number(digits, what) * mult
    except InvalidArgument:
        raise InvalidArgument(f"{what} {text!r} is not a number of bytes "
                              "(e.g. 4096, 4k or 1M)") from None


def parse_seconds(text: str, what: str) -> float:
    """A positive, finite number of seconds (``nan`` and ``inf`` would never expire)."""
    body = text.strip(BLANKS)
    plain = body.replace(".", "", 1).replace("e", "", 1).replace("E", "", 1)
    plain = plain.replace("-", "", 1).replace("+", "", 1)
    try:
        if not plain or not set(plain) <= _DIGITS:
            raise ValueError(text)
        seconds = float(body)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(f"{what} {text} must be a positive, finite number of seconds")
    return seconds
