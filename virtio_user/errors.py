"""Every exception virtio_user raises, and the CLI exit code each one maps to.

::

    VirtioError                     99  anything else
     +-- InvalidArgument             1  bad syntax, negative or zero counts, wrong file length
     +-- Unsupported                 5  VIRTIO_BLK_S_UNSUPP, or a feature the device lacks
     +-- ReadOnlyDevice              7  a write, discard or write-zeroes to a read-only device
     +-- BlkIOError(status, ...)     3  VIRTIO_BLK_S_IOERR from the device
     +-- OutOfRange                 22  a sector range beyond the capacity
     +-- CannotOpen                 15  cannot open or use the device or a file
     |    +-- DeviceNotFound            no such PCI device, or none of the right kind
     |    +-- WrongDevice               a PCI device of another kind
     |    +-- DeviceBusy                mounted, held by the kernel, or open in another process
     |    +-- BindError                 driver_override / drivers_probe did not give the driver
     |    +-- DmaError                  no hugepages, no pagemap, memory not contiguous
     |    +-- BackendUnavailable        a backend that cannot be used here (vfio: not yet)
     |    +-- FileAccessError           an input or output file
     |    +-- DeviceError               the device broke the protocol (bad used id/len/idx,
     |         |                        a register access failed); a reset was attempted and
     |         |                        the message says whether it took
     |         +-- DeviceTimeout    33  no completion before the deadline; reset likewise
     |         +-- WorkerFailed     (*)  a worker process driving one queue failed or died;
     |                                  the device has been reset, every worker stopped;
     |                                  (*) the first failed worker's code (15 if it died)
     +-- Interrupted(signum)   128+sig  SIGINT / SIGTERM arrived; the device has been reset
     +-- ProtocolError          99  a peer broke its protocol (a malformed NBD request);
                                    the connection has been ended

``exit_code(exc)`` is the one table the CLI uses; anything not a ``VirtioError`` is 99.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Base of every error this package raises on purpose."""


class InvalidArgument(VirtioError):
    """The caller asked for something malformed; nothing reached the device."""


class Unsupported(VirtioError):
    """The device does not offer the feature or answered VIRTIO_BLK_S_UNSUPP."""


class ReadOnlyDevice(VirtioError):
    """A modifying request to a device that negotiated VIRTIO_BLK_F_RO."""


class BlkIOError(VirtioError):
    """The device completed a request with VIRTIO_BLK_S_IOERR."""

    def __init__(self, message: str, status: int, sector: int, count: int) -> None:
        super().__init__(message)
        self.status = status
        self.sector = sector
        self.count = count


class OutOfRange(VirtioError):
    """A sector range that does not fit the device's capacity."""

    def __init__(self, message: str, sector: int, count: int, capacity: int) -> None:
        super().__init__(message)
        self.sector = sector
        self.count = count
        self.capacity = capacity


class CannotOpen(VirtioError):
    """The device (or a file) cannot be opened or used."""


class DeviceNotFound(CannotOpen):
    pass


class WrongDevice(CannotOpen):
    pass


class DeviceBusy(CannotOpen):
    pass


class BindError(CannotOpen):
    pass


class DmaError(CannotOpen):
    pass


class BackendUnavailable(CannotOpen):
    pass


class FileAccessError(CannotOpen):
    pass


class DeviceError(CannotOpen):
    """The device violated the protocol or stopped responding; a reset was attempted and the
    message says whether it took (if not, the DMA memory is kept mapped)."""


class DeviceTimeout(DeviceError):
    """No completion arrived before the deadline; reset as for DeviceError."""


class WorkerFailed(DeviceError):
    """One of the worker processes that each drive one request queue failed (its error)
    or died; the device has been reset and every other worker stopped. ``reports`` has
    one line per worker; ``code`` is the exit code of the first failure."""

    def __init__(self, message: str, reports: list[str], code: int) -> None:
        super().__init__(message)
        self.reports = reports
        self.code = code


class Interrupted(VirtioError):
    """A signal asked us to stop; the device has been reset before memory was freed."""

    def __init__(self, signum: int, message: str = "") -> None:
        import signal  # here: the command line parses before any signal (start-up)
        name = signal.Signals(signum).name
        super().__init__(message or f"interrupted by {name}")
        self.signum = signum


class ProtocolError(VirtioError):
    """A peer (the kernel's NBD client) sent something malformed; the connection has
    been ended."""


EXIT_CODES: dict[type[BaseException], int] = {
    InvalidArgument: 1,
    BlkIOError: 3,
    Unsupported: 5,
    ReadOnlyDevice: 7,
    CannotOpen: 15,
    OutOfRange: 22,
    DeviceTimeout: 33,
    VirtioError: 99,
}


def exit_code(exc: BaseException) -> int:
    """The CLI exit code for ``exc``: the nearest class in EXIT_CODES, else 99."""
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, WorkerFailed):
        return exc.code
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 99
