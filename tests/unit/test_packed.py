"""PackedQueue against the packed device model: layout, wrap counters over many laps,
chains, indirect and framed tables, out-of-order completion, event suppression, and
rejection of every kind of hostile used descriptor."""

from __future__ import annotations

import random
from typing import Any

import pytest

from packed_device import AVAIL, INDIRECT, NEXT, USED, WRITE, PackedDevice
from virtio_user.errors import DeviceError, DeviceTimeout
from virtio_user.memory import DmaAllocator, DmaRegion
from virtio_user.ring.core import QueueFull
from virtio_user.ring.packed import (EVENT_SUPPRESS_DTYPE, PACKED_DESC_DTYPE, PackedQueue,
                                     packed_layout)
from virtio_user.spec import RingEventFlags

ENABLE, DISABLE, DESC = (int(f) for f in RingEventFlags)


class Harness:
    """A queue and the device model on the same memory."""

    def __init__(self, size: int = 8, indirect: bool = False, event_idx: bool = False,
                 max_chain: int = 16) -> None:
        self.region = DmaRegion.anonymous(2 << 20, contiguous=2 << 20)
        self.kicks = 0
        self.faults = 0
        self.q: PackedQueue[Any] = PackedQueue(
            DmaAllocator(self.region), size, self._kick, indirect=indirect,
            event_idx=event_idx, on_fault=self._fault, max_chain=max_chain)
        self.dev = PackedDevice([self.region], size, self.q.desc_bus, self.q.driver_bus,
                                self.q.device_bus)

    def _kick(self) -> None:
        self.kicks += 1

    def _fault(self) -> None:
        self.faults += 1


def segs(n: int, base: int = 0x10_0000, writable_last: int = 1) -> list[tuple[int, int, bool]]:
    """``n`` segments, the last ``writable_last`` of them device-writable."""
    return [(base + 0x1000 * i, 512 + i, i >= n - writable_last) for i in range(n)]


# -- layout ----------------------------------------------------------------------------
def test_descriptor_and_event_suppression_layout() -> None:
    assert PACKED_DESC_DTYPE.itemsize == 16
    assert [PACKED_DESC_DTYPE.fields[f][1] for f in ("addr", "len", "id", "flags")] == \
        [0, 8, 12, 14]
    assert EVENT_SUPPRESS_DTYPE.itemsize == 4
    assert [EVENT_SUPPRESS_DTYPE.fields[f][1] for f in ("off_wrap", "flags")] == [0, 2]
    for dt in (PACKED_DESC_DTYPE, EVENT_SUPPRESS_DTYPE):
        assert all(dt.fields[f][0].str[0] in "<|" for f in dt.names)


@pytest.mark.parametrize("size", [1, 3, 256, 1000, 1024, 32768])
def test_layout_any_size(size: int) -> None:
    lay = packed_layout(size)
    assert lay.desc == 0 and lay.driver == 16 * size and lay.device == lay.driver + 4
    assert lay.total % 4096 == 0 and lay.total >= lay.device + 4


@pytest.mark.parametrize("size", [0, -1, 32769])
def test_layout_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        packed_layout(size)


def test_initial_state_disables_used_notifications() -> None:
    h = Harness()
    assert h.dev.driver_event_flags == DISABLE
    assert h.q.desc_bus % 16 == 0 and h.q.driver_bus % 4 == 0 and h.q.device_bus % 4 == 0
    assert h.q.avail_wrap == 1 and h.q.used_wrap == 1
    assert h.q.reap() == [] and h.q.wait(0.01) == []


# -- chains ----------------------------------------------------------------------------
def test_direct_chain_occupies_consecutive_slots_with_next_and_id() -> None:
    h = Harness(size=8)
    bid = h.q.add(segs(3), "a")
    assert h.dev.take() == []  # nothing is visible before the kick
    h.q.kick()
    assert h.kicks == 1 and h.q.num_free == 5 and h.q.in_flight == 1
    d = h.q.desc
    assert [int(d[i]["flags"]) for i in range(3)] == [NEXT | AVAIL, NEXT | AVAIL,
                                                      WRITE | AVAIL]
    assert [int(d[i]["id"]) for i in range(3)] == [bid] * 3
    [buf] = h.dev.take()
    assert buf.id == bid and buf.segs == segs(3) and buf.slots == 3
    h.dev.complete(bid, 514)
    assert h.q.reap() == [("a", 514)]
    assert h.q.num_free == 8 and h.q.in_flight == 0


def test_a_batch_is_invisible_until_the_kick() -> None:
    """Later heads are stored at once, the first one held: a device reading in ring
    order sees none of the batch before the kick, then all of it."""
    h = Harness(size=8)
    ids = [h.q.add(segs(n), n) for n in (2, 1, 3)]
    assert h.dev.take() == [] and h.q.outstanding == 3 and h.q.in_flight == 0
    assert int(h.q.desc[2]["flags"]) & (AVAIL | USED) == AVAIL  # the second head: stored
    h.q.kick()
    assert [b.id for b in h.dev.take()] == ids and h.q.in_flight == 3


def test_chain_crossing_the_ring_end_flips_the_wrap_bits_mid_chain() -> None:
    h = Harness(size=4)
    h.q.add(segs(3), "a")
    h.q.kick()
    [a] = h.dev.take()
    h.dev.complete(a.id)
    assert h.q.reap() == [("a", a.writable)]
    b = h.q.add(segs(3), "b")  # slots 3, 0, 1
    h.q.kick()
    assert int(h.q.desc[3]["flags"]) & (AVAIL | USED) == AVAIL
    assert int(h.q.desc[0]["flags"]) & (AVAIL | USED) == USED  # the next lap's pattern
    [buf] = h.dev.take()
    assert buf.id == b and buf.slots == 3
    h.dev.complete(b)
    assert h.q.reap() == [("b", buf.writable)] and h.q.avail_wrap == 0


def test_queue_full_counts_descriptors_not_ids() -> None:
    h = Harness(size=4)
    h.q.add(segs(3), "a")
    with pytest.raises(QueueFull):
        h.q.add(segs(2), "b")
    h.q.add(segs(1), "c")
    with pytest.raises(QueueFull):
        h.q.next_head()
    assert h.q.outstanding == 2 and h.q.in_flight == 0


# -- wrap counters over many laps --------------------------------------------------------
@pytest.mark.parametrize("size,indirect", [(8, False), (5, False), (8, True), (3, True)])
def test_both_wrap_counters_over_many_laps_random_order(size: int, indirect: bool) -> None:
    """Random chains and batches, completed in random order: every token comes back once
    with its length, across hundreds of laps of both counters."""
    h = Harness(size=size, indirect=indirect, max_chain=4)
    rng = random.Random(size * 2 + indirect)
    outstanding: dict[int, str] = {}
    got: list[tuple[str, int]] = []
    expected: list[tuple[str, int]] = []
    flips = {"avail": 0, "used": 0}
    for step in range(3000):
        before = (h.q.avail_wrap, h.q.used_wrap)
        for _ in range(rng.randint(0, 3)):
            n = rng.randint(1, min(4, size))
            if h.q.descriptors_needed(n) > h.q.num_free:
                break
            token = f"t{step}-{n}"
            chain = segs(n, writable_last=rng.randint(0, n))
            bid = h.q.add(chain, token)
            outstanding[bid] = token
        h.q.kick()
        h.dev.take()
        bufs = list(h.dev.taken.values())  # taken now or earlier, not yet completed
        rng.shuffle(bufs)
        for buf in bufs[:rng.randint(0, len(bufs))]:
            length = rng.randint(0, buf.writable)
            h.dev.complete(buf.id, length)
            expected.append((outstanding.pop(buf.id), length))
        got += h.q.reap()
        flips["avail"] += before[0] != h.q.avail_wrap
        flips["used"] += before[1] != h.q.used_wrap
    for bid in list(h.dev.taken):
        h.dev.complete(bid, 0)
        expected.append((outstanding.pop(bid), 0))
    got += h.q.reap()
    assert sorted(got) == sorted(expected) and not outstanding
    assert h.q.num_free == size and h.q.in_flight == 0 and h.faults == 0
    assert flips["avail"] > 100 and flips["used"] > 100


def test_completion_order_is_the_devices() -> None:
    h = Harness(size=8)
    ids = [h.q.add(segs(n), f"r{n}") for n in (1, 3, 2)]
    h.q.kick()
    h.dev.take()
    for bid in reversed(ids):
        h.dev.complete(bid, 0)
    assert h.q.reap() == [("r2", 0), ("r3", 0), ("r1", 0)]
    assert h.q.num_free == 8


# -- indirect and framed -----------------------------------------------------------------
def test_indirect_chain_takes_one_slot_and_a_table_without_next() -> None:
    h = Harness(size=4, indirect=True)
    ids = [h.q.add(segs(3), n) for n in range(4)]
    h.q.kick()
    assert h.q.num_free == 0 and sorted(ids) == [0, 1, 2, 3]
    assert all(int(h.q.desc[i]["flags"]) == INDIRECT | AVAIL for i in range(4))
    bufs = h.dev.take()
    assert all(b.indirect and b.slots == 1 and b.segs == segs(3) for b in bufs)
    for b in bufs:
        h.dev.complete(b.id)
    assert sorted(t for t, _ in h.q.reap()) == [0, 1, 2, 3]


def test_single_segment_stays_direct_with_indirect() -> None:
    h = Harness(size=4, indirect=True)
    h.q.add(segs(1), "x")
    h.q.kick()
    [b] = h.dev.take()
    assert not b.indirect


def test_framed_chains_reuse_tables_and_mix_with_plain_adds() -> None:
    h = Harness(size=4, indirect=True)
    hdr = [(0x20_0000 + 16 * i, 16, False) for i in range(4)]
    status = [(0x30_0000 + i, 1, True) for i in range(4)]
    h.q.frame(hdr, status)
    data = PackedQueue.framed_data(0x40_0000, 4096, True)
    for lap in range(20):
        bid = h.q.add_framed(data, f"f{lap}", 4097)
        h.q.kick()
        [b] = h.dev.take()
        assert b.segs == [hdr[bid], (0x40_0000, 4096, True), status[bid]]
        h.dev.complete(b.id, 4097)
        assert h.q.reap() == [(f"f{lap}", 4097)]
        if lap % 3 == 0:  # a plain chain in between rewrites some ID's table
            h.q.add(segs(2), "p")
            h.q.kick()
            [p] = h.dev.take()
            assert p.segs == segs(2)
            h.dev.complete(p.id, 0)
            h.q.reap()


# -- event suppression -------------------------------------------------------------------
def test_device_event_suppression_flags_decide_the_kick() -> None:
    h = Harness(size=8)
    h.dev.suppress(DISABLE)
    h.q.add(segs(1), "a")
    h.q.kick()
    assert h.kicks == 0 and h.q.in_flight == 1
    h.dev.suppress(ENABLE)
    h.q.add(segs(1), "b")
    h.q.kick()
    assert h.kicks == 1
    h.dev.suppress(DESC, 0, 1)  # DESC without EVENT_IDX negotiated: treated as enable
    h.q.add(segs(1), "c")
    h.q.kick()
    assert h.kicks == 2


@pytest.mark.parametrize("off,wrap,added,kick", [
    (2, 1, 1, True),   # exactly the descriptor just made available
    (3, 1, 1, False),  # a later one
    (1, 1, 1, False),  # an earlier one, already passed
    (2, 1, 3, True),   # inside the batch
    (5, 1, 3, False),  # past the batch
])
def test_descriptor_event_offset(off: int, wrap: int, added: int, kick: bool) -> None:
    h = Harness(size=8, event_idx=True)
    h.q.add(segs(2), "warm")  # slots 0-1
    h.q.kick()
    h.kicks = 0
    h.dev.suppress(DESC, off, wrap)
    for i in range(added):
        h.q.add(segs(1), i)
    h.q.kick()
    assert h.kicks == int(kick)


def test_descriptor_event_across_the_wrap() -> None:
    h = Harness(size=4, event_idx=True)
    for t in "abc":
        h.q.add(segs(1), t)
    h.q.kick()
    for b in h.dev.take():
        h.dev.complete(b.id, 0)
    h.q.reap()
    h.kicks = 0
    h.dev.suppress(DESC, 3, 1)  # slot 3 of the first lap
    h.q.add(segs(2), "d")  # slots 3 and 0 (second lap)
    h.q.kick()
    assert h.kicks == 1
    h.dev.suppress(DESC, 0, 1)  # slot 0 in the FIRST lap: long gone
    h.q.add(segs(1), "e")
    h.q.kick()
    assert h.kicks == 1
    h.dev.suppress(DESC, 1, 0)  # slot 1 of the second lap: just made available
    h.q.add(segs(1), "f")
    h.q.kick()
    assert h.kicks == 1


# -- a hostile device --------------------------------------------------------------------
def _one_in_flight(size: int = 8) -> tuple[Harness, int]:
    h = Harness(size=size)
    bid = h.q.add(segs(2), "req")
    h.q.kick()
    h.dev.take()
    return h, bid


def _assert_faulted(h: Harness, *words: str) -> None:
    with pytest.raises(DeviceError) as err:
        h.q.reap()
    msg = str(err.value)
    assert "queue 0" in msg and "reset" in msg
    assert all(w in msg for w in words), msg
    assert h.faults == 1 and h.q.broken
    with pytest.raises(DeviceError):
        h.q.add(segs(1), "after")
    with pytest.raises(DeviceError):
        h.q.reap()


@pytest.mark.parametrize("bad", [8, 500, 0xFFFF])
def test_used_id_out_of_range(bad: int) -> None:
    h, _ = _one_in_flight()
    h.dev.complete(bad, 0, slots=2)
    _assert_faulted(h, f"buffer ID {bad}", "out of range")


def test_used_id_not_in_flight() -> None:
    h, bid = _one_in_flight()
    h.dev.complete(bid + 1, 0, slots=2)
    _assert_faulted(h, f"buffer ID {bid + 1}", "not in flight")


def test_used_id_completed_twice() -> None:
    h = Harness(size=8)
    a = h.q.add(segs(1), "a")
    h.q.add(segs(1), "b")
    h.q.kick()
    h.dev.take()
    h.dev.complete(a, 0)
    assert h.q.reap() == [("a", 0)]
    h.dev.complete(a, 0, slots=1)
    _assert_faulted(h, f"buffer ID {a}", "not in flight")


@pytest.mark.parametrize("take", ["reap", "pop_used"])
def test_used_id_added_but_not_yet_published(take: str) -> None:
    """A buffer added without a kick is not the device's yet: completing it is a fault
    (the QD1 loop always holds its next request back that way)."""
    h, bid = _one_in_flight()
    held = h.q.add(segs(2), "held")
    h.dev.complete(held, 0, slots=2)
    with pytest.raises(DeviceError, match=f"buffer ID {held} .*not yet published"):
        getattr(h.q, take)()
    assert h.faults == 1 and h.q.broken


def test_used_len_beyond_writable_bytes() -> None:
    h, bid = _one_in_flight()
    h.dev.complete(bid, 514)  # segs(2): the writable one is 513 bytes
    _assert_faulted(h, "used len 514", "513")


@pytest.mark.parametrize("flags,shown", [(0, "0x0000"), (USED, "0x8000")])
def test_used_descriptor_with_the_wrong_wrap_bits(flags: int, shown: str) -> None:
    h, bid = _one_in_flight()
    h.dev.complete(bid, 0, flags=flags)  # the previous lap's used pattern, or garbage
    _assert_faulted(h, "slot 0", shown, "wrap")


def test_wrong_wrap_bits_in_the_second_lap() -> None:
    h = Harness(size=2)
    for t in "ab":
        h.q.add(segs(1), t)
        h.q.kick()
        [b] = h.dev.take()
        h.dev.complete(b.id, 0)
        h.q.reap()
    bid = h.q.add(segs(1), "c")
    h.q.kick()
    h.dev.take()
    h.dev.complete(bid, 0, wrap=1)  # the first lap's counter in the second lap
    _assert_faulted(h, "slot 0", "0x8080", "used wrap counter 0")


def test_a_device_that_never_completes_times_out() -> None:
    h, _ = _one_in_flight()
    with pytest.raises(DeviceTimeout, match="no completion within 0.05 s for req"):
        h.q.wait(0.05)
    assert h.faults == 1 and h.q.broken


def test_completions_only_count_what_is_in_flight() -> None:
    """A used descriptor at a slot the driver never published is not looked at."""
    h = Harness(size=8)
    h.dev.complete(0, 0, slots=1)  # nothing in flight: ignored
    assert h.q.reap() == [] and h.faults == 0


def test_detach_releases_the_views() -> None:
    h = Harness(size=4)
    h.q.detach()
    assert h.q.broken == "closed"
    h.region.close()


# -- VirtioBlk on a packed ring ------------------------------------------------------------
@pytest.fixture
def packed_blk(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``packed_blk(ring=..., packed=..., **device_options)`` -> (VirtioBlk, transport)."""
    import virtio_user.blk as blk_module
    from packed_device import PackedBlkTransport
    from fake_device import FakeBackend, FakeBlkDevice
    opened: list[Any] = []

    def make(ring: str = "auto", packed: bool = True, **options: Any) -> Any:
        made: list[PackedBlkTransport] = []

        def transport(backend: Any, choice: str = "auto") -> PackedBlkTransport:
            made.append(PackedBlkTransport(backend, packed=packed))
            return made[0]
        monkeypatch.setattr(blk_module, "open_transport", transport)
        dev = blk_module.VirtioBlk(FakeBackend(FakeBlkDevice(**options)), timeout=0.2,
                                   ring=ring)
        opened.append(dev)
        return dev, made[0]

    yield make
    for dev in opened:
        dev.close()


def test_blk_auto_takes_the_packed_ring(packed_blk: Any) -> None:
    dev, t = packed_blk()
    info = dev.info()
    assert info["ring"] == "packed" and isinstance(dev.queue, PackedQueue)
    assert "VIRTIO_F_RING_PACKED" in info["features_negotiated"]
    data = bytes(range(256)) * 2 * 24
    dev.write(100, data)
    assert dev.read(100, 24) == data
    assert t.blk.disk[100 * 512:124 * 512] == data


def test_blk_many_laps_out_of_order_through_the_batch_api(packed_blk: Any) -> None:
    from virtio_user.blk import Request
    from virtio_user.spec import ReqType
    dev, t = packed_blk(queue_size=16)
    t.order = "reverse"
    t.blk.disk[:] = bytes(i * 7 & 0xFF for i in range(len(t.blk.disk)))
    bufs = [dev.alloc_buffer(4096) for _ in range(12)]
    reqs = [Request(ReqType.VIRTIO_BLK_T_IN, 0, 8, b, 4096) for b in bufs]
    rng = random.Random(1)
    for _ in range(100):  # 1200 requests through a 16-entry ring
        for r in reqs:
            r.sector = rng.randrange(0, 2040)
        dev.submit(reqs)
        done = []
        while len(done) < len(reqs):
            done += dev.reap()
        assert [id(r) for r in done] == [id(r) for r in reversed(reqs)]  # device's order
        for r in reqs:
            assert r.status == 0
            assert bytes(r.buffer.mv[:4096]) == t.blk.disk[r.sector * 512:r.sector * 512 + 4096]
    assert dev.queue.completed == 1200 and dev.queue.num_free == 16


def test_blk_ring_split_does_not_ask_for_packed(packed_blk: Any) -> None:
    with pytest.raises(AssertionError, match="packed ring not negotiated"):
        packed_blk(ring="split")  # the double serves packed rings only: split reached it


def test_blk_ring_packed_on_a_device_without_it_is_unsupported(packed_blk: Any) -> None:
    from virtio_user.errors import Unsupported, exit_code
    with pytest.raises(Unsupported, match="does not offer VIRTIO_F_RING_PACKED") as err:
        packed_blk(ring="packed", packed=False)
    assert exit_code(err.value) == 5


def test_blk_unknown_ring_is_invalid(packed_blk: Any) -> None:
    from virtio_user.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match="unknown ring 'ringy'"):
        packed_blk(ring="ringy")


def test_blk_flush_discard_write_zeroes_and_get_id(packed_blk: Any) -> None:
    dev, t = packed_blk(serial="packed-serial")
    dev.write(0, b"\xaa" * 4096)
    dev.flush()
    dev.write_zeroes(0, 4)
    dev.discard(4, 4)
    assert t.blk.disk[:4096] == bytes(4096)
    assert dev.get_id() == "packed-serial"


def test_a_fault_names_the_slot_it_was_found_at() -> None:
    h = Harness(size=8)
    a = h.q.add(segs(2), "a")
    b = h.q.add(segs(1), "b")
    h.q.kick()
    h.dev.take()
    h.dev.complete(a, 0)  # slot 0, skips to 2
    h.dev.complete(b, 0, flags=USED)  # slot 2: garbage wrap bits
    _assert_faulted(h, "slot 2", "0x8000")
    assert h.q.used_pos == 0  # nothing of a faulted reap is believed


@pytest.mark.parametrize("trick,words", [("bad_id", "buffer ID 19"),
                                         ("len_too_large", "used len 4098"),
                                         ("wrong_wrap", "wrap bits")])
def test_blk_hostile_device_is_reset_and_the_read_fails(packed_blk: Any, trick: str,
                                                        words: str) -> None:
    dev, t = packed_blk(queue_size=16)
    t.blk.disk[:4096] = b"\x77" * 4096
    assert dev.read(0, 8) == b"\x77" * 4096
    resets = t.resets
    t.misbehave = trick
    with pytest.raises(DeviceError, match=words) as err:
        dev.read(0, 8)
    assert "reset" in str(err.value) and t.resets == resets + 1
    with pytest.raises(DeviceError):
        dev.read(0, 8)  # the queue stays unusable


def test_bench_runs_on_the_packed_ring_and_says_so(packed_blk: Any) -> None:
    from virtio_user.bench import BenchSpec, run
    dev, t = packed_blk(queue_size=16)
    result = run(dev, BenchSpec("randwrite", 4096, 8, None, 400, True))
    assert result["ring"] == "packed" and result["ios"] == 400
    assert result["verified_blocks"] > 0 and dev.queue.completed >= 400


@pytest.mark.parametrize("trick,words", [
    (lambda h, bid: h.dev.complete(500, 0, slots=2), ("buffer ID 500", "out of range")),
    (lambda h, bid: h.dev.complete(bid + 1, 0, slots=2), ("not in flight",)),
    (lambda h, bid: h.dev.complete(bid, 514), ("used len 514", "513")),
    (lambda h, bid: h.dev.complete(bid, 0, flags=USED), ("slot 0", "0x8000", "wrap")),
])
def test_pop_used_is_as_strict_as_reap(trick: Any, words: tuple[str, ...]) -> None:
    h, bid = _one_in_flight()
    trick(h, bid)
    with pytest.raises(DeviceError) as err:
        h.q.pop_used()
    assert all(w in str(err.value) for w in words) and "reset" in str(err.value)
    assert h.faults == 1 and h.q.broken


def test_pop_used_laps_the_ring_one_at_a_time() -> None:
    h = Harness(size=4)
    assert h.q.pop_used() is None  # nothing in flight
    for i in range(30):  # both wrap counters flip many times
        bid = h.q.add(segs(2), i)
        h.q.kick()
        assert h.q.pop_used() is None  # available, not used yet
        [b] = h.dev.take()
        h.dev.complete(b.id, 513)
        assert h.q.wait_one(0.5) == (i, 513)
        assert bid == b.id
    assert h.q.completed == 30 and h.q.num_free == 4 and h.q.in_flight == 0
