"""A seconds-long run of scripts/bench.sh: every workload through both drivers (issue 5).

It checks that the benchmark works end to end and writes its three outputs, never how
fast anything is: the targets are benchmark figures, not timed tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from virtio_user.host.bench import REPO, WORKLOADS

pytestmark = pytest.mark.qemu

BENCH = REPO / "scripts" / "bench.sh"

FIGURES = ("python_iops", "kernel_iops", "ratio", "python_mbps", "kernel_mbps")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([str(BENCH), "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-4000:]}"
    return out


def test_writes_the_three_outputs(results: Path) -> None:
    for name in ("latest.json", "latest.md", "latest.png"):
        assert (results / name).stat().st_size > 0, name
    assert (results / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_has_every_workload_on_both_devices(results: Path) -> None:
    rows = json.loads((results / "latest.json").read_text())
    got = {(r["workload"], r["backend_file"]) for r in rows}
    assert got == {(w.name, b) for w in WORKLOADS for b in ("raw", "null-co")}
    for r in rows:
        for key in FIGURES:
            assert r[key] > 0, (r["workload"], r["backend_file"], key)
        for side in ("python_lat_us", "kernel_lat_us"):
            assert all(r[side][p] > 0 for p in ("p50", "p99", "p99.9")), (r["workload"], side)
        assert r["accel"] in ("kvm", "tcg")
        assert r["driver_backend"] == "uio"
        assert {"cpu", "cores", "host_kernel", "qemu"} <= set(r["machine"])


def test_markdown_table_has_a_row_per_result(results: Path) -> None:
    text = (results / "latest.md").read_text()
    rows = json.loads((results / "latest.json").read_text())
    for r in rows:
        assert f"| {r['workload']} | {r['backend_file']} |" in text
