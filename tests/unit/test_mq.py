"""Multi-queue (VIRTIO_BLK_F_MQ) against the device models: negotiation, set-up of every
queue, --queues, notification per queue, a fault on one queue stopping all."""

from __future__ import annotations

import os
from typing import Any

import pytest

from virtio_user.blk import Request, VirtioBlk
from virtio_user.errors import DeviceError, InvalidArgument
from virtio_user.spec import Feature, ReqType
from fake_device import DEFAULT_FEATURES, FakeBackend, FakeBlkDevice
from fake_modern import NOTIFY_MULTIPLIER, FakeModernBackend, FakeModernDevice

SECTOR = 512
IN, OUT = ReqType.VIRTIO_BLK_T_IN, ReqType.VIRTIO_BLK_T_OUT


def open_blk(modern: bool, num_queues: int, **kwargs: Any) -> tuple[VirtioBlk, FakeBlkDevice]:
    device = FakeBlkDevice(capacity=4096, num_queues=num_queues)
    backend = (FakeModernBackend(FakeModernDevice(device)) if modern
               else FakeBackend(device))
    return VirtioBlk(backend, timeout=0.2, **kwargs), device


@pytest.fixture(autouse=True)
def four_cpus(monkeypatch: Any) -> None:
    """The default (one queue per CPU) as on a 4-CPU machine, whatever this one has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "modern"])
def test_every_offered_queue_is_set_up_and_carries_requests(modern: bool) -> None:
    blk, dev = open_blk(modern, 4)
    with blk:
        assert blk.has(Feature.VIRTIO_BLK_F_MQ)
        assert [q.index for q in blk.queues] == [0, 1, 2, 3]
        info = blk.info()
        assert info["num_queues_offered"] == 4 and info["num_queues"] == 4
        for q in blk.queues:
            data = bytes([q.index + 1]) * 4096
            buf = blk.alloc_buffer(4096)
            buf.mv[:4096] = data
            w = Request(OUT, 8 * q.index, 8, buf, 4096)
            before = list(dev.queue_notifies)
            q.submit([w])
            assert q.reap(1.0) == [w] and w.status == 0
            assert dev.disk[8 * q.index * SECTOR:(8 * q.index + 8) * SECTOR] == data
            # Each queue's kick names the queue: QUEUE_NOTIFY's value (legacy), or the
            # queue's own notify address, queue_notify_off * multiplier (modern).
            before[q.index] += 1
            assert dev.queue_notifies == before
        if modern:
            backend = blk.backend
            assert isinstance(backend, FakeModernBackend)
            assert backend.modern.notify_offsets[-4:] == [i * NOTIFY_MULTIPLIER
                                                          for i in range(4)]
        assert blk.requests_completed >= 4
        assert blk.read(0, 32) == b"".join(bytes([i + 1]) * 4096 for i in range(4))


@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "modern"])
def test_queues_chooses_how_many(modern: bool) -> None:
    blk, dev = open_blk(modern, 4, queues=2)
    with blk:
        assert len(blk.queues) == 2 and blk.info()["num_queues_offered"] == 4
        assert [bool(dev.queue_pfn(i)) for i in range(4)] == [True, True, False, False]


def test_the_default_is_capped_at_the_cpu_count(monkeypatch: Any) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    blk, _ = open_blk(False, 4)
    with blk:
        assert len(blk.queues) == 2 and blk.info()["num_queues_offered"] == 4


def test_more_queues_than_offered_is_refused_and_the_device_failed() -> None:
    with pytest.raises(InvalidArgument, match="--queues 5 exceeds the 4 request queues"):
        open_blk(False, 4, queues=5)


@pytest.mark.parametrize("bad", [0, -1, 65, 1.5, True])
def test_a_bad_queue_count_is_refused_before_the_device(bad: Any) -> None:
    device = FakeBlkDevice(num_queues=2)
    with pytest.raises(InvalidArgument, match="queues"):
        VirtioBlk(FakeBackend(device), queues=bad)
    assert device.status == 0 and device.log == ["backend closed"]  # never touched


def test_a_device_without_mq_has_one_queue_whatever_num_queues_says() -> None:
    device = FakeBlkDevice(capacity=64, features=DEFAULT_FEATURES)
    device.config["num_queues"] = 8  # not negotiated: means nothing
    with VirtioBlk(FakeBackend(device)) as blk:
        assert not blk.has(Feature.VIRTIO_BLK_F_MQ)
        assert len(blk.queues) == 1 and blk.info()["num_queues_offered"] == 1
    with pytest.raises(InvalidArgument, match="exceeds the 1 request queue "):
        VirtioBlk(FakeBackend(FakeBlkDevice(capacity=64)), queues=2)


def test_num_queues_0_counts_as_one() -> None:
    device = FakeBlkDevice(capacity=64, num_queues=1,
                           features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_MQ)
    device.config["num_queues"] = 0
    with VirtioBlk(FakeBackend(device)) as blk:
        assert len(blk.queues) == 1


def test_a_fault_on_one_queue_resets_the_device_and_stops_every_queue() -> None:
    blk, dev = open_blk(False, 4)
    with blk:
        bufs = [blk.alloc_buffer(4096) for _ in blk.queues]
        reqs = [Request(IN, 0, 8, b, 4096) for b in bufs]
        dev.misbehave = "zero_len"
        blk.queues[2].submit([reqs[2]])
        resets = dev.resets
        with pytest.raises(DeviceError, match="used len 0 .* the device has been reset"):
            blk.queues[2].reap(1.0)
        assert dev.resets == resets + 1
        for q in blk.queues:
            if q.index != 2:
                with pytest.raises(DeviceError, match="after a fault on queue 2"):
                    q.submit([reqs[q.index]])


def test_notification_suppression_is_per_queue() -> None:
    # VIRTIO_RING_F_EVENT_IDX: each queue's avail_event is its own ("Driver Requirements:
    # Available Buffer Notification Suppression"); the model writes it when it serves.
    blk, dev = open_blk(False, 2)
    with blk:
        dev.auto = False
        q0, q1 = blk.queues
        reqs = [Request(IN, 8 * i, 8, blk.alloc_buffer(4096), 4096) for i in range(4)]
        before = list(dev.queue_notifies)
        q1.submit([reqs[0]])
        q1.submit([reqs[1]])  # the device has not caught up with the first: no kick
        assert dev.queue_notifies == [before[0], before[1] + 1]
        q0.submit([reqs[2]])  # queue 0's avail_event is its own: kicked
        assert dev.queue_notifies == [before[0] + 1, before[1] + 1]
        dev.process(queue=1)  # serves both, asks for the next one
        q1.submit([reqs[3]])
        assert dev.queue_notifies == [before[0] + 1, before[1] + 2]
        dev.process(queue=0)
        dev.process(queue=1)
        assert sorted(r.tag or id(r) for r in q1.reap(1.0)) == sorted(
            id(r) for r in (reqs[0], reqs[1], reqs[3]))
        assert q0.reap(1.0) == [reqs[2]]
