"""What both rings do through RingCore, checked on each: a queue broken by a timeout
says so at once on every later wait, with no second wait and no second reset (issue
22, defect 3: ``wait_one`` used to wait the whole timeout again and reset again)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from virtio_user.errors import DeviceError, DeviceTimeout, exit_code
from virtio_user.memory import DmaAllocator, DmaRegion
from virtio_user.ring.core import RingCore
from virtio_user.ring.packed import PackedQueue
from virtio_user.ring.split import SplitQueue

RINGS = {"split": SplitQueue, "packed": PackedQueue}
SEGS = [(0x1000, 16, False), (0x2000, 512, True), (0x3000, 1, True)]


def stalled_queue(kind: str, faults: list[int]) -> RingCore[Any]:
    """A queue with one chain in flight on a device that never completes it."""
    region = DmaRegion.anonymous(1 << 20, contiguous=1 << 20)
    q: RingCore[Any] = RINGS[kind](DmaAllocator(region), 8, lambda: None, indirect=True,
                                   event_idx=False, on_fault=lambda: bool(faults.append(1)) or True)
    q.add(SEGS, "IN sectors 5..6")
    q.kick()
    return q


@pytest.mark.parametrize("kind", RINGS)
@pytest.mark.parametrize("first,then", [("wait_one", "wait_one"), ("wait", "wait_one"),
                                        ("wait_one", "wait"), ("wait", "wait")])
def test_a_wait_after_a_timeout_says_the_queue_is_unusable_at_once(kind: str, first: str,
                                                                   then: str) -> None:
    faults: list[int] = []
    q = stalled_queue(kind, faults)
    with pytest.raises(DeviceTimeout, match="no completion within 0.05 s for IN sectors 5..6"):
        getattr(q, first)(0.05)
    start = time.monotonic()
    with pytest.raises(DeviceError, match="unusable after: .*no completion within 0.05 s") as err:
        getattr(q, then)(3.0)
    assert not isinstance(err.value, DeviceTimeout)
    assert time.monotonic() - start < 1.0 and faults == [1]
    assert exit_code(err.value) == 15


@pytest.mark.parametrize("kind", RINGS)
def test_reap_one_after_a_timeout_is_exit_15_at_once_with_one_reset(
        kind: str, make_blk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block device's QD1 call, on both rings, against the fake devices."""
    from virtio_user.blk import Request
    from virtio_user.spec import ReqType
    if kind == "packed":
        import virtio_user.blk as blk_module
        from packed_device import PackedBlkTransport
        made: list[PackedBlkTransport] = []

        def transport(backend: Any, choice: str = "auto") -> PackedBlkTransport:
            made.append(PackedBlkTransport(backend))
            return made[0]
        monkeypatch.setattr(blk_module, "open_transport", transport)
    blk, dev = make_blk(timeout=0.05)
    assert type(blk.queue) is RINGS[kind]
    resets = (lambda: made[0].resets) if kind == "packed" else (lambda: dev.resets)
    before = resets()
    dev.stall = True
    req = Request(ReqType.VIRTIO_BLK_T_IN, 5, 2, blk.alloc_buffer(4096), 1024)
    blk.submit([req])
    with pytest.raises(DeviceTimeout, match="IN sectors 5..6"):
        blk.reap_one()
    assert resets() == before + 1
    start = time.monotonic()
    with pytest.raises(DeviceError, match="unusable") as err:
        blk.reap_one(timeout=3.0)
    assert not isinstance(err.value, DeviceTimeout) and exit_code(err.value) == 15
    assert time.monotonic() - start < 1.0 and resets() == before + 1
