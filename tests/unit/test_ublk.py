"""ublk's UAPI (include/uapi/linux/ublk_cmd.h) pinned: struct sizes and offsets, the
ioctl-encoded command codes; the disk parameters made from a virtio disk; the
translation of a ublk request into a virtio-blk request; the CLI's refusals."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from virtio_user import cli
from virtio_user.io_uring.spec import SQE_DTYPE
from virtio_user.spec import VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, ReqType
from virtio_user.ublk.device import check_unused, mount_point
from virtio_user.ublk.params import DiskShape, Plan, make_params, translate
from virtio_user.ublk.spec import (CTRL_CMD_DTYPE, DEV_INFO_DTYPE, IO_CMD_DTYPE, IO_CMD_SQE,
                                   IO_DESC_DTYPE, PARAM_BASIC_DTYPE, PARAM_DISCARD_DTYPE,
                                   PARAMS_DTYPE, Attr, CtrlCmd, IoCmd, IoFlag, IoOp, ParamType,
                                   desc_area_bytes)


def offsets(dt: np.dtype) -> dict[str, int]:
    return {name: dt.fields[name][1] for name in dt.names}


def test_command_structs() -> None:
    assert CTRL_CMD_DTYPE.itemsize == 32
    assert offsets(CTRL_CMD_DTYPE) == {"dev_id": 0, "queue_id": 4, "len": 6, "addr": 8,
                                       "data": 16, "dev_path_len": 24, "pad": 26,
                                       "reserved": 28}
    assert IO_CMD_DTYPE.itemsize == 16
    assert offsets(IO_CMD_DTYPE) == {"q_id": 0, "tag": 2, "result": 4, "addr": 8}
    assert IO_DESC_DTYPE.itemsize == 24
    assert offsets(IO_DESC_DTYPE) == {"op_flags": 0, "nr_sectors": 4, "start_sector": 8,
                                      "addr": 16}
    # A whole I/O command SQE: the 48-byte head, then the payload at cmd[] (addr3).
    assert IO_CMD_SQE.size == SQE_DTYPE.itemsize == 64


def test_dev_info_and_params() -> None:
    assert DEV_INFO_DTYPE.itemsize == 64
    assert offsets(DEV_INFO_DTYPE) == {
        "nr_hw_queues": 0, "queue_depth": 2, "state": 4, "pad0": 6, "max_io_buf_bytes": 8,
        "dev_id": 12, "ublksrv_pid": 16, "pad1": 20, "flags": 24, "ublksrv_flags": 32,
        "owner_uid": 40, "owner_gid": 44, "reserved1": 48, "reserved2": 56}
    assert PARAM_BASIC_DTYPE.itemsize == 32
    assert offsets(PARAM_BASIC_DTYPE) == {
        "attrs": 0, "logical_bs_shift": 4, "physical_bs_shift": 5, "io_opt_shift": 6,
        "io_min_shift": 7, "max_sectors": 8, "chunk_sectors": 12, "dev_sectors": 16,
        "virt_boundary_mask": 24}
    assert PARAM_DISCARD_DTYPE.itemsize == 20
    assert offsets(PARAMS_DTYPE) == {"len": 0, "types": 4, "basic": 8, "discard": 40,
                                     "devt": 60, "zoned": 76}
    assert PARAMS_DTYPE.itemsize == 112  # 108 bytes of fields, 8-byte aligned


def test_command_codes_are_ioctl_encoded() -> None:
    # _IOWR('u', nr, struct ublksrv_ctrl_cmd) and _IOR; as libublk and ublksrv spell them
    assert CtrlCmd.UBLK_U_CMD_ADD_DEV == 0xC0207504
    assert CtrlCmd.UBLK_U_CMD_DEL_DEV == 0xC0207505
    assert CtrlCmd.UBLK_U_CMD_START_DEV == 0xC0207506
    assert CtrlCmd.UBLK_U_CMD_STOP_DEV == 0xC0207507
    assert CtrlCmd.UBLK_U_CMD_SET_PARAMS == 0xC0207508
    assert CtrlCmd.UBLK_U_CMD_GET_PARAMS == 0x80207509
    assert CtrlCmd.UBLK_U_CMD_GET_DEV_INFO == 0x80207502
    assert IoCmd.UBLK_U_IO_FETCH_REQ == 0xC0107520
    assert IoCmd.UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xC0107521


def test_descriptor_area_is_whole_pages() -> None:
    assert desc_area_bytes(1) == 4096
    assert desc_area_bytes(64) == 4096  # 1536 bytes
    assert desc_area_bytes(171) == 8192  # 4104 bytes
    assert desc_area_bytes(4096) == 98304


FULL = DiskShape(capacity=1 << 20, block_size=4096, flush=True, discard=True,
                 write_zeroes=True, max_discard_sectors=1 << 30,
                 max_write_zeroes_sectors=1000)


def test_params_from_a_disk_with_everything() -> None:
    p = make_params(FULL, max_sectors=1023)
    assert int(p["len"]) == 112
    assert int(p["types"]) == ParamType.UBLK_PARAM_TYPE_BASIC | ParamType.UBLK_PARAM_TYPE_DISCARD
    b = p["basic"]
    assert int(b["attrs"]) == Attr.UBLK_ATTR_VOLATILE_CACHE
    assert int(b["logical_bs_shift"]) == int(b["physical_bs_shift"]) == 12
    assert int(b["max_sectors"]) == 1016  # whole 4 KiB blocks
    assert int(b["dev_sectors"]) == 1 << 20
    d = p["discard"]
    assert int(d["discard_granularity"]) == 4096
    assert int(d["max_discard_sectors"]) == (1 << 30)
    assert int(d["max_discard_segments"]) == 1
    assert int(d["max_write_zeroes_sectors"]) == 1000 // 8 * 8


def test_params_of_a_read_only_disk_without_cache() -> None:
    p = make_params(DiskShape(capacity=2048, block_size=512, read_only=True, discard=True,
                              max_discard_sectors=8), max_sectors=256)
    assert int(p["types"]) == ParamType.UBLK_PARAM_TYPE_BASIC  # nothing to discard on RO
    assert int(p["basic"]["attrs"]) == Attr.UBLK_ATTR_READ_ONLY
    assert int(p["basic"]["logical_bs_shift"]) == 9
    assert int(p["basic"]["max_sectors"]) == 256


READ, WRITE = int(IoOp.UBLK_IO_OP_READ), int(IoOp.UBLK_IO_OP_WRITE)
BUF = 512 << 10


def test_read_and_write_are_one_request_on_the_tag_buffer() -> None:
    assert translate(READ, 8, 16, FULL, BUF) == Plan(ReqType.VIRTIO_BLK_T_IN, 16, 8, 4096, 0,
                                                     4096)
    assert translate(WRITE | IoFlag.UBLK_IO_F_FUA, 1024, 0, FULL, BUF) == Plan(
        ReqType.VIRTIO_BLK_T_OUT, 0, 1024, BUF, 0, BUF)


def test_what_does_not_fit_is_refused_before_the_device() -> None:
    assert translate(READ, 1025, 0, FULL, BUF) == -errno.EINVAL  # more than the buffer
    assert translate(READ, 8, (1 << 20) - 7, FULL, BUF) == -errno.EINVAL  # past the end
    assert translate(READ, 0, 0, FULL, BUF) == -errno.EINVAL
    assert translate(0x7F, 8, 0, FULL, BUF) == -errno.EOPNOTSUPP
    assert translate(int(IoOp.UBLK_IO_OP_DISCARD), 2000, 0,
                     DiskShape(1 << 20, 512, discard=True, max_discard_sectors=1000),
                     BUF) == -errno.EINVAL


def test_flush_discard_and_write_zeroes() -> None:
    assert translate(int(IoOp.UBLK_IO_OP_FLUSH), 0, 0, FULL, BUF) == Plan(
        ReqType.VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0, 0)
    assert translate(int(IoOp.UBLK_IO_OP_FLUSH), 0, 0, DiskShape(8, 512), BUF) == 0
    assert translate(int(IoOp.UBLK_IO_OP_DISCARD), 64, 8, FULL, BUF) == Plan(
        ReqType.VIRTIO_BLK_T_DISCARD, 8, 64, 16, 0, 0)
    wz = int(IoOp.UBLK_IO_OP_WRITE_ZEROES)
    assert translate(wz, 8, 0, FULL, BUF) == Plan(
        ReqType.VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, 0)
    assert translate(wz | IoFlag.UBLK_IO_F_NOUNMAP, 8, 0, FULL, BUF) == Plan(
        ReqType.VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 16, 0, 0)
    assert translate(wz, 8, 0, DiskShape(64, 512), BUF) == -errno.EOPNOTSUPP


def test_a_read_only_disk_refuses_every_change() -> None:
    ro = DiskShape(1 << 20, 512, read_only=True, discard=True, write_zeroes=True,
                   max_discard_sectors=64, max_write_zeroes_sectors=64)
    assert isinstance(translate(READ, 8, 0, ro, BUF), Plan)
    for op in (IoOp.UBLK_IO_OP_WRITE, IoOp.UBLK_IO_OP_DISCARD, IoOp.UBLK_IO_OP_WRITE_ZEROES):
        assert translate(int(op), 8, 0, ro, BUF) == -errno.EROFS


def test_mount_point_is_read_from_the_mount_table(tmp_path: Any) -> None:
    table = tmp_path / "mounts"
    table.write_text("proc /proc proc rw 0 0\n/dev/ublkb3 /mnt/x\\040y ext4 rw 0 0\n")
    assert mount_point("/dev/ublkb3", str(table)) == "/mnt/x y"
    assert mount_point("/dev/ublkb1", str(table)) is None
    assert mount_point(str(tmp_path / "nothing")) is None
    check_unused(str(tmp_path / "nothing"))  # no such device: nothing holds it


@pytest.mark.parametrize("argv", [["ublk"], ["ublk", "add", "-h"], ["ublk", "del"],
                                  ["ublk", "del", "x"], ["ublk", "del", "-1"],
                                  ["ublk", "add", "--number", "-3"], ["ublk", "frob"]])
def test_bad_ublk_arguments_are_exit_code_1(argv: list[str], capsys: Any) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtio-user: ") and err.count("\n") == 1


class _StubRing:
    """Records the commands a queue would send (tag, result) instead of a kernel."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, int]] = []


def _queue(shape: DiskShape, depth: int = 4, buf_bytes: int = BUF) -> Any:
    """A UblkQueue without a kernel: descriptors in a bytearray, commands recorded."""
    import types

    from virtio_user.ublk import server
    q = server.UblkQueue.__new__(server.UblkQueue)
    bufs = [types.SimpleNamespace(size=buf_bytes, mv=memoryview(bytearray(buf_bytes)))
            for _ in range(depth)]
    q.depth, q.shape, q.buffers, q.buf_bytes = depth, shape, bufs, buf_bytes
    q._capacity, q._read_only = shape.capacity, shape.read_only
    q.reqs = [server.Request(ReqType.VIRTIO_BLK_T_IN, buffer=b, tag=t)  # type: ignore[arg-type]
              for t, b in enumerate(bufs)]
    q.results, q.stats, q.live, q._waiting = [0] * depth, server.QueueStats(), depth, []
    q.descs = memoryview(bytearray(depth * IO_DESC_DTYPE.itemsize))
    sent: list[tuple[int, int, int]] = []
    q._queue_cmd = lambda cmd, tag, result: sent.append((cmd, tag, result))
    q.sent = sent
    return q


def _desc(q: Any, tag: int, op_flags: int, nr: int, sector: int) -> None:
    from virtio_user.ublk.spec import IO_DESC
    IO_DESC.pack_into(q.descs, tag * IO_DESC_DTYPE.itemsize, op_flags, nr, sector, 0)


@pytest.mark.parametrize("op_flags,nr,sector", [
    (READ, 8, 0), (WRITE, 1024, 8), (READ, 1025, 0), (READ, 8, (1 << 20) - 7), (READ, 0, 0),
    (int(IoOp.UBLK_IO_OP_FLUSH), 0, 0), (int(IoOp.UBLK_IO_OP_DISCARD), 64, 8),
    (int(IoOp.UBLK_IO_OP_WRITE_ZEROES) | IoFlag.UBLK_IO_F_NOUNMAP, 8, 0), (0x7F, 8, 0)])
def test_the_queue_builds_what_translate_says(op_flags: int, nr: int, sector: int) -> None:
    """The queue's inline READ/WRITE path and its general path agree with translate()."""
    from virtio_user.ublk.server import IoCmd
    q = _queue(FULL)
    _desc(q, 2, op_flags, nr, sector)
    q._arrived(2, 0)
    plan = translate(op_flags, nr, sector, FULL, BUF)
    if isinstance(plan, int):
        assert q.sent == [(IoCmd.UBLK_U_IO_COMMIT_AND_FETCH_REQ, 2, plan)] and not q._waiting
        return
    assert q.sent == [] and q._waiting == [q.reqs[2]]
    req = q.reqs[2]
    assert (req.type, req.sector, req.count, req.nbytes) == plan[:4]
    assert q.results[2] == plan.result
    if plan.type in (ReqType.VIRTIO_BLK_T_DISCARD, ReqType.VIRTIO_BLK_T_WRITE_ZEROES):
        entry = np.frombuffer(q.buffers[2].mv, np.dtype([("sector", "<u8"),
                              ("num_sectors", "<u4"), ("flags", "<u4")]), 1)[0]
        assert (int(entry["sector"]), int(entry["num_sectors"]), int(entry["flags"])) == (
            plan.sector, plan.sectors, plan.dwz_flags)


def test_device_status_becomes_the_commit_result() -> None:
    from virtio_user.spec import BlkStatus
    from virtio_user.ublk.server import IoCmd
    q = _queue(FULL)
    q.dev = type("Dev", (), {"bdf": "0000:00:10.0"})()
    commit = IoCmd.UBLK_U_IO_COMMIT_AND_FETCH_REQ
    for tag, status in enumerate((BlkStatus.VIRTIO_BLK_S_OK, BlkStatus.VIRTIO_BLK_S_IOERR,
                                  BlkStatus.VIRTIO_BLK_S_UNSUPP)):
        _desc(q, tag, READ, 8, 0)
        q._arrived(tag, 0)
        q.reqs[tag].status = int(status)
    q._completed(q.reqs[:3])
    assert q.sent == [(commit, 0, 4096), (commit, 1, -errno.EIO), (commit, 2, -errno.EOPNOTSUPP)]
    assert q.stats.errors == 2


def test_an_aborted_tag_is_not_fetched_again() -> None:
    q = _queue(FULL)
    q._arrived(1, -errno.ENODEV)
    assert q.live == 3 and q.sent == [] and q.stats.requests == 0


def test_the_interrupt_poll_goes_through_the_real_ring() -> None:
    """IORING_OP_POLL_ADD on an interrupt fd (an eventfd here, as vfio's): its
    completion comes back as the interrupt, which the device's source acknowledges."""
    import os
    import types

    from virtio_user.io_uring import Ring
    from virtio_user.ublk import server
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    acked: list[int] = []

    def wait(timeout: float) -> int:
        acked.append(os.eventfd_read(efd))
        return 0

    source = types.SimpleNamespace(fds=[efd], wait=wait)
    dev = types.SimpleNamespace(waiter=types.SimpleNamespace(source=source,
                                                              on_config=lambda: None))
    q = _queue(FULL)
    q.dev = dev
    q._irq_fds = server.interrupt_fds(dev)  # type: ignore[arg-type]
    q._polling = [False]
    with Ring(8) as ring:
        q.ring = ring
        q._arm_polls()
        q._arm_polls()  # armed once only
        assert ring.queued == 1
        ring.enter(0)
        assert ring.enter(1, 0.1) == 0 and ring.reap() == []  # nothing fired yet
        os.eventfd_write(efd, 1)
        ring.enter(1, 5.0)
        (user_data, res, _), = ring.reap()
        assert user_data == server._IRQ and res & 1  # POLLIN
        q._interrupted(user_data - server._IRQ)
        assert acked == [1] and q._polling == [False]
    os.close(efd)


def test_add_without_the_ublk_driver_says_so_before_taking_the_device(
        capsys: Any, monkeypatch: Any, tmp_path: Any) -> None:
    from virtio_user.ublk import spec

    def opener(args: Any) -> Any:
        raise AssertionError("the device must not be opened")

    monkeypatch.setattr(spec, "CONTROL_PATH", str(tmp_path / "ublk-control"))
    assert cli.main(["ublk", "add", "--foreground"], opener=opener) == 15
    err = capsys.readouterr().err
    assert "ublk-control: no such file (is the ublk_drv module loaded?" in err, err


def test_ctrl_c_while_the_background_server_starts_stops_it(monkeypatch: Any,
                                                           tmp_path: Path) -> None:
    """``ublk add`` waits for its forked server as ``nbd`` does (daemon.py): Ctrl-C then
    stops that server (in a session of its own, it never sees the terminal's SIGINT)
    before the command ends with Interrupted (exit 130), instead of a traceback and a
    server that goes on to add the disk. A sleeping process stands in for the child."""
    import argparse
    import signal
    import subprocess
    from virtio_user import daemon
    from virtio_user.errors import Interrupted
    from virtio_user.ublk import command, spec as ublk_spec
    control = tmp_path / "ublk-control"
    control.touch()
    monkeypatch.setattr(ublk_spec, "CONTROL_PATH", str(control))
    child = subprocess.Popen(["sleep", "60"])
    monkeypatch.setattr(daemon.os, "fork", lambda: child.pid)

    def ctrl_c(*args: Any) -> Any:
        raise KeyboardInterrupt
    monkeypatch.setattr(daemon.select, "select", ctrl_c)
    args = argparse.Namespace(ublk_action="add", number=None, log=None, foreground=False)
    try:
        with pytest.raises((Interrupted, KeyboardInterrupt)) as exc:
            command.prepare(args)
        assert isinstance(exc.value, Interrupted), "Ctrl-C escaped as a traceback"
        assert exc.value.signum == signal.SIGINT
        assert "the ublk disk is not connected" in str(exc.value)
        with pytest.raises(ChildProcessError):
            os.waitpid(child.pid, os.WNOHANG)  # stopped and reaped
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
