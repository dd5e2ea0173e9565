"""Worker processes, one per request queue (workers.py), against the device model: the
device is initialised once, each forked worker drives its own queue; a failure or death
of one resets the device and stops all; Ctrl-C stops all and the device resets once."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from virtio_user.blk import VirtioBlk
from virtio_user.errors import DeviceError, InvalidArgument, WorkerFailed, exit_code
from virtio_user.workers import run_workers
from fake_device import FakeBackend, FakeBlkDevice

SECTOR = 512


def open_mq(queues: int = 3) -> tuple[VirtioBlk, FakeBlkDevice]:
    device = FakeBlkDevice(capacity=4096, num_queues=queues)
    return VirtioBlk(FakeBackend(device), timeout=0.5, queues=queues), device


def write_and_read_back(dev: VirtioBlk, index: int) -> tuple[int, int]:
    """Disjoint ranges per worker, each through its own queue. (The device model runs
    in each worker's copy of this process, so the check is the read-back.)"""
    data = bytes([index + 1]) * (64 * SECTOR)
    dev.write(64 * index, data, queue=index)
    assert dev.read(64 * index, 64, queue=index) == data
    return os.getpid(), dev.queues[index].vq.completed


def test_each_worker_drives_its_own_queue_in_its_own_process() -> None:
    dev, model = open_mq(3)
    with dev:
        results = run_workers(dev, write_and_read_back, 3, deadline=30)
        pids = [pid for pid, _ in results]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        assert all(done >= 2 for _, done in results)
        assert model.resets == 1  # the initialisation's only: no worker reset the device
        # The parent's queues saw none of it: the workers' requests were theirs.
        assert all(q.vq.completed == 0 for q in dev.queues[1:])


def fail_on_queue_1(dev: VirtioBlk, index: int) -> int:
    if index == 1:
        # The device model, in this worker, completes its next request with used len
        # 0: a completion that does not cover the status byte it must write.
        dev.backend.device.misbehave = "zero_len"  # type: ignore[attr-defined]
        dev.read(0, 8, queue=1)
    time.sleep(30)  # the others would run on: they must be stopped
    return index


def test_a_fault_on_one_queue_resets_the_device_and_stops_every_worker() -> None:
    dev, model = open_mq(3)
    with dev:
        resets = model.resets
        start = time.monotonic()
        with pytest.raises(WorkerFailed, match="the worker on queue 1 failed: .*used len 0 "
                           "does not cover.*the device has been reset and every worker "
                           "stopped") as err:
            run_workers(dev, fail_on_queue_1, 3, deadline=60)
        assert time.monotonic() - start < 10
        assert model.resets == resets + 1  # the parent's reset (the worker's was its own)
        assert err.value.reports == [
            "worker 0 (queue 0): stopped, since the worker on queue 1 failed",
            "worker 1 (queue 1): 0000:00:10.0: IN sectors 0..7: used len 0 does not cover "
            "the data and status byte the device must write; the device has been reset",
            "worker 2 (queue 2): stopped, since the worker on queue 1 failed"]
        assert exit_code(err.value) == 15
        for q in dev.queues:
            assert q.vq.broken


def die_on_queue_2(dev: VirtioBlk, index: int) -> int:
    if index == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)
    return index


def test_kill_9_of_one_worker_resets_the_device_before_anything_is_freed() -> None:
    dev, model = open_mq(3)
    with dev:
        resets = model.resets
        with pytest.raises(WorkerFailed, match="queue 2 failed: the worker was killed by "
                           "SIGKILL without a result") as err:
            run_workers(dev, die_on_queue_2, 3, deadline=60)
        assert model.resets == resets + 1 and model.status == 0
        assert all(r.mm is not None and not r.mm.closed for r in dev._regions)
        assert exit_code(err.value) == 15


def ctrl_c_the_parent(dev: VirtioBlk, index: int) -> int:
    if index == 0:
        os.kill(os.getppid(), signal.SIGINT)
    time.sleep(30)
    return index


def test_ctrl_c_stops_every_worker_and_the_device_resets_once(monkeypatch: Any) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh process
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    dev, model = open_mq(2)
    resets = model.resets
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with dev:
            run_workers(dev, ctrl_c_the_parent, 2, deadline=60)
    assert time.monotonic() - start < 10
    assert model.resets == resets + 1  # close(), once


def test_a_worker_that_outlives_the_deadline_is_a_timeout() -> None:
    dev, model = open_mq(2)
    with dev:
        with pytest.raises(WorkerFailed, match="did not finish within the deadline") as err:
            run_workers(dev, lambda d, i: time.sleep(30), 2, deadline=0.5)
        assert exit_code(err.value) == 33


def test_more_workers_than_queues_is_refused() -> None:
    dev, _ = open_mq(2)
    with dev, pytest.raises(InvalidArgument, match="3 workers need as many queues"):
        run_workers(dev, write_and_read_back, 3, deadline=5)


def test_a_queue_that_is_not_set_up_is_refused() -> None:
    dev, _ = open_mq(2)
    with dev, pytest.raises(InvalidArgument, match="queue 2 is not one of the 2"):
        dev.read(0, 1, queue=2)


def test_a_worker_may_not_allocate_dma_memory() -> None:
    dev, _ = open_mq(2)
    with dev, pytest.raises(WorkerFailed, match="worker 1: allocate DMA buffers before "
                            "the workers start"):
        run_workers(dev, lambda d, i: d.alloc_buffer(4096) if i else time.sleep(30), 2,
                    deadline=30)


def test_after_the_workers_their_queues_are_theirs() -> None:
    dev, model = open_mq(2)
    with dev:
        run_workers(dev, write_and_read_back, 2, deadline=30)
        with pytest.raises(DeviceError, match="queue 0 was driven by a worker process; its "
                           "ring state left with it: close and reopen"):
            dev.read(0, 8)
        assert model.resets == 1  # refused before anything reached the device
