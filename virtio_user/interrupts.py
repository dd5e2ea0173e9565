"""Waiting for completions: poll, interrupt or hybrid, and where interrupts come from.

``poll`` spins on the used ring and asks the device for no interrupts at all (the
queue's default). ``interrupt`` sleeps in poll(2) on a file descriptor the kernel
signals when the device interrupts; ``hybrid`` spins for a short, calibrated while
first and sleeps only if nothing completed by then.

Sources (``IrqSource``), one per device, every wait bounded by a timeout:

- ``UioIntx``: INTx through /dev/uioN. uio_pci_generic masks the line (PCI command
  register, Interrupt Disable) when it fires; we read the ISR (which acknowledges the
  device and lowers the level-triggered line), then clear Interrupt Disable again in
  config space. uio_pci_generic has no irqcontrol: a write of 1 to /dev/uioN, which
  other uio drivers take as "unmask", fails there with ENOSYS.
- ``VfioMsix``: MSI-X through VFIO_DEVICE_SET_IRQS, one eventfd per vector: vector 0
  for configuration changes, vector 1 + i for request queue i ("MSI-X Vector
  Configuration"; Linux's first choice in vp_find_vqs). A device with fewer vectors
  than queues + 1 gets Linux's second choice: vector 1 shared by every queue. Each
  queue's owner sleeps on its own eventfd (``for_queue``), so no owner drains
  another's wake-up; with the shared vector they do, and an owner that missed one
  notices its completions at the end of its sleep slice (MAX_SLEEP).

With several queues, uio has one INTx line for the whole device and the ISR says only
"some queue": every owner is woken (each worker process reopens /dev/uioN after the
fork, so each has its own event count) and looks at its own queue.
- ``VfioIntx``: INTx through one eventfd when the device has no MSI-X; vfio-pci
  masks it like uio does and is told to unmask through SET_IRQS.

The lost wake-up ("Driver Requirements: Used Buffer Notification Suppression"): the
device only interrupts for a used buffer if, when it writes used.idx, we had asked. So
before sleeping the queue asks (clears VIRTQ_AVAIL_F_NO_INTERRUPT, or sets used_event
to the last used index seen), issues a full barrier and looks at used.idx once more: a
completion that slipped in before the device could see the request would otherwise
never be announced, and we would sleep until the timeout. The packed ring does the same
with its driver event suppression structure (RING_EVENT_FLAGS_ENABLE / DISABLE).
"""

from __future__ import annotations

import logging
import os
import select
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from . import pci
from .errors import BackendUnavailable, CannotOpen, DeviceError
from .spec import VIRTIO_MSI_NO_VECTOR, IsrBit

log = logging.getLogger(__name__)

HYBRID_SPIN_SECONDS = 50e-6  # spin this long before sleeping (see README "Waiting")
MAX_SLEEP = 1.0  # one poll(2) at most this long: deadlines are re-checked in between
CONFIG_VECTOR, QUEUE_VECTOR = 0, 1  # MSI-X table entries we use
SYSFS_PCI = Path("/sys/bus/pci/devices")


class Armable(Protocol):
    """What a queue (split or packed) offers the waiter."""

    def arm_interrupts(self) -> bool:
        """Ask for a used-buffer notification, barrier, look again: True when used
        buffers are already there (then do not sleep)."""
        ...

    def disarm_interrupts(self) -> None: ...

    def has_used(self) -> bool: ...


class IrqSource(Protocol):
    """Where a device's interrupts arrive; ``wait`` acknowledges and re-enables them."""

    kind: str  # "uio-intx", "vfio-msix", "vfio-intx"

    def wait(self, timeout: float) -> IsrBit | None:
        """Block at most ``timeout`` seconds for an interrupt; None on timeout, else
        what it announced (nothing, for a shared line's or a spurious interrupt)."""
        ...

    def close(self) -> None: ...


def _poll_fds(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` that are readable within ``timeout`` seconds."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return [fd for fd, _ in p.poll(max(0, int(timeout * 1000 + 0.999)))]


class UioIntx:
    """INTx of a device bound to uio_pci_generic, through /dev/uioN."""

    kind = "uio-intx"

    def __init__(self, bdf: str, isr: Callable[[], int], config: pci.ConfigSpace) -> None:
        self.bdf = bdf
        self._isr = isr
        self._config = config
        self.path = self.find(bdf)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CannotOpen(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            pci.unmask_intx(config)  # a previous run may have left the line masked
        except BaseException:
            self.close()  # nobody else holds the fd yet
            raise

    @staticmethod
    def find(bdf: str) -> Path:
        names = sorted((SYSFS_PCI / bdf / "uio").glob("uio*"))
        if not names:
            raise BackendUnavailable(f"{bdf} has no uio device (is it bound to "
                                     "uio_pci_generic?): no interrupts to wait for")
        return Path("/dev") / names[0].name

    def wait(self, timeout: float) -> IsrBit | None:
        if not _poll_fds([self.fd], timeout):
            return None
        os.read(self.fd, 4)  # the interrupt count; readable, so this does not block
        bits = IsrBit(self._isr())  # acknowledges: the device lowers the line
        pci.unmask_intx(self._config)
        return bits

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def for_queue(self, index: int) -> IrqSource:
        return self  # one line for every queue

    def after_fork(self) -> None:
        """In a worker process: an open file of its own, so that uio wakes this
        process on every interrupt (uio counts events per open file; an inherited
        descriptor shares its count with the parent and the other workers)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        os.close(self.fd)
        self.fd = fd


class _Eventfds:
    """eventfds handed to VFIO_DEVICE_SET_IRQS, torn down before the device is released."""

    kind = "vfio"
    index = 0

    def __init__(self, device: int, count: int) -> None:
        from .transport import vfio_ioctl
        self._ioctl = vfio_ioctl
        self.device = device
        self.fds: list[int] = []
        try:
            for _ in range(count):  # one at a time: a failure closes the ones made
                self.fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        except OSError as exc:
            self._close_fds()
            raise CannotOpen(f"{self.kind}: cannot make {count} eventfds: "
                             f"{exc.strerror}") from exc
        except BaseException:
            self._close_fds()
            raise
        try:
            vfio_ioctl.set_irq_eventfds(device, self.index, self.fds)
        except OSError as exc:
            self._close_fds()
            raise DeviceError(f"VFIO_DEVICE_SET_IRQS ({self.kind}, {count} vectors): "
                              f"{exc.strerror}") from exc

    def _fired(self, timeout: float) -> list[int]:
        """Indexes of the vectors that fired, each eventfd drained."""
        fired = []
        for fd in _poll_fds(self.fds, timeout):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            fired.append(self.fds.index(fd))
        return fired

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        """Free the vectors (count 0), then the eventfds. The device is reset by then."""
        if not self.fds:
            return
        try:
            self._ioctl.set_irq_eventfds(self.device, self.index, [])
        except OSError as exc:
            log.warning("tearing down %s vectors: %s", self.kind, exc.strerror)
        finally:
            self._close_fds()


class VfioMsix(_Eventfds):
    """Vector CONFIG_VECTOR for configuration changes, QUEUE_VECTOR + i for queue i (or
    QUEUE_VECTOR for all of them, ``shared``)."""

    kind = "vfio-msix"
    index = 2  # VFIO_PCI_MSIX_IRQ_INDEX

    def __init__(self, device: int, count: int, shared: bool = False) -> None:
        super().__init__(device, count)
        self.shared = shared

    def vector(self, queue: int) -> int:
        return QUEUE_VECTOR if self.shared else QUEUE_VECTOR + queue

    def for_queue(self, index: int) -> IrqSource:
        return _QueueVector(self, self.vector(index))

    def after_fork(self) -> None:
        pass

    def wait(self, timeout: float) -> IsrBit | None:
        fired = self._fired(timeout)
        if not fired:
            return None
        bits = IsrBit(0)
        for vector in fired:
            bits |= IsrBit.CONFIG if vector == CONFIG_VECTOR else IsrBit.QUEUE
        return bits


class _QueueVector:
    """One queue's view of the MSI-X vectors: its own and the config vector. Closing it
    closes nothing: the device's source is closed with the device."""

    kind = "vfio-msix"

    def __init__(self, msix: VfioMsix, vector: int) -> None:
        self.msix = msix
        self.vector = vector

    def wait(self, timeout: float) -> IsrBit | None:
        fds = [self.msix.fds[CONFIG_VECTOR], self.msix.fds[self.vector]]
        bits = IsrBit(0)
        for fd in _poll_fds(fds, timeout):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:  # another owner drained it (config, shared vector)
                continue
            bits |= IsrBit.CONFIG if fd == fds[0] else IsrBit.QUEUE
        return bits or None

    def close(self) -> None:
        pass


class VfioIntx(_Eventfds):
    """The one INTx line, with the ISR telling queue from config (as for uio)."""

    kind = "vfio-intx"
    index = 0  # VFIO_PCI_INTX_IRQ_INDEX

    def __init__(self, device: int, isr: Callable[[], int]) -> None:
        super().__init__(device, 1)
        self._isr = isr

    def wait(self, timeout: float) -> IsrBit | None:
        if not self._fired(timeout):
            return None
        bits = IsrBit(self._isr())
        try:
            self._ioctl.unmask_intx(self.device)
        except OSError as exc:
            raise DeviceError(f"cannot unmask INTx: {exc.strerror}") from exc
        return bits

    def for_queue(self, index: int) -> IrqSource:
        return self

    def after_fork(self) -> None:
        pass


def calibrate_spins(seconds: float) -> int:
    """How many looks at a ring index fit in ``seconds`` on this CPU: the hybrid
    budget is counted in looks, since reading the clock on every look costs more
    than the look (and under TCG, much more)."""
    probe = memoryview(bytearray(4)).cast("H")
    n, best = 20000, float("inf")
    for _ in range(3):  # the fastest of three: the others were preempted
        t0 = time.perf_counter()
        for _ in range(n):
            if probe[1] != 0:
                break
        best = min(best, time.perf_counter() - t0)
    return max(1, int(seconds / max(best / n, 1e-9)))


class Waiter:
    """Sleeps a queue until its device interrupts. Shared by split and packed queues:
    they call ``sleep`` when their spin budget (``spins`` looks) runs out."""

    def __init__(self, mode: str, source: IrqSource,
                 on_config: Callable[[], None] = lambda: None,
                 spins: int | None = None) -> None:
        if mode not in ("interrupt", "hybrid"):
            raise ValueError(f"a Waiter is for interrupt or hybrid, not {mode!r}")
        self.mode = mode
        self.source = source
        self.on_config = on_config
        self.spins = (spins if spins is not None else
                      calibrate_spins(HYBRID_SPIN_SECONDS) if mode == "hybrid" else 0)
        self.sleeps = 0  # times we went to sleep
        self.wakeups = 0  # interrupts that announced something
        self.spurious = 0  # interrupts after which the ring was still empty
        self.config_changes = 0

    def sleep(self, queue: Armable, deadline: float) -> bool:
        """Sleep until ``queue`` has used buffers (True) or ``deadline`` (a
        time.monotonic() value) passes (False). Interrupts are armed only while
        sleeping, so a busy queue costs the device no interrupts."""
        try:
            while True:
                if queue.arm_interrupts():
                    return True  # the re-check after arming: no lost wake-up
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return queue.has_used()
                self.sleeps += 1
                bits = self.source.wait(min(remaining, MAX_SLEEP))
                if bits is None:
                    continue  # a slice of the sleep ended: arm, look, check the deadline
                self.wakeups += 1
                if bits & IsrBit.CONFIG:
                    self.config_changes += 1
                    self.on_config()
                if queue.has_used():
                    return True
                if not bits & IsrBit.CONFIG:
                    # A shared line, or an interrupt for buffers already reaped: not an
                    # error, sleep again.
                    self.spurious += 1
        finally:
            queue.disarm_interrupts()

    def stats(self) -> dict[str, Any]:
        return {"wait": self.mode, "irq": self.source.kind, "sleeps": self.sleeps,
                "interrupts": self.wakeups, "spurious": self.spurious,
                "config_changes": self.config_changes, "spin_looks": self.spins}

    def close(self) -> None:
        self.source.close()


class Transport(Protocol):
    """What the interrupt set-up needs from a transport (legacy or modern)."""

    def isr(self) -> IsrBit: ...

    def set_config_vector(self, vector: int) -> int: ...

    def set_queue_vector(self, index: int, vector: int) -> int: ...


def queue_source(source: IrqSource, index: int) -> IrqSource:
    """What queue ``index``'s owner sleeps on (sources without queues: the source)."""
    for_queue = getattr(source, "for_queue", None)
    return source if for_queue is None else for_queue(index)


def open_source(backend: Any, transport: Transport, queues: int = 1) -> IrqSource:
    """The best interrupt source the backend has, in Linux's vp_find_vqs order: on vfio
    MSI-X with a vector per queue plus the config vector, else with one vector shared
    by the queues (at least two vectors), else INTx (uio, or vfio without MSI-X)."""
    if backend.name == "uio":
        return UioIntx(backend.bdf, transport.isr, backend.config)
    if backend.name != "vfio":
        raise BackendUnavailable(f"the {backend.name} backend has no interrupts: "
                                 "use --wait poll")
    from .transport import vfio_ioctl
    device = backend.vfio.device
    vectors = vfio_ioctl.irq_info(device, vfio_ioctl.VFIO_PCI_MSIX_IRQ_INDEX).count
    if vectors >= 2:
        shared = vectors < queues + 1
        msix = VfioMsix(device, 2 if shared else queues + 1, shared)
        try:
            _route_vectors(backend, transport, [msix.vector(i) for i in range(queues)])
            return msix
        except BaseException:
            msix.close()
            backend.refresh_msix()
            raise
    if not vfio_ioctl.irq_info(device, vfio_ioctl.VFIO_PCI_INTX_IRQ_INDEX).count:
        raise BackendUnavailable(f"{backend.bdf} has neither MSI-X nor INTx: use --wait poll")
    return VfioIntx(device, transport.isr)


def _route_vectors(backend: Any, transport: Transport,
                   queue_vectors: list[int] | None = None) -> None:
    """With MSI-X now on (a legacy device's config moves from 20 to 24), point config
    changes and each queue i at its vector (``queue_vectors[i]``, by default queue 0
    at QUEUE_VECTOR) and check the device kept them."""
    if not backend.refresh_msix():
        raise DeviceError(f"{backend.bdf}: MSI-X did not come on after SET_IRQS")
    routes = [("config", transport.set_config_vector(CONFIG_VECTOR), CONFIG_VECTOR)]
    routes += [(f"queue {i}", transport.set_queue_vector(i, v), v)
               for i, v in enumerate(queue_vectors or [QUEUE_VECTOR])]
    for what, got, want in routes:
        if got != want:
            refused = "refused it" if got == VIRTIO_MSI_NO_VECTOR else f"reads back {got}"
            raise DeviceError(f"{backend.bdf}: MSI-X vector {want} for {what}: the device "
                              f"{refused}")
