"""Benchmarks: our driver next to the kernel's virtio_blk, in one guest, in one run.

One TCG guest holds four identical legacy virtio-blk devices: two raw images of the same
size and cache mode, and two ``null-co`` devices (QEMU's no-op backend, the ceiling of
the device emulation itself). Of each pair, the first goes to ``virtio-user bench`` (which
takes it from the kernel) and the second stays with the kernel's virtio_blk, driven by
``fio --ioengine=io_uring --direct=1``. Each workload runs alternately, ours then the
kernel's, for N rounds, and the medians are kept, so that noise from the host (other
guests on a 2-core machine) hits both sides alike.

Variants (``VARIANTS``) add rows on the raw images for the workloads that tell them apart:
a pair of modern devices driven with ``--transport modern``, a pair of packed ones with
``--ring packed``, and our ``--wait interrupt`` and ``hybrid`` on the legacy raw pair.
The ``nbd`` variant runs the same fio on ``/dev/nbd0``, served by ``virtio-user nbd`` on
our device of the legacy raw pair: the kernel's block layer and nbd driver, then ours.
Every row carries both sides' CPU time per I/O.

    python -m virtio_user.host.bench_harness [--runtime S | --ios N] [--rounds N] [--quick]
                                     [--backend uio|vfio] [--out DIR]
                                     [--variant NAME]... [--no-variants]

Writes ``latest.json``, ``latest.md`` and ``latest.png`` into ``--out`` (bench_report.py).
Setting ``VIRTIO_USER_BENCH_OURS=fio`` runs fio on our device too (through the kernel):
a stand-in to develop the orchestration against, never a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import bench_report
from .errors import HarnessError
from .machine import FIRST_DISK_SLOT, Disk
from .session import Command, CommandResult, GuestSession

REPO = Path(__file__).resolve().parents[2]
KIB, MIB = 1024, 1024 * 1024
STUB_ENV = "VIRTIO_USER_BENCH_OURS"
DOCS_ENV = "VIRTIO_USER_BENCH_DOCS"  # --update-docs writes under this directory instead (tests)
GUEST_SERVER = Path(__file__).with_name("bench_guest.py")
GUEST_FIFO = "/tmp/virtio-user-bench.fifo"  # the guest's own /tmp
COMMAND_SLACK = 180.0  # seconds a run may take beyond its runtime (start-up under TCG)
FIO_CAP = 120  # seconds: a run of N I/Os ends by then at the latest
# NBD runs 10-50x slower than either driver: N I/Os that take them a second would take it
# a minute (256 MiB at QD8 in the smoke), so an NBD run of N I/Os stops after this long.
NBD_IOS_CAP = 2
NBD_DEVICE = "/dev/nbd0"
NBD_LOG = "/tmp/virtio-user-bench-nbd.log"  # the guest's; quoted when an NBD run fails
NBD_KERNEL_TIMEOUT = 30  # s: a request the server leaves unanswered fails fio, not hangs it


@dataclass(frozen=True)
class Workload:
    rw: str  # fio's and our bench's --rw: randread, randwrite, read, write
    bs: int
    iodepth: int
    target: float | None = None  # ours/kernel ratio the issue asks for (raw backend)
    # Jobs in parallel, each with its own queue (ours: --numjobs, a worker process per
    # request queue; fio: --numjobs with --group_reporting on the kernel's blk-mq).
    numjobs: int = 1

    @property
    def name(self) -> str:
        size = f"{self.bs // MIB}m" if self.bs % MIB == 0 else f"{self.bs // KIB}k"
        jobs = f"-j{self.numjobs}" if self.numjobs > 1 else ""
        return f"{self.rw}-{size}-qd{self.iodepth}{jobs}"

    @property
    def direction(self) -> str:
        """The section of fio's JSON that holds the figures."""
        return "write" if "write" in self.rw else "read"


WORKLOADS = (
    Workload("randread", 4 * KIB, 1, target=2.0),
    Workload("randread", 4 * KIB, 8),
    Workload("randread", 4 * KIB, 32, target=1.5),
    Workload("randwrite", 4 * KIB, 1),
    Workload("randwrite", 4 * KIB, 32),
    Workload("read", MIB, 8, target=0.9),
    Workload("write", MIB, 8),
    # Two jobs of QD16 against one of QD32 above: the same requests in flight, on the
    # two request queues QEMU gives a 2-vCPU guest's virtio-blk-pci (num-queues=2).
    Workload("randread", 4 * KIB, 16, numjobs=2),
)


@dataclass(frozen=True)
class Variant:
    """A device model and driver setting beside the legacy polled rows: on its own pair
    of identical raw-image devices (``device``), ours with these global options."""
    name: str
    device: str  # a key of DEVICE_MODELS
    transport: str
    ring: str
    wait: str
    nbd: bool = False  # fio on /dev/nbd0 served by ``virtio-user nbd``, not our ``bench``

    @property
    def opts(self) -> list[str]:
        return ["--transport", self.transport, "--ring", self.ring, "--wait", self.wait]


BASE = Variant(bench_report.BASE_VARIANT, "legacy", "legacy", "split", "poll")
VARIANTS = (
    Variant("modern", "modern", "modern", "split", "poll"),
    Variant("packed", "packed", "modern", "packed", "poll"),
    Variant("interrupt", "legacy", "legacy", "split", "interrupt"),
    Variant("hybrid", "legacy", "legacy", "split", "hybrid"),
    # The server's wait: interrupt, measured about twice poll's QD1 rate through NBD
    # (the kernel's half of each request needs the CPU a polling server would take).
    Variant(bench_report.NBD_VARIANT, "legacy", "legacy", "split", "interrupt", nbd=True),
)
# The workloads that tell the variants apart (per-request cost at QD1, batching at QD32,
# bandwidth), on the raw images only: all of them everywhere would triple the run.
VARIANT_WORKLOADS = ("randread-4k-qd1", "randread-4k-qd32", "read-1m-qd8")
# virtio-blk-pci settings of each pair (Disk fields); the kernel's device is identical.
DEVICE_MODELS: dict[str, dict[str, Any]] = {
    "legacy": {"transport": "legacy"},
    "modern": {"transport": "modern"},  # disable-legacy=on,disable-modern=off
    "packed": {"transport": "modern", "packed": True},
}


@dataclass(frozen=True)
class Amount:
    """How long each run lasts: seconds (the benchmark) or a number of I/Os (the smoke)."""
    runtime: float | None = None
    ios: int | None = None

    def describe(self) -> str:
        return f"{self.runtime:g} s per run" if self.runtime else f"{self.ios} I/Os per run"

    def timeout(self) -> float:
        return (self.runtime or 0.0) + COMMAND_SLACK


@dataclass(frozen=True)
class Sample:
    """One run of one side: what both fio and ``virtio-user bench --json`` report."""
    iops: float
    mbps: float  # 10^6 bytes per second
    lat_us: dict[str, float]  # completion latency percentiles: p50, p99, p99.9
    cpu_us_per_io: float | None = None  # user + system CPU over completed I/Os

    @classmethod
    def from_ours(cls, data: dict[str, Any]) -> "Sample":
        lat = {k: float(data["lat_us"][k]) for k in bench_report.PERCENTILES}
        cpu = data.get("cpu_s_per_io")
        return cls(float(data["iops"]), float(data["mbps"]), lat,
                   None if cpu is None else float(cpu) * 1e6)

    @classmethod
    def from_fio(cls, data: dict[str, Any], direction: str) -> "Sample":
        job = data["jobs"][0]
        if job.get("error"):
            raise HarnessError(f"fio job failed with error {job['error']}")
        side = job[direction]
        # fio's clat is completion latency, like ours; its keys read "99.900000".
        pct = side["clat_ns"]["percentile"]
        lat = {k: pct[f"{float(k[1:]):.6f}"] / 1000.0 for k in bench_report.PERCENTILES}
        return cls(float(side["iops"]), side["bw_bytes"] / 1e6, lat, fio_cpu_us_per_io(job, side))


def fio_cpu_us_per_io(job: dict[str, Any], side: dict[str, Any]) -> float | None:
    """fio's usr_cpu and sys_cpu are percent of one CPU over the job's runtime (ms)."""
    runtime_ms = job.get("job_runtime") or side.get("runtime")
    ios = side.get("total_ios")
    if "usr_cpu" not in job or not runtime_ms or not ios:
        return None
    cpu_s = (float(job["usr_cpu"]) + float(job["sys_cpu"])) / 100.0 * float(runtime_ms) / 1000.0
    return cpu_s / float(ios) * 1e6


@dataclass
class Pair:
    """Two identical devices: ``ours`` for virtio-user, ``kernel`` stays with virtio_blk."""
    backend_file: str  # "raw" or "null-co"
    ours_bdf: str
    kernel_bdf: str
    device: str = "legacy"  # a key of DEVICE_MODELS
    blockdevs: dict[str, str] = field(default_factory=dict)  # BDF -> /dev/vdX


# -- the two sides -----------------------------------------------------------------------

def fio_argv(dev: str, w: Workload, amount: Amount, cap: int = FIO_CAP) -> list[str]:
    argv = ["fio", "--name=bench", f"--filename={dev}", "--ioengine=io_uring", "--direct=1",
            f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}",
            # fio's random map costs CPU per I/O, and CPU is what TCG measures; ours
            # keeps none either.
            "--norandommap", "--randrepeat=0",
            "--percentile_list=50:99:99.9", "--output-format=json"]
    if w.numjobs > 1:
        argv += [f"--numjobs={w.numjobs}", "--group_reporting"]
    if amount.runtime:
        # In milliseconds: fio takes no fractional seconds, our side does.
        return argv + [f"--runtime={round(amount.runtime * 1000)}ms", "--time_based"]
    # io_size wraps around the device, so a count larger than the device still works;
    # a runtime without --time_based is only a cap.
    assert amount.ios is not None
    return argv + [f"--io_size={amount.ios * w.bs}", f"--runtime={cap}s"]


def ours_argv(bdf: str, backend: str, w: Workload, amount: Amount,
              variant: Variant = BASE) -> list[str]:
    argv = ["virtio-user", "--backend", backend, *variant.opts, "--device", bdf, "bench",
            "--rw", w.rw, "--bs", str(w.bs), "--iodepth", str(w.iodepth), "--json"]
    if w.numjobs > 1:
        argv += ["--numjobs", str(w.numjobs)]
    if amount.runtime:
        return argv + ["--runtime", f"{amount.runtime:g}"]
    return argv + ["--ios", str(amount.ios)]


def nbd_argv(bdf: str, backend: str, variant: Variant) -> list[str]:
    """Connect /dev/nbd0 to our driver on ``bdf``; the server runs on in the background."""
    return ["virtio-user", "--backend", backend, *variant.opts, "--device", bdf, "nbd",
            "--kernel-timeout", str(NBD_KERNEL_TIMEOUT), "--log", NBD_LOG, NBD_DEVICE]


# Until the process has ended (gone, or a zombie: its parent reaps it later). Field 3 of
# /proc/PID/stat is the state.
WAIT_ENDED = ('while s=$(cut -d" " -f3 "/proc/$0/stat" 2>/dev/null) && [ "$s" != Z ]; do '
              'sleep 0.05; done')
WAIT_ENDED_S = 60
CPU_TICKS_PER_S = os.sysconf("SC_CLK_TCK")  # USER_HZ, 100 on x86 in the guest too


def server_cpu_s(stat: str) -> float:
    """User + system CPU of a process from its /proc/PID/stat (after the comm field)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CPU_TICKS_PER_S  # utime, stime


class OursServer:
    """``virtio-user`` commands run by one long-lived guest process (bench_guest.py).

    It calls the same ``virtio_user.cli.main(argv)`` as the command, minus the 4-5 s of
    imports a new process pays under TCG before its first I/O (not measured either way).
    """

    def __init__(self, vm: GuestSession, timeout: float) -> None:
        self.vm = vm
        self.timeout = timeout
        self.next_id = 1
        self.proc: Command = vm.spawn([sys.executable, str(GUEST_SERVER), GUEST_FIFO])
        self._answer(b'{"ready": true}', "the benchmark's guest process to start")

    def run(self, argv: list[str]) -> CommandResult:
        """Run ``virtio-user ARGS...`` (argv[0] is the program name)."""
        request = json.dumps({"id": self.next_id, "argv": argv[1:]})
        self.next_id += 1
        self._send(request)
        answer = self._answer(f'{{"id": {self.next_id - 1},'.encode(), " ".join(argv))
        return CommandResult(argv, answer["status"], answer["stdout"].encode(),
                             answer["stderr"].encode())

    def close(self) -> None:
        if self.proc.status is None:
            try:
                self._send(json.dumps({"quit": True}))
                self.proc.wait(timeout=30)
            except HarnessError:
                self.proc.signal()

    def _send(self, line: str) -> None:
        if self.proc.status is not None:  # else opening the FIFO would block: no reader
            raise HarnessError(f"the benchmark's guest process exited ({self.proc.status}):"
                               f"\n{bytes(self.proc.stderr).decode(errors='replace')[-2000:]}")
        # printf through sh: the agent gives commands no stdin, so requests go by FIFO.
        r = self.vm.run(["sh", "-c", 'printf "%s\\n" "$1" > "$0"', GUEST_FIFO, line],
                        timeout=60)
        if r.status != 0:
            raise HarnessError(f"cannot reach the benchmark's guest process: {r.err}")

    def _answer(self, prefix: bytes, what: str) -> dict[str, Any]:
        # Answers are JSON with "stdout" escaped inside, so the prefix is found only at
        # the start of its own line.
        self.proc.wait_output(prefix, self.timeout)
        for line in bytes(self.proc.stdout).splitlines():
            if line.startswith(prefix):
                return dict(json.loads(line))
        raise HarnessError(f"no answer for {what}; the guest process said:\n"
                           f"{bytes(self.proc.stderr).decode(errors='replace')[-2000:]}")


@dataclass
class Runner:
    """Runs one side of one workload in the guest and parses what it printed."""
    vm: GuestSession
    backend: str  # uio or vfio, for our driver
    amount: Amount
    server: OursServer | None  # None: VIRTIO_USER_BENCH_OURS=fio, our side runs fio too

    def kernel(self, pair: Pair, w: Workload) -> Sample:
        return self._fio(pair.blockdevs[pair.kernel_bdf], w)

    def ours(self, pair: Pair, w: Workload, variant: Variant = BASE) -> Sample:
        if self.server is None:
            return self._fio(pair.blockdevs[pair.ours_bdf], w)
        if variant.nbd:
            return self.nbd(pair, w, variant)
        argv = ours_argv(pair.ours_bdf, self.backend, w, self.amount, variant)
        data = json.loads(self._check(self.server.run(argv)))
        used = (data.get("ring"), data.get("wait"))
        if used != (variant.ring, variant.wait):
            raise HarnessError(f"{' '.join(argv)}: ran with ring, wait {used}, not "
                               f"{variant.ring}, {variant.wait}")
        return Sample.from_ours(data)

    def nbd(self, pair: Pair, w: Workload, variant: Variant) -> Sample:
        """fio on /dev/nbd0 served by our driver on the pair's device. Connected for this
        run only (no server beside the other runs), and disconnected whatever fio did,
        so the next run can bind the device. CPU per I/O: fio's plus the server's."""
        assert self.server is not None
        argv = nbd_argv(pair.ours_bdf, self.backend, variant)
        said = self._check(self.server.run(argv), NBD_LOG)
        found = re.search(r"server pid (\d+)", said)
        if found is None:
            raise HarnessError(f"{' '.join(argv)} printed no server pid: {said!r}")
        pid = int(found.group(1))
        try:
            before = self._cpu_s(pid)
            r = self.vm.run(fio_argv(NBD_DEVICE, w, self.amount, NBD_IOS_CAP),
                            timeout=self.amount.timeout())
            server_s = self._cpu_s(pid) - before
        except BaseException:
            self._disconnect(pid, quiet=True)
            raise
        self._disconnect(pid)
        data = json.loads(self._check(r, NBD_LOG))
        sample = Sample.from_fio(data, w.direction)
        ios = data["jobs"][0][w.direction].get("total_ios")
        if sample.cpu_us_per_io is None or not ios:
            return sample
        return dataclasses.replace(sample, cpu_us_per_io=sample.cpu_us_per_io
                                   + server_s / float(ios) * 1e6)

    def _cpu_s(self, pid: int) -> float:
        return server_cpu_s(self._check(self.vm.run(["cat", f"/proc/{pid}/stat"], timeout=60)))

    def _disconnect(self, pid: int, quiet: bool = False) -> None:
        """``nbd -d``, then wait for the server to end (it resets and releases the device
        after the kernel's NBD_DO_IT has returned); one that does not end is killed, which
        releases the device too. ``quiet``: no error of its own, for when one is already
        on its way."""
        argv = ["virtio-user", "nbd", "-d", NBD_DEVICE]
        problems = []
        try:
            # A new process when quiet: the long-lived one may be what failed.
            r = (self.vm.run(argv, timeout=COMMAND_SLACK) if quiet or self.server is None
                 else self.server.run(argv))
            if r.status != 0:
                problems.append(f"{' '.join(argv)}: exit status {r.status}\n{r.err[-2000:]}")
            ended = self.vm.run(["timeout", str(WAIT_ENDED_S), "sh", "-c", WAIT_ENDED,
                                 str(pid)], timeout=WAIT_ENDED_S + 30)
            if ended.status != 0:
                self.vm.run(["kill", "-9", str(pid)], timeout=60)
                problems.append(f"the NBD server (pid {pid}) had not ended {WAIT_ENDED_S} s "
                                "after nbd -d: killed")
        except HarnessError as exc:
            problems.append(str(exc))
        if problems and not quiet:
            tail = self.vm.run(["tail", "-n", "20", NBD_LOG], timeout=60)
            raise HarnessError("\n".join(problems) + f"\n{NBD_LOG}:\n{tail.out}")

    def _fio(self, dev: str, w: Workload) -> Sample:
        r = self.vm.run(fio_argv(dev, w, self.amount), timeout=self.amount.timeout())
        return Sample.from_fio(json.loads(self._check(r)), w.direction)

    def _check(self, r: CommandResult, log: str | None = None) -> str:
        if r.status == 0:
            return r.out
        message = f"{' '.join(r.argv)}: exit status {r.status}\n{r.err[-2000:]}"
        if log is not None:
            tail = self.vm.run(["tail", "-n", "20", log], timeout=60)
            message += f"\n{log}:\n{tail.out}"
        raise HarnessError(message)


# -- the guest and its devices -----------------------------------------------------------

def make_images(workdir: Path, size_mib: int, count: int = 2) -> list[Path]:
    """Raw images with the same non-zero contents, so reads are of data, not holes."""
    paths = [workdir / f"disk{i}.raw" for i in range(count)]
    chunk = os.urandom(MIB)
    with paths[0].open("wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
    for path in paths[1:]:
        shutil.copyfile(paths[0], path)
    return paths


def device_models(variants: Sequence[Variant]) -> list[str]:
    """The raw-image pairs to attach: the legacy one always, then those variants use."""
    used = {v.device for v in variants}
    return [d for d in DEVICE_MODELS if d == "legacy" or d in used]


def bdf(slot: int) -> str:
    return f"0000:00:{slot:02x}.0"


def null_co_slot(models: Sequence[str]) -> int:
    return FIRST_DISK_SLOT + 2 * len(models)  # after the raw images' pairs


def null_co_args(size_mib: int, first_slot: int) -> list[str]:
    args: list[str] = []
    for i in range(2):
        args += ["-drive", f"if=none,id=null{i},driver=null-co,size={size_mib}M,read-zeroes=on",
                 "-device", f"virtio-blk-pci,drive=null{i},disable-modern=on,"
                            f"disable-legacy=off,addr={first_slot + i:#x},serial=null{i}"]
    return args


def pairs(models: Sequence[str] = ("legacy",)) -> list[Pair]:
    """Raw pairs in ``models`` order (the disks' order on the bus), then null-co (legacy)."""
    out = [Pair("raw", bdf(FIRST_DISK_SLOT + 2 * i), bdf(FIRST_DISK_SLOT + 2 * i + 1), model)
           for i, model in enumerate(models)]
    null = null_co_slot(models)
    return out + [Pair("null-co", bdf(null), bdf(null + 1))]


# /sys/block/vdX/device -> .../0000:00:11.0/virtioN: the PCI device is virtioN's parent.
MAP_BLOCKDEVS = ('for b in /sys/block/vd*; do '
                 'echo "$(basename "$b") $(basename "$(dirname "$(readlink -f "$b/device")")")";'
                 ' done')


# The kernel's negotiated features, one '0'/'1' per bit, for each kernel-side BDF.
KERNEL_FEATURES = ('for d in /sys/bus/pci/devices/*/virtio*; do '
                   'echo "$(basename "$(dirname "$d")") $(cat "$d/features")"; done')
VERSION_1, RING_PACKED = 32, 34  # virtio 1.2 "Reserved Feature Bits"


def check_kernel_devices(vm: GuestSession, all_pairs: list[Pair]) -> None:
    """The kernel's side of each pair really runs the pair's transport and ring: its
    virtio_blk negotiates the packed ring where offered, but say so, not assume it."""
    r = vm.run(KERNEL_FEATURES, timeout=60)
    features = dict(line.split() for line in r.out.splitlines() if line.strip())
    for pair in all_pairs:
        bits = features.get(pair.kernel_bdf, "")
        model = DEVICE_MODELS[pair.device]
        want = {VERSION_1: model["transport"] == "modern", RING_PACKED: bool(model.get("packed"))}
        for bit, on in want.items():
            if len(bits) <= bit or (bits[bit] == "1") != on:
                raise HarnessError(f"the kernel's {pair.kernel_bdf} ({pair.device}) has "
                                   f"features {bits!r}: bit {bit} should be {int(on)}")


def find_blockdevs(vm: GuestSession, all_pairs: list[Pair]) -> None:
    """Fill each pair's BDF -> /dev/vdX map (before our driver takes its device away)."""
    r = vm.run(MAP_BLOCKDEVS, timeout=60)
    found: dict[str, str] = {}  # BDF -> vdX
    for line in r.out.splitlines():
        if line.strip():
            name, bdf = line.split()
            found[bdf] = name
    for pair in all_pairs:
        for bdf in (pair.ours_bdf, pair.kernel_bdf):
            if bdf not in found:
                raise HarnessError(f"no /dev/vd* for {bdf} in the guest: {r.out!r} {r.err!r}")
            pair.blockdevs[bdf] = f"/dev/{found[bdf]}"


# -- rounds and medians ------------------------------------------------------------------

Progress = Callable[[str], None]


def median_sample(samples: Sequence[Sample]) -> Sample:
    """The median of each figure on its own (they need not come from the same round)."""
    lat = {k: statistics.median(s.lat_us[k] for s in samples) for k in samples[0].lat_us}
    cpu = [s.cpu_us_per_io for s in samples if s.cpu_us_per_io is not None]
    return Sample(statistics.median(s.iops for s in samples),
                  statistics.median(s.mbps for s in samples), lat,
                  statistics.median(cpu) if cpu else None)


def measure(runner: Runner, pair: Pair, w: Workload, rounds: int, say: Progress,
            variants: Sequence[Variant] = (BASE,)) -> tuple[list[list[Sample]], list[Sample]]:
    """Ours, kernel, ours, kernel, ...: alternation spreads drifting noise over both.
    Several settings of ours on one pair each run once per round, before the kernel's
    run they share; returns ours per variant, then the kernel's samples."""
    ours: list[list[Sample]] = [[] for _ in variants]
    kernel: list[Sample] = []
    sides: list[tuple[str, Callable[[], Sample], list[Sample]]] = [
        (f"ours {v.name}", functools.partial(runner.ours, pair, w, v), into)
        for v, into in zip(variants, ours)]
    sides.append(("kernel", functools.partial(runner.kernel, pair, w), kernel))
    for i in range(rounds):
        for label, run, into in sides:
            sample = run()
            into.append(sample)
            say(f"{w.name:<18} {pair.backend_file:<7} {pair.device:<7} "
                f"round {i + 1}/{rounds} {label:<16} "
                f"{sample.iops:>10.0f} IOPS {sample.mbps:>9.1f} MB/s "
                f"p99 {sample.lat_us['p99']:>8.0f} us")
    return ours, kernel


Job = tuple[Pair, Workload, list[Variant]]


def plan(all_pairs: list[Pair], workloads: Sequence[Workload],
         variants: Sequence[Variant]) -> list[Job]:
    """Every workload on the legacy raw and null-co pairs, then each variant on its raw
    pair for the VARIANT_WORKLOADS among ``workloads``. A variant on the legacy pair
    (a wait mode) joins the legacy row's job: the kernel's side is the same device and
    the same fio, so its runs are shared rather than repeated."""
    jobs: dict[tuple[str, str], Job] = {
        (pair.ours_bdf, w.name): (pair, w, [BASE])
        for pair in all_pairs if pair.device == "legacy" for w in workloads}
    raw = {p.device: p for p in all_pairs if p.backend_file == "raw"}
    for v in variants:
        pair = raw[v.device]
        for w in workloads:
            if w.name in VARIANT_WORKLOADS:
                jobs.setdefault((pair.ours_bdf, w.name), (pair, w, []))[2].append(v)
    return list(jobs.values())


def run_all(runner: Runner, all_pairs: list[Pair], workloads: Sequence[Workload],
            rounds: int, say: Progress,
            variants: Sequence[Variant] = ()) -> list[bench_report.Row]:
    rows = []
    for pair, w, job_variants in plan(all_pairs, workloads, variants):
        ours, kernel = measure(runner, pair, w, rounds, say, job_variants)
        for variant, samples in zip(job_variants, ours):
            rows.append(bench_report.Row(
                workload=w.name, rw=w.rw, bs=w.bs, iodepth=w.iodepth,
                backend_file=pair.backend_file,
                target=None if variant.nbd else w.target,  # the targets are the driver's
                ours=median_sample(samples), kernel=median_sample(kernel),
                ours_rounds=samples, kernel_rounds=kernel, variant=variant.name,
                transport=variant.transport, ring=variant.ring, wait=variant.wait))
    return rows


# -- the command line --------------------------------------------------------------------

QUICK_IOS = 256  # the smoke: every workload through both drivers, in seconds
QUICK_IMAGE_MIB = 64


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__.split("\n")[0])
    how = p.add_mutually_exclusive_group()
    how.add_argument("--runtime", type=float, metavar="SECONDS", help="each run (default 5)")
    how.add_argument("--ios", type=int, metavar="N", help="each run does N I/Os instead")
    p.add_argument("--rounds", type=int, default=3, help="ours/kernel alternations (default 3)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke for CI: {QUICK_IOS} I/Os per run, 1 round, small images")
    p.add_argument("--backend", choices=("uio", "vfio"), default="uio",
                   help="how our driver reaches the device (default uio)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--cache", default="writeback", help="cache mode of both raw images")
    p.add_argument("--image-mib", type=int, help="size of each device (default 1024)")
    p.add_argument("--only", action="append", metavar="WORKLOAD",
                   help="run just this workload (repeatable): " + ", ".join(w.name for w in WORKLOADS))
    p.add_argument("--variant", action="append", metavar="NAME",
                   choices=[v.name for v in VARIANTS],
                   help="measure only these rows beside the legacy polled ones (repeatable; "
                   "default all: " + ", ".join(v.name for v in VARIANTS) + "), on "
                   + ", ".join(VARIANT_WORKLOADS) + " and the raw images")
    p.add_argument("--no-variants", action="store_true",
                   help="only the legacy polled rows (no modern, packed or wait-mode rows)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--update-docs", action="store_true",
                   help="also write the chart and full table into docs/benchmarks.md and "
                   "the headline table into README.md")
    # The option's old name, from when the whole table lived in the README.
    p.add_argument("--update-readme", action="store_true", dest="update_docs",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.ios = args.ios or (None if args.runtime else QUICK_IOS)
        args.image_mib = args.image_mib or QUICK_IMAGE_MIB
    if args.runtime is None and args.ios is None:
        args.runtime = 5.0
    args.image_mib = args.image_mib or 1024
    for name, value in (("--rounds", args.rounds), ("--ios", args.ios or 1),
                        ("--runtime", args.runtime or 1), ("--image-mib", args.image_mib)):
        if value <= 0:
            p.error(f"{name} must be positive")
    if args.variant and args.no_variants:
        p.error("--variant and --no-variants exclude each other")
    known = {w.name for w in WORKLOADS}
    for name in args.only or ():
        if name not in known:
            p.error(f"--only {name}: not one of {', '.join(sorted(known))}")
    return args


STARTED = time.monotonic()


def say(message: str) -> None:
    # Seconds since start: shows where a slow run spends its time (boot, a stalled side).
    print(f"bench: {time.monotonic() - STARTED:6.1f} {message}", file=sys.stderr, flush=True)


def selected_variants(args: argparse.Namespace) -> list[Variant]:
    if args.no_variants:
        return []
    return [v for v in VARIANTS if not args.variant or v.name in args.variant]


def run(args: argparse.Namespace) -> list[bench_report.Row]:
    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only]
    variants = selected_variants(args)
    models = device_models(variants)
    stub = os.environ.get(STUB_ENV) == "fio"
    if stub:
        say(f"{STUB_ENV}=fio: OUR SIDE RUNS FIO THROUGH THE KERNEL (a stand-in, not a result)")
    amount = Amount(args.runtime, args.ios)
    with tempfile.TemporaryDirectory(prefix="virtio-user-bench-", dir="/var/tmp") as tmp:
        images = make_images(Path(tmp), args.image_mib, 2 * len(models))
        disks = [Disk(path, format="raw", cache=args.cache, **DEVICE_MODELS[models[i // 2]])
                 for i, path in enumerate(images)]
        all_pairs = pairs(models)
        runs = sum(len(v) + 1 for _, _, v in plan(all_pairs, workloads, variants))
        say(f"booting the guest ({runs} runs x {args.rounds} rounds, {amount.describe()})")
        with GuestSession(disks, accel=args.accel, backend=args.backend, cwd=REPO,
                          qemu_args=null_co_args(args.image_mib, null_co_slot(models))) as vm:
            say(f"guest up ({vm.accel})")
            find_blockdevs(vm, all_pairs)
            check_kernel_devices(vm, all_pairs)
            server = None if stub else OursServer(vm, amount.timeout())
            say("our driver's guest process ready")
            try:
                runner = Runner(vm, args.backend, amount, server)
                rows = run_all(runner, all_pairs, workloads, args.rounds, say, variants)
            finally:
                if server is not None:
                    server.close()
            accel = vm.accel
    meta = bench_report.Meta(
        accel=accel, machine=bench_report.machine_info(), driver_backend=args.backend,
        rounds=args.rounds, runtime=args.runtime, ios=args.ios, cache=args.cache,
        image_mib=args.image_mib, stub=stub)
    for path in bench_report.write_all(rows, meta, args.out):
        say(f"wrote {path}")
    if args.update_docs:
        objs = json.loads((args.out / "latest.json").read_text())
        root = Path(os.environ.get(DOCS_ENV) or REPO)
        try:
            updated = bench_report.update_docs(root, objs, args.out.resolve())
        except ValueError as exc:
            raise HarnessError(str(exc)) from exc
        for path in updated:
            say(f"updated {path}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except HarnessError as exc:
        say(f"failed: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
