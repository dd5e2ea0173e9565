"""The benchmark's host side without a guest: fio's JSON, medians, the three outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from virtio_user.host import bench_harness, bench_report
from virtio_user.host.session import CommandResult

FIO_READ = {"jobs": [{"error": 0, "usr_cpu": 10.0, "sys_cpu": 30.0, "job_runtime": 5000,
                       "read": {
    "iops": 4000.0, "bw_bytes": 16_384_000, "total_ios": 20000, "runtime": 5000,
    "clat_ns": {"percentile": {"50.000000": 150_000, "99.000000": 400_000,
                               "99.900000": 900_000}}}, "write": {}}]}


def sample(iops: float, p99: float = 400.0, cpu: float | None = None) -> bench_harness.Sample:
    return bench_harness.Sample(iops, iops * 4096 / 1e6, {"p50": 150.0, "p99": p99, "p99.9": 900.0},
                                cpu)


def test_fio_json_gives_iops_mbps_clat_in_microseconds_and_cpu_per_io() -> None:
    s = bench_harness.Sample.from_fio(FIO_READ, "read")
    # 40 % of one CPU for 5 s = 2 CPU seconds over 20000 I/Os = 100 µs each.
    assert s == bench_harness.Sample(4000.0, 16.384, {"p50": 150.0, "p99": 400.0, "p99.9": 900.0},
                                     100.0)


def test_fio_json_without_cpu_figures_gives_none() -> None:
    job = {k: v for k, v in FIO_READ["jobs"][0].items() if k not in ("usr_cpu", "sys_cpu")}
    assert bench_harness.Sample.from_fio({"jobs": [job]}, "read").cpu_us_per_io is None


def test_a_failed_fio_job_is_an_error() -> None:
    with pytest.raises(bench_harness.HarnessError):
        bench_harness.Sample.from_fio({"jobs": [{"error": 5}]}, "read")


def test_our_json_contract() -> None:
    ours = {"rw": "randread", "bs": 4096, "iodepth": 32, "ios": 12345, "seconds": 2.0,
            "iops": 6172.5, "mbps": 25.3, "lat_us": {"p50": 150.0, "p99": 400.0,
                                                     "p99.9": 900.0}, "backend": "uio",
            "wait": "poll", "ring": "split", "cpu_s_per_io": 8.1e-05}
    got = bench_harness.Sample.from_ours(ours)
    assert got == bench_harness.Sample(6172.5, 25.3, ours["lat_us"], pytest.approx(81.0))


def test_medians_are_taken_figure_by_figure() -> None:
    m = bench_harness.median_sample([sample(1000, p99=900, cpu=5.0), sample(3000, p99=100),
                                     sample(2000, cpu=7.0)])
    assert (m.iops, m.lat_us["p99"], m.cpu_us_per_io) == (2000, 400, 6.0)


def test_workload_names_and_the_kernel_command() -> None:
    names = [w.name for w in bench_harness.WORKLOADS]
    assert names == ["randread-4k-qd1", "randread-4k-qd8", "randread-4k-qd32",
                     "randwrite-4k-qd1", "randwrite-4k-qd32", "read-1m-qd8", "write-1m-qd8",
                     "randread-4k-qd16-j2"]
    jobs = bench_harness.WORKLOADS[-1]
    assert {"--numjobs=2", "--group_reporting"} <= set(
        bench_harness.fio_argv("/dev/vdb", jobs, bench_harness.Amount(runtime=5)))
    ours = bench_harness.ours_argv("0000:00:14.0", "uio", jobs, bench_harness.Amount(ios=9))
    assert ours[ours.index("--numjobs") + 1] == "2" and ours[ours.index("--iodepth") + 1] == "16"
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
    assert (first["variant"], first["transport"], first["ring"], first["wait"]) == \
        ("legacy", "legacy", "split", "poll")
    assert "| randread-4k-qd1 | raw | legacy split poll | 3000 | 2000 | 1.50x | " \
        "2.0x **not met** |" in paths[1].read_text()
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def _obj(workload: str, ratio: float, variant: str = "legacy", backend: str = "raw",
         target: float | None = 2.0) -> dict[str, Any]:
    lat = {"p50": 1, "p99": 1, "p99.9": 1}
    return {"workload": workload, "backend_file": backend, "variant": variant,
            "transport": "legacy" if variant == "legacy" else "modern",
            "ring": "packed" if variant == "packed" else "split", "wait": "poll",
            "python_iops": 3000.0 * ratio, "kernel_iops": 3000.0, "ratio": ratio,
            "target": target, "target_met": target is not None and ratio >= target,
            "python_mbps": 1.0, "kernel_mbps": 1.0, "python_lat_us": lat,
            "kernel_lat_us": lat, "runtime_s": 5, "driver_backend": "uio", "image_mib": 1,
            "cache": "writeback", "rounds": 3, "accel": "tcg",
            "machine": {"cpu": "c", "cores": 2, "host_kernel": "k", "qemu": "q", "guest": "g",
                        "commit": "abc1234"},
            "date": "2026-12-08 01:00 UTC", "stub": False}


RUN = [_obj("randread-4k-qd1", 3.07), _obj("randread-4k-qd1", 3.64, "modern"),
       _obj("randread-4k-qd1", 3.53, "packed"), _obj("randwrite-4k-qd1", 2.21, target=None),
       _obj("randread-4k-qd1", 2.88, backend="null-co", target=None)]


def _checkout(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        f"# x\n{bench_report.HEADLINE_BEGIN}\nold headline\n{bench_report.HEADLINE_END}\n"
        "after readme\n")
    (tmp_path / "docs" / "benchmarks.md").write_text(
        f"# b\n{bench_report.RESULTS_BEGIN}\nold table\n{bench_report.RESULTS_END}\n"
        "after page\n")
    return tmp_path


def test_update_docs_writes_the_page_and_the_readme_from_one_run(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    written = bench_report.update_docs(root, RUN, root / "bench" / "results")
    assert written == [root / "docs" / "benchmarks.md", root / "README.md"]
    page, readme = (p.read_text() for p in written)
    assert "old table" not in page and page.endswith(f"{bench_report.RESULTS_END}\nafter page\n")
    assert "![ours / kernel per workload](../bench/results/latest.png)" in page
    assert "| randwrite-4k-qd1 | raw | legacy split poll |" in page  # the full table
    assert "old headline" not in readme
    assert readme.endswith(f"{bench_report.HEADLINE_END}\nafter readme\n")
    # The headline: the targeted raw rows only, legacy with modern and packed beside it.
    assert "| randread-4k-qd1 | 9210 | 3000 | 3.07x | 3.64x | 3.53x | 2.0x met |" in readme
    assert "randwrite-4k-qd1" not in readme and "null-co" not in readme
    assert "[docs/benchmarks.md](docs/benchmarks.md)" in readme
    assert "2026-12-08 01:00 UTC" in page and "2026-12-08 01:00 UTC" in readme


def test_update_docs_writes_neither_file_when_one_lacks_its_markers(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    (root / "README.md").write_text("# no markers\n")
    page_before = (root / "docs" / "benchmarks.md").read_text()
    with pytest.raises(ValueError, match="README.md has no bench:headline markers"):
        bench_report.update_docs(root, RUN, root / "bench" / "results")
    assert (root / "docs" / "benchmarks.md").read_text() == page_before
    (root / "docs" / "benchmarks.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="benchmarks.md has no bench:results markers"):
        bench_report.update_docs(root, RUN, root / "bench" / "results")


def test_headline_leaves_out_variants_not_measured() -> None:
    text = bench_report.to_headline(RUN[:1], "docs/benchmarks.md")
    assert "modern" not in text.splitlines()[0]
    assert "| randread-4k-qd1 | 9210 | 3000 | 3.07x | 2.0x met |" in text


def test_update_docs_and_its_old_name_both_parse() -> None:
    assert bench_harness.parse_args(["--update-docs"]).update_docs is True
    assert bench_harness.parse_args(["--update-readme"]).update_docs is True
    assert bench_harness.parse_args([]).update_docs is False


def test_variants_get_their_own_pairs_and_only_the_workloads_that_tell_them_apart() -> None:
    variants = bench_harness.selected_variants(bench_harness.parse_args([]))
    assert [v.name for v in variants] == ["modern", "packed", "interrupt", "hybrid", "nbd"]
    models = bench_harness.device_models(variants)
    assert models == ["legacy", "modern", "packed"]
    all_pairs = bench_harness.pairs(models)
    # Raw pairs from 00:10.0 in the disks' order, null-co right after them.
    assert [(p.backend_file, p.device, p.ours_bdf, p.kernel_bdf) for p in all_pairs] == [
        ("raw", "legacy", "0000:00:10.0", "0000:00:11.0"),
        ("raw", "modern", "0000:00:12.0", "0000:00:13.0"),
        ("raw", "packed", "0000:00:14.0", "0000:00:15.0"),
        ("null-co", "legacy", "0000:00:16.0", "0000:00:17.0")]
    null_co = bench_harness.null_co_args(64, bench_harness.null_co_slot(models))
    assert "addr=0x16" in " ".join(null_co)
    jobs = bench_harness.plan(all_pairs, bench_harness.WORKLOADS, variants)
    # The wait modes and NBD join the legacy raw rows' jobs: one kernel run per round.
    assert len(jobs) == 2 * 8 + 2 * 3
    assert sum(len(vs) + 1 for _, _, vs in jobs) == 2 * 8 * 2 + 2 * 3 * 2 + 3 * 3
    runs = {(p.device, p.backend_file, w.name): [v.name for v in vs] for p, w, vs in jobs}
    assert runs[("legacy", "raw", "randread-4k-qd1")] == ["legacy", "interrupt", "hybrid",
                                                          "nbd"]
    assert runs[("legacy", "null-co", "randread-4k-qd1")] == ["legacy"]
    assert runs[("legacy", "raw", "randwrite-4k-qd1")] == ["legacy"]
    assert runs[("packed", "raw", "read-1m-qd8")] == ["packed"]
    assert ("modern", "raw", "randwrite-4k-qd1") not in runs


def test_variant_options_as_the_readme_shows_them() -> None:
    one = bench_harness.parse_args(["--variant", "packed", "--variant", "hybrid"])
    assert [v.name for v in bench_harness.selected_variants(one)] == ["packed", "hybrid"]
    assert bench_harness.device_models(bench_harness.selected_variants(one)) == ["legacy", "packed"]
    none = bench_harness.parse_args(["--no-variants"])
    assert bench_harness.selected_variants(none) == []
    assert [p.ours_bdf for p in bench_harness.pairs(["legacy"])] == ["0000:00:10.0",
                                                                     "0000:00:12.0"]
    for bad in (["--variant", "fast"], ["--variant", "modern", "--no-variants"]):
        with pytest.raises(SystemExit):
            bench_harness.parse_args(bad)


def test_our_command_carries_the_variant_as_global_options() -> None:
    packed = next(v for v in bench_harness.VARIANTS if v.name == "packed")
    argv = bench_harness.ours_argv("0000:00:14.0", "uio", bench_harness.WORKLOADS[0],
                                   bench_harness.Amount(ios=4), packed)
    assert argv[:10] == ["virtio-user", "--backend", "uio", "--transport", "modern", "--ring",
                         "packed", "--wait", "poll", "--device"]
    assert argv[argv.index("--device") + 2] == "bench"


def test_variant_rows_in_the_outputs(tmp_path: Path) -> None:
    qd1 = bench_harness.WORKLOADS[0]
    rows = [bench_report.Row(qd1.name, qd1.rw, qd1.bs, qd1.iodepth, dev, qd1.target,
                             ours=sample(3000 if dev == "raw" else 6000, cpu=40.0),
                             kernel=sample(2000 if dev == "raw" else 4000, cpu=60.0))
            for dev in ("raw", "null-co")]
    rows.append(bench_report.Row(qd1.name, qd1.rw, qd1.bs, qd1.iodepth, "raw", qd1.target,
                                 ours=sample(1000, cpu=20.5), kernel=sample(2000),
                                 variant="interrupt", wait="interrupt"))
    rows.append(bench_report.Row(qd1.name, qd1.rw, qd1.bs, qd1.iodepth, "raw", qd1.target,
                                 ours=sample(4000), kernel=sample(2000), variant="packed",
                                 transport="modern", ring="packed"))
    meta = bench_report.Meta("tcg", {"cpu": "CPU", "cores": 2, "host_kernel": "6.1",
                                     "qemu": "7.2", "guest": "q35", "commit": "abc"},
                             "uio", rounds=1, runtime=None, ios=256, cache="writeback",
                             image_mib=64)
    paths = bench_report.write_all(rows, meta, tmp_path)
    objs = json.loads(paths[0].read_text())
    irq, packed = objs[2], objs[3]
    assert (irq["variant"], irq["wait"], irq["ratio"]) == ("interrupt", "interrupt", 0.5)
    assert (irq["python_cpu_us_per_io"], irq["kernel_cpu_us_per_io"]) == (20.5, None)
    assert (packed["transport"], packed["ring"], packed["target_met"]) == \
        ("modern", "packed", True)
    # The null-co ceiling is the legacy rows' figure only.
    assert objs[0]["python_share_of_null_co"] == 0.5
    assert "python_share_of_null_co" not in irq and "python_share_of_null_co" not in packed
    md = paths[1].read_text()
    assert "| randread-4k-qd1 | raw | legacy split interrupt | 1000 | 2000 | 0.50x |" in md
    assert "| randread-4k-qd1 | raw | modern packed poll | 4000 | 2000 | 2.00x |" in md
    assert md.count("| 40.0 / 60.0 |") == 2 and "| 20.5 / ? |" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_wait_modes_alternate_with_one_shared_kernel_run_per_round() -> None:
    calls: list[str] = []

    class FakeRunner:
        def ours(self, pair: object, w: object, v: bench_harness.Variant) -> bench_harness.Sample:
            calls.append(v.name)
            return sample(1000 * (len(calls)))

        def kernel(self, pair: object, w: object) -> bench_harness.Sample:
            calls.append("kernel")
            return sample(500, cpu=3.0)

    waits = [bench_harness.BASE, *[v for v in bench_harness.VARIANTS if v.device == "legacy"]]
    pair = bench_harness.pairs()[0]
    runner: Any = FakeRunner()
    rows = bench_harness.run_all(runner, [pair], bench_harness.WORKLOADS[:1], 2,
                                 lambda _: None, waits[1:])
    assert calls == ["legacy", "interrupt", "hybrid", "nbd", "kernel"] * 2
    assert [(r.variant, r.wait, len(r.ours_rounds), len(r.kernel_rounds)) for r in rows] == [
        ("legacy", "poll", 2, 2), ("interrupt", "interrupt", 2, 2), ("hybrid", "hybrid", 2, 2),
        ("nbd", "interrupt", 2, 2)]
    assert rows[1].ours.iops == (2000 + 7000) / 2 and rows[1].kernel.cpu_us_per_io == 3.0
    # The driver's targets are not the NBD path's.
    assert rows[0].target == 2.0 and rows[3].target is None


class FakeGuest:
    """The guest's side of an NBD run: what each command prints, and the order they ran."""

    def __init__(self, fio_status: int = 0, fio_hangs: bool = False,
                 server_stays: bool = False) -> None:
        self.calls: list[str] = []
        self.fio_status = fio_status
        self.fio_hangs = fio_hangs
        self.server_stays = server_stays
        self.ticks = 0

    def run(self, argv: list[str], timeout: float = 0.0) -> CommandResult:
        assert timeout > 0  # every command in the guest is bounded
        self.calls.append(argv[0] if argv[0] != "virtio-user" else " ".join(argv[-2:]))
        if argv[0] == "fio":
            assert f"--filename={bench_harness.NBD_DEVICE}" in argv
            assert "--runtime=1000ms" in argv and "--time_based" in argv
            self.ticks += 300  # the server's CPU meanwhile: 3 s
            if self.fio_hangs:
                raise bench_harness.HarnessError("timed out waiting for command ['fio']")
            return CommandResult(argv, self.fio_status, json.dumps(FIO_READ).encode(), b"bad")
        if argv[0] == "cat":
            assert argv[1] == "/proc/4242/stat"
            stat = f"4242 (virtio user) S {' '.join(['0'] * 10)} {self.ticks} 100 0"
            return CommandResult(argv, 0, stat.encode(), b"")
        if argv[0] == "timeout" and self.server_stays:
            return CommandResult(argv, 124, b"", b"")
        return CommandResult(argv, 0, b"", b"")

    class Server:
        def __init__(self, guest: "FakeGuest") -> None:
            self.guest = guest

        def run(self, argv: list[str]) -> CommandResult:
            self.guest.calls.append(" ".join(argv[-2:]))
            return CommandResult(argv, 0, b"/dev/nbd0: connected, server pid 4242\n", b"")


def nbd_run(guest: FakeGuest) -> bench_harness.Sample:
    runner = bench_harness.Runner(guest, "uio", bench_harness.Amount(runtime=1.0),  # type: ignore[arg-type]
                                  FakeGuest.Server(guest))  # type: ignore[arg-type]
    nbd = next(v for v in bench_harness.VARIANTS if v.nbd)
    return runner.ours(bench_harness.pairs()[0], bench_harness.WORKLOADS[0], nbd)


def test_nbd_run_connects_runs_fio_on_nbd0_and_disconnects() -> None:
    guest = FakeGuest()
    s = nbd_run(guest)
    assert guest.calls == ["/tmp/virtio-user-bench-nbd.log /dev/nbd0", "cat", "fio", "cat",
                           "-d /dev/nbd0", "timeout"]
    # fio's 100 µs per I/O plus the server's 3 s over 20000 I/Os.
    assert (s.iops, s.cpu_us_per_io) == (4000.0, pytest.approx(250.0))
    nbd = next(v for v in bench_harness.VARIANTS if v.nbd)
    argv = bench_harness.nbd_argv("0000:00:10.0", "uio", nbd)
    assert argv[argv.index("--wait") + 1] == "interrupt"
    assert argv[-3:] == ["--log", bench_harness.NBD_LOG, "/dev/nbd0"]


def test_a_failed_fio_on_nbd_still_disconnects_and_reports_fio() -> None:
    guest = FakeGuest(fio_status=1)
    with pytest.raises(bench_harness.HarnessError, match="fio.*exit status 1"):
        nbd_run(guest)
    assert guest.calls[-4:] == ["cat", "-d /dev/nbd0", "timeout", "tail"]


def test_a_fio_past_its_timeout_on_nbd_still_disconnects() -> None:
    guest = FakeGuest(fio_hangs=True)
    with pytest.raises(bench_harness.HarnessError, match="timed out"):
        nbd_run(guest)
    assert guest.calls[-3:] == ["fio", "-d /dev/nbd0", "timeout"]


def test_a_server_that_outlives_its_disconnect_is_killed_and_the_run_fails() -> None:
    guest = FakeGuest(server_stays=True)
    with pytest.raises(bench_harness.HarnessError, match="pid 4242.*killed"):
        nbd_run(guest)
    assert guest.calls[-4:] == ["-d /dev/nbd0", "timeout", "kill", "tail"]


def test_fio_runs_of_n_ios_are_capped_in_time() -> None:
    argv = bench_harness.fio_argv("/dev/nbd0", bench_harness.WORKLOADS[0],
                                  bench_harness.Amount(ios=256))
    assert f"--runtime={bench_harness.FIO_CAP}s" in argv and "--time_based" not in argv
    assert bench_harness.FIO_CAP + 30 < bench_harness.Amount(ios=256).timeout()
    capped = bench_harness.fio_argv("/dev/nbd0", bench_harness.WORKLOADS[0],
                                    bench_harness.Amount(ios=256), bench_harness.NBD_IOS_CAP)
    assert "--runtime=2s" in capped


def test_nbd_rows_and_the_three_way_table_in_the_outputs(tmp_path: Path) -> None:
    qd1 = bench_harness.WORKLOADS[0]
    rows = [bench_report.Row(qd1.name, qd1.rw, qd1.bs, qd1.iodepth, "raw", qd1.target,
                             ours=sample(3000), kernel=sample(2000)),
            bench_report.Row(qd1.name, qd1.rw, qd1.bs, qd1.iodepth, "raw", None,
                             ours=sample(100, cpu=900.0), kernel=sample(2000, cpu=60.0),
                             variant="nbd", wait="interrupt")]
    meta = bench_report.Meta("tcg", {"cpu": "CPU", "cores": 2, "host_kernel": "6.1",
                                     "qemu": "7.2", "guest": "q35", "commit": "abc"},
                             "uio", rounds=1, runtime=3.0, ios=None, cache="writeback",
                             image_mib=64)
    paths = bench_report.write_all(rows, meta, tmp_path)
    nbd = json.loads(paths[0].read_text())[1]
    assert (nbd["variant"], nbd["ratio"], nbd["target"], nbd["target_met"]) == \
        ("nbd", 0.05, None, None)
    md = paths[1].read_text()
    assert "served by `virtio-user --wait interrupt nbd /dev/nbd0`" in md
    assert "| randread-4k-qd1 | raw | fio on NBD, legacy split interrupt | 100 | 2000 | " \
        "0.05x |  |" in md
    assert "| randread-4k-qd1 | 100, 0.4 (0.050x) | 2000, 8.2 | 3000, 12.3 (1.50x) |" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_the_multi_queue_figure_command_selects_the_two_rows() -> None:
    # docs/multi-queue.md: scripts/bench.sh --only randread-4k-qd32 --only
    # randread-4k-qd16-j2 --no-variants
    args = bench_harness.parse_args(["--only", "randread-4k-qd32", "--only",
                                     "randread-4k-qd16-j2", "--no-variants"])
    assert args.only == ["randread-4k-qd32", "randread-4k-qd16-j2"] and args.no_variants
    picked = [w for w in bench_harness.WORKLOADS if w.name in args.only]
    assert [(w.iodepth, w.numjobs) for w in picked] == [(32, 1), (16, 2)]
