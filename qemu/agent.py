"""Guest side of the virtio-user session channel: runs the host's commands in the guest.

The host (virtio_user/host/session.py) and this agent talk over a virtio-serial port
named ``virtio-user.agent``, one JSON object per line in each direction:

host -> guest
    {"op": "run", "id": N, "argv": [...], "cwd": "/path", "env": {...}, "warm": bool}
    {"op": "signal", "id": N, "signal": 2}
    {"op": "poweroff"}
guest -> host
    {"op": "ready", "uptime": seconds since the guest kernel started}
    {"op": "output", "id": N, "fd": 1 or 2, "data": base64}
    {"op": "exit", "id": N, "status": exit status (128+signal when killed)}

Output is forwarded as it comes, so a long command streams. Several commands may run
at once. Only the standard library is used: this starts before anything else in the guest
and should cost as little boot time as it can. A ``virtio-user`` command marked ``warm``
is forked from qemu/warm.py, started on first use, instead of paying its imports again.
"""

import base64
import json
import os
import selectors
import signal
import socket
import subprocess
import sys

PORT_NAME = "virtio-user.agent"
WARM_COMMAND = "virtio-user"
WARM_DIED = (b"agent: the warm interpreter (qemu/warm.py) ended before this command "
             b"reported its status; its error is on the guest's serial console\n")
WARM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm.py")


def find_port() -> str:
    base = "/sys/class/virtio-ports"
    for dev in sorted(os.listdir(base)):
        with open(os.path.join(base, dev, "name")) as f:
            if f.read().strip() == PORT_NAME:
                return "/dev/" + dev
    raise SystemExit(f"agent: no virtio-serial port named {PORT_NAME}")


class Agent:
    def __init__(self, port_fd: int) -> None:
        self.port = port_fd
        self.sel = selectors.DefaultSelector()
        self.sel.register(port_fd, selectors.EVENT_READ, self.on_request)
        self.pending = b""
        self.children: dict[int, subprocess.Popen | WarmChild] = {}
        self.open_pipes: dict[int, int] = {}  # id -> pipes still open
        self.warm: socket.socket | None = None
        self.warm_proc: subprocess.Popen | None = None
        self.running = True

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(self.port, data):]

    def on_request(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        if not chunk:
            # The host side closed the socket; nothing more will come.
            self.running = False
            return
        self.pending += chunk
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            if line.strip():
                self.handle(json.loads(line))

    def handle(self, req: dict) -> None:
        op = req.get("op")
        if op == "run":
            self.start(req)
        elif op == "signal":
            child = self.children.get(req["id"])
            if child is not None and child.poll() is None:
                child.send_signal(req["signal"])
        elif op == "poweroff":
            self.running = False

    def start(self, req: dict) -> None:
        cid = req["id"]
        env = dict(os.environ)
        env.update(req.get("env") or {})
        try:
            if req.get("warm") and req["argv"][:1] == [WARM_COMMAND]:
                child, pipes = self.start_warm(req, env)
            else:
                child = subprocess.Popen(
                    req["argv"], cwd=req.get("cwd") or "/", env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True)
                pipes = (child.stdout, child.stderr)
        except OSError as exc:
            msg = f"agent: cannot run {req['argv'][:1]}: {exc}\n".encode()
            self.send({"op": "output", "id": cid, "fd": 2,
                       "data": base64.b64encode(msg).decode()})
            self.send({"op": "exit", "id": cid, "status": 127})
            return
        self.children[cid] = child
        self.open_pipes[cid] = 2
        for fdno, pipe in zip((1, 2), pipes):
            os.set_blocking(pipe.fileno(), False)
            self.sel.register(pipe, selectors.EVENT_READ, (cid, fdno))

    def start_warm(self, req: dict, env: dict) -> tuple["WarmChild", tuple]:
        """Hand the command to the warm interpreter with its three fds."""
        if self.warm is None:
            self.warm, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.warm_proc = subprocess.Popen(
                [sys.executable, WARM_SCRIPT, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, cwd="/")
            theirs.close()
            self.sel.register(self.warm, selectors.EVENT_READ, self.on_warm)
        msg = {"id": req["id"], "argv": req["argv"], "cwd": req.get("cwd") or "/",
               "env": env}
        opened: list[int] = []  # all closed if the command cannot be handed over
        try:
            out_r, out_w = os.pipe()
            opened += (out_r, out_w)
            err_r, err_w = os.pipe()
            opened += (err_r, err_w)
            stdin = os.open(os.devnull, os.O_RDONLY)
            opened.append(stdin)
            socket.send_fds(self.warm, [json.dumps(msg).encode()], [stdin, out_w, err_w])
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in (stdin, out_w, err_w):  # the warm child has its own copies
            os.close(fd)
        return WarmChild(), (os.fdopen(out_r, "rb", 0), os.fdopen(err_r, "rb", 0))

    def on_warm(self, fd: int) -> None:
        data = self.warm.recv(65536) if self.warm is not None else b""
        if not data:
            # The warm interpreter died: its commands cannot report a status any more,
            # and its own error went to the guest console, not to them. The next warm
            # command starts a new one.
            self.sel.unregister(fd)
            if self.warm is not None:
                self.warm.close()
            self.warm = None
            if self.warm_proc is not None:
                self.warm_proc.poll()
            note = base64.b64encode(WARM_DIED).decode()
            for cid, child in list(self.children.items()):
                if isinstance(child, WarmChild) and child.status is None:
                    self.send({"op": "output", "id": cid, "fd": 2, "data": note})
                    child.status = 255
                    self.maybe_exit(cid)
            return
        msg = json.loads(data)
        child = self.children.get(msg["id"])
        if not isinstance(child, WarmChild):
            return
        if "pid" in msg:
            child.pid = msg["pid"]
        if "status" in msg:
            child.status = msg["status"]
            self.maybe_exit(msg["id"])

    def on_output(self, pipe, cid: int, fdno: int) -> None:
        try:
            data = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return
        if data:
            self.send({"op": "output", "id": cid, "fd": fdno,
                       "data": base64.b64encode(data).decode()})
            return
        self.sel.unregister(pipe)
        pipe.close()
        self.open_pipes[cid] -= 1
        self.maybe_exit(cid)

    def maybe_exit(self, cid: int) -> None:
        """Report the exit once both pipes are closed and the status is known."""
        child = self.children[cid]
        if self.open_pipes[cid] > 0:
            return
        if isinstance(child, WarmChild):
            if child.status is None:
                return
            status = child.status
        else:
            status = child.wait()
            status = 128 - status if status < 0 else status
        del self.children[cid], self.open_pipes[cid]
        self.send({"op": "exit", "id": cid, "status": status})

    def loop(self) -> None:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        self.send({"op": "ready", "uptime": uptime})
        while self.running:
            for key, _ in self.sel.select():
                if key.data in (self.on_request, self.on_warm):
                    key.data(key.fd)
                else:
                    self.on_output(key.fileobj, *key.data)
        for child in self.children.values():
            if child.poll() is None and child.pid:
                os.killpg(child.pid, signal.SIGKILL)
        if self.warm_proc is not None:
            self.warm_proc.kill()


class WarmChild:
    """A command forked by the warm interpreter: its pid and status arrive as messages."""

    def __init__(self) -> None:
        self.pid = 0
        self.status: int | None = None

    def poll(self) -> int | None:
        return self.status

    def send_signal(self, signum: int) -> None:
        if self.pid and self.status is None:
            os.kill(self.pid, signum)


def main() -> None:
    fd = os.open(find_port(), os.O_RDWR)
    Agent(fd).loop()
    os.sync()


if __name__ == "__main__":
    sys.exit(main())
