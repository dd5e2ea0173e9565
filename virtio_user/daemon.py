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


def fork_server() -> tuple[int, int]:
    """(0, the write end of the readiness pipe) in the detached child; (child pid, the
    read end) in the parent."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()  # out of the caller's session and process group
        return 0, w
    os.close(w)
    return pid, r


def await_ready(pid: int, fd: int, timeout: float) -> tuple[int, str]:
    """(0, what the child said after "ready ") once it is ready, or (its exit code, "")
    if it ended first (it said why on stderr). Kills it with SIGTERM after ``timeout``
    and returns (-1, "")."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.2)
            if readable:
                line = os.read(fd, 256).decode(errors="replace")
                if line.startswith("ready"):
                    return 0, line[5:].strip()
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                return (code if code > 0 else 128 - code if code < 0 else 99), ""
        os.kill(pid, signal.SIGTERM)
        return -1, ""
    finally:
        os.close(fd)


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
