"""``virtio-user nbd /dev/nbdN`` and ``nbd -d``: arguments, the server in the background
(or ``--foreground``), readiness, and the disconnect."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..blk import VirtioBlk
from ..errors import (CannotOpen, DeviceBusy, DeviceTimeout, FileAccessError,
                     InvalidArgument)
from ..spec import SECTOR_SIZE

from .kernel import (DISCONNECT_TIMEOUT, KERNEL_TIMEOUT, KernelNbd, READY_TIMEOUT, disconnect,
                     nbd_name, server_pid)
from .server import NbdServer, grow_buffers

log = logging.getLogger(__name__)

# A cancelled start-up: the server resets the device and, if it got that far, has the
# kernel disconnect (bounded by DISCONNECT_TIMEOUT); then it is killed.
STOP_TIMEOUT = DISCONNECT_TIMEOUT + 10.0

@dataclass
class NbdPlan:
    path: str
    kernel_timeout: int
    ready_fd: int | None = None  # the background child tells its parent here
    log_file: str | None = None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("nbd_device", metavar="/dev/nbdN", help="the kernel's NBD device")
    p.add_argument("-d", "--disconnect", action="store_true",
                   help="flush, disconnect and wait for the server to end")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until disconnected (default: background)")
    p.add_argument("--kernel-timeout", metavar="SECONDS", default=str(KERNEL_TIMEOUT),
                   help="the kernel fails a request not answered within SECONDS "
                   f"(NBD_SET_TIMEOUT, default {KERNEL_TIMEOUT})")
    p.add_argument("--log", metavar="FILE", help="append the background server's log to FILE")


def prepare(args: argparse.Namespace) -> Any:
    """Checks before the device is taken; ``-d`` and the parent of a background server
    finish here (subcommand.Finished)."""
    from ..numbers import parse_number
    from ..subcommand import Finished
    path = args.nbd_device
    name = nbd_name(path)
    if not os.path.exists(f"/sys/block/{name}"):
        raise CannotOpen(f"{path}: no such NBD device (is the nbd module loaded?)")
    timeout = parse_number(args.kernel_timeout, "--kernel-timeout")
    if not 1 <= timeout <= 86400:
        raise InvalidArgument(f"--kernel-timeout {timeout} is not in 1..86400 seconds")
    if args.disconnect:
        return Finished(disconnect(path))
    pid = server_pid(name)
    if pid is not None:
        raise DeviceBusy(f"{path} is already connected (server pid {pid})")
    if not os.path.exists(path):
        raise CannotOpen(f"{path}: no such device node")
    if args.log is not None:
        try:
            open(args.log, "a").close()
        except OSError as exc:
            raise FileAccessError(f"cannot write {args.log}: {exc.strerror}") from exc
    plan = NbdPlan(path, timeout, log_file=args.log)
    if args.foreground:
        return plan
    return _background(plan, Finished)


def _background(plan: NbdPlan, finished: Callable[[int], Any]) -> Any:
    """Fork a detached child that becomes the server (daemon.py); the parent returns once
    the child says /dev/nbdN is usable, or with the child's exit status if it failed.
    Ctrl-C or SIGTERM meanwhile stops the server before it connects (Interrupted)."""
    from ..daemon import await_ready, fork_server
    pid, fd, mask = fork_server()
    if pid == 0:
        plan.ready_fd = fd
        return plan
    # READY_TIMEOUT + 30 s: the child also opens the device.
    code, _ = await_ready(pid, fd, READY_TIMEOUT + 30.0, mask, plan.path, STOP_TIMEOUT)
    if code < 0:
        raise DeviceTimeout(f"{plan.path}: the server did not get ready within "
                            f"{READY_TIMEOUT + 30.0:g} s")
    if code == 0:
        print(f"{plan.path}: connected, server pid {pid}")
    return finished(code)


def run(dev: VirtioBlk, args: argparse.Namespace, plan: NbdPlan) -> int:
    """Connect ``dev`` to the kernel as plan.path and serve until disconnected."""
    _log_to_stderr()
    from ..daemon import serve_and_exit
    return serve_and_exit(dev, lambda: _serve(dev, plan), background=plan.ready_fd is not None)


def _serve(dev: VirtioBlk, plan: NbdPlan) -> int:
    kernel = KernelNbd(plan.path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()
    ready = False
    started = time.monotonic()

    def tick() -> None:
        nonlocal ready
        if ready:
            return
        if kernel.error is not None:
            raise CannotOpen(f"{plan.path}: NBD_DO_IT failed: {kernel.error.strerror}")
        if kernel.ready():
            ready = True
            _announce(plan, dev)
        elif time.monotonic() - started > READY_TIMEOUT:
            raise DeviceTimeout(f"{plan.path} did not come up within {READY_TIMEOUT:g} s")

    previous = {s: signal.signal(s, lambda signum, frame: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    if plan.ready_fd is not None:  # blocked since the fork (daemon.fork_server)
        from ..daemon import unblock_stop
        unblock_stop()
    try:
        if stop.is_set():  # the parent cancelled the start-up: connect nothing
            log.info("%s: start-up cancelled; not connected", plan.path)
            return 128 + signal.SIGTERM
        server = NbdServer(dev, ours, wait=max(dev.timeout, plan.kernel_timeout))
        grow_buffers(theirs)  # the kernel sends whole large writes through it
        kernel.configure(theirs, block_size=dev.block_size,
                         size_bytes=dev.capacity * SECTOR_SIZE, flags=server.flags,
                         timeout=plan.kernel_timeout)
        theirs.close()  # the kernel holds its own reference now
        kernel.start()
        reason = server.serve(stop=stop.is_set, on_stop=kernel.disconnect, tick=tick)
        log.info("%s: %s; %d requests, %d errors", plan.path, reason,
                 server.stats.requests, server.stats.errors)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        theirs.close()
        ours.close()
        kernel.close()


def _announce(plan: NbdPlan, dev: VirtioBlk) -> None:
    if plan.ready_fd is None:
        print(f"{plan.path}: connected, serving in the foreground (pid {os.getpid()})",
              flush=True)
    else:
        _detach(plan)
    log.info("%s: serving %s (%d sectors)", plan.path, dev.bdf, dev.capacity)


def _detach(plan: NbdPlan) -> None:
    from ..daemon import detach
    assert plan.ready_fd is not None
    detach(plan.ready_fd, plan.path, plan.log_file)


def _log_to_stderr() -> None:
    """The whole package's messages (server, kernel side, this module) to stderr."""
    from ..daemon import log_to_stderr
    log_to_stderr(__package__ or "virtio_user.nbd", "nbd")
