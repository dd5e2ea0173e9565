"""Warm start for ``virtio-user`` in the guest: one interpreter that has already imported
the driver and numpy forks a child per command, so a test suite pays the ~2 s import under
TCG once per guest instead of once per command (numpy alone is 2-3 s warm in a TCG guest).

The session agent (qemu/agent.py) starts this on the first ``run`` request marked
``"warm"`` and talks to it over a SOCK_SEQPACKET socket, one JSON message per packet:

agent -> warm
    {"id": N, "argv": ["virtio-user", ...], "cwd": "/path", "env": {...}}
    with the command's stdin, stdout and stderr attached as SCM_RIGHTS
warm -> agent
    {"id": N, "pid": P}        the child is running
    {"id": N, "status": S}     it ended (128+signal when killed), or it could not start

The child is what the ``virtio-user`` entry point would be, minus the imports: its own
session, the standard signal dispositions, the given fds, cwd, environment and argv,
``virtio_user.cli.main`` run to its exit status, stdio flushed and ``atexit`` handlers run.
Commands that must start cold (the start-up tests, the README's) do not ask for this.
"""

import json
import os
import selectors
import signal
import socket
import sys
import traceback

# Imported before any fork: this is the cost the children no longer pay.
import numpy  # noqa: F401
import virtio_user.blk  # noqa: F401
import virtio_user.cli
import virtio_user.ring.packed  # noqa: F401
import virtio_user.interrupts  # noqa: F401

MAX_MESSAGE = 1 << 20
PR_SET_NAME = 15  # prctl(2)
RESET_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD,
                 signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def exit_status(code: object) -> int:
    """What the interpreter would exit with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run_child(req: dict, fds: list[int]) -> None:
    """In the forked child: become the command, never return."""
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        # Last: whoever finds the process by its name may signal it at once, so the
        # dispositions must already be the command's.
        set_comm(os.path.basename(req["argv"][0]))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        # As Popen(close_fds=True) would: a daemon the command leaves behind (nbd) must
        # not hold the agent's pipes open through a stray copy.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = list(req["argv"])
        status = exit_status(virtio_user.cli.main(sys.argv[1:]))
    except SystemExit as exc:
        status = exit_status(exc.code)
    except KeyboardInterrupt:
        flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        status = 1
    flush()
    try:
        import atexit
        atexit._run_exitfuncs()
    finally:
        flush()
        os._exit(status)


def set_comm(name: str) -> None:
    """The name ps, pgrep and /proc/PID/comm show, as exec of the entry point gives it
    (the command line stays the warm interpreter's)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


class Warm:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)

    def send(self, msg: dict) -> None:
        self.sock.send(json.dumps(msg).encode())

    def start(self, req: dict, fds: list[int]) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            os.write(fds[2], f"warm: cannot fork: {exc}\n".encode())
            self.send({"id": req["id"], "status": 127})
            return
        if pid == 0:
            self.sock.close()
            run_child(req, fds)
        pidfd = os.pidfd_open(pid)
        self.sel.register(pidfd, selectors.EVENT_READ, (req["id"], pid))
        self.send({"id": req["id"], "pid": pid})

    def reap(self, pidfd: int, cid: int, pid: int) -> None:
        self.sel.unregister(pidfd)
        os.close(pidfd)
        _, wstatus = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wstatus)
        self.send({"id": cid, "status": 128 - code if code < 0 else code})

    def loop(self) -> None:
        while True:
            for key, _ in self.sel.select():
                if key.data is not None:
                    self.reap(key.fd, *key.data)
                    continue
                msg, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 3)
                if not msg:
                    return  # the agent is gone
                try:
                    self.start(json.loads(msg), fds)
                finally:
                    for fd in fds:
                        os.close(fd)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    Warm(sock).loop()


if __name__ == "__main__":
    main()
