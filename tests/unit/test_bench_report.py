"""The benchmark's host side without a guest: fio's JSON, medians, the three outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtio_user.host import bench_harness, bench_report

FIO_READ = {"jobs": [{"error": 0, "read": {
    "iops": 4000.0, "bw_bytes": 16_384_000,
    "clat_ns": {"percentile": {"50.000000": 150_000, "99.000000": 400_000,
                               "99.900000": 900_000}}}, "write": {}}]}


def sample(iops: float, p99: float = 400.0) -> bench_harness.Sample:
    return bench_harness.Sample(iops, iops * 4096 / 1e6, {"p50": 150.0, "p99": p99, "p99.9": 900.0})


def test_fio_json_gives_iops_mbps_and_clat_in_microseconds() -> None:
    s = bench_harness.Sample.from_fio(FIO_READ, "read")
    assert s == bench_harness.Sample(4000.0, 16.384, {"p50": 150.0, "p99": 400.0, "p99.9": 900.0})


def test_a_failed_fio_job_is_an_error() -> None:
    with pytest.raises(bench_harness.HarnessError):
        bench_harness.Sample.from_fio({"jobs": [{"error": 5}]}, "read")


def test_our_json_contract() -> None:
    ours = {"rw": "randread", "bs": 4096, "iodepth": 32, "ios": 12345, "seconds": 2.0,
            "iops": 6172.5, "mbps": 25.3, "lat_us": {"p50": 150.0, "p99": 400.0,
                                                     "p99.9": 900.0}, "backend": "uio"}
    assert bench_harness.Sample.from_ours(ours) == bench_harness.Sample(6172.5, 25.3, ours["lat_us"])


def test_medians_are_taken_figure_by_figure() -> None:
    m = bench_harness.median_sample([sample(1000, p99=900), sample(3000, p99=100), sample(2000)])
    assert (m.iops, m.lat_us["p99"]) == (2000, 400)


def test_workload_names_and_the_kernel_command() -> None:
    names = [w.name for w in bench_harness.WORKLOADS]
    assert names == ["randread-4k-qd1", "randread-4k-qd8", "randread-4k-qd32",
                     "randwrite-4k-qd1", "randwrite-4k-qd32", "read-1m-qd8", "write-1m-qd8"]
    argv = bench_harness.fio_argv("/dev/vdb", bench_harness.WORKLOADS[2], bench_harness.Amount(runtime=5))
    for opt in ("--ioengine=io_uring", "--direct=1", "--rw=randread", "--bs=4096",
                "--iodepth=32", "--runtime=5000ms", "--time_based"):
        assert opt in argv
    assert "--io_size=4194304" in bench_harness.fio_argv("/dev/vdb", bench_harness.WORKLOADS[5],
                                                 bench_harness.Amount(ios=4))


def test_outputs(tmp_path: Path) -> None:
    rows = [bench_report.Row(w.name, w.rw, w.bs, w.iodepth, dev, w.target,
                             ours=sample(3000 if dev == "raw" else 6000),
                             kernel=sample(2000 if dev == "raw" else 4000))
            for dev in ("raw", "null-co") for w in bench_harness.WORKLOADS]
    meta = bench_report.Meta("tcg", {"cpu": "CPU", "cores": 2, "host_kernel": "6.1",
                                     "qemu": "7.2", "guest": "q35", "commit": "abc"},
                             "uio", rounds=3, runtime=5.0, ios=None, cache="writeback",
                             image_mib=1024)
    paths = bench_report.write_all(rows, meta, tmp_path)
    assert [p.name for p in paths] == ["latest.json", "latest.md", "latest.png"]
    objs = json.loads(paths[0].read_text())
    first = objs[0]
    assert (first["ratio"], first["target"], first["target_met"]) == (1.5, 2.0, False)
    assert first["python_share_of_null_co"] == 0.5
    assert all(o["target"] is None for o in objs if o["backend_file"] == "null-co")
    assert "| randread-4k-qd1 | raw | 3000 | 2000 | 1.50x | 2.0x **not met** |" in \
        paths[1].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_readme_block_is_replaced_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{bench_report.README_BEGIN}\nold\n{bench_report.README_END}\n"
                      "after\n")
    objs = [{"workload": "w", "backend_file": "raw", "python_iops": 1.0, "kernel_iops": 1.0,
             "ratio": 1.0, "target": None, "python_mbps": 1.0, "kernel_mbps": 1.0,
             "python_lat_us": {"p50": 1, "p99": 1, "p99.9": 1},
             "kernel_lat_us": {"p50": 1, "p99": 1, "p99.9": 1}, "runtime_s": 5,
             "driver_backend": "uio", "image_mib": 1, "cache": "writeback", "rounds": 3,
             "accel": "tcg", "machine": {"cpu": "c", "cores": 2, "host_kernel": "k",
                                         "qemu": "q", "guest": "g", "commit": "x"},
             "date": "d", "stub": False}]
    assert bench_report.update_readme(readme, objs, tmp_path / "bench" / "results")
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{bench_report.README_END}\nafter\n")
    assert "![ours / kernel per workload](bench/results/latest.png)" in text
