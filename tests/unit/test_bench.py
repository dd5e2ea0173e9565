"""virtio-user bench on the fake device: the batch loop, its results and verify pass."""

from __future__ import annotations

import json
from typing import Any

import pytest

from test_cli import Env
from virtio_user.bench import VERIFY_BLOCKS
from virtio_user.spec import Feature
from fake_device import DEFAULT_FEATURES


BS = 8192


@pytest.mark.parametrize("rw", ["randread", "randwrite", "read", "write"])
@pytest.mark.parametrize("depth", [1, 8, 32])
def test_bench_runs_the_asked_number_of_ios(rw: str, depth: int, capsys: Any) -> None:
    env = Env()
    assert env.run("bench", "--rw", rw, "--bs", "4k", "--iodepth", depth, "--ios", 300,
                   "--verify", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ios"] == 300
    assert (result["rw"], result["bs"], result["iodepth"]) == (rw, 4096, depth)
    assert result["iops"] > 0 and result["mbps"] > 0
    lat = result["lat_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"]
    assert result["verified_blocks"] == VERIFY_BLOCKS
    # The model completes a whole batch at its notify, so every reap takes all `depth`
    # requests and resubmits them with one kick: one kick per batch of `depth`.
    assert result["kicks"] == -(-300 // depth)


def test_bench_writes_land_on_the_disk(capsys: Any) -> None:
    env = Env()
    before = bytes(env.device.disk)
    assert env.run("bench", "--rw", "write", "--bs", "8k", "--iodepth", 4, "--ios", 16) == 0
    after = bytes(env.device.disk)
    blocks = [after[i * BS:(i + 1) * BS] for i in range(16)]
    # Sequential: blocks 0..15, the 4 buffers (distinct contents) taking turns in order.
    assert len(set(blocks[:4])) == 4
    assert blocks == blocks[:4] * 4
    assert all(block != before[i * BS:(i + 1) * BS] for i, block in enumerate(blocks))
    assert after[16 * BS:] == before[16 * BS:]
    out = capsys.readouterr().out
    assert out.startswith("write bs=8192 iodepth=4 backend=fake ring=split: 16 ios in ")
    assert "kicks 4" in out


@pytest.mark.parametrize("args,text", [
    (["--bs", "1000"], "multiple of 512"),
    (["--bs", "2M"], "512 to 1M"),
    (["--iodepth", "0"], "at least 1"),
    (["--ios", "5", "--runtime", "1"], "not both"),
    (["--iodepth", "100000"], "queue size"),
    (["--rw", "sideways"], "invalid choice"),
])
def test_bench_refuses_bad_options(args: list[str], text: str, capsys: Any) -> None:
    env = Env()
    extra = [] if "--ios" in args else ["--ios", "1"]
    assert env.run("bench", *args, *extra) == 1
    assert text in capsys.readouterr().err


def test_bench_write_to_read_only_device_is_exit_7(capsys: Any) -> None:
    env = Env(features=DEFAULT_FEATURES | Feature.VIRTIO_BLK_F_RO)
    before = bytes(env.device.disk)
    assert env.run("bench", "--rw", "randwrite", "--ios", 10) == 7
    assert bytes(env.device.disk) == before


def test_qd1_keeps_one_request_at_the_device_at_a_time(capsys: Any) -> None:
    """The next request is built while the current one is out, but published only when
    that one has completed. The model serves requests only when the driver waits for
    one, so each wait must find exactly one request published."""
    env = Env()
    env.device.auto = False
    served: list[int] = []

    def opener(args: Any) -> Any:
        blk = Env.opener(env, args)
        blk.queue._await_used = lambda timeout: served.append(env.device.process())
        return blk
    env.opener = opener  # type: ignore[method-assign]
    assert env.run("bench", "--rw", "randread", "--iodepth", 1, "--ios", 200, "--verify",
                   "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ios"] == 200 and result["kicks"] == 200
    assert served[:200] == [1] * 200  # (then the verify pass, at its own depth)


@pytest.mark.parametrize("depth", [1, 6, 16])
def test_iodepth_counts_the_descriptors_a_request_takes_without_indirect(
        depth: int, capsys: Any) -> None:
    """Without indirect descriptors a 4 KiB request is a chain of three (header, data,
    status): depth 6 on a 16-entry queue passed the old check and then failed with
    QueueFull, exit 99. Depth 1 keeps two requests in the ring (one built ahead)."""
    env = Env(queue_size=16, features=DEFAULT_FEATURES & ~Feature.VIRTIO_RING_F_INDIRECT_DESC)
    code = env.run("bench", "--bs", "4k", "--iodepth", depth, "--ios", 50)
    err = capsys.readouterr().err
    if depth == 1:
        assert code == 0, err
        return
    assert code == 1, err
    assert f"--iodepth {depth} needs {3 * depth} descriptors" in err
    assert "queue size 16" in err
    assert env.device.requests == [], "refused before anything reached the device"


def test_iodepth_that_fits_three_descriptors_each_runs(capsys: Any) -> None:
    env = Env(queue_size=16, features=DEFAULT_FEATURES & ~Feature.VIRTIO_RING_F_INDIRECT_DESC)
    assert env.run("bench", "--bs", "4k", "--iodepth", 5, "--ios", 50) == 0


class MqEnv(Env):
    """Env with a multi-queue device, the CLI's --queues passed through."""

    def opener(self, args: Any) -> Any:
        from virtio_user.blk import VirtioBlk
        from fake_device import FakeBackend
        self.opened += 1
        return VirtioBlk(FakeBackend(self.device), timeout=args.timeout, queues=args.queues)


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_bench_numjobs_runs_one_worker_per_queue_and_sums(rw: str, capsys: Any,
                                                          monkeypatch: Any) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    env = MqEnv(num_queues=2)
    assert env.run("bench", "--rw", rw, "--bs", "4k", "--iodepth", 8, "--ios", 200,
                   "--numjobs", 2, "--verify", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    jobs = result["jobs"]
    assert result["numjobs"] == 2 and [j["queue"] for j in jobs] == [0, 1]
    assert result["ios"] == 400 and [j["ios"] for j in jobs] == [200, 200]
    assert result["cpu_s"] == pytest.approx(sum(j["cpu_s"] for j in jobs), abs=0.002)
    assert result["cpu_s_per_io"] > 0
    assert result["verified_blocks"] == sum(j["verified_blocks"] for j in jobs) > 2 * 150
    assert result["iops"] == pytest.approx(400 / max(j["seconds"] for j in jobs), rel=0.01)
    assert "_lat" not in jobs[0] and 0 < result["lat_us"]["p50"] <= result["lat_us"]["p99"]
    # the text form: the total, then a line per job
    assert env.run("bench", "--bs", "4k", "--iodepth", 4, "--ios", 50, "--numjobs", 2) == 0
    out = capsys.readouterr().out.splitlines()
    assert "numjobs=2" in out[0] and "100 ios" in out[0]
    assert [line.split(":")[0] for line in out[-2:]] == ["  job 0 (queue 0)", "  job 1 (queue 1)"]


def test_bench_numjobs_beyond_the_queues_is_refused(capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    env = MqEnv(num_queues=4)
    assert env.run("--queues", 1, "bench", "--ios", 10, "--numjobs", 2) == 1
    assert ("--numjobs 2 needs as many request queues; 0000:00:10.0 has 1 set up "
            "(it offers 4; see --queues)") in capsys.readouterr().err
    assert env.run("bench", "--ios", 10, "--numjobs", 0) == 1
    assert "--numjobs 0 must be from 1 to 64" in capsys.readouterr().err
