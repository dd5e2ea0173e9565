"""Guest side of tests/integration/test_mq.py: one worker process per request queue.

    mq_workers.py BACKEND verify BDF...   each device: every queue set up, a worker per
        queue writes its own pattern to its own range through its queue and reads it
        back, all at once; prints one JSON line per device. The host checks the image.
    mq_workers.py BACKEND kill BDF        worker 2 puts a batch in flight and kills
        itself (SIGKILL); prints the WorkerFailed lines, then that the device reset
        before its memory was released, and that it opens and reads again.
"""

import json
import os
import signal
import sys

from virtio_user import VirtioBlk
from virtio_user.blk import Request
from virtio_user.errors import WorkerFailed
from virtio_user.spec import ReqType
from virtio_user.workers import run_workers

SECTORS = 2048  # per worker: 1 MiB, several bounce-pool pieces


def pattern(queue: int) -> bytes:
    unit = f"queue {queue} of a multi-queue device\n".encode()
    return (unit * (SECTORS * 512 // len(unit) + 1))[:SECTORS * 512]


def write_and_read(dev: VirtioBlk, queue: int) -> dict:
    base = (queue + 1) * SECTORS
    dev.write(base, pattern(queue), queue=queue)
    assert dev.read(base, SECTORS, queue=queue) == pattern(queue)
    q = dev.queues[queue]
    return {"queue": queue, "pid": os.getpid(), "completed": q.vq.completed,
            "kicks": q.vq.kicks}


def verify(backend: str, bdfs: list) -> None:
    for bdf in bdfs:
        with VirtioBlk.open(bdf, backend=backend, queues=4) as dev:
            info = dev.info()  # before: afterwards the queues are the workers' (workers.py)
            jobs = run_workers(dev, write_and_read, len(dev.queues), deadline=120)
            print(json.dumps({"bdf": bdf, "info": info, "jobs": jobs}), flush=True)


def die_with_requests_out(buffers: list):
    def job(dev: VirtioBlk, queue: int) -> int:
        if queue == 2:
            reqs = [Request(ReqType.VIRTIO_BLK_T_IN, 8 * i, 8, buf, 4096)
                    for i, buf in enumerate(buffers)]
            dev.queues[2].submit(reqs)
            os.kill(os.getpid(), signal.SIGKILL)
        return write_and_read(dev, queue)
    return job


def kill(backend: str, bdf: str) -> None:
    dev = VirtioBlk.open(bdf, backend=backend, queues=4)
    released = []
    real_reset = dev._reset_quietly

    def reset() -> bool:
        released.append(("reset", all(not r.mm.closed for r in dev._regions)))
        return real_reset()
    dev._reset_quietly = reset  # type: ignore[method-assign]
    try:
        run_workers(dev, die_with_requests_out([dev.alloc_buffer(4096) for _ in range(32)]),
                    len(dev.queues), deadline=120)
        sys.exit("kill: no WorkerFailed")
    except WorkerFailed as exc:
        print("error", exc, flush=True)
        for line in exc.reports:
            print("report", line, flush=True)
        print("status after", dev.transport.status, flush=True)
    finally:
        dev.close()
    print("resets with memory still mapped", released, flush=True)
    with VirtioBlk.open(bdf, backend=backend) as again:
        print("reopened", len(again.read(0, 8)), flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "verify":
        verify(sys.argv[1], sys.argv[3:])
    else:
        kill(sys.argv[1], sys.argv[3])
