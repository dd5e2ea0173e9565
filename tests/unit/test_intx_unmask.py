"""Interrupt Disable in the PCI Command register is clear when DRIVER_OK is written.

uio_pci_generic leaves it set after the line fired once; QEMU then starts a vhost-user
back end without a call eventfd, which libvhost-user cannot survive (see
pci.unmask_intx). Checked on both transports, at the moment of DRIVER_OK."""

from __future__ import annotations

from typing import Any

import pytest

from virtio_user.blk import VirtioBlk
from virtio_user.pci import (COMMAND_BUS_MASTER, COMMAND_IO, COMMAND_REG,
                             PCI_COMMAND_INTX_DISABLE, enable_command, unmask_intx)
from virtio_user.spec import Status
from fake_device import FakeBackend, FakeConfigSpace
from fake_modern import FakeModernBackend


def command_at_driver_ok(backend: FakeBackend, device: Any) -> list[int]:
    """Record the Command register each time ``device`` sees DRIVER_OK written."""
    seen: list[int] = []
    write = device.write

    def spy(reg: Any, value: int) -> None:
        if getattr(reg, "name", "") == "DEVICE_STATUS" and value & Status.DRIVER_OK:
            seen.append(backend.config.read_at(COMMAND_REG, 2))
        write(reg, value)
    device.write = spy
    return seen


@pytest.mark.parametrize("kind", ["legacy", "modern"])
def test_interrupt_disable_is_cleared_before_driver_ok(kind: str) -> None:
    backend = FakeModernBackend() if kind == "modern" else FakeBackend()
    masked = COMMAND_BUS_MASTER | PCI_COMMAND_INTX_DISABLE
    backend.config.write_at(COMMAND_REG, 2, masked)
    seen = command_at_driver_ok(backend, backend.device)
    blk = VirtioBlk(backend, timeout=0.2, transport=kind)
    try:
        assert blk.transport.kind == kind
        assert seen and all(not cmd & PCI_COMMAND_INTX_DISABLE for cmd in seen), seen
        assert backend.config.read_at(COMMAND_REG, 2) == COMMAND_BUS_MASTER
    finally:
        blk.close()


def test_unmask_intx_leaves_the_other_command_bits_and_a_clear_bit_alone() -> None:
    config = FakeConfigSpace()
    config.write_at(COMMAND_REG, 2, 0x0507)
    unmask_intx(config)
    assert config.read_at(COMMAND_REG, 2) == 0x0107
    writes: list[int] = []
    config.write_at = lambda offset, width, value: writes.append(value)  # type: ignore[method-assign]
    unmask_intx(config)
    assert writes == []


def test_enable_command_sets_only_the_bits_asked_for_and_skips_a_needless_write() -> None:
    config = FakeConfigSpace()
    config.write_at(COMMAND_REG, 2, PCI_COMMAND_INTX_DISABLE)
    enable_command(config, COMMAND_IO | COMMAND_BUS_MASTER)
    assert config.read_at(COMMAND_REG, 2) == (PCI_COMMAND_INTX_DISABLE | COMMAND_IO
                                              | COMMAND_BUS_MASTER)
    writes: list[int] = []
    config.write_at = lambda offset, width, value: writes.append(value)  # type: ignore[method-assign]
    enable_command(config, COMMAND_BUS_MASTER)
    assert writes == []
