"""Register I/O on an open file at a base offset: the only user of os.pread/os.pwrite
for device registers.

The legacy BAR0 is an I/O-port BAR that x86 cannot mmap; Linux's sysfs ``resource0``
(and a vfio region) accept pread/pwrite of exactly 1, 2 or 4 bytes at a register offset.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

from .errors import DeviceError, InvalidArgument
from .spec import Reg

_WIDTHS = (1, 2, 4)


class RegisterIO(Protocol):
    """What the transport needs from a register block (real or fake)."""

    def read(self, reg: Reg) -> int: ...

    def write(self, reg: Reg, value: int) -> None: ...

    def read_at(self, offset: int, width: int) -> int: ...

    def poker(self, reg: Reg, value: int) -> Callable[[], None]: ...


class Registers:
    """1/2/4-byte little-endian accesses to ``fd`` at ``base + offset``, bounds-checked."""

    def __init__(self, fd: int, base: int, size: int, what: str) -> None:
        self.fd = fd
        self.base = base
        self.size = size
        self.what = what  # e.g. "0000:00:10.0 BAR0", for messages

    def _check(self, offset: int, width: int) -> None:
        if width not in _WIDTHS or offset < 0 or offset + width > self.size:
            raise InvalidArgument(f"{self.what}: no {width}-byte register at {offset}")

    def read_at(self, offset: int, width: int) -> int:
        self._check(offset, width)
        try:
            data = os.pread(self.fd, width, self.base + offset)
        except OSError as exc:
            raise DeviceError(f"{self.what}: reading offset {offset}: {exc.strerror}") from exc
        if len(data) != width:
            raise DeviceError(f"{self.what}: short read at offset {offset} (device gone?)")
        return int.from_bytes(data, "little")

    def write_at(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width)
        try:
            n = os.pwrite(self.fd, value.to_bytes(width, "little"), self.base + offset)
        except OSError as exc:
            raise DeviceError(f"{self.what}: writing offset {offset}: {exc.strerror}") from exc
        if n != width:
            raise DeviceError(f"{self.what}: short write at offset {offset} (device gone?)")

    def read(self, reg: Reg) -> int:
        return self.read_at(reg.offset, reg.width)

    def write(self, reg: Reg, value: int) -> None:
        if not reg.writable:
            raise InvalidArgument(f"{self.what}: {reg.name} is read-only")
        self.write_at(reg.offset, reg.width, value)

    def poker(self, reg: Reg, value: int) -> Callable[[], None]:
        """A function writing ``value`` to ``reg``: the queue notify on the hot path,
        with the checks and the encoding done once here instead of per kick."""
        if not reg.writable:
            raise InvalidArgument(f"{self.what}: {reg.name} is read-only")
        self._check(reg.offset, reg.width)
        fd, data, pos = self.fd, value.to_bytes(reg.width, "little"), self.base + reg.offset
        pwrite = os.pwrite

        what = f"{self.what}: writing {reg.name}"

        def poke() -> None:
            try:  # zero-cost in 3.11 unless it raises
                pwrite(fd, data, pos)
            except OSError as exc:
                raise DeviceError(f"{what}: {exc.strerror}") from exc
        return poke
