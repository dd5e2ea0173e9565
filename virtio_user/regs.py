"""Register I/O: the only user of os.pread/os.pwrite for device registers, and of loads
and stores on memory-mapped BARs.

The legacy BAR0 is an I/O-port BAR that x86 cannot mmap; Linux's sysfs ``resource0``
(and a vfio region) accept pread/pwrite of exactly 1, 2 or 4 bytes at a register offset.
A memory BAR (the modern virtio structures) is mmapped (memory.map_mmio) and accessed
with single loads and stores of the register's width (``MappedRegisters``). A ``Window``
is the part of a BAR one virtio structure occupies, with the structure's registers.
"""

from __future__ import annotations

import mmap
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


class Mmio(Protocol):
    """A BAR (or any register file) accessed by offset: 1, 2 or 4 bytes at a time."""

    size: int
    what: str

    def read_at(self, offset: int, width: int) -> int: ...

    def write_at(self, offset: int, width: int, value: int) -> None: ...

    def poker_at(self, offset: int, width: int, value: int) -> Callable[[], None]: ...

    def close(self) -> None: ...


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
        return self.poker_at(reg.offset, reg.width, value, reg.name)

    def poker_at(self, offset: int, width: int, value: int,
                 name: str = "") -> Callable[[], None]:
        self._check(offset, width)
        fd, data, pos = self.fd, value.to_bytes(width, "little"), self.base + offset
        pwrite = os.pwrite

        what = f"{self.what}: writing {name or f'offset {offset}'}"

        def poke() -> None:
            try:  # zero-cost in 3.11 unless it raises
                pwrite(fd, data, pos)
            except OSError as exc:
                raise DeviceError(f"{what}: {exc.strerror}") from exc
        return poke

    def close(self) -> None:
        """The owner closes the file."""


class MappedRegisters:
    """Loads and stores of 1, 2 or 4 bytes on an mmapped memory BAR, each a single
    access of that width (memoryview item access on a cast view is one aligned load or
    store), bounds- and alignment-checked."""

    def __init__(self, mm: mmap.mmap, what: str) -> None:
        self._mm = mm
        self.size = len(mm)
        self.what = what
        whole = memoryview(mm)
        self._views = {1: whole.cast("B"), 2: whole.cast("H"), 4: whole.cast("I")}
        self._whole = whole

    def _check(self, offset: int, width: int) -> None:
        if (width not in _WIDTHS or offset < 0 or offset + width > self.size
                or offset % width):
            raise InvalidArgument(f"{self.what}: no aligned {width}-byte register at {offset}")

    def read_at(self, offset: int, width: int) -> int:
        self._check(offset, width)
        return int(self._views[width][offset // width])

    def write_at(self, offset: int, width: int, value: int) -> None:
        self._check(offset, width)
        self._views[width][offset // width] = value & ((1 << 8 * width) - 1)

    def poker_at(self, offset: int, width: int, value: int,
                 name: str = "") -> Callable[[], None]:
        """The notify store on the hot path: checked and bound once."""
        self._check(offset, width)
        view, index, value = self._views[width], offset // width, value & ((1 << 8 * width) - 1)

        def poke() -> None:
            view[index] = value
        return poke

    def close(self) -> None:
        for view in self._views.values():
            view.release()
        self._whole.release()
        self._mm.close()


class Window:
    """The ``length`` bytes at ``offset`` of a BAR where one virtio structure lives
    ("Virtio Structure PCI Capabilities"); registers are given relative to it. 8-byte
    registers are two 4-byte accesses, low half first."""

    def __init__(self, bar: Mmio, offset: int, length: int, what: str) -> None:
        if offset < 0 or length <= 0 or offset + length > bar.size:
            raise DeviceError(f"{what}: {length} bytes at offset {offset:#x} do not fit "
                              f"{bar.what} ({bar.size:#x} bytes)")
        self.bar = bar
        self.offset = offset
        self.length = length
        self.what = what

    def _check(self, offset: int, width: int, name: str) -> None:
        if offset < 0 or offset + width > self.length:
            raise DeviceError(f"{self.what}: {name or f'offset {offset:#x}'} ({width} bytes) "
                              f"is past the end of the structure ({self.length:#x} bytes)")

    def read_at(self, offset: int, width: int, name: str = "") -> int:
        self._check(offset, width, name)
        if width == 8:
            return (self.bar.read_at(self.offset + offset, 4)
                    | self.bar.read_at(self.offset + offset + 4, 4) << 32)
        return self.bar.read_at(self.offset + offset, width)

    def write_at(self, offset: int, width: int, value: int, name: str = "") -> None:
        self._check(offset, width, name)
        if width == 8:
            self.bar.write_at(self.offset + offset, 4, value & 0xFFFF_FFFF)
            self.bar.write_at(self.offset + offset + 4, 4, value >> 32)
        else:
            self.bar.write_at(self.offset + offset, width, value)

    def read(self, reg: Reg) -> int:
        return self.read_at(reg.offset, reg.width, reg.name)

    def write(self, reg: Reg, value: int) -> None:
        if not reg.writable:
            raise InvalidArgument(f"{self.what}: {reg.name} is read-only")
        self.write_at(reg.offset, reg.width, value, reg.name)

    def poker_at(self, offset: int, width: int, value: int) -> Callable[[], None]:
        self._check(offset, width, "")
        return self.bar.poker_at(self.offset + offset, width, value)
