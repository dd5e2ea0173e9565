"""The ublk control device (/dev/ublk-control): ADD_DEV, SET_PARAMS, START_DEV,
STOP_DEV, DEL_DEV, GET_DEV_INFO, each one URING_CMD on a small ring of its own, each
wait bounded.

ublk_drv runs control commands from io_uring's worker threads (it refuses the
non-blocking attempt), so a command that blocks in the kernel (START_DEV adds the disk
and reads its partition table; STOP_DEV waits for I/O in flight) blocks only the thread
that waits for its completion here, never the queue's server loop.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import CannotOpen, DeviceTimeout
from ..io_uring import Ring
from ..io_uring.spec import URING_CMD_HEAD, Op
from .spec import (CONTROL_PATH, CTRL_CMD, DEV_INFO_DTYPE, PARAMS_DTYPE, CtrlCmd, DevFlag,
                   DevState)

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 30.0  # seconds for one control command (START_DEV reads the disk)
_ANY = 0xFFFF_FFFF  # dev_id -1: the kernel picks the number
_NO_QUEUE = 0xFFFF  # queue_id -1: a command for the device, not a queue


@dataclass(frozen=True)
class DevInfo:
    """struct ublksrv_ctrl_dev_info, the fields we use."""
    dev_id: int
    nr_hw_queues: int
    queue_depth: int
    state: int
    max_io_buf_bytes: int
    ublksrv_pid: int
    flags: int

    @classmethod
    def from_array(cls, a: np.ndarray) -> DevInfo:
        return cls(int(a["dev_id"]), int(a["nr_hw_queues"]), int(a["queue_depth"]),
                   int(a["state"]), int(a["max_io_buf_bytes"]), int(a["ublksrv_pid"]),
                   int(a["flags"]))

    @property
    def state_name(self) -> str:
        try:
            return DevState(self.state).name.removeprefix("UBLK_S_DEV_")
        except ValueError:
            return f"state {self.state}"


class UblkCommandError(CannotOpen):
    """A control command failed; errno kept."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


class Control:
    """/dev/ublk-control and a ring to send it commands; close() when done."""

    def __init__(self, timeout: float = CONTROL_TIMEOUT) -> None:
        self.timeout = timeout
        try:
            self.fd = os.open(CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (is the ublk_drv module loaded? Linux 6.0 or later)" \
                if exc.errno == errno.ENOENT else ""
            raise CannotOpen(f"{CONTROL_PATH}: {exc.strerror}{hint}") from exc
        try:
            self.ring = Ring(4)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            self.ring.close()  # cancels a command we stopped waiting for
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, cmd: CtrlCmd, dev_id: int, *, addr: int = 0, length: int = 0,
                data: int = 0, timeout: float | None = None) -> int:
        """Send one command and wait (bounded) for its result (>= 0);
        UblkCommandError for a negative one, DeviceTimeout when none comes."""
        off = self.ring.next_sqe()
        mv = self.ring.sqes_mv
        mv[off:off + self.ring.sqe_bytes] = bytes(self.ring.sqe_bytes)
        URING_CMD_HEAD.pack_into(mv, off, Op.IORING_OP_URING_CMD, 0, 0, self.fd, int(cmd),
                                 0, 0, 0, 0, int(cmd), 0, 0, 0)
        CTRL_CMD.pack_into(mv, off + URING_CMD_HEAD.size, dev_id, _NO_QUEUE, length, addr,
                           data, 0, 0, 0)
        name = cmd.name.removeprefix("UBLK_U_CMD_")
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self.ring.enter()
        while True:
            done = self.ring.reap()
            if done:
                res = done[0][1]
                if res < 0:
                    raise UblkCommandError(f"ublk {name} of device {dev_id & 0x7FFF_FFFF}: "
                                           f"{os.strerror(-res)}", -res)
                return res
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeout(f"ublk {name}: no answer within {limit:g} s")
            self.ring.enter(1, min(left, 1.0))

    # -- the commands -------------------------------------------------------------
    def add(self, *, dev_id: int | None, queues: int, depth: int,
            max_io_buf_bytes: int) -> DevInfo:
        info = np.zeros((), DEV_INFO_DTYPE)
        number = _ANY if dev_id is None else dev_id
        info["dev_id"], info["nr_hw_queues"], info["queue_depth"] = number, queues, depth
        info["max_io_buf_bytes"] = max_io_buf_bytes
        info["flags"] = int(DevFlag.UBLK_F_CMD_IOCTL_ENCODE)
        self.command(CtrlCmd.UBLK_U_CMD_ADD_DEV, number, addr=info.ctypes.data,
                     length=DEV_INFO_DTYPE.itemsize)
        return DevInfo.from_array(info)

    def info(self, dev_id: int) -> DevInfo:
        info = np.zeros((), DEV_INFO_DTYPE)
        self.command(CtrlCmd.UBLK_U_CMD_GET_DEV_INFO, dev_id, addr=info.ctypes.data,
                     length=DEV_INFO_DTYPE.itemsize)
        return DevInfo.from_array(info)

    def set_params(self, dev_id: int, params: np.ndarray) -> None:
        assert params.dtype == PARAMS_DTYPE
        self.command(CtrlCmd.UBLK_U_CMD_SET_PARAMS, dev_id, addr=params.ctypes.data,
                     length=PARAMS_DTYPE.itemsize)

    def start(self, dev_id: int, pid: int) -> None:
        self.command(CtrlCmd.UBLK_U_CMD_START_DEV, dev_id, data=pid)

    def stop(self, dev_id: int) -> None:
        self.command(CtrlCmd.UBLK_U_CMD_STOP_DEV, dev_id)

    def delete(self, dev_id: int, timeout: float | None = None) -> None:
        """DEL_DEV: the kernel waits until /dev/ublkcN is closed by everyone."""
        self.command(CtrlCmd.UBLK_U_CMD_DEL_DEV, dev_id, timeout=timeout)


def device_ids() -> list[int]:
    """The ublk devices that exist, from /sys/class/ublk-char (ublkcN)."""
    try:
        names = os.listdir("/sys/class/ublk-char")
    except FileNotFoundError:
        return []
    return sorted(int(n[5:]) for n in names if n.startswith("ublkc") and n[5:].isdigit())
