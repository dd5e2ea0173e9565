"""Guest side of the virtio-user session channel: runs the host's commands in the guest.

The host (virtio_user/host/session.py) and this agent talk over a virtio-serial port
named ``virtio-user.agent``, one JSON object per line in each direction:

host -> guest
    {"op": "run", "id": N, "argv": [...], "cwd": "/path", "env": {...}}
    {"op": "signal", "id": N, "signal": 2}
    {"op": "poweroff"}
guest -> host
    {"op": "ready", "uptime": seconds since the guest kernel started}
    {"op": "output", "id": N, "fd": 1 or 2, "data": base64}
    {"op": "exit", "id": N, "status": exit status (128+signal when killed)}

Output is forwarded as it comes, so a long command streams. Several commands may run
at once. Only the standard library is used: this starts before anything else in the guest
and should cost as little boot time as it can.
"""

import base64
import json
import os
import selectors
import signal
import subprocess
import sys

PORT_NAME = "virtio-user.agent"


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
        self.children: dict[int, subprocess.Popen] = {}
        self.open_pipes: dict[int, int] = {}  # id -> pipes still open
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
            child = subprocess.Popen(
                req["argv"], cwd=req.get("cwd") or "/", env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError as exc:
            msg = f"agent: cannot run {req['argv'][:1]}: {exc}\n".encode()
            self.send({"op": "output", "id": cid, "fd": 2,
                       "data": base64.b64encode(msg).decode()})
            self.send({"op": "exit", "id": cid, "status": 127})
            return
        self.children[cid] = child
        self.open_pipes[cid] = 2
        for fdno, pipe in ((1, child.stdout), (2, child.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.sel.register(pipe, selectors.EVENT_READ, (cid, fdno))

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
        if self.open_pipes[cid] == 0:
            status = self.children.pop(cid).wait()
            del self.open_pipes[cid]
            self.send({"op": "exit", "id": cid,
                       "status": 128 - status if status < 0 else status})

    def loop(self) -> None:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        self.send({"op": "ready", "uptime": uptime})
        while self.running:
            for key, _ in self.sel.select():
                if key.data == self.on_request:
                    self.on_request(key.fd)
                else:
                    self.on_output(key.fileobj, *key.data)
        for child in self.children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)


def main() -> None:
    fd = os.open(find_port(), os.O_RDWR)
    Agent(fd).loop()
    os.sync()


if __name__ == "__main__":
    sys.exit(main())
