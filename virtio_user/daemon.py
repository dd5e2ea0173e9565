"""A server that goes to the background once it is usable: the parent forks, the child
serves and says "ready" through a pipe, the parent prints and returns; the child's
output then goes to a log file (or nowhere), so whoever waits for the parent's output
does not wait for the server's end. Shared by ``virtio-user ublk add`` (and the same
shape as ``virtio-user nbd``)."""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time

from typing import TYPE_CHECKING, Callable

from .errors import Interrupted, VirtioError, exit_code

if TYPE_CHECKING:
    from .blk import VirtioBlk


Mask = set[int | signal.Signals]


def fork_server() -> tuple[int, int, Mask]:
    """(0, the write end of the readiness pipe, the caller's signal mask) in the detached
    child; (child pid, the read end, that mask) in the parent.

    SIGINT and SIGTERM are blocked across the fork: a Ctrl-C between fork() and the
    parent's handlers (``await_ready``) would leave the new server running with nobody
    to stop it. In the child SIGTERM stays blocked until the server can take it as a
    request to stop (``unblock_stop``): raised as an exception in the middle of the
    start-up it once landed in an import's weakref callback, was "ignored", and the
    server went on to connect."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, {*mask, signal.SIGTERM})
        os.close(r)
        os.setsid()  # out of the caller's session and process group
        return 0, w, mask
    os.close(w)
    return pid, r, mask


def unblock_stop() -> None:
    """In the server, once its SIGTERM handler is in place: a stop request that came
    during the start-up is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def await_ready(pid: int, fd: int, timeout: float, mask: Mask, what: str,
                stop_timeout: float) -> tuple[int, str]:
    """(0, what the child said after "ready ") once it is ready, or (its exit code, "")
    if it ended first (it said why on stderr); (-1, "") after ``timeout``, the child
    stopped. The caller's signal ``mask`` is put back meanwhile: Ctrl-C or SIGTERM
    cancels the start-up. The server, in a session of its own, sees neither and would
    go on to connect ``what`` after the user gave up: it is stopped first, then
    Interrupted is raised."""
    def on_sigterm(signum: int, frame: object) -> None:
        raise Interrupted(signum)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that came is raised here
        return _wait_for_ready(pid, fd, timeout, stop_timeout)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        stop_child(pid, what, stop_timeout)
        raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name}: the "
                          f"server was stopped, {what} is not connected") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(fd)


def _wait_for_ready(pid: int, fd: int, timeout: float, stop_timeout: float) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.2)
        if readable:
            line = os.read(fd, 256).decode(errors="replace")
            if line.startswith("ready"):
                return 0, line[5:].strip()
            _, status = os.waitpid(pid, 0)  # it failed and said why on stderr
            code = os.waitstatus_to_exitcode(status)
            return (code if code > 0 else 128 - code if code < 0 else 99), ""
    stop_child(pid, "the server", stop_timeout)
    return -1, ""


def stop_child(pid: int, what: str, stop_timeout: float) -> None:
    """SIGTERM takes the server's own way out (device reset, disconnected if it got
    that far), bounded by ``stop_timeout``, then SIGKILL. A second Ctrl-C meanwhile
    must not leave it running: SIGINT is ignored until it is gone."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + stop_timeout
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.05)
        print(f"virtio-user: the server for {what} (pid {pid}) did not stop within "
              f"{stop_timeout:g} s; killed", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # already reaped
    finally:
        signal.signal(signal.SIGINT, previous)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended: its parent may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def detach(ready_fd: int, message: str, log_file: str | None) -> None:
    """Tell the parent we are ready, then leave its output: stdout and stderr to
    ``log_file`` (appended) or /dev/null, stdin from /dev/null."""
    os.write(ready_fd, f"ready {message}\n".encode())
    os.close(ready_fd)
    target = os.open(log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)
    os.close(devnull)


def log_to_stderr(package: str, tag: str) -> None:
    """``package``'s messages to stderr (which follows a later dup2), once."""
    logger = logging.getLogger(package)
    if any(getattr(h, "_virtio_user_daemon", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()  # sys.stderr at each write: follows the dup2
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s virtio-user {tag}[{os.getpid()}]: %(levelname)s %(message)s"))
    handler._virtio_user_daemon = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve_and_exit(dev: VirtioBlk, serve: Callable[[], int], *, background: bool) -> int:
    """Run ``serve`` and return its exit code; in the ``background`` child, report an
    error as the CLI would, close the device and leave the process there, without
    returning into the caller of main() (whose clean-up belongs to the parent)."""
    try:
        code = serve()
    except BaseException as exc:
        if not background:
            raise
        print(f"virtio-user: {exc}", file=sys.stderr)
        code = exit_code(exc) if isinstance(exc, VirtioError) else 99
    if not background:
        return code
    dev.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
