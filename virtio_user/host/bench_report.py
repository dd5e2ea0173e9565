"""The benchmark's outputs: latest.json, latest.md and latest.png.

Kept apart from the orchestration (bench_harness.py) so a report can be redrawn from a JSON file
without booting anything: ``python -m virtio_user.host.bench_report results/latest.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

PERCENTILES = ("p50", "p99", "p99.9")
BACKENDS = ("raw", "null-co")
BASE_VARIANT = "legacy"
NBD_VARIANT = "nbd"  # "ours" is fio on /dev/nbd0, served by our driver
REPO = Path(__file__).resolve().parents[2]


class Figures(Protocol):
    """One side's figures (bench.Sample): what fio and ``virtio-user bench`` report."""
    @property
    def iops(self) -> float: ...
    @property
    def mbps(self) -> float: ...
    @property
    def lat_us(self) -> dict[str, float]: ...
    @property
    def cpu_us_per_io(self) -> float | None: ...


@dataclass
class Row:
    """One workload on one pair of devices: the medians of both sides."""
    workload: str
    rw: str
    bs: int
    iodepth: int
    backend_file: str
    target: float | None
    ours: Figures
    kernel: Figures
    ours_rounds: Sequence[Figures] = ()
    kernel_rounds: Sequence[Figures] = ()
    # Which device model and driver setting: "legacy" (the legacy split-ring device,
    # polled, every workload) or a variant measured beside it on its own pair.
    variant: str = BASE_VARIANT
    transport: str = "legacy"
    ring: str = "split"
    wait: str = "poll"

    @property
    def ratio(self) -> float:
        # Same block size on both sides, so this is the bandwidth ratio too.
        return self.ours.iops / self.kernel.iops if self.kernel.iops else 0.0


@dataclass
class Meta:
    """How the figures were taken: the same for every row of one run."""
    accel: str
    machine: dict[str, Any]
    driver_backend: str
    rounds: int
    runtime: float | None
    ios: int | None
    cache: str
    image_mib: int
    stub: bool = False
    date: str = field(default_factory=lambda: datetime.now(timezone.utc)
                      .strftime("%Y-%m-%d %H:%M UTC"))

    def per_run(self) -> str:
        return f"{self.runtime:g} s" if self.runtime else f"{self.ios} I/Os"


# -- the machine -------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip().splitlines() or ["unknown"])[0]


def machine_info(guest: str = "q35, 2 vCPUs, 1024 MiB") -> dict[str, Any]:
    qemu = _first_line(["qemu-system-x86_64", "--version"])
    match = re.search(r"version (\S+)", qemu)
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "host_kernel": platform.release(),
            "qemu": match.group(1) if match else qemu, "guest": guest,
            "commit": _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])}


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, host kernel "
            f"{machine['host_kernel']}, QEMU {machine['qemu']}")


# -- JSON --------------------------------------------------------------------------------

def _cpu(s: Figures) -> float | None:
    return None if s.cpu_us_per_io is None else round(s.cpu_us_per_io, 2)


def _figures(s: Figures) -> dict[str, Any]:
    return {"iops": round(s.iops, 1), "mbps": round(s.mbps, 2),
            "lat_us": {k: round(v, 1) for k, v in s.lat_us.items()},
            "cpu_us_per_io": _cpu(s)}


def variant_label(obj: dict[str, Any]) -> str:
    """How a row's devices and our driver were set up, e.g. "modern packed poll"."""
    setup = (f"{obj.get('transport', 'legacy')} {obj.get('ring', 'split')} "
             f"{obj.get('wait', 'poll')}")
    return f"fio on NBD, {setup}" if obj.get("variant") == NBD_VARIANT else setup


def is_base(obj: dict[str, Any]) -> bool:
    return bool(obj.get("variant", BASE_VARIANT) == BASE_VARIANT)


def _ceiling(rows: Sequence[Row]) -> dict[str, tuple[float, float]]:
    """Per workload, the raw image's IOPS as a share of null-co's, for ours and kernel."""
    base = [r for r in rows if r.variant == BASE_VARIANT]
    null = {r.workload: r for r in base if r.backend_file == "null-co"}
    out = {}
    for r in base:
        n = null.get(r.workload)
        if r.backend_file == "raw" and n is not None and n.ours.iops and n.kernel.iops:
            out[r.workload] = (r.ours.iops / n.ours.iops, r.kernel.iops / n.kernel.iops)
    return out


def to_json(rows: Sequence[Row], meta: Meta) -> list[dict[str, Any]]:
    ceiling = _ceiling(rows)
    out = []
    for r in rows:
        obj: dict[str, Any] = {
            "workload": r.workload, "rw": r.rw, "bs": r.bs, "iodepth": r.iodepth,
            "backend_file": r.backend_file, "variant": r.variant, "transport": r.transport,
            "ring": r.ring, "wait": r.wait,
            "python_iops": round(r.ours.iops, 1), "kernel_iops": round(r.kernel.iops, 1),
            "ratio": round(r.ratio, 3),
            "python_mbps": round(r.ours.mbps, 2), "kernel_mbps": round(r.kernel.mbps, 2),
            "python_lat_us": {k: round(v, 1) for k, v in r.ours.lat_us.items()},
            "kernel_lat_us": {k: round(v, 1) for k, v in r.kernel.lat_us.items()},
            "python_cpu_us_per_io": _cpu(r.ours), "kernel_cpu_us_per_io": _cpu(r.kernel),
            "target": r.target if r.backend_file == "raw" else None,
            "target_met": (r.ratio >= r.target) if r.target and r.backend_file == "raw"
            else None,
        }
        if r.backend_file == "raw" and r.variant == BASE_VARIANT and r.workload in ceiling:
            obj["python_share_of_null_co"] = round(ceiling[r.workload][0], 3)
            obj["kernel_share_of_null_co"] = round(ceiling[r.workload][1], 3)
        obj.update({
            "accel": meta.accel, "machine": meta.machine,
            "driver_backend": meta.driver_backend, "rounds": meta.rounds,
            "runtime_s": meta.runtime, "ios_per_run": meta.ios, "cache": meta.cache,
            "image_mib": meta.image_mib, "date": meta.date, "stub": meta.stub,
            "python_per_round": [_figures(s) for s in r.ours_rounds],
            "kernel_per_round": [_figures(s) for s in r.kernel_rounds],
        })
        out.append(obj)
    return out


# -- markdown ----------------------------------------------------------------------------

def _lat(lat: dict[str, float]) -> str:
    return " / ".join(f"{lat[k]:.0f}" for k in PERCENTILES)


def _cpu_cell(obj: dict[str, Any]) -> str:
    """CPU µs per I/O, ours / kernel (ours: process user+system; kernel: fio's usr+sys)."""
    ours, kernel = obj.get("python_cpu_us_per_io"), obj.get("kernel_cpu_us_per_io")
    if ours is None and kernel is None:
        return ""
    return " / ".join("?" if v is None else f"{v:.1f}" for v in (ours, kernel))


def _target(obj: dict[str, Any]) -> str:
    if obj["target"] is None:
        return ""
    return f"{obj['target']:.1f}x {'met' if obj['target_met'] else '**not met**'}"


def to_markdown(objs: Sequence[dict[str, Any]]) -> str:
    first = objs[0]
    runs = (f"{first['runtime_s']:g} s" if first["runtime_s"] else f"{first['ios_per_run']} I/Os")
    lines = [
        f"Ours: `virtio-user --backend {first['driver_backend']} bench`. Kernel: virtio_blk "
        "with `fio --ioengine=io_uring --direct=1`. Same guest, identical virtio-blk "
        f"devices ({first['image_mib']} MiB, raw images with cache={first['cache']}, or "
        f"null-co; legacy unless the setup says modern). Medians of {first['rounds']} "
        f"alternating rounds of {runs}.",
        "",
        "Setup: device transport, ring and our `--wait` (the kernel's virtio_blk gets an "
        "identical device: on a packed device it uses the packed ring too, and it always "
        "waits for interrupts). CPU: µs of CPU per I/O, ours (process user + system) / the "
        "kernel's (fio's usr + sys; interrupt work done outside fio's process is not "
        "counted).",
        "",
    ]
    nbd = [o for o in objs if o.get("variant") == NBD_VARIANT]
    if nbd:
        lines += [
            f"fio on NBD: the same fio on `/dev/nbd0`, served by `virtio-user --wait "
            f"{nbd[0]['wait']} nbd /dev/nbd0` on our device of the legacy raw pair (the "
            "kernel's block layer and nbd driver, a socketpair, then our driver); its CPU "
            "is fio's plus the server process's.",
            "",
        ]
    lines += [
        f"Accel **{first['accel']}**; {machine_line(first['machine'])}; guest "
        f"{first['machine']['guest']}; commit {first['machine']['commit']}; {first['date']}.",
        "",
    ]
    if first["stub"]:
        lines += ["**STAND-IN RUN: our side ran fio through the kernel; not a result.**", ""]
    lines += [
        "| workload | device | setup | ours IOPS | kernel IOPS | ours/kernel | target "
        "| ours MB/s | kernel MB/s | ours p50/p99/p99.9 µs | kernel p50/p99/p99.9 µs "
        "| CPU µs/IO ours / kernel |",
        "|---|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for o in objs:
        lines.append(
            f"| {o['workload']} | {o['backend_file']} | {variant_label(o)} "
            f"| {o['python_iops']:.0f} | {o['kernel_iops']:.0f} | {o['ratio']:.2f}x "
            f"| {_target(o)} | {o['python_mbps']:.1f} | {o['kernel_mbps']:.1f} "
            f"| {_lat(o['python_lat_us'])} | {_lat(o['kernel_lat_us'])} | {_cpu_cell(o)} |")
    lines += _nbd_table(objs)
    shares = [o for o in objs if "python_share_of_null_co" in o]
    if shares:
        lines += ["", "How close each driver gets to the device emulation's ceiling "
                  "(IOPS on the raw image / IOPS on null-co, same driver):", "",
                  "| workload | ours | kernel |", "|---|--:|--:|"]
        lines += [f"| {o['workload']} | {o['python_share_of_null_co']:.2f} "
                  f"| {o['kernel_share_of_null_co']:.2f} |" for o in shares]
    return "\n".join(lines) + "\n"


def _nbd_table(objs: Sequence[dict[str, Any]]) -> list[str]:
    """The NBD rows beside both drivers on the same raw pair: three columns of IOPS."""
    bench = {o["workload"]: o for o in objs if is_base(o) and o["backend_file"] == "raw"}
    nbd = [o for o in objs if o.get("variant") == NBD_VARIANT]
    if not nbd:
        return []
    lines = ["", "The same raw pair three ways (IOPS, MB/s; ratio to the kernel's virtio_blk):",
             "", "| workload | fio on `/dev/nbd0` (our driver) | fio on the kernel's virtio_blk "
             "| `virtio-user bench` |", "|---|--:|--:|--:|"]
    for o in nbd:
        b = bench.get(o["workload"])
        ours = ("" if b is None else f"{b['python_iops']:.0f}, {b['python_mbps']:.1f} "
                f"({b['ratio']:.2f}x)")
        lines.append(f"| {o['workload']} | {o['python_iops']:.0f}, {o['python_mbps']:.1f} "
                     f"({o['ratio']:.3f}x) | {o['kernel_iops']:.0f}, {o['kernel_mbps']:.1f} "
                     f"| {ours} |")
    return lines


# -- the chart ---------------------------------------------------------------------------

COLOURS = {"raw": "#3b75af", "null-co": "#9fc2e0", "ours": "#3b75af", "kernel": "#e1812c",
           "raw modern": "#2ca02c", "raw packed": "#98df8a", "raw interrupt": "#9467bd",
           "raw hybrid": "#c5b0d5", "raw nbd (fio on /dev/nbd0)": "#8c564b"}


def _bars(ax: Any, names: list[str], series: dict[str, list[float | None]], fmt: str,
          base: float = 0.0) -> tuple[float, float]:
    """Grouped bars growing from ``base``, values at their ends (None: no bar); returns
    (lowest, highest)."""
    width = 0.8 / len(series)
    low, high = base, base
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(names))]
        bars = ax.bar(xs, [0.0 if v is None else v - base for v in values], width,
                      bottom=base, label=label,
                      color=COLOURS.get(label, COLOURS[label.split()[0]]))
        ax.bar_label(bars, ["" if v is None else fmt.format(v) for v in values],
                     fontsize=6 if len(series) > 3 else 7, padding=2)
        present = [v for v in values if v is not None]
        low, high = min([low, *present]), max([high, *present])
    ax.set_xticks(range(len(names)), [n.replace("-", "\n", 1) for n in names], fontsize=8)
    return low, high


def _ratio_panel(ax: Any, objs: Sequence[dict[str, Any]], names: list[str]) -> None:
    """Ours / kernel on a log scale, bars from 1.0: 2x faster and 2x slower look alike."""
    by = {(o["workload"], o["backend_file"]): o for o in objs if is_base(o)}
    series: dict[str, list[float | None]] = {
        f"{b} device": [by[(n, b)]["ratio"] if (n, b) in by else None for n in names]
        for b in BACKENDS if any(o["backend_file"] == b and is_base(o) for o in objs)}
    variants = {(o["workload"], o["variant"]): o for o in objs if not is_base(o)}
    for v in dict.fromkeys(o["variant"] for o in objs if not is_base(o)):
        label = f"raw {v} (fio on /dev/nbd0)" if v == NBD_VARIANT else f"raw {v}"
        series[label] = [variants[(n, v)]["ratio"] if (n, v) in variants else None
                              for n in names]
    ax.set_yscale("log", base=2)
    low, high = _bars(ax, names, series, "{:.2f}x", base=1.0)
    ax.axhline(1.0, color="black", linewidth=1, label="as fast as the kernel")
    for x, n in enumerate(names):
        target = by.get((n, "raw"), {}).get("target")
        if target:
            # Over the raw-device bar only: the targets are about real images.
            left = x - 0.45 if len(series) > 1 else x - 0.4
            ax.hlines(target, left, left + 0.45, colors="#c0392b", linestyles="--",
                      linewidth=2, label="target (raw device)")
            ax.annotate(f"{target:.1f}x", (left, target), xytext=(-2, 0),
                        textcoords="offset points", ha="right", va="center",
                        color="#c0392b", fontsize=8, fontweight="bold")
            high = max(high, target)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry for all the target segments
    # One row across the top, above the tallest bar, so it hides none.
    ax.legend(unique.values(), unique.keys(), loc="upper center", ncol=5, fontsize=8)
    ax.set_ylim(min(0.5, max(low, 1e-3) / 1.3), max(2.0, high) * 2.0)
    ticks = [2.0 ** k for k in range(-10, 11) if ax.get_ylim()[0] <= 2.0 ** k <= ax.get_ylim()[1]]
    ax.set_yticks(ticks, [f"{t:g}x" if t >= 1 else f"1/{1 / t:g}x" for t in ticks])
    ax.set_ylabel("ours / kernel, IOPS (log scale; above 1 = ours faster)")


def _ceiling_panel(ax: Any, objs: Sequence[dict[str, Any]], names: list[str]) -> None:
    by = {o["workload"]: o for o in objs if "python_share_of_null_co" in o}
    series: dict[str, list[float | None]] = {
        "ours": [by[n]["python_share_of_null_co"] if n in by else None for n in names],
        "kernel": [by[n]["kernel_share_of_null_co"] if n in by else None for n in names]}
    top = _bars(ax, names, series, "{:.2f}")[1]
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylim(0, max(top, 1.0) * 1.3)
    ax.set_ylabel("raw image / null-co (IOPS)")
    ax.set_title("How close each driver gets to the device emulation's ceiling: IOPS on the "
                 "raw image / IOPS on null-co, same driver (1.0 = the ceiling)", fontsize=9)
    ax.legend(loc="upper center", ncol=2, fontsize=8)


def to_png(objs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on these machines, nor in CI
    import matplotlib.pyplot as plt

    first = objs[0]
    names = list(dict.fromkeys(o["workload"] for o in objs))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 8.5), height_ratios=(3, 2))
    _ratio_panel(top, objs, names)
    _ceiling_panel(bottom, objs, names)
    runs = (f"{first['runtime_s']:g} s" if first["runtime_s"] else f"{first['ios_per_run']} I/Os")
    stub = "  [STAND-IN: fio on both sides]" if first["stub"] else ""
    top.set_title(
        f"virtio-user (Python, {first['driver_backend']}) vs the kernel's virtio_blk + fio "
        f"io_uring, same guest{stub}\naccel {first['accel'].upper()}: "
        f"{machine_line(first['machine'])}\nmedian of {first['rounds']} alternating rounds "
        f"of {runs}; {first['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- all three ---------------------------------------------------------------------------

def write_all(rows: Sequence[Row], meta: Meta, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    objs = to_json(rows, meta)
    (out / "latest.json").write_text(json.dumps(objs, indent=2) + "\n")
    return [out / "latest.json", *render(objs, out)]


def render(objs: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """latest.md and latest.png from the JSON objects."""
    (out / "latest.md").write_text(to_markdown(objs))
    to_png(objs, out / "latest.png")
    return [out / "latest.md", out / "latest.png"]


# Where ``scripts/bench.sh --update-docs`` writes, relative to a checkout (or to the
# directory VIRTIO_USER_BENCH_DOCS names, in tests): the chart and the full table into the
# benchmarks page, the headline table into the README, both from the same run.
DOCS_PAGE = Path("docs") / "benchmarks.md"
README = Path("README.md")
RESULTS_BEGIN = "<!-- bench:results:begin (written by scripts/bench.sh --update-docs) -->"
RESULTS_END = "<!-- bench:results:end -->"
HEADLINE_BEGIN = "<!-- bench:headline:begin (written by scripts/bench.sh --update-docs) -->"
HEADLINE_END = "<!-- bench:headline:end -->"
# The columns of the headline table beyond the legacy rows: (variant, heading).
HEADLINE_VARIANTS = (("modern", "modern split"), ("packed", "modern packed"))


def to_headline(objs: Sequence[dict[str, Any]], page: str) -> str:
    """The README's small table: the workloads with a target, on the raw image, ours
    against the kernel on the legacy device and on each ring variant measured."""
    rows = [o for o in objs if is_base(o) and o["backend_file"] == "raw"
            and o["target"] is not None]
    ratio = {(o["workload"], o["variant"]): o["ratio"] for o in objs
             if o["backend_file"] == "raw"}
    variants = [(v, h) for v, h in HEADLINE_VARIANTS
                if any(o.get("variant") == v for o in objs)]
    first = objs[0]
    lines = [
        "| workload (raw image) | ours IOPS | kernel IOPS | ours / kernel "
        + "".join(f"| {h} " for _, h in variants) + "| target |",
        "|---|--:|--:|--:|" + "--:|" * len(variants) + "---|",
    ]
    for o in rows:
        cells = "".join(f"| {ratio[(o['workload'], v)]:.2f}x "
                        if (o["workload"], v) in ratio else "| " for v, _ in variants)
        lines.append(f"| {o['workload']} | {o['python_iops']:.0f} | {o['kernel_iops']:.0f} "
                     f"| {o['ratio']:.2f}x {cells}| {_target(o)} |")
    stub = (" **STAND-IN RUN: our side ran fio through the kernel; not a result.**"
            if first["stub"] else "")
    also = (" (" + " and ".join(h for _, h in variants) + ": ours / kernel on those "
            "devices)") if variants else ""
    lines += ["", f"IOPS on the legacy split-ring device{also}; ours polled, through "
              f"{first['driver_backend']}; medians of {first['rounds']} alternating rounds; accel "
              f"{first['accel']}, {machine_line(first['machine'])}; commit "
              f"{first['machine']['commit']}, {first['date']}.{stub} Every row, the NBD "
              f"and wait-mode variants, CPU per I/O and latencies: [{page}]({page})."]
    return "\n".join(lines) + "\n"


def _between(text: str, begin: str, end: str, block: str) -> str | None:
    """``text`` with what lies between the markers replaced by ``block``; None without them."""
    b, e = text.find(begin), text.find(end)
    if b < 0 or e < b:
        return None
    return text[:b] + begin + "\n" + block + text[e:]


def update_docs(root: Path, objs: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Write the chart and full table into the benchmarks page and the headline table into
    the README under ``root``, both or neither. Raises ValueError naming a file that lacks
    its markers."""
    page, readme = root / DOCS_PAGE, root / README
    chart = os.path.relpath(out / "latest.png", page.parent)
    full = _between(page.read_text(), RESULTS_BEGIN, RESULTS_END,
                    f"![ours / kernel per workload]({chart})\n\n{to_markdown(objs)}")
    if full is None:
        raise ValueError(f"{page} has no bench:results markers to write between")
    link = DOCS_PAGE.as_posix()
    head = _between(readme.read_text(), HEADLINE_BEGIN, HEADLINE_END, to_headline(objs, link))
    if head is None:
        raise ValueError(f"{readme} has no bench:headline markers to write between")
    page.write_text(full)
    readme.write_text(head)
    return [page, readme]


def main(argv: Sequence[str] | None = None) -> int:
    """Redraw latest.md and latest.png next to a latest.json."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m virtio_user.host.bench_report DIR/latest.json", file=sys.stderr)
        return 1
    src = Path(args[0])
    render(json.loads(src.read_text()), src.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
