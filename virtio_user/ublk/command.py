"""``virtio-user ublk add | del N | list``, modelled on ublksrv's ``ublk add -t ... /
del -n / list``: arguments, the server in the background (or ``--foreground``), and
the two commands that need no virtio device."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CannotOpen, FileAccessError, InvalidArgument

if TYPE_CHECKING:
    from ..blk import VirtioBlk
    from .device import Started

log = logging.getLogger(__name__)

READY_TIMEOUT = 90.0  # for the background server to open the device and start the disk
# A cancelled start-up: the server's own way out (STOP_DEV, DEL_DEV, device reset), then
# SIGKILL.
STOP_TIMEOUT = 40.0


@dataclass
class UblkPlan:
    number: int | None
    ready_fd: int | None = None  # the background child tells its parent here
    log_file: str | None = None


def add_args(p: argparse.ArgumentParser) -> None:
    # The subcommand's parser class (bad usage: one line, exit code 1), no -h (as for
    # every other command: --help only).
    sub = p.add_subparsers(dest="ublk_action", metavar="ACTION", required=True,
                           parser_class=type(p))

    def action(name: str, text: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        a.add_argument("--help", action="help", help="show this help")
        return a

    add = action("add", "serve the device as /dev/ublkbN (in the background)")
    add.add_argument("--number", metavar="N", type=int, default=None,
                     help="ask for /dev/ublkbN (default: the kernel picks the first free)")
    add.add_argument("--foreground", action="store_true",
                     help="serve in this process until Ctrl-C or SIGTERM")
    add.add_argument("--log", metavar="FILE",
                     help="append the background server's log to FILE")
    rm = action("del", "flush and remove /dev/ublkbN (refused while mounted)")
    rm.add_argument("number", metavar="N", type=int, help="the device number")
    action("list", "the ublk devices and their servers")


def prepare(args: argparse.Namespace) -> Any:
    """``del`` and ``list`` finish here, as does the parent of a background server
    (subcommand.Finished)."""
    from ..subcommand import Finished
    if args.ublk_action == "del":
        from .device import del_device
        print(del_device(args.number))
        return Finished(0)
    if args.ublk_action == "list":
        _print_list()
        return Finished(0)
    if args.number is not None and not 0 <= args.number < 1 << 20:
        raise InvalidArgument(f"--number {args.number} is not in 0..{(1 << 20) - 1}")
    from . import spec
    if not os.path.exists(spec.CONTROL_PATH):  # before the virtio device is taken
        raise CannotOpen(f"{spec.CONTROL_PATH}: no such file (is the ublk_drv module "
                         "loaded? Linux 6.0 or later with CONFIG_BLK_DEV_UBLK)")
    if args.log is not None:
        try:
            open(args.log, "a").close()
        except OSError as exc:
            raise FileAccessError(f"cannot write {args.log}: {exc.strerror}") from exc
    plan = UblkPlan(args.number, log_file=args.log)
    if args.foreground:
        return plan
    from ..daemon import await_ready, fork_server
    pid, fd, mask = fork_server()
    if pid == 0:
        plan.ready_fd = fd
        return plan
    # Ctrl-C or SIGTERM meanwhile stops the server before it adds the disk (Interrupted).
    code, path = await_ready(pid, fd, READY_TIMEOUT, mask, "the ublk disk", STOP_TIMEOUT)
    if code == 0:
        print(f"{path}: ready, server pid {pid}")
    elif code < 0:
        from ..errors import DeviceTimeout
        raise DeviceTimeout(f"the ublk server did not get ready within {READY_TIMEOUT:g} s")
    return Finished(code)


def _print_list() -> None:
    from ..daemon import process_alive
    from .device import list_devices
    for info, sectors in list_devices():
        pid = info.ublksrv_pid
        server = f"pid {pid}" if pid > 0 and process_alive(pid) else "gone"
        print(f"/dev/ublkb{info.dev_id}: {info.state_name}, {sectors} sectors, "
              f"{info.nr_hw_queues} queue(s) of {info.queue_depth}, "
              f"max request {info.max_io_buf_bytes} bytes, flags {info.flags:#x}, "
              f"server {server}")


def run(dev: VirtioBlk, args: argparse.Namespace, plan: UblkPlan) -> int:
    """Serve ``dev`` as a ublk disk until stopped."""
    from ..daemon import log_to_stderr
    log_to_stderr("virtio_user", "ublk")
    from ..daemon import serve_and_exit
    return serve_and_exit(dev, lambda: _serve(dev, plan), background=plan.ready_fd is not None)


def _serve(dev: VirtioBlk, plan: UblkPlan) -> int:
    from .device import serve
    stop = threading.Event()

    def on_ready(started: Started) -> None:
        if plan.ready_fd is None:
            print(f"{started.path}: ready, serving in the foreground (pid {os.getpid()})",
                  flush=True)
        else:
            from ..daemon import detach
            detach(plan.ready_fd, started.path, plan.log_file)
        log.info("%s: serving %s (%d sectors)", started.path, dev.bdf, dev.capacity)

    previous = {s: signal.signal(s, lambda signum, frame: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    if plan.ready_fd is not None:  # blocked since the fork (daemon.fork_server)
        from ..daemon import unblock_stop
        unblock_stop()
    try:
        if stop.is_set():  # the parent cancelled the start-up: add no disk
            log.info("start-up cancelled; no ublk disk added")
            return 128 + signal.SIGTERM
        serve(dev, plan.number, stop, on_ready)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
