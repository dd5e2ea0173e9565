"""SplitQueue against a hand-driven device side: free list, chains, indirect tables,
index wrap-around, out-of-order completion, and rejection of a misbehaving device."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from virtio_user.errors import DeviceError, DeviceTimeout
from virtio_user.memory import DmaAllocator, DmaRegion
from virtio_user.ring.core import QueueFull
from virtio_user.ring.split import SplitQueue
from virtio_user.spec import DescFlag

NEXT, WRITE, INDIRECT = (int(f) for f in DescFlag)


class Harness:
    """A queue plus the device-side moves a test needs."""

    def __init__(self, size: int = 8, indirect: bool = False, event_idx: bool = False,
                 reset: Any = None) -> None:
        self.region = DmaRegion.anonymous(1 << 20, contiguous=1 << 20)
        self.kicks = 0
        self.faults = 0
        self.q: SplitQueue[Any] = SplitQueue(
            DmaAllocator(self.region), size, self._kick, indirect=indirect,
            event_idx=event_idx, on_fault=reset or self._fault)
        self.device_avail = 0

    def _kick(self) -> None:
        self.kicks += 1

    def _fault(self) -> bool:
        self.faults += 1
        return True  # the reset took

    def avail_heads(self) -> list[int]:
        """Heads the device would now take from the available ring."""
        idx = int(self.q.avail["idx"])
        heads = []
        while self.device_avail != idx:
            heads.append(int(self.q.avail["ring"][self.device_avail % self.q.size]))
            self.device_avail = (self.device_avail + 1) & 0xFFFF
        return heads

    def complete(self, head: int, length: int = 0, step: int = 1) -> None:
        used = self.q.used
        slot = int(used["idx"]) % self.q.size
        used["ring"][slot] = (head, length)
        used["idx"] = (int(used["idx"]) + step) & 0xFFFF


SEG3 = [(0x1000, 16, False), (0x2000, 512, True), (0x3000, 1, True)]


def test_direct_chain_uses_the_free_list_and_links_descriptors() -> None:
    h = Harness(size=8)
    head = h.q.add(SEG3, "a")
    h.q.kick()
    assert h.q.num_free == 5 and h.kicks == 1
    [got] = h.avail_heads()
    assert got == head
    d, seen = h.q.desc, []
    i = head
    while True:
        seen.append((int(d[i]["addr"]), int(d[i]["len"]), int(d[i]["flags"])))
        if not d[i]["flags"] & NEXT:
            break
        i = int(d[i]["next"])
    assert seen == [(0x1000, 16, NEXT), (0x2000, 512, NEXT | WRITE), (0x3000, 1, WRITE)]
    h.complete(head, 513)
    assert h.q.reap() == [("a", 513)]
    assert h.q.num_free == 8 and h.q.in_flight == 0


def test_indirect_chain_takes_one_slot_and_fills_a_table() -> None:
    h = Harness(size=4, indirect=True)
    heads = [h.q.add(SEG3, n) for n in range(4)]  # queue_size requests in flight
    h.q.kick()
    assert h.q.num_free == 0 and sorted(heads) == [0, 1, 2, 3]
    with pytest.raises(QueueFull):
        h.q.add(SEG3, "x")
    d = h.q.desc[heads[0]]
    assert int(d["flags"]) == INDIRECT and int(d["len"]) == 48
    table = np.ndarray((3,), h.q.desc.dtype, h.region.mm, h.region.offset_of(int(d["addr"])))
    assert table["addr"].tolist() == [0x1000, 0x2000, 0x3000]
    assert table["flags"].tolist() == [NEXT, NEXT | WRITE, WRITE]
    assert table["next"].tolist()[:2] == [1, 2]


def test_out_of_order_completion_returns_each_token_once() -> None:
    h = Harness(size=8, indirect=True)
    heads = {h.q.add(SEG3, name): name for name in "abc"}
    h.q.kick()
    order = list(heads)[::-1]
    for head in order:
        h.complete(head, 1)
    assert [t for t, _ in h.q.reap()] == [heads[x] for x in order]
    assert h.q.num_free == 8 and h.q.completed == 3


def test_indices_wrap_past_65535() -> None:
    h = Harness(size=4, indirect=True)
    for i in range(70000):
        head = h.q.add(SEG3, i)
        h.q.kick()
        h.complete(head, 1)
        assert h.q.reap() == [(i, 1)]
    assert h.q.avail_idx == h.q.used_idx == 70000 % 65536
    assert h.q.completed == 70000 and h.q.num_free == 4


@pytest.mark.parametrize("take", ["reap", "pop_used"])
@pytest.mark.parametrize("trick,message", [
    (lambda h, head: h.complete(99, 1), "out of range"),
    (lambda h, head: h.complete((head + 1) % 8, 1), "not the head of a chain in flight"),
    (lambda h, head: h.complete(head, 514), "exceeds"),
    (lambda h, head: h.complete(head, 1, step=9), "only 1 requests in flight"),
])
def test_misbehaving_device_is_rejected_and_reset(trick: Any, message: str, take: str) -> None:
    """pop_used (one at a time) is as strict as reap."""
    h = Harness(size=8)
    head = h.q.add(SEG3, "a")
    h.q.kick()
    trick(h, head)
    with pytest.raises(DeviceError, match=message):
        getattr(h.q, take)()
    assert h.faults == 1 and h.q.broken
    with pytest.raises(DeviceError, match="unusable"):
        h.q.add(SEG3, "b")


def test_duplicate_completion_is_rejected() -> None:
    h = Harness(size=8)
    head = h.q.add(SEG3, "a")
    h.q.add(SEG3, "b")
    h.q.kick()
    h.complete(head, 1)
    h.complete(head, 1)
    with pytest.raises(DeviceError, match="not the head"):
        h.q.reap()


@pytest.mark.parametrize("wait", ["wait", "wait_one"])
def test_wait_times_out_naming_the_request_and_resets(wait: str) -> None:
    h = Harness(size=8)
    h.q.add(SEG3, "IN sectors 5..6")
    h.q.kick()
    with pytest.raises(DeviceTimeout, match="no completion within 0.05 s for IN sectors 5..6"):
        getattr(h.q, wait)(0.05)
    assert h.faults == 1


def test_event_idx_skips_kicks_the_device_does_not_need() -> None:
    h = Harness(size=8, indirect=True, event_idx=True)
    h.q.add(SEG3, "a")
    h.q.kick()  # avail_event 0: the device wants to hear about entry 0
    assert h.kicks == 1
    h.q.add(SEG3, "b")
    h.q.kick()  # avail_event still 0: the device is busy and will look again
    assert h.kicks == 1
    h.q.used["avail_event"] = 2
    h.q.add(SEG3, "c")
    h.q.kick()
    assert h.kicks == 2


def test_no_notify_flag_suppresses_kicks_without_event_idx() -> None:
    h = Harness(size=8)
    h.q.used["flags"] = 1
    h.q.add(SEG3, "a")
    h.q.kick()
    assert h.kicks == 0 and h.q.avail_idx == 1
    assert int(h.q.avail["flags"]) == 1  # we poll: no interrupts, please


def _table(h: Harness, head: int, n: int) -> list[tuple[int, int, int, int]]:
    desc = h.q.desc[head]
    assert int(desc["flags"]) == INDIRECT and int(desc["len"]) == 16 * n
    table = np.ndarray((n,), h.q.desc.dtype, h.region.mm,
                       h.region.offset_of(int(desc["addr"])))
    return [(int(e["addr"]), int(e["len"]), int(e["flags"]), int(e["next"])) for e in table]


def test_framed_chain_writes_fixed_entries_once_and_the_data_entry_when_it_changes() -> None:
    h = Harness(size=4, indirect=True)
    first = [(0x1000 + 16 * i, 16, False) for i in range(4)]
    last = [(0x2000 + i, 1, True) for i in range(4)]
    h.q.frame(first, last)
    a = SplitQueue.framed_data(0x10000, 4096, True)
    b = SplitQueue.framed_data(0x20000, 512, False)
    head = h.q.add_framed(a, "a", 4097)
    h.q.kick()
    assert _table(h, head, 3) == [(0x1000 + 16 * head, 16, NEXT, 1),
                                  (0x10000, 4096, NEXT | WRITE, 2),
                                  (0x2000 + head, 1, WRITE, 0)]
    assert h.avail_heads() == [head]
    h.complete(head, 4097)
    assert h.q.reap() == [("a", 4097)]
    again = h.q.add_framed(b, "b", 1)  # same head (LIFO free list), other data
    assert again == head
    assert _table(h, head, 3)[1] == (0x20000, 512, NEXT, 2)
    h.q.kick()
    h.complete(head, 2)  # more than the 1 writable byte
    with pytest.raises(DeviceError, match="exceeds"):
        h.q.reap()


def test_plain_add_after_framed_rewrites_the_table_and_back() -> None:
    h = Harness(size=2, indirect=True)
    h.q.frame([(0x1000, 16, False)] * 2, [(0x2000, 1, True)] * 2)
    data = SplitQueue.framed_data(0x10000, 512, True)
    for token in ("framed", "plain", "framed again", "direct", "framed last"):
        if token == "plain":
            head = h.q.add([(0x5000, 16, False), (0x6000, 1, True)], token)
        elif token == "direct":
            head = h.q.add([(0x7000, 8, True)], token)
        else:
            head = h.q.add_framed(data, token, 513)
        h.q.kick()
        if token == "plain":
            assert _table(h, head, 2) == [(0x5000, 16, NEXT, 1), (0x6000, 1, WRITE, 0)]
        elif token == "direct":
            assert int(h.q.desc[head]["addr"]) == 0x7000
        else:
            assert _table(h, head, 3)[1:] == [(0x10000, 512, NEXT | WRITE, 2),
                                              (0x2000, 1, WRITE, 0)]
        assert h.avail_heads() == [head]
        h.complete(head, 1)
        assert h.q.reap() == [(token, 1)]


def test_wait_with_zero_timeout_is_a_poll() -> None:
    h = Harness(size=8)
    head = h.q.add(SEG3, "a")
    h.q.kick()
    assert h.q.wait(0) == [] and h.q.wait(0.0) == []
    assert h.faults == 0 and not h.q.broken
    h.complete(head, 513)
    assert h.q.wait(0) == [("a", 513)]


def test_ctrl_c_during_the_reset_after_a_fault_is_not_replaced() -> None:
    def interrupted_reset() -> bool:
        raise KeyboardInterrupt
    h = Harness(size=8, reset=interrupted_reset)
    h.q.add(SEG3, "a")
    h.q.kick()
    h.complete(99, 1)
    with pytest.raises(KeyboardInterrupt):
        h.q.reap()
    assert h.q.broken and "out of range" in h.q.broken


def test_fault_message_says_whether_the_reset_took() -> None:
    h = Harness(size=8, reset=lambda: False)  # the status did not read back 0
    h.q.add(SEG3, "a")
    h.q.kick()
    h.complete(99, 1)
    with pytest.raises(DeviceError) as info:
        h.q.reap()
    assert "has been reset" not in str(info.value) and "did not reset" in str(info.value)


def test_packed_wait_with_zero_timeout_is_a_poll_too() -> None:
    from virtio_user.ring.packed import PackedQueue
    faults: list[int] = []
    q: PackedQueue[Any] = PackedQueue(
        DmaAllocator(DmaRegion.anonymous(1 << 20, contiguous=1 << 20)), 8, lambda: None,
        indirect=False, event_idx=False, on_fault=lambda: bool(faults.append(1)) or True)
    q.add(SEG3, "a")
    q.kick()
    assert q.wait(0) == [] and not faults and not q.broken


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_ring_views_kept_past_close_keep_their_memory(kind: str) -> None:
    import subprocess
    import sys
    code = ("from virtio_user.memory import DmaAllocator, DmaRegion\n"
            "from virtio_user.ring.packed import PackedQueue\n"
            "from virtio_user.ring.split import SplitQueue\n"
            "region = DmaRegion.anonymous(1 << 20, contiguous=1 << 20)\n"
            f"q = {'PackedQueue' if kind == 'packed' else 'SplitQueue'}(DmaAllocator(region),"
            " 8, lambda: None, indirect=False, event_idx=False, on_fault=lambda: True)\n"
            "desc = q.desc\n"
            "q.detach()\n"
            "region.close()\n"
            "print(int(desc[0]['len']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # not -11 (SIGSEGV): the mapping outlived the view
    assert r.stdout.strip() == "0"


def test_indirect_tables_are_power_of_two_sized_aligned_and_within_a_page() -> None:
    """Both rings take their tables from indirect_tables: each the next power of two of
    its descriptors' bytes, aligned to that size (so none crosses a page), with the bus
    address of each; more than a page of descriptors per table is refused."""
    from virtio_user.ring.core import indirect_tables
    region = DmaRegion.anonymous(64 << 10, contiguous=8 << 10)
    chunk, table_bytes, bus = indirect_tables(DmaAllocator(region), 40, 5)
    assert table_bytes == 128 and chunk.size == 40 * 128 and chunk.offset % 128 == 0
    assert bus == [region.bus(chunk.offset + i * 128) for i in range(40)]
    assert all(b // 4096 == (b + table_bytes - 1) // 4096 for b in bus)
    with pytest.raises(ValueError, match="exceed a page"):
        indirect_tables(DmaAllocator(region), 4, 257)


@pytest.mark.parametrize("take", ["reap", "pop_used"])
def test_a_chain_added_but_not_published_cannot_complete(take: str) -> None:
    """Until the kick, a chain is not the device's: a used element naming its head is a
    fault, though the head has a token (the QD1 loop always holds one back)."""
    h = Harness(size=8)
    h.q.add(SEG3, "a")
    h.q.kick()
    held = h.q.add(SEG3, "b")
    h.complete(held, 1)
    with pytest.raises(DeviceError, match=f"used id {held} is not yet published"):
        getattr(h.q, take)()
    assert h.faults == 1 and h.q.broken


def test_a_published_chain_completes_while_another_is_held_back() -> None:
    h = Harness(size=8)
    a = h.q.add(SEG3, "a")
    h.q.kick()
    b = h.q.add(SEG3, "b")
    h.complete(a, 1)
    assert h.q.pop_used() == ("a", 1) and h.q.pop_used() is None
    h.q.kick()
    assert h.avail_heads() == [a, b]
    h.complete(b, 1)
    assert h.q.reap() == [("b", 1)] and h.faults == 0


def test_pop_used_takes_completions_one_at_a_time_in_used_order() -> None:
    h = Harness(size=8, indirect=True)
    heads = [h.q.add(SEG3, t) for t in "abc"]
    h.q.kick()
    assert h.q.pop_used() is None  # nothing used yet
    for x in (2, 0):
        h.complete(heads[x], 1)
    assert h.q.pop_used() == ("c", 1)
    assert h.q.in_flight == 2 and h.q.num_free == 6
    assert h.q.wait_one(0.5) == ("a", 1)
    assert h.q.pop_used() is None
    h.complete(heads[1], 1)
    assert h.q.reap() == [("b", 1)]  # reap and pop_used share one used position
    assert h.q.completed == 3 and h.q.num_free == 8 and h.q.wait_one(0.5) is None
