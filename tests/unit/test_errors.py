"""One exit code per error class, as the README's table says."""

import signal

import pytest

from virtio_user import errors as e


@pytest.mark.parametrize("exc,code", [
    (e.InvalidArgument("x"), 1), (e.BlkIOError("x", 1, 0, 1), 3), (e.Unsupported("x"), 5),
    (e.ReadOnlyDevice("x"), 7), (e.DeviceNotFound("x"), 15), (e.WrongDevice("x"), 15),
    (e.DeviceBusy("x"), 15), (e.BindError("x"), 15), (e.DmaError("x"), 15),
    (e.FileAccessError("x"), 15), (e.BackendUnavailable("x"), 15), (e.DeviceError("x"), 15),
    (e.OutOfRange("x", 0, 1, 1), 22), (e.DeviceTimeout("x"), 33), (e.VirtioError("x"), 99),
    (RuntimeError("x"), 99), (e.Interrupted(signal.SIGINT), 130),
    (e.Interrupted(signal.SIGTERM), 143),
])
def test_exit_codes(exc: BaseException, code: int) -> None:
    assert e.exit_code(exc) == code


def test_the_tree_is_drawn_in_the_docstring() -> None:
    for name in dir(e):
        obj = getattr(e, name)
        if isinstance(obj, type) and issubclass(obj, e.VirtioError):
            assert name in (e.__doc__ or ""), name
