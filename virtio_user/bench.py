"""``virtio-user bench``: keep the queue full at a given depth and measure, like fio.

With ``--numjobs N`` (fio's name) N worker processes run the same loop in parallel, each
on its own request queue with its own ``--iodepth`` and its own slice of the device
(workers.py); the result is their total plus a line per job, and the CPU per I/O is
summed over the workers.

The loop is the batch API at work: submit ``iodepth`` requests with one kick, then
repeatedly reap whatever completed and resubmit as many, one kick per batch. Nothing
is checked on the hot path but the status byte; ``--verify`` runs a separate pass
afterwards. Completion latency (fio's clat) is taken per batch: one clock read when a
batch is submitted and one when a batch is reaped.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .blk import DmaBuffer, Request, VirtioBlk
from .blk_queue import RequestQueue
from .blk_setup import ring_name
from .errors import BlkIOError, InvalidArgument, Unsupported
from .options import MAX_QUEUES
from .numbers import parse_number, parse_seconds, parse_size
from .spec import SECTOR_SIZE, BlkStatus, ReqType

RW = ("randread", "randwrite", "read", "write")
MAX_BS = 1 << 20
VERIFY_BLOCKS = 256


@dataclass(frozen=True)
class BenchSpec:
    rw: str
    bs: int
    iodepth: int
    runtime: float | None
    ios: int | None
    verify: bool
    seed: int = 1
    numjobs: int = 1

    @property
    def writing(self) -> bool:
        return self.rw.endswith("write")

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rw", choices=RW, default="randread")
    p.add_argument("--bs", default="4096", help="block size in bytes: 512 to 1M (k/M ok)")
    p.add_argument("--iodepth", default="1", help="requests in flight: 1 to the queue size")
    p.add_argument("--runtime", default=None, help="seconds to run (default 5)")
    p.add_argument("--ios", default=None, help="stop after this many requests instead")
    p.add_argument("--verify", action="store_true",
                   help="afterwards, check what was written or read, off the timed path")
    p.add_argument("--numjobs", default="1",
                   help="worker processes, each on its own request queue (VIRTIO_BLK_F_MQ) "
                   "with its own --iodepth and its own slice of the device")
    p.add_argument("--json", action="store_true", help="one JSON object, fio-like fields")


def prepare(args: argparse.Namespace) -> BenchSpec:
    """Validate everything that does not need the device (the CLI's number parsers)."""
    bs = parse_size(args.bs, "bench: --bs")
    if not SECTOR_SIZE <= bs <= MAX_BS or bs % SECTOR_SIZE:
        raise InvalidArgument(f"bench: --bs {bs} must be a multiple of 512 from 512 to 1M")
    iodepth = parse_number(args.iodepth, "bench: --iodepth")
    if iodepth < 1:
        raise InvalidArgument(f"bench: --iodepth {args.iodepth!r} must be at least 1")
    runtime = (parse_seconds(args.runtime, "bench: --runtime")
               if args.runtime is not None else None)
    ios = parse_number(args.ios, "bench: --ios") if args.ios is not None else None
    if ios is not None and ios < 1:
        raise InvalidArgument("bench: --ios must be positive")
    if runtime is not None and ios is not None:
        raise InvalidArgument("bench: give --runtime or --ios, not both")
    if runtime is None and ios is None:
        runtime = 5.0
    numjobs = parse_number(args.numjobs, "bench: --numjobs")
    if not 1 <= numjobs <= MAX_QUEUES:
        raise InvalidArgument(f"bench: --numjobs {numjobs} must be from 1 to {MAX_QUEUES}")
    return BenchSpec(args.rw, bs, iodepth, runtime, ios, args.verify, numjobs=numjobs)


class Offsets:
    """Where each request goes: random aligned blocks, or sequential with wrap-around.
    Random ones are drawn in bulk, so the hot path only pops a Python int."""

    def __init__(self, spec: BenchSpec, capacity: int, job: int = 0) -> None:
        self.sectors = spec.bs // SECTOR_SIZE
        # Job ``job`` of spec.numjobs works on its own slice of the blocks: jobs never
        # write one block, so each one's --verify holds.
        blocks = capacity // self.sectors // spec.numjobs
        self.blocks = blocks
        self.base = job * blocks * self.sectors
        if self.blocks < 1:
            raise InvalidArgument(f"bench: --bs {spec.bs} times --numjobs {spec.numjobs} "
                                  "exceeds the device capacity")
        self.rng = np.random.default_rng(spec.seed)
        self.random = spec.random
        self.pool: list[int] = []
        self.next_block = 0

    def next(self) -> int:
        if not self.random:
            block = self.next_block
            self.next_block = (block + 1) % self.blocks
            return self.base + block * self.sectors
        if not self.pool:
            self.pool = (self.rng.integers(0, self.blocks, 65536) * self.sectors
                         + self.base).tolist()
        return self.pool.pop()

    def picker(self) -> Callable[[], int]:
        """``next`` for the hot path: for random offsets a C-level ``next`` over the bulk
        draws, with no Python frame per request."""
        if not self.random:
            return self.next

        def draws() -> Iterator[list[int]]:
            while True:
                yield (self.rng.integers(0, self.blocks, 65536) * self.sectors
                       + self.base).tolist()
        return functools.partial(next, itertools.chain.from_iterable(draws()))


def _requests(spec: BenchSpec, buffers: list[DmaBuffer]) -> list[Request]:
    rtype = ReqType.VIRTIO_BLK_T_OUT if spec.writing else ReqType.VIRTIO_BLK_T_IN
    rng = np.random.default_rng(spec.seed)
    reqs = []
    for i, buf in enumerate(buffers):
        if spec.writing:  # distinct content per buffer, so verify can tell them apart
            buf.mv[:] = rng.integers(0, 256, spec.bs, dtype=np.uint8).tobytes()
        reqs.append(Request(rtype, 0, spec.bs // SECTOR_SIZE, buf, spec.bs, tag=i))
    return reqs


def _check(req: Request) -> None:
    if req.status != BlkStatus.VIRTIO_BLK_S_OK:
        raise BlkIOError(f"bench: {req} failed with status {req.status}", req.status or 0,
                         req.sector, req.count)


def run(dev: VirtioBlk, spec: BenchSpec) -> dict[str, Any]:
    """Run the workload (in ``spec.numjobs`` workers, one per queue); returns the
    fio-like result."""
    if spec.writing:
        dev.check_writable("bench")  # refuse before anything reaches the device
    if spec.numjobs > len(dev.queues):
        raise InvalidArgument(
            f"bench: --numjobs {spec.numjobs} needs as many request queues; "
            f"{dev.bdf} has {len(dev.queues)} set up (it offers "
            f"{dev.limits.num_queues}; see --queues)")
    for q in dev.queues[:spec.numjobs]:
        if spec.iodepth > q.vq.size:
            raise InvalidArgument(f"bench: --iodepth {spec.iodepth} exceeds the queue size "
                                  f"{q.vq.size} of queue {q.index}")
    Offsets(spec, dev.capacity)  # refuse a --bs * --numjobs beyond the capacity up front
    # Every DMA buffer is allocated here, before any fork: a worker may not map memory
    # of its own (the device could still write it after that worker died).
    buffers = [_buffers(dev, spec) for _ in range(spec.numjobs)]
    for q, bufs in zip(dev.queues, buffers):
        _check_room(q, spec, bufs)
    if spec.numjobs == 1:
        return run_job(dev, spec, 0, buffers[0])
    if dev.waiter is not None and dev.waiter.source.kind in ("uio-intx", "vfio-intx"):
        # Every worker woken by the one line, each reading (clearing) the ISR: on QEMU
        # 7.2 a job timed out waiting for its queue that way. Per-queue MSI-X works.
        raise Unsupported(f"bench: --numjobs {spec.numjobs} with --wait {dev.wait_mode} "
                          "needs a vector per queue (--backend vfio, MSI-X); "
                          f"{dev.backend.name} has one INTx line for the whole device")
    from .workers import run_workers
    deadline = (spec.runtime or 600.0) + 60.0 + 4 * dev.timeout
    jobs = run_workers(dev, lambda d, i: run_job(d, spec, i, buffers[i], keep_lat=True),
                       spec.numjobs, deadline)
    return _total(spec, jobs)


def _total(spec: BenchSpec, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """fio's group report: I/Os of every job over the longest job's time, latency
    percentiles over every completion, CPU summed over the workers."""
    lat = np.concatenate([np.frombuffer(j.pop("_lat"), np.float32) for j in jobs])
    done = sum(j["ios"] for j in jobs)
    seconds = max(j["seconds"] for j in jobs)
    cpu = sum(j["cpu_s"] for j in jobs)
    p50, p99, p999 = np.percentile(lat.astype(np.float64) * 1e6, [50, 99, 99.9]).tolist()
    total: dict[str, Any] = {
        "rw": spec.rw, "bs": spec.bs, "iodepth": spec.iodepth, "numjobs": spec.numjobs,
        "ios": done, "seconds": round(seconds, 4), "iops": round(done / seconds, 1),
        "mbps": round(done * spec.bs / seconds / 1e6, 2),
        "lat_us": {"p50": round(p50, 1), "p99": round(p99, 1), "p99.9": round(p999, 1)},
        "backend": jobs[0]["backend"], "ring": jobs[0]["ring"],
        "kicks": sum(j["kicks"] for j in jobs), "wait": jobs[0]["wait"],
        "cpu_s": round(cpu, 3), "cpu_s_per_io": float(f"{cpu / max(done, 1):.3g}"),
        "cpu_util": round(cpu / seconds, 3) if seconds else 0.0, "jobs": jobs}
    if all("verified_blocks" in j for j in jobs):
        total["verified_blocks"] = sum(j["verified_blocks"] for j in jobs)
    return total


def _buffers(dev: VirtioBlk, spec: BenchSpec) -> list[DmaBuffer]:
    """One job's buffers: one per request in flight, one more for --iodepth 1's
    request built while the other is out."""
    return [dev.alloc_buffer(spec.bs) for _ in range(spec.iodepth + (spec.iodepth == 1))]


def run_job(dev: VirtioBlk, spec: BenchSpec, queue: int, buffers: list[DmaBuffer],
            keep_lat: bool = False) -> dict[str, Any]:
    """One job on request queue ``queue``, its own slice of the device, ``buffers``
    for its requests; with ``keep_lat`` its latencies go along (float32 bytes) for the
    total's percentiles."""
    q = dev.queues[queue]
    offsets = Offsets(spec, dev.capacity, queue)
    track = Tracker(offsets) if spec.verify and spec.writing else None
    pick = track.pick if track else offsets.picker()
    reqs = _requests(spec, buffers[:spec.iodepth])
    port = _Port(q, dev.timeout)
    one_at_a_time = spec.iodepth == 1 and not track
    if one_at_a_time:
        reqs.append(_requests(spec, buffers[1:])[0])  # built while the other is out
        reqs[1].tag = 1
    lat: list[float] = []
    target = spec.ios or 1 << 62
    clock = time.perf_counter
    cpu0 = os.times()
    start = clock()
    deadline = start + (spec.runtime or 1e9)
    if one_at_a_time:
        done = _one_at_a_time(port, reqs, pick, target, start, deadline, lat)
    else:
        done = _keep_full(port, reqs, pick, target, start, deadline, lat, track)
    seconds = clock() - start
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    result = _summary(dev, spec, done, seconds, lat, q)
    result.update(_cpu_and_wait(dev, q, done, seconds, cpu))
    if spec.verify:
        checked = (_verify_writes(dev, spec, reqs, track, queue) if track
                   else _verify_reads(dev, spec, reqs, port, queue))
        result["verified_blocks"] = checked
    if keep_lat:
        result["queue"] = queue
        result["_lat"] = np.asarray(lat, np.float32).tobytes()
    return result


def _check_room(q: RequestQueue, spec: BenchSpec, buffers: list[DmaBuffer]) -> None:
    """A job's requests (one per buffer) are in its ring at once. Without indirect
    descriptors a request takes one descriptor per segment (header, data, status), not
    one: count what each really takes."""
    need = sum(q.descriptors(buf, spec.bs) for buf in buffers)
    if need > q.vq.size:
        raise InvalidArgument(f"bench: --iodepth {spec.iodepth} needs {need} descriptors "
                              f"({len(buffers)} requests of {spec.bs} bytes), more than "
                              f"the queue size {q.vq.size} of queue {q.index}")


class _Port:
    """One request queue's batch calls with the device's timeout bound in, as the loops
    below call them (VirtioBlk's own submit/reap are these on queue 0)."""

    def __init__(self, q: RequestQueue, timeout: float) -> None:
        self.submit = q.submit
        self.kick = q.vq.kick
        self.reap: Callable[[], list[Request]] = functools.partial(q.reap, timeout)
        self.reap_one: Callable[[], Request | None] = functools.partial(q.reap_one, timeout)
        self.q = q


def _one_at_a_time(dev: _Port, reqs: list[Request], pick: Callable[[], int],
                   target: int, start: float, deadline: float, lat: list[float]) -> int:
    """--iodepth 1: one request at the device at a time, from two requests (and
    buffers) in turn. The next one is built into the ring (``submit(kick=False)``)
    while the current one is in flight, and published as soon as that one completes:
    building a request costs about as much Python as the device takes to serve one,
    and the device still sees a single request at a time. Its latency runs from the
    previous completion (when it was published) to its own. Returns the requests done."""
    # The queue's own kick: dev.kick adds only a closed-device check, and a Python call
    # on this path (completion seen -> next request published) costs about a microsecond.
    submit, kick, reap_one, record = dev.submit, dev.kick, dev.reap_one, lat.append
    clock = time.perf_counter
    cur, nxt = reqs
    cur.sector = pick()
    submit((cur,))
    done, last, built = 0, start, False
    while True:
        if done + 1 < target and last < deadline:
            nxt.sector = pick()
            submit((nxt,), kick=False)
            built = True
        reap_one()
        if built:
            kick()
        now = clock()
        if cur.status:  # VIRTIO_BLK_S_OK is 0
            _check(cur)
        record(now - last)
        last = now
        done += 1
        if not built:
            return done
        cur, nxt, built = nxt, cur, False


def _keep_full(dev: _Port, reqs: list[Request], pick: Callable[[], int], target: int,
               start: float, deadline: float, lat: list[float], track: Tracker | None) -> int:
    """Keep ``reqs`` in flight: reap whatever completed and resubmit as many, one kick
    per batch. Returns the requests done."""
    clock = time.perf_counter
    submitted_at = [start] * len(reqs)
    for req in reqs:
        req.sector = pick()
    dev.submit(reqs)
    left = target - len(reqs)  # requests that may still be issued
    reap, submit, record = dev.reap, dev.submit, lat.append
    in_flight = len(reqs)  # only this loop submits: no need to ask the device
    while in_flight:
        batch = reap()
        now = clock()
        n = len(batch)
        if track or n > left or now >= deadline:
            again = _last_laps(batch, now, submitted_at, lat, track, pick,
                               left if now < deadline else 0)
            if again:
                submit(again)
            left -= len(again)
            in_flight += len(again) - n
            continue
        # The common case: every completed request goes straight back. Only what the
        # submit needs comes before it; the bookkeeping after it overlaps the device's
        # work on the batch.
        for req in batch:
            if req.status:  # VIRTIO_BLK_S_OK is 0
                _check(req)
            req.sector = pick()
        submit(batch)
        left -= n
        for req in batch:
            tag = req.tag
            record(now - submitted_at[tag])
            submitted_at[tag] = now
    return target - left  # every issued request was reaped: nothing is in flight


def _last_laps(batch: list[Request], now: float, submitted_at: list[float], lat: list[float],
               track: Tracker | None, pick: Callable[[], int], budget: int) -> list[Request]:
    """The careful lap (near the end of the run, or tracking writes for --verify):
    record each completion; the first ``budget`` of them, given new sectors, are
    returned to be submitted again."""
    again: list[Request] = []
    for req in batch:
        if req.status:  # VIRTIO_BLK_S_OK is 0
            _check(req)
        lat.append(now - submitted_at[req.tag])
        if track:
            track.completed(req)
        if len(again) < budget:
            req.sector = pick()
            submitted_at[req.tag] = now
            again.append(req)
    return again


class Tracker:
    """For --verify of writes: never two writes to one block in flight at once (their
    order would be the device's choice), and which buffer each block got last."""

    def __init__(self, offsets: Offsets) -> None:
        self.offsets = offsets
        self.busy: set[int] = set()
        self.owner: dict[int, int] = {}

    def pick(self) -> int:
        sector = self.offsets.next()
        while sector in self.busy:
            sector = self.offsets.next()
        self.busy.add(sector)
        return sector

    def completed(self, req: Request) -> None:
        self.busy.discard(req.sector)
        self.owner.pop(req.sector, None)  # keep insertion order = completion order
        self.owner[req.sector] = req.tag


def _summary(dev: VirtioBlk, spec: BenchSpec, done: int, seconds: float,
             lat: list[float], q: RequestQueue) -> dict[str, Any]:
    p50, p99, p999 = np.percentile(np.array(lat) * 1e6, [50, 99, 99.9]).tolist()
    return {"rw": spec.rw, "bs": spec.bs, "iodepth": spec.iodepth, "ios": done,
            "seconds": round(seconds, 4), "iops": round(done / seconds, 1),
            "mbps": round(done * spec.bs / seconds / 1e6, 2),
            "lat_us": {"p50": round(p50, 1), "p99": round(p99, 1), "p99.9": round(p999, 1)},
            "backend": dev.backend.name, "ring": ring_name(q.vq), "kicks": q.vq.kicks}


def _cpu_and_wait(dev: VirtioBlk, q: RequestQueue, done: int, seconds: float,
                  cpu: float) -> dict[str, Any]:
    """What the waiting cost: this process's user + system CPU time over the timed
    loop, per completed I/O, and how the wait mode behaved (sleeps, interrupts,
    capacity changes reported by the config interrupt)."""
    out: dict[str, Any] = {"wait": dev.wait_mode, "cpu_s": round(cpu, 3),
                           "cpu_s_per_io": float(f"{cpu / max(done, 1):.3g}"),
                           "cpu_util": round(cpu / seconds, 3) if seconds else 0.0}
    waiter = q.vq.waiter
    if waiter is not None:
        st = waiter.stats()
        out.update({"irq": st["irq"], "sleeps": st["sleeps"], "interrupts": st["interrupts"],
                    "spurious": st["spurious"]})
    if dev.capacity_changes:
        out["capacity_changes"] = [{"from": a, "to": b} for a, b in dev.capacity_changes]
    return out


def _verify_writes(dev: VirtioBlk, spec: BenchSpec, reqs: list[Request],
                   track: Tracker, queue: int) -> int:
    """The most recently written blocks hold the buffer last written to each."""
    count = spec.bs // SECTOR_SIZE
    recent = list(track.owner.items())[-VERIFY_BLOCKS:]
    for sector, tag in recent:
        if (dev.read(sector, count, queue=queue)
                != bytes(reqs[tag].buffer.mv)):  # type: ignore[union-attr]
            raise BlkIOError(f"bench verify: sectors {sector}..{sector + count - 1} do "
                             "not hold what was written there last", 0, sector, count)
    return len(recent)


def _verify_reads(dev: VirtioBlk, spec: BenchSpec, reqs: list[Request], port: _Port,
                  queue: int) -> int:
    """Blocks read at full depth through the batch path equal plain reads of them."""
    count = spec.bs // SECTOR_SIZE
    offsets = Offsets(spec, dev.capacity, queue)
    checked = 0
    while checked < VERIFY_BLOCKS:
        for req in reqs:
            req.sector = offsets.next()
        port.submit(reqs)
        while port.q.in_flight:
            port.reap()
        for req in reqs:
            _check(req)
            if (bytes(req.buffer.mv)  # type: ignore[union-attr]
                    != dev.read(req.sector, count, queue=queue)):
                raise BlkIOError(f"bench verify: {req} differs from a plain read", 0,
                                 req.sector, count)
        checked += len(reqs)
    return checked


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    lat = result["lat_us"]
    jobs = f" numjobs={result['numjobs']}" if "numjobs" in result else ""
    print(f"{result['rw']} bs={result['bs']} iodepth={result['iodepth']}{jobs} "
          f"backend={result['backend']} ring={result['ring']}: {result['ios']} ios in "
          f"{result['seconds']:.2f} s")
    print(f"  IOPS {result['iops']:.0f}  {result['mbps']:.1f} MB/s  clat p50 {lat['p50']:.0f} us"
          f"  p99 {lat['p99']:.0f} us  p99.9 {lat['p99.9']:.0f} us  kicks {result['kicks']}")
    wait = f"  wait {result['wait']}" if "wait" in result else ""
    if "irq" in result:
        wait += (f" ({result['irq']}: {result['sleeps']} sleeps, {result['interrupts']} "
                 f"interrupts, {result['spurious']} spurious)")
    if "cpu_s_per_io" in result:
        print(f" {wait}  CPU {result['cpu_s']:.2f} s = {result['cpu_s_per_io'] * 1e6:.1f} us/IO"
              f" ({result['cpu_util'] * 100:.0f}% of one CPU)")
    for change in result.get("capacity_changes", []):
        print(f"  config change: capacity {change['from']} -> {change['to']} sectors")
    if "verified_blocks" in result:
        print(f"  verify: {result['verified_blocks']} blocks checked, all good")
    for job in result.get("jobs", []):
        jl = job["lat_us"]
        print(f"  job {job['queue']} (queue {job['queue']}): IOPS {job['iops']:.0f}  "
              f"{job['mbps']:.1f} MB/s  clat p50 {jl['p50']:.0f} us  p99 {jl['p99']:.0f} us"
              f"  CPU {job['cpu_s_per_io'] * 1e6:.1f} us/IO")
