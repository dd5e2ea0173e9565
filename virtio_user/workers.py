"""One worker process per request queue: the device initialised once, then a forked
child per queue that drives that queue alone, in parallel with the others.

CPython's threads do not run Python code in parallel, so parallel queues mean processes.
The model is SPDK's bdev_virtio and DPDK's (each thread owns one queue, no locks on the
fast path): after ``fork`` every worker shares the device's BAR and the DMA memory (the
hugepage regions are MAP_SHARED, so a worker's writes are the device's reads) and
touches only its own queue, its own request slots and its own bounce pool.

The parent supervises and owns the clean-up:

- A worker that fails (a device protocol violation, a timeout, any error) sends its
  error and exits; one that dies (kill -9) sends nothing. Either way the parent resets
  the device (every queue stops), stops the other workers (SIGKILL: nothing of theirs
  to clean up, the parent holds the memory) and raises ``WorkerFailed`` with a line per
  worker. Memory is freed only after that reset, when the caller closes the device: a
  dead worker never leaves the device running with memory freed under it.
- Ctrl-C reaches the whole process group: the workers ignore SIGINT and SIGTERM goes
  back to its default action, so only the parent acts: it kills the workers, waits for
  them and re-raises, and the device is reset once, by the caller's close().
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import InvalidArgument, WorkerFailed, exit_code

if TYPE_CHECKING:
    from .blk import VirtioBlk

Job = Callable[["VirtioBlk", int], Any]  # (device, queue index) -> a picklable result


@dataclass
class _Worker:
    index: int  # the queue it drives
    pid: int
    fd: int  # read end of its result pipe
    data: bytearray
    status: int | None = None  # waitpid status once reaped


def run_workers(dev: VirtioBlk, job: Job, count: int, deadline: float) -> list[Any]:
    """Run ``job(dev, i)`` in a forked worker for each queue i < ``count``, in parallel;
    their results in queue order. Bounded by ``deadline`` seconds in all. On any
    failure the device is reset and ``WorkerFailed`` raised (module docstring)."""
    if not 1 <= count <= len(dev.queues):
        raise InvalidArgument(f"{count} workers need as many queues; {dev.bdf} has "
                              f"{len(dev.queues)} set up (--queues)")
    workers: list[_Worker] = []
    try:
        # A signal handler that raises inside fork()'s at-fork hooks is "ignored" by
        # CPython: Ctrl-C waits until every worker is started.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for index in range(count):
                workers.append(_fork(dev, job, index))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return _collect(dev, workers, time.monotonic() + deadline)
    finally:
        _stop(workers)
        for w in workers:
            # This process's copy of the ring is as it was at the fork; the device's
            # indices moved on with the worker. Using it would look like a protocol
            # violation (used.idx ahead of what is in flight).
            q = dev.queues[w.index].vq
            if not q.broken:
                q.broken = (f"queue {w.index} was driven by a worker process; its ring "
                            "state left with it: close and reopen the device to use it")


def _fork(dev: VirtioBlk, job: Job, index: int) -> _Worker:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        os.close(r)
        _child(dev, job, index, w)
    os.close(w)
    return _Worker(index, pid, r, bytearray())


def _child(dev: VirtioBlk, job: Job, index: int, fd: int) -> None:
    """Run the job; send ("ok", result) or ("error", message, exit code); _exit. Exit
    hooks never run here: the parent alone closes (resets) the device."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        dev.after_fork(index)
        try:
            reply: tuple[Any, ...] = ("ok", job(dev, index))
        except BaseException as exc:  # noqa: B036 - every failure is reported, then _exit
            reply = ("error", str(exc) or type(exc).__name__, exit_code(exc))
        data = pickle.dumps(reply)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:  # noqa: B036 - nothing may unwind into the parent's frames
        code = 1
    finally:
        os._exit(code)


def _collect(dev: VirtioBlk, workers: list[_Worker], deadline: float) -> list[Any]:
    """Read every worker's reply until its pipe closes; reap it. The first failure
    (an error reply, a death without one, the deadline) stops everything."""
    pending = {w.fd: w for w in workers}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            late = sorted(w.index for w in pending.values())
            _fail(dev, workers, min(late), f"did not finish within the deadline "
                  f"(workers on queues {late} still running)", 33)
        ready, _, _ = select.select(list(pending), [], [], left)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            worker = pending[fd]
            if chunk:
                worker.data += chunk
                continue
            del pending[fd]
            os.close(fd)
            worker.fd = -1
            _, worker.status = os.waitpid(worker.pid, 0)
            reply = _reply(worker)
            if reply[0] != "ok":
                _fail(dev, workers, worker.index, reply[1], reply[2])
    return [_reply(w)[1] for w in workers]


def _reply(worker: _Worker) -> tuple[Any, ...]:
    """What the worker said, or why it said nothing."""
    if worker.data:
        try:
            reply: tuple[Any, ...] = pickle.loads(bytes(worker.data))
            return reply
        except Exception:  # a truncated reply: it died while writing
            pass
    status = worker.status or 0
    how = (f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
           if os.WIFSIGNALED(status) else f"exited with status {os.waitstatus_to_exitcode(status)}")
    return ("error", f"the worker {how} without a result", 15)


def _fail(dev: VirtioBlk, workers: list[_Worker], index: int, message: str,
          code: int) -> None:
    """Reset the device (before anything is freed), stop every worker, raise."""
    why = f"the worker on queue {index} failed: {message}"
    dev.queues[index].vq.broken = why
    reset = dev.queue_fault(index, why)
    _stop(workers)
    outcome = ("the device has been reset" if reset
               else "the device did not reset; its memory stays mapped")
    reports = []
    for w in workers:
        if w.index == index:
            reports.append(f"worker {w.index} (queue {w.index}): {message}")
        else:
            reports.append(f"worker {w.index} (queue {w.index}): stopped, since the "
                           f"worker on queue {index} failed")
    raise WorkerFailed(f"{dev.bdf}: the worker on queue {index} failed: {message}; "
                       f"{outcome} and every worker stopped", reports, code)


def _stop(workers: list[_Worker]) -> None:
    """Kill and reap every worker still running; close its pipe. SIGKILL: a worker
    has nothing to clean up (the parent holds the device and its memory)."""
    for w in workers:
        if w.status is None:
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for w in workers:
        if w.status is None:
            _, w.status = os.waitpid(w.pid, 0)
        if w.fd >= 0:
            os.close(w.fd)
            w.fd = -1
