"""A seconds-long run of scripts/bench.sh: every kind of workload through both drivers,
with the options docs/benchmarks.md shows for bench.sh, each in its documented form.

It checks that the benchmark works end to end and writes its three outputs, never how
fast anything is: the targets are benchmark figures, not timed tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from virtio_user.host.bench_harness import (DOCS_ENV, REPO, VARIANT_WORKLOADS, VARIANTS,
                                            WORKLOADS)
from virtio_user.host.bench_report import (DOCS_PAGE, HEADLINE_BEGIN, HEADLINE_END,
                                           NBD_VARIANT, README, RESULTS_BEGIN, RESULTS_END)

pytestmark = pytest.mark.qemu

BENCH = REPO / "scripts" / "bench.sh"

FIGURES = ("python_iops", "kernel_iops", "ratio", "python_mbps", "kernel_mbps")


# Every workload but one, each as the docs show it (`--only randread-4k-qd1`): the left
# out one proves --only excludes; it only differs from its neighbours in queue depth.
LEFT_OUT = "randread-4k-qd8"
RUN = [w.name for w in WORKLOADS if w.name != LEFT_OUT]
IMAGE_MIB, CACHE = 32, "writethrough"  # not --quick's 64 MiB and writeback


def results_block(page: str) -> str:
    return page[page.index(RESULTS_BEGIN):page.index(RESULTS_END)]


def headline_block(readme: str) -> str:
    return readme[readme.index(HEADLINE_BEGIN):readme.index(HEADLINE_END)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run; --update-docs writes copies of the README and the benchmarks page under
    DOCS_ENV, never the checkout's."""
    out = tmp_path_factory.mktemp("bench")
    (out / "docs").mkdir()
    for name in (README, DOCS_PAGE):
        (out / name).write_text((REPO / name).read_text())
    before = (results_block((REPO / DOCS_PAGE).read_text()),
              headline_block((REPO / README).read_text()))
    only = [arg for name in RUN for arg in ("--only", name)]
    variants = [arg for v in VARIANTS for arg in ("--variant", v.name)]
    r = subprocess.run([str(BENCH), "--quick", *only, *variants, "--rounds", "1",
                        "--image-mib", str(IMAGE_MIB), "--cache", CACHE,
                        "--out", str(out), "--update-docs"],
                       env=dict(os.environ, **{DOCS_ENV: str(out)}),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-4000:]}"
    assert (results_block((REPO / DOCS_PAGE).read_text()),
            headline_block((REPO / README).read_text())) == before
    return out


def test_writes_the_three_outputs(results: Path) -> None:
    for name in ("latest.json", "latest.md", "latest.png"):
        assert (results / name).stat().st_size > 0, name
    assert (results / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_has_every_workload_on_both_devices_and_every_variant(results: Path) -> None:
    rows = json.loads((results / "latest.json").read_text())
    got = {(r["workload"], r["backend_file"], r["variant"]) for r in rows}
    assert got == ({(name, b, "legacy") for name in RUN for b in ("raw", "null-co")}
                   | {(name, "raw", v.name) for name in RUN if name in VARIANT_WORKLOADS
                      for v in VARIANTS})
    for r in rows:
        v = next((v for v in VARIANTS if v.name == r["variant"]), None)
        if v is not None:
            assert (r["transport"], r["ring"], r["wait"]) == (v.transport, v.ring, v.wait)
        # CPU per I/O on both sides: our process's, fio's usr+sys (256 I/Os may take
        # less than one clock tick of CPU: 0 then).
        assert r["python_cpu_us_per_io"] >= 0 and r["kernel_cpu_us_per_io"] >= 0, r
    for side in ("python_cpu_us_per_io", "kernel_cpu_us_per_io"):
        assert max(r[side] for r in rows) > 0, side
    for r in rows:
        for key in FIGURES:
            assert r[key] > 0, (r["workload"], r["backend_file"], key)
        for side in ("python_lat_us", "kernel_lat_us"):
            assert all(r[side][p] > 0 for p in ("p50", "p99", "p99.9")), (r["workload"], side)
        assert r["accel"] in ("kvm", "tcg")
        assert r["driver_backend"] == "uio"
        assert {"cpu", "cores", "host_kernel", "qemu"} <= set(r["machine"])


def test_options_reach_the_run(results: Path) -> None:
    for r in json.loads((results / "latest.json").read_text()):
        assert (r["rounds"], r["image_mib"], r["cache"]) == (1, IMAGE_MIB, CACHE)
        assert len(r["python_per_round"]) == len(r["kernel_per_round"]) == 1


def test_update_docs_fills_both_blocks_from_one_run(results: Path) -> None:
    """The full table in docs/benchmarks.md, the headline table in the README."""
    for name, begin, end in ((DOCS_PAGE, RESULTS_BEGIN, RESULTS_END),
                             (README, HEADLINE_BEGIN, HEADLINE_END)):
        text, original = (results / name).read_text(), (REPO / name).read_text()
        # Only the block changed (the checkout's copy may be edited meanwhile: compare ends).
        assert text.startswith(original[:original.index(begin)]), name
        assert text.endswith(original[original.index(end):]), name
    block = results_block((results / DOCS_PAGE).read_text())
    assert "![ours / kernel per workload](../latest.png)" in block
    assert f"devices ({IMAGE_MIB} MiB, raw images with cache={CACHE}" in block
    for r in json.loads((results / "latest.json").read_text()):
        assert f"| {r['workload']} | {r['backend_file']} |" in block
    assert f"| {LEFT_OUT} |" not in block
    headline = headline_block((results / README).read_text())
    date = json.loads((results / "latest.json").read_text())[0]["date"]
    assert date in block and date in headline  # the same run
    assert "| randread-4k-qd1 | " in headline and "[docs/benchmarks.md]" in headline


def test_markdown_table_has_a_row_per_result(results: Path) -> None:
    text = (results / "latest.md").read_text()
    rows = json.loads((results / "latest.json").read_text())
    for r in rows:
        assert f"| {r['workload']} | {r['backend_file']} |" in text


def test_bench_report_redraws_from_the_json(results: Path, tmp_path: Path) -> None:
    """docs/benchmarks.md's `python -m virtio_user.host.bench_report DIR/latest.json`."""
    shutil.copy(results / "latest.json", tmp_path / "latest.json")
    r = subprocess.run([sys.executable, "-m", "virtio_user.host.bench_report",
                        str(tmp_path / "latest.json")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "latest.md").read_text() == (results / "latest.md").read_text()
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nbd_rows_beside_both_drivers(results: Path) -> None:
    """fio on /dev/nbd0 through our driver, on the legacy raw pair: a row per variant
    workload, the kernel's runs shared with the legacy row. Each NBD run disconnected and
    released the device, or the next workload's ``bench`` on it could not have run."""
    rows = json.loads((results / "latest.json").read_text())
    legacy = {r["workload"]: r for r in rows
              if r["variant"] == "legacy" and r["backend_file"] == "raw"}
    nbd = [r for r in rows if r["variant"] == NBD_VARIANT]
    assert sorted(r["workload"] for r in nbd) == sorted(VARIANT_WORKLOADS)
    for r in nbd:
        assert (r["transport"], r["ring"], r["wait"]) == ("legacy", "split", "interrupt")
        assert r["kernel_per_round"] == legacy[r["workload"]]["kernel_per_round"]
        assert r["target"] is None and r["ratio"] > 0
        # fio's CPU plus the server's, against fio's alone on the kernel's driver.
        assert r["python_cpu_us_per_io"] > r["kernel_cpu_us_per_io"], r
    text = (results / "latest.md").read_text()
    assert "virtio-user --wait interrupt nbd /dev/nbd0" in text
    for r in nbd:
        assert f"| {r['workload']} | raw | fio on NBD, legacy split interrupt |" in text
        assert f"| {r['workload']} | {r['python_iops']:.0f}, " in text  # the three-way table


def test_no_variants_measures_the_legacy_rows_only(tmp_path: Path) -> None:
    """The docs' `--no-variants`: four devices, legacy polled rows, no variant's."""
    r = subprocess.run([str(BENCH), "--quick", "--no-variants", "--only", "randread-4k-qd1",
                        "--image-mib", "8", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-4000:]}"
    rows = json.loads((tmp_path / "latest.json").read_text())
    assert {(o["workload"], o["backend_file"], o["variant"], o["transport"], o["ring"],
             o["wait"]) for o in rows} == {
        ("randread-4k-qd1", b, "legacy", "legacy", "split", "poll") for b in ("raw", "null-co")}
