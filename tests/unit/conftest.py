"""Unit-test fixtures: a VirtioBlk on the Python device model (no root, no QEMU)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from virtio_user.blk import VirtioBlk
from fake_device import FakeBackend, FakeBlkDevice

MakeBlk = Callable[..., tuple[VirtioBlk, FakeBlkDevice]]


@pytest.fixture
def make_blk() -> Any:
    """``make_blk(**device_options)`` -> (VirtioBlk, FakeBlkDevice); closed afterwards."""
    opened: list[VirtioBlk] = []

    def make(timeout: float = 0.2, contiguous: int = 64 << 10, **options: Any):
        device = FakeBlkDevice(**options)
        blk = VirtioBlk(FakeBackend(device, contiguous=contiguous), timeout=timeout)
        opened.append(blk)
        return blk, device

    yield make
    for blk in opened:
        blk.close()
