"""io_uring's UAPI layouts (include/uapi/linux/io_uring.h) pinned, and one real ring
driven through the raw system calls (a NOP round trip, a bounded wait, a full SQ)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from virtio_user.io_uring import Ring, RingFull
from virtio_user.io_uring.spec import (CMD_OFFSET, CQE, CQE32_DTYPE, CQE_DTYPE,
                                       CQRING_OFFSETS_DTYPE, GETEVENTS_ARG_DTYPE,
                                       PARAMS_DTYPE, SQE_DTYPE, SQRING_OFFSETS_DTYPE,
                                       URING_CMD_HEAD, URING_CMD_HEAD_DTYPE, Op, struct_of)


def offsets(dt: np.dtype) -> dict[str, int]:
    return {name: dt.fields[name][1] for name in dt.names}


def test_sqe_layout() -> None:
    assert SQE_DTYPE.itemsize == 64
    assert offsets(SQE_DTYPE) == {
        "opcode": 0, "flags": 1, "ioprio": 2, "fd": 4, "off": 8, "addr": 16, "len": 24,
        "op_flags": 28, "user_data": 32, "buf_index": 40, "personality": 42,
        "file_index": 44, "addr3": 48, "pad2": 56}
    # cmd_op overlays the low half of off; cmd[] starts at addr3
    assert offsets(URING_CMD_HEAD_DTYPE)["cmd_op"] == 8
    assert URING_CMD_HEAD_DTYPE.itemsize == CMD_OFFSET == 48 == URING_CMD_HEAD.size
    assert all(SQE_DTYPE.fields[f][0].str[0] in "<|" for f in SQE_DTYPE.names)


def test_cqe_and_params_layouts() -> None:
    assert CQE_DTYPE.itemsize == 16 and CQE32_DTYPE.itemsize == 32
    assert offsets(CQE_DTYPE) == {"user_data": 0, "res": 8, "flags": 12}
    assert CQE.size == 16
    assert SQRING_OFFSETS_DTYPE.itemsize == CQRING_OFFSETS_DTYPE.itemsize == 40
    assert offsets(SQRING_OFFSETS_DTYPE)["array"] == 24
    assert offsets(CQRING_OFFSETS_DTYPE)["cqes"] == 20
    assert PARAMS_DTYPE.itemsize == 120
    assert offsets(PARAMS_DTYPE)["features"] == 20
    assert offsets(PARAMS_DTYPE)["sq_off"] == 40 and offsets(PARAMS_DTYPE)["cq_off"] == 80
    assert GETEVENTS_ARG_DTYPE.itemsize == 24 and offsets(GETEVENTS_ARG_DTYPE)["ts"] == 16


def test_struct_of_follows_the_dtype_and_refuses_holes() -> None:
    assert struct_of(CQE_DTYPE).format == "<QiI"
    padded = np.dtype({"names": ["a", "b"], "formats": ["u1", "<u4"], "offsets": [0, 4],
                       "itemsize": 8})
    with pytest.raises(ValueError):
        struct_of(padded)
    with pytest.raises(ValueError):
        struct_of(CQE32_DTYPE)  # an array field is not a scalar


def _nop(ring: Ring, user_data: int) -> None:
    off = ring.next_sqe()
    URING_CMD_HEAD.pack_into(ring.sqes_mv, off, Op.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, 0,
                             user_data, 0, 0, 0)


def test_a_nop_goes_round_through_the_real_ring() -> None:
    with Ring(8) as ring:
        assert ring.sqe_bytes == 128 and ring.cqe_bytes == 32
        for i in range(3):
            _nop(ring, 1000 + i)
        assert ring.queued == 3
        assert ring.enter(3, 5.0) == 3
        assert ring.queued == 0
        assert ring.reap() == [(1000, 0, 0), (1001, 0, 0), (1002, 0, 0)]
        assert ring.ready() == 0 and ring.reap() == []
        assert int(ring.cqes[0]["user_data"]) == 1000  # the structured view, same memory


def test_a_wait_with_nothing_to_come_ends_at_its_timeout() -> None:
    with Ring(4) as ring:
        start = time.monotonic()
        assert ring.enter(1, 0.2) == 0
        assert 0.15 < time.monotonic() - start < 3.0
        assert ring.reap() == []


def test_a_full_submission_queue_says_so() -> None:
    with Ring(4) as ring:
        for i in range(ring.sq_entries):
            _nop(ring, i)
        with pytest.raises(RingFull):
            ring.next_sqe()
        ring.enter(ring.sq_entries, 5.0)
        assert len(ring.reap()) == ring.sq_entries
        _nop(ring, 99)  # room again once the kernel took them
