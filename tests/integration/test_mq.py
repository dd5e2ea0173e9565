"""Multi-queue (VIRTIO_BLK_F_MQ) against QEMU's real virtio-blk with ``num-queues=4``,
legacy and modern, split and packed, through uio and vfio, in the lab guest
(tests/lab.py). One worker process per queue (workers.py) writes and reads back its own
range at the same time as the others; the host image is the oracle. Also: kill -9 of a
worker with requests in flight, --queues 1 on a multi-queue device, a device without MQ,
and bench --numjobs. The hostile-completion case is in tests/unit/test_workers.py (a
real QEMU does not misbehave on request).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from images import make_image
from lab import Bay
from virtio_user.host import CommandResult, Disk

pytestmark = pytest.mark.qemu
# The default lab is full (27 slots on its root bus); multi-queue runs in the "next" lab,
# kernel 6.12 under QEMU 10.0 (tests/lab.py).
LAB_GUEST = "next"

SECTOR = 512
GUEST = Path(__file__).resolve().parents[1] / "guest" / "mq_workers.py"
MODERN = {"disable-legacy": "on", "disable-modern": "off"}
LEGACY = {"disable-legacy": "off", "disable-modern": "on"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "multi-queue.md"
DOC_BDF = "0000:00:1d.0"  # the address docs/multi-queue.md's commands name
DISKS = {"legacy4": {**LEGACY, "num-queues": "4"},
         "split4": {**MODERN, "num-queues": "4", "addr": "0x" + DOC_BDF[8:10]},
         "packed4": {**MODERN, "packed": "on", "num-queues": "4"},
         "single": {**MODERN, "num-queues": "1"}}


def lab_disks(d: Path) -> dict[str, Disk]:
    """This module's disks in the lab guest (tests/lab.py)."""
    return {name: Disk(make_image(d / f"{name}.raw", 8, pattern=name.encode() + b"\n"),
                       extra=extra) for name, extra in DISKS.items()}


def vu(bay: Bay, backend: str, disk: str, *args: str | int) -> CommandResult:
    return bay.run(["virtio-user", "--backend", backend, "--device", bay.bdfs[disk],
                    *map(str, args)], timeout=300)


def pattern(queue: int) -> bytes:
    unit = f"queue {queue} of a multi-queue device\n".encode()
    return (unit * (2048 * 512 // len(unit) + 1))[:2048 * 512]


@pytest.mark.parametrize("backend,disks", [("uio", ["legacy4", "split4", "packed4"]),
                                           ("vfio", ["legacy4", "packed4"])])
def test_every_queue_carries_verified_io_from_its_own_worker(bay: Bay, backend: str,
                                                             disks: list[str]) -> None:
    r = bay.run(["python", str(GUEST), backend, "verify", *(bay.bdfs[d] for d in disks)])
    assert r.status == 0, r.err
    results = [json.loads(line) for line in r.out.splitlines()]
    for disk, res in zip(disks, results, strict=True):
        info = res["info"]
        assert info["num_queues_offered"] == 4 and info["num_queues"] == 4
        assert "VIRTIO_BLK_F_MQ" in info["features_negotiated"]
        assert info["ring"] == ("packed" if disk == "packed4" else "split")
        assert info["transport"] == ("legacy" if disk == "legacy4" else "modern")
        jobs = res["jobs"]
        assert [j["queue"] for j in jobs] == [0, 1, 2, 3] and len({j["pid"] for j in jobs}) == 4
        assert all(j["completed"] > 0 and j["kicks"] > 0 for j in jobs), jobs
        with bay.images[disk].open("rb") as f:
            for queue in range(4):
                f.seek((queue + 1) * 2048 * SECTOR)
                assert f.read(2048 * SECTOR) == pattern(queue), (disk, queue)


def test_kill_9_of_one_worker_resets_the_device_before_its_memory_goes(bay: Bay) -> None:
    r = bay.run(["python", str(GUEST), "vfio", "kill", bay.bdfs["packed4"]])
    assert r.status == 0, r.err
    out = r.out.splitlines()
    assert any(line.startswith("error") and "the worker on queue 2 failed: the worker was "
               "killed by SIGKILL without a result; the device has been reset" in line
               for line in out), r.out
    assert "status after 0" in out
    reports = [line for line in out if line.startswith("report")]
    assert len(reports) == 4 and "stopped, since the worker on queue 2 failed" in reports[0]
    # Every reset (the parent's after the death, then close's) came while all of the
    # DMA memory was still mapped; and the device works again afterwards.
    assert "resets with memory still mapped [('reset', True), ('reset', True)]" in out
    assert "reopened 4096" in out


def test_queues_default_and_queues_1_on_a_multi_queue_device(bay: Bay) -> None:
    info = json.loads(vu(bay, "uio", "packed4", "info", "--json").out)
    assert (info["num_queues_offered"], info["num_queues"]) == (4, 2)  # one per vCPU
    r = vu(bay, "uio", "packed4", "--queues", "1", "info", "--json")
    assert r.status == 0, r.err
    info = json.loads(r.out)
    assert (info["num_queues_offered"], info["num_queues"]) == (4, 1)
    r = vu(bay, "uio", "packed4", "--queues", "1", "bench", "--numjobs", "2", "--ios", 10)
    assert r.status == 1 and "has 1 set up (it offers 4; see --queues)" in r.err
    r = vu(bay, "uio", "packed4", "--queues", "5", "info")
    assert r.status == 1 and "--queues 5 exceeds the 4 request queues" in r.err


def test_a_device_without_mq_has_one_queue(bay: Bay) -> None:
    r = vu(bay, "uio", "single", "info")
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    assert f"{'num_queues_offered':20} 1" in lines and f"{'num_queues':20} 1" in lines
    assert "VIRTIO_BLK_F_MQ" not in r.out
    data = vu(bay, "uio", "single", "read", 0, 1)
    assert data.stdout == bay.images["single"].read_bytes()[:SECTOR]


def doc_commands() -> list[str]:
    """The ``virtio-user`` command lines of docs/multi-queue.md's code blocks."""
    blocks = DOC.read_text().split("```")[1::2]
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("virtio-user ")]


def test_the_docs_commands_run_as_written(bay: Bay) -> None:
    commands = doc_commands()
    assert len(commands) == 4 and all(DOC_BDF in c for c in commands)
    assert bay.bdfs["split4"] == DOC_BDF
    for command in commands:
        r = bay.run(command.split())
        assert r.status == 0, f"{command}: exit {r.status}: {r.err}"
        if "--json" in command and " info" in command:
            info = json.loads(r.out)
            assert (info["num_queues_offered"], info["num_queues"]) == (4, 4)
        elif " info" in command:
            lines = r.out.splitlines()
            assert f"{'num_queues_offered':20} 4" in lines and f"{'num_queues':20} 2" in lines
        elif "--json" in command:  # --queues 4: every queue the device offers, a job each
            result = json.loads(r.out)
            assert [j["queue"] for j in result["jobs"]] == [0, 1, 2, 3]
            assert result["ios"] == 2000 and result["verified_blocks"] > 0
            assert result["cpu_s_per_io"] > 0
        else:
            out = r.out.splitlines()
            assert "numjobs=2" in out[0] and "2000 ios" in out[0], r.out
            assert out[-1].startswith("  job 1 (queue 1): IOPS")


def test_each_job_sleeps_on_its_own_queues_interrupt(bay: Bay) -> None:
    # vfio: MSI-X vector 1 + i for queue i (QEMU gives num-queues + 1 vectors).
    for disk in ("packed4",):
        r = vu(bay, "vfio", disk, "--wait", "interrupt", "bench", "--numjobs", 2,
               "--iodepth", 4, "--ios", 300, "--rw", "randread", "--verify", "--json")
        assert r.status == 0, r.err
        result = json.loads(r.out)
        assert result["ios"] == 600 and result["wait"] == "interrupt"
        for job in result["jobs"]:
            assert job["irq"] == "vfio-msix" and job["sleeps"] > 0, job
            assert job["interrupts"] > 0, job
    # uio: one INTx line for the device; refused with the reason, nothing written.
    before = bay.images["legacy4"].read_bytes()
    r = vu(bay, "uio", "legacy4", "--wait", "interrupt", "bench", "--numjobs", 2,
           "--ios", 10, "--rw", "randwrite")
    assert r.status == 5 and "uio has one INTx line for the whole device" in r.err
    assert bay.images["legacy4"].read_bytes() == before
