"""Runs in the guest: ``virtio-user`` commands, one process for all of a benchmark's runs.

Under TCG a new Python process spends about 4-5 s importing numpy and the driver before
its first I/O; fio starts in a fraction of that. Neither start-up is part of what either
side measures, but paid once per run it made a smoke of 14 runs take minutes. So the
host starts this once; it imports ``virtio_user.cli`` and then, for each request, calls
the very ``main(argv)`` that the ``virtio-user`` command calls.

Requests come through a FIFO (the agent gives commands no stdin): one JSON line
``{"id": N, "argv": [...]}``, or ``{"quit": true}``. Blocked on the FIFO, the process
uses no CPU while the kernel side runs. Each answer is one line on stdout:
``{"id": N, "status": S, "stdout": "...", "stderr": "..."}``.

``virtio-user nbd`` forks its background server from this process; each server that has
ended is reaped after the next request, so none stays a zombie for the whole run.

Run as a script (``python bench_guest.py FIFO``), so the host package is not imported.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
from typing import Any, Callable


def serve(fifo: str) -> None:
    from virtio_user.cli import main  # the import cost this process exists to pay once

    with contextlib.suppress(FileNotFoundError):
        os.unlink(fifo)  # left by an earlier server in this guest
    os.mkfifo(fifo)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        with open(fifo) as requests:  # a writer's close ends each batch of lines
            for line in requests:
                request = json.loads(line)
                if request.get("quit"):
                    return
                print(json.dumps(run_one(main, request)), flush=True)
                reap_children()


def run_one(main: Callable[[list[str]], int], request: dict[str, Any]) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    gc.collect()  # each run starts with no garbage left by the one before, like a new process
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(request["argv"])
    return {"id": request["id"], "status": status, "stdout": out.getvalue(),
            "stderr": err.getvalue()}


def reap_children() -> None:
    with contextlib.suppress(ChildProcessError):  # no children at all
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


if __name__ == "__main__":
    # Python put this script's folder (virtio_user/host) first on sys.path: drop it so
    # its modules cannot shadow top-level ones.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    serve(sys.argv[1])
