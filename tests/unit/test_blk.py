"""VirtioBlk against the Python device model: data paths, limits, errors, teardown."""

from __future__ import annotations

import os
from typing import Any

import pytest

from virtio_user.blk import Request
from virtio_user.errors import (BlkIOError, DeviceError, DeviceTimeout, InvalidArgument,
                                OutOfRange, ReadOnlyDevice, Unsupported)
from virtio_user.ring.core import QueueFull
from virtio_user.spec import Feature, ReqType
from fake_device import DEFAULT_FEATURES

SECTOR = 512
IN, OUT = ReqType.VIRTIO_BLK_T_IN, ReqType.VIRTIO_BLK_T_OUT


def test_write_then_read_back(make_blk) -> None:
    blk, dev = make_blk(capacity=4096)
    data = os.urandom(40 * SECTOR)
    blk.write(100, data)
    assert dev.disk[100 * SECTOR:140 * SECTOR] == data
    assert blk.read(100, 40) == data
    assert blk.read(4095, 1) == bytes(SECTOR)


def test_device_config_and_negotiation(make_blk) -> None:
    blk, dev = make_blk(capacity=4096, serial="a-serial-of-20-bytes-and-more")
    info = blk.info()
    assert info["capacity_sectors"] == 4096 and info["queue_size"] == 256
    assert info["serial"] == "a-serial-of-20-bytes"  # GET_ID gives at most 20 bytes
    assert "VIRTIO_F_ANY_LAYOUT" in info["features_offered"]
    assert "VIRTIO_F_ANY_LAYOUT" not in info["features_negotiated"]  # not implemented
    assert dev.status == 7  # ACKNOWLEDGE | DRIVER | DRIVER_OK


@pytest.mark.parametrize("queue_size", [1024, 32768, 4])
def test_queue_size_is_used_as_reported(make_blk, queue_size: int) -> None:
    blk, dev = make_blk(queue_size=queue_size, contiguous=2 << 20)
    assert blk.queue_size == queue_size
    blk.write(0, b"q" * SECTOR)
    assert blk.read(0, 1) == b"q" * SECTOR


def test_large_requests_are_split_by_size_max_and_seg_max(make_blk) -> None:
    feats = DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_SIZE_MAX
    blk, dev = make_blk(capacity=8192, features=feats, size_max=4096, seg_max=4)
    data = os.urandom(1000 * SECTOR)
    blk.write(7, data)
    assert blk.read(7, 1000) == data
    sizes = [n for t, _, n in dev.requests if t in (IN, OUT)]
    assert max(sizes) <= 4 * 4096 and sum(sizes) == 2 * len(data)


def test_max_request_bytes_is_what_one_request_from_the_pool_can_carry(make_blk) -> None:
    feats = DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_SIZE_MAX
    blk, dev = make_blk(capacity=8192, features=feats, size_max=4096, seg_max=4)
    big, small = blk.alloc_buffer(64 << 10), blk.alloc_buffer(6 * SECTOR)
    assert blk.max_request_bytes([big]) == 4 * 4096  # seg_max segments of size_max
    assert blk.max_request_bytes([big, small]) == 6 * SECTOR  # the smallest buffer
    req = Request(IN, 0, 32, big, blk.max_request_bytes([big]))
    blk.submit([req])  # accepted as one request of seg_max segments
    assert blk.reap(timeout=1.0) == [req]
    assert req.status == 0 and dev.requests[-1] == (IN, 0, 4 * 4096)


def test_buffers_split_where_physical_pages_are_not_contiguous(make_blk) -> None:
    blk, dev = make_blk(capacity=8192, contiguous=16384, seg_max=3)
    data = os.urandom(2048 * SECTOR)
    blk.write(0, data)
    assert blk.read(0, 2048) == data
    assert max(n for t, _, n in dev.requests if t == IN) <= 3 * 16384


def test_direct_descriptors_without_indirect_feature(make_blk) -> None:
    feats = DEFAULT_FEATURES & ~Feature.VIRTIO_RING_F_INDIRECT_DESC & ~Feature.VIRTIO_RING_F_EVENT_IDX
    blk, dev = make_blk(features=feats, queue_size=8)
    assert not blk.queue.indirect
    data = os.urandom(300 * SECTOR)
    blk.write(1, data)
    assert blk.read(1, 300) == data


@pytest.mark.parametrize("sector,count,exc,text", [
    (2047, 2, OutOfRange, "sectors 2047..2048 exceed capacity 2048"),
    (2048, 1, OutOfRange, "capacity 2048"),
    (0, 2**64, OutOfRange, "capacity"),
    (-1, 1, InvalidArgument, "-1"),
    (0, 0, InvalidArgument, "count"),
])
def test_bounds_are_checked_before_the_device_sees_anything(make_blk, sector, count, exc,
                                                             text) -> None:
    blk, dev = make_blk(capacity=2048)
    before = len(dev.requests)
    with pytest.raises(exc, match=text):
        blk.read(sector, count)
    assert len(dev.requests) == before


def test_block_size_alignment(make_blk) -> None:
    blk, dev = make_blk(blk_size=4096)
    assert blk.block_size == 4096
    with pytest.raises(InvalidArgument, match="4096-byte block size"):
        blk.read(1, 8)
    assert blk.read(8, 8) == bytes(8 * SECTOR)


def test_read_only_device_refuses_every_write_path(make_blk) -> None:
    blk, dev = make_blk(features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_RO)
    dev.disk[:SECTOR] = b"r" * SECTOR
    before, seen = bytes(dev.disk), len(dev.requests)
    for call in (lambda: blk.write(0, bytes(SECTOR)), lambda: blk.discard(0, 8),
                 lambda: blk.write_zeroes(0, 8)):
        with pytest.raises(ReadOnlyDevice, match="read-only"):
            call()
    assert bytes(dev.disk) == before and len(dev.requests) == seen
    assert blk.read(0, 1) == b"r" * SECTOR


def test_features_not_offered_are_unsupported(make_blk) -> None:
    feats = DEFAULT_FEATURES & ~(Feature.VIRTIO_BLK_F_FLUSH | Feature.VIRTIO_BLK_F_DISCARD
                                 | Feature.VIRTIO_BLK_F_WRITE_ZEROES)
    blk, _ = make_blk(features=feats)
    for call in (blk.flush, lambda: blk.discard(0, 1), lambda: blk.write_zeroes(0, 1)):
        with pytest.raises(Unsupported, match="does not offer"):
            call()


def test_discard_and_write_zeroes_split_by_their_limits(make_blk) -> None:
    blk, dev = make_blk(capacity=4096, max_discard_sectors=100)
    dev.disk[:] = b"\xee" * len(dev.disk)
    blk.write_zeroes(10, 250)
    assert dev.disk[10 * SECTOR:260 * SECTOR] == bytes(250 * SECTOR)
    assert dev.disk[260 * SECTOR:261 * SECTOR] == b"\xee" * SECTOR
    assert [s for t, s, _ in dev.requests if t == ReqType.VIRTIO_BLK_T_WRITE_ZEROES] == [10, 110, 210]
    blk.discard(0, 8)
    blk.flush()


def test_io_error_names_the_sectors_and_later_requests_work(make_blk) -> None:
    blk, dev = make_blk()
    dev.ioerr_sectors = {100}
    with pytest.raises(BlkIOError, match="96..103") as info:
        blk.read(96, 8)
    assert info.value.sector == 96
    assert blk.read(0, 96) == bytes(96 * SECTOR)
    blk.write(200, bytes(SECTOR))


@pytest.mark.parametrize("trick", ["bad_id", "id_not_in_flight", "len_too_large", "idx_jump",
                                   "no_status", "status_only", "zero_len"])
def test_misbehaving_device_gives_device_error_and_reset(make_blk, trick: str) -> None:
    blk, dev = make_blk()
    dev.disk[:SECTOR] = b"d" * SECTOR
    blk.read(0, 1)
    resets = dev.resets
    dev.misbehave = trick
    with pytest.raises(DeviceError, match="has been reset"):
        blk.read(0, 1)
    assert dev.resets == resets + 1 and dev.status == 0 and dev.pfn == 0
    with pytest.raises(DeviceError):
        blk.read(0, 1)  # nothing more from a device that broke the protocol


def test_stalled_device_times_out_naming_the_request(make_blk) -> None:
    blk, dev = make_blk(timeout=0.05)
    dev.stall = True
    with pytest.raises(DeviceTimeout, match="IN sectors 5..6"):
        blk.read(5, 2)
    assert dev.status == 0


def test_close_resets_the_device_before_releasing_memory(make_blk) -> None:
    blk, dev = make_blk()
    blk.read(0, 1)
    blk.close()
    resets = [i for i, e in enumerate(dev.log) if e == "status 0x0"]
    unmaps = [i for i, e in enumerate(dev.log) if e.startswith("unmap")]
    assert resets and unmaps and resets[-1] < unmaps[0]
    assert all(dev.log[i] == "unmap with status 0x0 pfn 0x0" for i in unmaps)
    assert dev.log[-1] == "backend closed"
    blk.close()  # idempotent


def test_batch_submit_fills_the_queue_with_one_kick_and_reaps_out_of_order(make_blk) -> None:
    blk, dev = make_blk(capacity=4096, queue_size=64)
    dev.disk[:] = os.urandom(len(dev.disk))
    dev.auto = False
    reqs = [Request(IN, 8 * i, 8, blk.alloc_buffer(4096), 4096, tag=i) for i in range(64)]
    blk.submit(reqs)
    assert dev.notifies == 1 and blk.in_flight == 64
    dev.reverse = True
    dev.process()
    done = blk.reap()
    assert [r.tag for r in done] == list(range(63, -1, -1))
    for r in done:
        assert r.status == 0
        assert bytes(r.buffer.mv[:4096]) == dev.disk[r.sector * SECTOR:(r.sector + 8) * SECTOR]
    assert blk.in_flight == 0


def test_capacity_change_is_noticed(make_blk) -> None:
    blk, dev = make_blk(capacity=1024)
    dev.resize(2048)
    assert blk.read(2047, 1) == bytes(SECTOR)
    assert blk.capacity == 2048
    dev.resize(512)
    with pytest.raises(OutOfRange, match="capacity 512"):
        blk.read(600, 1)


def test_requests_completed_counts_and_indices_match(make_blk) -> None:
    blk, dev = make_blk(queue_size=4)
    for i in range(300):
        blk.read(i, 1)
    assert blk.requests_completed == 300
    assert blk.queue.avail_idx == blk.queue.used_idx == 300


def test_a_call_cut_short_with_requests_out_resets_the_device(make_blk) -> None:
    blk, dev = make_blk()
    dev.auto = False  # the request stays in flight

    def interrupt() -> None:
        raise KeyboardInterrupt
    real_wait = blk.queue.wait
    blk.queue.wait = lambda timeout: interrupt()  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        blk.read(0, 1)
    blk.queue.wait = real_wait  # type: ignore[method-assign]
    assert dev.status == 0 and blk.queue.broken
    with pytest.raises(DeviceError, match="interrupted"):
        blk.read(0, 1)


# -- hardening: each of these failed on an earlier version ------------------------------

def _first_batch_only_reaches_the_device(blk, dev, submit_bad) -> None:
    """``submit_bad`` raises; afterwards nothing of it is queued, and the next kick sends
    exactly the next batch."""
    dev.auto = False
    size = blk.queue.size
    with pytest.raises(InvalidArgument):
        submit_bad()
    assert blk.queue.outstanding == 0 and blk.queue.num_free == size
    good = Request(IN, 24, 8, blk.alloc_buffer(4096), 4096)
    blk.submit([good])
    dev.process()
    assert blk.reap() == [good] and good.status == 0
    assert dev.requests == [(IN, 24, 4096)]  # no rejected request went out as well


@pytest.mark.parametrize("bad", ["sector_beyond_u64", "too_many_segments", "nbytes_beyond_buffer",
                                 "unknown_type"])
def test_a_failed_submit_queues_nothing(make_blk, bad: str) -> None:
    blk, dev = make_blk(capacity=4096, contiguous=16384, seg_max=2)
    ok = Request(OUT, 8, 8, blk.alloc_buffer(4096), 4096)
    buf = blk.alloc_buffer(64 << 10)  # 4 segments of 16 KiB here, more than seg_max
    wrong = {"sector_beyond_u64": Request(IN, 2**64, 8, blk.alloc_buffer(4096), 4096),
             "too_many_segments": Request(IN, 0, 128, buf, 64 << 10),
             "nbytes_beyond_buffer": Request(IN, 0, 16, blk.alloc_buffer(4096), 8192),
             "unknown_type": Request(99, 0, 8, blk.alloc_buffer(4096), 4096)}[bad]  # type: ignore[arg-type]
    _first_batch_only_reaches_the_device(blk, dev, lambda: blk.submit([ok, wrong]))


def test_close_keeps_the_memory_mapped_when_the_reset_fails(make_blk, caplog) -> None:
    blk, dev = make_blk()
    blk.read(0, 1)
    dev.reset_fails = True  # status does not read back 0: the device may still write
    blk.close()
    assert not any(e.startswith("unmap") for e in dev.log)
    assert dev.regions and not any(r.mm.closed for r in dev.regions)
    assert any(r.levelname == "ERROR" and "kept mapped" in r.getMessage()
               for r in caplog.records)


def test_fault_message_tells_when_the_reset_failed(make_blk) -> None:
    blk, dev = make_blk()
    dev.reset_fails = True
    dev.misbehave = "bad_id"
    with pytest.raises(DeviceError) as info:
        blk.read(0, 1)
    assert "has been reset" not in str(info.value)
    assert "did not reset" in str(info.value)


def test_a_read_the_device_completes_short_never_returns_stale_bytes(make_blk) -> None:
    blk, dev = make_blk()
    dev.disk[:SECTOR] = b"s" * SECTOR  # lands in the bounce buffer that is reused below
    assert blk.read(0, 1) == b"s" * SECTOR
    dev.misbehave = "status_only"  # writes only the status byte, used len 1
    with pytest.raises(DeviceError, match="used len 1"):
        blk.read(5, 1)
    assert dev.status == 0


def test_small_queue_without_indirect_descriptors_reads_4_mib(make_blk) -> None:
    feats = DEFAULT_FEATURES & ~Feature.VIRTIO_RING_F_INDIRECT_DESC
    blk, dev = make_blk(features=feats, queue_size=16, capacity=16384)
    dev.disk[:] = os.urandom(len(dev.disk))
    assert blk.read(0, 8192) == dev.disk[:8192 * SECTOR]
    blk.write(8192, bytes(dev.disk[:8192 * SECTOR]))
    assert dev.disk[8192 * SECTOR:] == dev.disk[:8192 * SECTOR]


def test_plain_read_waits_for_room_when_batch_requests_fill_the_queue(make_blk) -> None:
    feats = DEFAULT_FEATURES & ~Feature.VIRTIO_RING_F_INDIRECT_DESC
    blk, dev = make_blk(features=feats, queue_size=16, capacity=4096)
    mine = [Request(IN, 8 * i, 8, blk.alloc_buffer(4096), 4096, tag=i) for i in range(4)]
    blk.submit(mine)  # 4 chains of 2 + 1 descriptors: 12 of 16 in use
    assert blk.queue.num_free == 4
    assert blk.read(100, 300) == bytes(300 * SECTOR)
    assert sorted(r.tag for r in blk.reap()) == list(range(4))  # kept for the caller


def test_a_signal_as_close_begins_leaves_it_to_be_done_again(make_blk, monkeypatch) -> None:
    import virtio_user.blk as blk_module
    blk, dev = make_blk()
    real = blk_module._block_signals
    calls = []

    def signal_arrives() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # SIGINT's handler runs just as close() starts
        return real()
    monkeypatch.setattr(blk_module, "_block_signals", signal_arrives)
    with pytest.raises(KeyboardInterrupt):
        blk.close()
    blk.close()  # the exit hook, or the caller's retry, still resets and unmaps
    assert dev.status == 0 and dev.log[-1] == "backend closed"


def test_a_signal_while_opening_cannot_leave_the_device_running(monkeypatch) -> None:
    import signal
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt
    dev = FakeBlkDevice()
    try:
        with monkeypatch.context() as m:
            m.setattr(signal, "signal", interrupted)
            blk = VirtioBlk(FakeBackend(dev))
        blk.close()
    except KeyboardInterrupt:
        assert dev.status == 0 and dev.log[-1] == "backend closed"


def test_signal_dispositions_belong_to_the_caller_not_the_library() -> None:
    import signal
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        a, b = VirtioBlk(FakeBackend(FakeBlkDevice())), VirtioBlk(FakeBackend(FakeBlkDevice()))
        both_open = signal.getsignal(signal.SIGTERM)
        a.close()
        assert signal.getsignal(signal.SIGTERM) is both_open is signal.SIG_DFL
        b.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_reap_with_zero_timeout_is_a_poll(make_blk) -> None:
    blk, dev = make_blk()
    dev.auto = False
    req = Request(IN, 0, 1, blk.alloc_buffer(SECTOR), SECTOR)
    blk.submit([req])
    assert blk.reap(timeout=0) == [] and blk.reap(timeout=0) == []
    assert dev.status == 7 and not blk.queue.broken
    dev.process()
    assert blk.reap(timeout=0) == [req] and req.status == 0


def test_hostile_size_max_is_refused_early_and_cheaply() -> None:
    import tracemalloc
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice
    dev = FakeBlkDevice(features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_SIZE_MAX, size_max=1)
    tracemalloc.start()
    try:
        with pytest.raises(DeviceError, match="size_max 1"):
            VirtioBlk(FakeBackend(dev))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert dev.status == 0 and dev.resets
    assert dev.log[-1] == "backend closed"


def test_numpy_views_of_a_closed_device_keep_their_memory() -> None:
    import subprocess
    import sys
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from virtio_user.blk import VirtioBlk\n"
            "from fake_device import FakeBackend\n"
            "blk = VirtioBlk(FakeBackend())\n"
            "blk.read(0, 1)\n"
            "used, desc = blk.queue.used, blk.queue.desc\n"
            "blk.close()\n"
            "print(int(used['idx']), int(desc[0]['len']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # not -11: the mapping was not unmapped under them
    assert r.stdout.split()[0] == "1"


def test_discard_honours_the_sector_alignment(make_blk) -> None:
    blk, dev = make_blk(capacity=4096, max_discard_sectors=20, discard_sector_alignment=8)
    blk.discard(3, 40)
    pieces = [(s, n) for t, s, n in dev.ranges if t == ReqType.VIRTIO_BLK_T_DISCARD]
    assert pieces == [(3, 13), (16, 16), (32, 11)]  # boundaries on multiples of 8, as Linux


@pytest.mark.parametrize("limit", ["max_discard_sectors", "max_write_zeroes_sectors"])
def test_a_range_limit_below_one_block_is_refused(make_blk, limit: str) -> None:
    blk, dev = make_blk(blk_size=4096)
    dev.config[limit] = 4  # half a 4096-byte block
    blk.refresh_config()
    call = blk.discard if limit.startswith("max_discard") else blk.write_zeroes
    with pytest.raises(Unsupported, match=f"{limit.removeprefix('max_')} 4 is below"):
        call(0, 8)
    assert dev.ranges == []


def test_a_device_dropped_without_close_stays_mapped_until_the_exit_hook() -> None:
    import gc
    import weakref
    from virtio_user import blk as blk_module
    from fake_device import FakeBackend, FakeBlkDevice
    dev = FakeBlkDevice()
    ref = weakref.ref(blk_module.VirtioBlk(FakeBackend(dev)))  # e.g. a signal hit before `with`
    gc.collect()
    assert ref() is not None and dev.status == 7  # not collected: its memory stays mapped
    assert not any(e.startswith("unmap") for e in dev.log)
    blk_module._close_all()  # what atexit runs
    assert dev.status == 0 and dev.log[-1] == "backend closed"


def test_data_segments_follow_seg_max_the_table_and_the_ring() -> None:
    from virtio_user.blk_setup import MAX_DATA_SEGS, Limits, data_segments
    lim = Limits(2048, SECTOR, None, 6, 1, 1)
    assert data_segments(lim, 256, True, "t") == 6
    assert data_segments(Limits(2048, SECTOR, None, None, 1, 1), 256, True, "t") == MAX_DATA_SEGS
    # Without indirect tables a chain lives in the ring: header and status take two.
    assert data_segments(lim, 4, False, "t") == 2
    assert data_segments(lim, 2, False, "t") == 1
    with pytest.raises(DeviceError, match="size_max 100 and seg_max 4 leave no room for a "
                                          "4096-byte block"):
        data_segments(Limits(2048, 4096, 100, 4, 1, 1), 256, True, "t")


def test_the_ring_asked_for_decides_the_feature_and_packed_must_be_offered() -> None:
    from virtio_user.blk_setup import check_ring, ring_features, use_packed
    packed = int(Feature.VIRTIO_F_RING_PACKED)
    assert ring_features("split") == 0
    assert ring_features("auto") == ring_features("packed") == packed
    assert use_packed("auto", packed, "t", "modern") is True
    assert use_packed("auto", 0, "t", "legacy") is False
    with pytest.raises(Unsupported, match=r"t: the device does not offer "
                                          r"VIRTIO_F_RING_PACKED \(legacy transport\)"):
        use_packed("packed", 0, "t", "legacy")
    with pytest.raises(InvalidArgument, match="unknown ring 'both': choose auto, split, packed"):
        check_ring("both")


def test_a_block_size_that_is_no_power_of_two_is_ignored(make_blk, caplog: Any) -> None:
    feats = DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_BLK_SIZE
    blk, _ = make_blk(features=feats, blk_size=1000)
    assert blk.block_size == SECTOR
    assert "ignoring block size 1000" in caplog.text


def test_an_unknown_wait_mode_is_refused_and_the_device_reset(make_blk) -> None:
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice
    dev = FakeBlkDevice()
    with pytest.raises(InvalidArgument, match="unknown wait mode 'nap': choose poll, "):
        VirtioBlk(FakeBackend(dev), wait="nap")
    assert dev.status == 0


def test_status_bytes_map_to_typed_errors() -> None:
    from virtio_user.blk import status_error
    from virtio_user.spec import BlkStatus
    req = Request(IN, 8, 2)
    req.status = BlkStatus.VIRTIO_BLK_S_OK
    assert status_error(req, "t") is None
    req.status = BlkStatus.VIRTIO_BLK_S_UNSUPP
    assert isinstance(status_error(req, "t"), Unsupported)
    req.status = BlkStatus.VIRTIO_BLK_S_IOERR
    err = status_error(req, "t")
    assert isinstance(err, BlkIOError)
    assert (err.status, err.sector, err.count) == (1, 8, 2)
    assert str(err) == f"t: I/O error on {req} (VIRTIO_BLK_S_IOERR)"


def test_discard_pieces_end_on_the_alignment_where_the_range_goes_on() -> None:
    from virtio_user.blk import range_pieces
    from virtio_user.blk_setup import Limits
    lim = Limits(1 << 20, 4096, None, None, 1 << 16, 1 << 16, discard_sector_alignment=24)
    pieces = list(range_pieces(lim, ReqType.VIRTIO_BLK_T_DISCARD, 8, 100, 50, "t"))
    assert pieces == [(8, 40), (48, 48), (96, 12)]
    with pytest.raises(Unsupported, match="max_write_zeroes_sectors 4 is below one 4096-byte"):
        list(range_pieces(lim, ReqType.VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 4, "t"))


# -- one request, one framed segment: submit's inline path ---------------------------------

def _framed_read(blk: Any) -> Request:
    """A 4 KiB read that has been through submit once: its buffer's data descriptor is
    framed, so the next submit of it alone takes the inline path."""
    req = Request(IN, 0, 8, blk.alloc_buffer(4096), 4096)
    blk.submit([req])
    assert blk.reap(timeout=1.0) == [req] and req.status == 0
    assert req.buffer.framed_descs  # type: ignore[union-attr]
    return req


def test_one_framed_request_skips_the_batch_planner(make_blk, monkeypatch) -> None:
    blk, dev = make_blk(capacity=4096)
    dev.disk[:] = os.urandom(len(dev.disk))
    req = _framed_read(blk)

    def no_plan(requests: Any) -> Any:
        raise AssertionError("the batch path was taken")
    monkeypatch.setattr(blk.queues[0], "_plan", no_plan)
    for sector in (8, 4088, 16):
        req.sector = sector
        blk.submit([req])
        assert blk.reap(timeout=1.0) == [req] and req.status == 0 and req.used_len == 4097
        assert bytes(req.buffer.mv) == dev.disk[sector * SECTOR:(sector + 8) * SECTOR]
    assert dev.requests[-3:] == [(IN, 8, 4096), (IN, 4088, 4096), (IN, 16, 4096)]
    assert blk.requests_completed == 4 and blk.in_flight == 0


@pytest.mark.parametrize("bad", ["sector_beyond_u64", "negative_sector", "unknown_type",
                                 "nbytes_beyond_buffer", "framed_beyond_buffer", "no_buffer"])
def test_one_framed_request_gets_every_check_of_a_batch(make_blk, bad: str) -> None:
    blk, dev = make_blk(capacity=4096)
    req = _framed_read(blk)
    buf = req.buffer
    if bad == "sector_beyond_u64":
        req.sector = 2**64
    elif bad == "negative_sector":
        req.sector = -8
    elif bad == "unknown_type":
        req.type = 99  # type: ignore[assignment]
    elif bad == "nbytes_beyond_buffer":
        req.nbytes = 8192
    elif bad == "framed_beyond_buffer":  # a descriptor cached for more than the buffer
        buf.framed(8192, True)  # type: ignore[union-attr]
        req.nbytes = 8192
    else:
        req.buffer = None
    dev.requests.clear()
    _first_batch_only_reaches_the_device(blk, dev, lambda: blk.submit([req]))


def test_one_framed_request_on_a_full_queue_is_refused_untouched(make_blk) -> None:
    from virtio_user.ring.core import QueueFull
    blk, dev = make_blk(queue_size=4)
    req = _framed_read(blk)
    dev.auto = False
    others = [Request(IN, 8 * i, 8, blk.alloc_buffer(4096), 4096) for i in range(4)]
    blk.submit(others)
    with pytest.raises(QueueFull):
        blk.submit([req])
    assert blk.queue.outstanding == 4 and not blk.queue.broken and dev.status == 7
    dev.process()
    assert {id(r) for r in blk.reap()} == {id(r) for r in others}
    blk.submit([req])  # and room again: it goes
    dev.process()
    assert blk.reap() == [req] and req.status == 0


def test_a_signal_inside_the_inline_submit_resets_the_device(make_blk, monkeypatch) -> None:
    import virtio_user.blk_queue as blk_module
    blk, dev = make_blk()
    req = _framed_read(blk)

    class Interrupted:
        def pack_into(self, *args: Any) -> None:
            raise KeyboardInterrupt  # after the chain was added, before its header
    monkeypatch.setattr(blk_module, "_HDR", Interrupted())
    notifies = dev.notifies
    with pytest.raises(KeyboardInterrupt):
        blk.submit([req])
    assert blk.queue.broken and "interrupted" in blk.queue.broken
    assert dev.status == 0 and dev.notifies == notifies  # reset, never kicked
    with pytest.raises(DeviceError, match="interrupted"):
        blk.submit([req])


@pytest.mark.parametrize("take", ["reap", "reap_one"])
@pytest.mark.parametrize("trick", ["bad_id", "id_not_in_flight", "len_too_large", "idx_jump",
                                   "no_status", "status_only", "zero_len"])
def test_a_misbehaving_device_is_caught_on_the_batch_api_too(make_blk, trick: str,
                                                             take: str) -> None:
    blk, dev = make_blk()
    req = _framed_read(blk)
    dev.misbehave = trick
    with pytest.raises(DeviceError, match="has been reset"):
        blk.submit([req])
        getattr(blk, take)(timeout=1.0)
    assert dev.status == 0 and blk.queue.broken


def test_one_framed_request_at_a_time_laps_a_packed_ring(monkeypatch) -> None:
    import random
    import virtio_user.blk as blk_module
    from virtio_user.ring.packed import PackedQueue
    from packed_device import PackedBlkTransport
    from fake_device import FakeBackend, FakeBlkDevice
    made: list[PackedBlkTransport] = []

    def transport(backend: Any, choice: str = "auto") -> PackedBlkTransport:
        made.append(PackedBlkTransport(backend))
        return made[0]
    monkeypatch.setattr(blk_module, "open_transport", transport)
    blk = blk_module.VirtioBlk(FakeBackend(FakeBlkDevice(capacity=2048, queue_size=4)),
                               timeout=0.5)
    try:
        assert isinstance(blk.queue, PackedQueue) and blk.queue.framed
        disk = made[0].blk.disk
        disk[:] = os.urandom(len(disk))
        req, rng = _framed_read(blk), random.Random(2)
        for _ in range(50):  # both wrap counters flip many times over 4 slots
            req.sector = rng.randrange(0, 2040)
            blk.submit([req])
            assert blk.reap(timeout=1.0) == [req] and req.status == 0
            assert bytes(req.buffer.mv) == disk[req.sector * SECTOR:req.sector * SECTOR + 4096]
        assert blk.requests_completed == 51 and blk.queue.num_free == 4
    finally:
        blk.close()


def test_submit_without_kick_is_invisible_until_kick(make_blk) -> None:
    blk, dev = make_blk()
    dev.disk[:8192] = os.urandom(8192)
    a, b = _framed_read(blk), _framed_read(blk)
    a.sector, b.sector = 0, 8
    notifies = dev.notifies
    blk.submit([a])
    blk.submit([b], kick=False)  # built into the ring while a is out
    assert dev.notifies == notifies + 1 and blk.in_flight == 1
    assert blk.reap_one(timeout=1.0) is a and a.status == 0
    assert blk.reap_one(timeout=1.0) is None  # b is not published: nothing in flight
    blk.kick()
    assert dev.notifies == notifies + 2
    assert blk.reap_one(timeout=1.0) is b and b.status == 0
    assert bytes(a.buffer.mv) + bytes(b.buffer.mv) == dev.disk[:8192]


def test_a_full_queue_refuses_a_request_and_keeps_those_held_back(make_blk) -> None:
    """QueueFull from a submit is refused before any write: requests submitted with
    kick=False stay queued and go out at the kick (the queue is not broken for it)."""
    blk, dev = make_blk(queue_size=2)
    dev.disk[:8192] = os.urandom(8192)
    a, b, c = (_framed_read(blk) for _ in range(3))
    a.sector, b.sector = 0, 8
    blk.submit([a], kick=False)
    blk.submit([b], kick=False)
    with pytest.raises(QueueFull):
        blk.submit([c])
    assert not blk.queue.broken and blk.in_flight == 0
    blk.kick()
    assert [blk.reap_one(timeout=1.0), blk.reap_one(timeout=1.0)] == [a, b]
    assert bytes(a.buffer.mv) + bytes(b.buffer.mv) == dev.disk[:8192]


def test_reap_one_hands_out_what_a_plain_call_set_aside_first(make_blk) -> None:
    blk, dev = make_blk()
    req = _framed_read(blk)
    blk.submit([req])  # the model completes it at once; nobody has reaped it
    blk.flush()  # reaps req's completion on its way and keeps it for the caller
    assert blk.in_flight == 0
    assert blk.reap_one(timeout=1.0) is req and req.status == 0
    assert blk.reap_one(timeout=1.0) is None


def test_requests_resubmitted_in_reaped_order_keep_their_heads(make_blk) -> None:
    """The free list hands a reaped batch's ids back in the same order, so each
    buffer's framed table is already in place (no table write per request)."""
    blk, dev = make_blk()
    reqs = [Request(IN, 8 * i, 8, blk.alloc_buffer(4096), 4096, tag=i) for i in range(8)]
    blk.submit(reqs)
    batch = blk.reap(timeout=1.0)
    heads = {r.tag: r.head for r in batch}
    for _ in range(5):
        blk.submit(batch)
        batch = blk.reap(timeout=1.0)
        assert {r.tag: r.head for r in batch} == heads


@pytest.mark.parametrize("framed", [True, False], ids=["inline", "batch"])
def test_a_float_sector_is_a_bad_argument_not_a_device_reset(make_blk, framed) -> None:
    # Issue 22: 1.5 passed the range check, then struct.pack failed after the chain was
    # in the ring, which broke the queue and reset the device.
    blk, dev = make_blk(capacity=4096)
    req = _framed_read(blk) if framed else Request(IN, 0, 8, blk.alloc_buffer(4096), 4096)
    resets = dev.resets
    req.sector = 1.5  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="not an integer"):
        blk.submit([req])
    assert dev.resets == resets and not blk.queue.broken and blk.in_flight == 0
    req.sector = 8
    blk.submit([req])
    assert blk.reap(timeout=1.0) == [req] and req.status == 0


@pytest.mark.parametrize("call", ["read", "discard"])
def test_plain_calls_refuse_a_float_sector_before_the_device(make_blk, call) -> None:
    blk, dev = make_blk(capacity=4096, features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_DISCARD)
    resets, requests = dev.resets, len(dev.requests)
    with pytest.raises(InvalidArgument, match="sector 2.0 is not an integer"):
        getattr(blk, call)(2.0, 8)
    with pytest.raises(InvalidArgument, match="count 8.0 is not an integer"):
        getattr(blk, call)(2, 8.0)
    assert dev.resets == resets and len(dev.requests) == requests


def test_the_single_queue_api_is_queue_0s_request_path(make_blk) -> None:
    from virtio_user.blk_queue import RequestQueue
    blk, dev = make_blk(capacity=4096)
    assert [type(q) for q in blk.queues] == [RequestQueue]
    assert blk.queue is blk.queues[0].vq and blk.queues[0].index == 0
    blk.write(0, b"\1" * 4096)
    assert blk.requests_completed == blk.queues[0].vq.completed > 0
