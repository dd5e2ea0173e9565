"""PCI discovery and driver binding through sysfs, with pyudev for enumeration.

A virtio-blk device is either transitional, 1af4:1001 with subsystem device 2 ("Legacy
Interfaces: A Note on PCI Device Discovery"; it may carry the modern capabilities too),
or modern-only, 1af4:1042 ("PCI Device Discovery": 0x1040 + device type 2; its subsystem
ID is free). Binding uses ``driver_override`` + ``drivers_probe``, so no other device is
affected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import BindError, DeviceBusy, DeviceNotFound, InvalidArgument, WrongDevice
from .numbers import BLANKS
from .spec import (VIRTIO_ID_BLOCK, VIRTIO_PCI_LEGACY_BLK, VIRTIO_PCI_MODERN_BLK,
                   VIRTIO_PCI_VENDOR)

SYSFS_PCI = Path("/sys/bus/pci")
_BDF = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])")
# PCI configuration space header, "Command Register" (le16 at 4) and its bits.
COMMAND_REG = 4
COMMAND_IO = 1 << 0
COMMAND_BUS_MASTER = 1 << 2
PCI_COMMAND_INTX_DISABLE = 1 << 10  # "Interrupt Disable": the INTx line is masked


class ConfigSpace(Protocol):
    """PCI configuration space by offset: a sysfs ``config`` file or a VFIO region."""

    def read_at(self, offset: int, width: int) -> int: ...

    def write_at(self, offset: int, width: int, value: int) -> None: ...


def parse_bdf(text: str) -> str:
    """``0000:00:10.0`` (or ``00:10.0``) in canonical lower-case form."""
    m = _BDF.fullmatch(text.strip(BLANKS))
    if not m:
        raise InvalidArgument(f"malformed PCI address {text!r}: expected DDDD:BB:SS.F, "
                              "e.g. 0000:00:10.0")
    domain, bus, slot, func = m.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{func}"


@dataclass(frozen=True)
class PciDevice:
    bdf: str
    vendor: int
    device: int
    subsystem_device: int

    @property
    def path(self) -> Path:
        return SYSFS_PCI / "devices" / self.bdf

    @property
    def driver(self) -> str | None:
        link = self.path / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    @property
    def is_legacy_blk(self) -> bool:
        return (self.vendor == VIRTIO_PCI_VENDOR and self.device == VIRTIO_PCI_LEGACY_BLK
                and self.subsystem_device == VIRTIO_ID_BLOCK)

    @property
    def is_modern_blk(self) -> bool:
        return self.vendor == VIRTIO_PCI_VENDOR and self.device == VIRTIO_PCI_MODERN_BLK

    @property
    def is_virtio_blk(self) -> bool:
        return self.is_legacy_blk or self.is_modern_blk

    def describe(self) -> str:
        return (f"{self.bdf} ({self.vendor:04x}:{self.device:04x}, driver "
                f"{self.driver or 'none'})")


def _from_udev(dev: object) -> PciDevice:
    props = dev.properties  # type: ignore[attr-defined]
    vendor, device = (int(x, 16) for x in props.get("PCI_ID", "0:0").split(":"))
    m = re.search(r"sd([0-9A-Fa-f]{8})", props.get("MODALIAS", ""))
    return PciDevice(dev.sys_name, vendor, device, int(m.group(1), 16) if m else -1)  # type: ignore[attr-defined]


def list_devices() -> list[PciDevice]:
    """Every PCI device, in address order."""
    import pyudev
    ctx = pyudev.Context()
    return sorted((_from_udev(d) for d in ctx.list_devices(subsystem="pci")),
                  key=lambda d: d.bdf)


def find(bdf: str | None) -> PciDevice:
    """The virtio-blk device at ``bdf``, or the first one if ``bdf`` is None."""
    devices = list_devices()
    if bdf is None:
        blk = [d for d in devices if d.is_virtio_blk]
        if not blk:
            raise DeviceNotFound("no virtio-blk PCI device found: none is 1af4:1001 "
                                 "(legacy or transitional) or 1af4:1042 (modern)")
        return blk[0]
    bdf = parse_bdf(bdf)
    for d in devices:
        if d.bdf == bdf:
            if not d.is_virtio_blk:
                raise WrongDevice(f"{d.describe()} is not a virtio-blk device "
                                  "(1af4:1001 with subsystem 0002, or 1af4:1042)")
            return d
    raise DeviceNotFound(f"no PCI device at {bdf}")


def enable_command(config: ConfigSpace, bits: int) -> None:
    """Set ``bits`` (e.g. COMMAND_IO | COMMAND_BUS_MASTER) in the Command register."""
    cmd = config.read_at(COMMAND_REG, 2)
    if cmd & bits != bits:
        config.write_at(COMMAND_REG, 2, cmd | bits)


def unmask_intx(config: ConfigSpace) -> None:
    """Clear Interrupt Disable in the Command register (no write when it is clear).

    uio_pci_generic sets the bit each time the INTx line fires, and only clears it
    through a driver that writes it back; the transport clears it before DRIVER_OK and
    the uio interrupt waiter after each interrupt. No race with the kernel's own
    read-modify-write of the register: it only masks from the interrupt handler, which
    cannot run while the bit is still set."""
    cmd = config.read_at(COMMAND_REG, 2)
    if cmd & PCI_COMMAND_INTX_DISABLE:
        config.write_at(COMMAND_REG, 2, cmd & ~PCI_COMMAND_INTX_DISABLE)


def block_devices(dev: PciDevice) -> list[str]:
    """Names of the kernel block devices (e.g. vda) the kernel made for ``dev``."""
    return sorted(p.name for p in dev.path.glob("virtio*/block/*"))


def check_unused(dev: PciDevice) -> None:
    """Refuse a device whose kernel block device is mounted or held (swap, dm, md)."""
    for name in block_devices(dev):
        node = Path("/sys/block") / name
        parts = [name] + [p.name for p in node.glob(f"{name}*") if p.is_dir()]
        with open("/proc/mounts") as f:
            for line in f:
                source, target = line.split()[:2]
                if source in {f"/dev/{p}" for p in parts}:
                    raise DeviceBusy(f"{dev.bdf} is in use: {source} is mounted on {target}")
        for p in parts:
            holders = list((Path("/sys/class/block") / p / "holders").glob("*"))
            if holders:
                raise DeviceBusy(f"{dev.bdf} is in use: /dev/{p} is held by "
                                 f"{', '.join(h.name for h in holders)}")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise BindError(f"cannot write {text.strip()!r} to {path}: {exc.strerror}") from exc


def bind(dev: PciDevice, driver: str) -> None:
    """Hand ``dev`` to ``driver``: unbind it, set driver_override, drivers_probe."""
    if dev.driver == driver:
        return
    if not (SYSFS_PCI / "drivers" / driver).is_dir():
        raise BindError(f"driver {driver} is not loaded (modprobe {driver})")
    previous = dev.driver
    if previous is not None:
        _write(dev.path / "driver" / "unbind", dev.bdf)
    _write(dev.path / "driver_override", driver)
    _write(SYSFS_PCI / "drivers_probe", dev.bdf)
    if dev.driver != driver:
        # Never leave the device half-bound: give it back to the driver it had.
        release(dev, previous)
        raise BindError(f"{dev.bdf}: {driver} did not take the device "
                        f"(given back to {dev.driver or 'no driver'})")


def release(dev: PciDevice, rebind_to: str | None) -> None:
    """Clear driver_override and, if asked, give the device back (e.g. virtio-pci)."""
    if not dev.path.exists():
        return  # hot-unplugged
    _write(dev.path / "driver_override", "\n")
    if rebind_to and dev.driver != rebind_to:
        if dev.driver is not None:
            _write(dev.path / "driver" / "unbind", dev.bdf)
        _write(SYSFS_PCI / "drivers_probe", dev.bdf)
