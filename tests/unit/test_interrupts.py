"""The waiter (interrupt and hybrid modes) against a split queue and a device side that
interrupts only when the ring asks for it, as the spec's suppression rules say: the
re-check after arming that prevents a lost wake-up, spurious and shared interrupts,
configuration-change interrupts, timeouts and the vfio SET_IRQS encoding."""

from __future__ import annotations

import ctypes
import json
import os
from typing import Any

import pytest

from virtio_user import interrupts, pci
from virtio_user.errors import DeviceTimeout
from virtio_user.interrupts import UioIntx, Waiter
from virtio_user.memory import DmaAllocator, DmaRegion
from virtio_user.ring.packed import PackedQueue
from virtio_user.ring.split import SplitQueue
from virtio_user.spec import VIRTQ_AVAIL_F_NO_INTERRUPT, IsrBit, RingEventFlags
from virtio_user.transport import vfio_ioctl

SEG = [(0x1000, 16, False), (0x3000, 1, True)]


class Device:
    """The device side of one split queue: completes what it is told to and decides,
    like QEMU's virtio_should_notify, whether that would raise an interrupt."""

    def __init__(self, q: SplitQueue[Any]) -> None:
        self.q = q
        self.seen = 0  # avail entries taken
        self.pending: list[int] = []
        self.interrupts = 0
        self.armed_at_sleep: list[int] = []  # flags or used_event when the driver slept

    def take(self) -> None:
        idx = int(self.q.avail["idx"])
        while self.seen != idx:
            self.pending.append(int(self.q.avail["ring"][self.seen % self.q.size]))
            self.seen = (self.seen + 1) & 0xFFFF

    def complete_all(self) -> bool:
        """Publish every pending completion; True if the driver asked to be interrupted."""
        self.take()
        used = self.q.used
        old = int(used["idx"])
        for head in self.pending:
            used["ring"][int(used["idx"]) % self.q.size] = (head, 1)
            used["idx"] = (int(used["idx"]) + 1) & 0xFFFF
        self.pending = []
        new = int(used["idx"])
        if new == old:
            return False
        if self.q.event_idx:  # vring_need_event
            event = int(self.q.avail["used_event"])
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not int(self.q.avail["flags"]) & VIRTQ_AVAIL_F_NO_INTERRUPT


class Source:
    """An IrqSource driven by a script of what happens during each sleep."""

    kind = "fake"

    def __init__(self, device: Device, script: list[str]) -> None:
        self.device = device
        self.script = script
        self.waits = 0
        self.closed = False

    def wait(self, timeout: float) -> IsrBit | None:
        self.waits += 1
        q = self.device.q
        self.device.armed_at_sleep.append(
            int(q.avail["used_event"]) if q.event_idx else int(q.avail["flags"]))
        step = self.script.pop(0) if self.script else "nothing"
        if step == "complete":  # the device completes; it interrupts only if asked
            return IsrBit.QUEUE if self.device.complete_all() else None
        if step == "shared":  # another device's interrupt on a shared INTx line
            return IsrBit(0)
        if step == "stale":  # an interrupt for something already reaped
            return IsrBit.QUEUE
        if step == "config":
            return IsrBit.CONFIG
        return None  # the slice of sleep ended with no interrupt

    def close(self) -> None:
        self.closed = True


def make(event_idx: bool, script: list[str], mode: str = "interrupt",
         spins: int | None = 0) -> tuple[SplitQueue[Any], Device, Source, Waiter, list[str]]:
    """A queue of 8 with a waiter; the list collects "fault" and "config" events."""
    region = DmaRegion.anonymous(1 << 20, contiguous=1 << 20)
    events: list[str] = []
    q: SplitQueue[Any] = SplitQueue(DmaAllocator(region), 8, lambda: None, indirect=False,
                                    event_idx=event_idx,
                                    on_fault=lambda: events.append("fault"))
    dev = Device(q)
    src = Source(dev, script)
    waiter = Waiter(mode, src, on_config=lambda: events.append("config"), spins=spins)
    q.waiter = waiter
    return q, dev, src, waiter, events


def suppressed(q: SplitQueue[Any]) -> bool:
    """Whether the ring tells the device not to interrupt (the polling state)."""
    if q.event_idx:
        return int(q.avail["used_event"]) == (q.used_idx - 1) & 0xFFFF
    return bool(int(q.avail["flags"]) & VIRTQ_AVAIL_F_NO_INTERRUPT)


@pytest.mark.parametrize("event_idx", [False, True])
def test_sleeps_armed_and_wakes_on_the_interrupt(event_idx: bool) -> None:
    q, dev, src, waiter, _ = make(event_idx, ["complete"])
    assert suppressed(q)  # polling state until someone waits
    q.add(SEG, "a")
    q.kick()
    assert q.wait(5.0) == [("a", 1)]
    assert src.waits == 1 and waiter.wakeups == 1 and waiter.spurious == 0
    # While asleep the ring asked for an interrupt at the next used entry ...
    assert dev.armed_at_sleep == [0]  # used_event = last used (0) / flags = 0
    # ... and it is back to "no interrupts" now that the driver is not sleeping.
    assert suppressed(q)


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_interrupt_is_raised_while_not_armed(event_idx: bool) -> None:
    """The device model's rule is the spec's: in the polling state completing a request
    raises nothing. (So a waiter that forgot to arm would sleep until the deadline.)"""
    q, dev, *_ = make(event_idx, [])
    q.add(SEG, "a")
    q.kick()
    assert dev.complete_all() is False


@pytest.mark.parametrize("event_idx", [False, True])
def test_completion_between_the_look_and_the_arming_is_not_lost(event_idx: bool) -> None:
    """The device publishes right before the driver arms: no interrupt will come for it
    (it was not asked for), so only the re-check after arming finds it."""
    q, dev, src, waiter, _ = make(event_idx, [])
    q.add(SEG, "a")
    q.kick()
    arm = q.arm_interrupts

    def racing_arm() -> bool:
        assert dev.complete_all() is False  # suppressed at this instant: no interrupt
        return arm()
    q.arm_interrupts = racing_arm  # type: ignore[method-assign]
    assert q.wait(0.2) == [("a", 1)]
    assert src.waits == 0  # never slept
    assert suppressed(q)


@pytest.mark.parametrize("kind", ["shared", "stale"])
def test_spurious_and_shared_interrupts_are_not_errors(kind: str) -> None:
    q, dev, src, waiter, events = make(False, [kind, kind, "complete"])
    q.add(SEG, "a")
    q.kick()
    assert q.wait(5.0) == [("a", 1)]
    assert waiter.spurious == 2 and waiter.wakeups == 3 and not events
    assert dev.armed_at_sleep == [0, 0, 0]  # re-armed before every sleep


def test_config_interrupt_calls_back_and_keeps_waiting() -> None:
    q, dev, src, waiter, events = make(False, ["config", "complete"])
    q.add(SEG, "a")
    q.kick()
    assert q.wait(5.0) == [("a", 1)]
    assert waiter.config_changes == 1 and events == ["config"]
    assert waiter.spurious == 0


def test_no_interrupt_before_the_deadline_is_a_timeout_and_a_reset() -> None:
    q, dev, src, waiter, events = make(True, [])  # nothing ever completes
    q.add(SEG, "a")
    q.kick()
    with pytest.raises(DeviceTimeout, match="no completion within 0.05 s"):
        q.wait(0.05)
    assert events == ["fault"] and q.broken
    assert src.waits >= 1


def test_hybrid_spins_first_and_sleeps_only_when_nothing_came() -> None:
    q, dev, src, waiter, _ = make(False, ["complete"], mode="hybrid", spins=1000)
    q.add(SEG, "a")
    q.kick()
    dev.complete_all()  # done before the driver looks: found while spinning
    assert q.wait(5.0) == [("a", 1)] and src.waits == 0
    q.add(SEG, "b")
    q.kick()
    assert q.wait(5.0) == [("b", 1)] and src.waits == 1


def test_hybrid_budget_is_calibrated_from_a_measurement() -> None:
    spins = interrupts.calibrate_spins(50e-6)
    assert 1 <= spins < 10_000_000  # a CPU looks at least once, at most 200 G/s
    assert interrupts.calibrate_spins(0) == 1


def test_a_waiter_is_only_for_sleeping_modes() -> None:
    with pytest.raises(ValueError, match="poll"):
        Waiter("poll", Source(None, []))  # type: ignore[arg-type]


class Config:
    """PCI config space with only the command register."""

    def __init__(self, command: int) -> None:
        self.command = command
        self.writes: list[int] = []

    def read_at(self, offset: int, width: int) -> int:
        assert (offset, width) == (4, 2)
        return self.command

    def write_at(self, offset: int, width: int, value: int) -> None:
        assert (offset, width) == (4, 2)
        self.command = value
        self.writes.append(value)


def test_uio_source_acknowledges_through_the_isr_and_unmasks(tmp_path: Any,
                                                             monkeypatch: Any) -> None:
    """/dev/uioN stands in as a pipe: readable = an interrupt. The source reads the
    count, reads the ISR (the acknowledgement), then clears the command register's
    Interrupt Disable bit, which uio_pci_generic set when the line fired."""
    (tmp_path / "0000:00:10.0" / "uio" / "uio3").mkdir(parents=True)
    monkeypatch.setattr(interrupts, "SYSFS_PCI", tmp_path)
    assert UioIntx.find("0000:00:10.0") == interrupts.Path("/dev/uio3")
    with pytest.raises(interrupts.BackendUnavailable, match="uio_pci_generic"):
        UioIntx.find("0000:00:11.0")
    r, w = os.pipe()
    isr_reads: list[int] = []

    def isr() -> int:
        isr_reads.append(1)
        return 3
    masked = 0x0006 | pci.PCI_COMMAND_INTX_DISABLE  # bus master, memory, masked
    config = Config(masked)
    src = object.__new__(UioIntx)
    src.fd, src.path, src._isr, src._config = r, interrupts.Path("/dev/uio3"), isr, config
    assert src.wait(0.01) is None and not isr_reads  # nothing: a bounded wait, no ack
    os.write(w, (7).to_bytes(4, "little"))  # the interrupt count
    assert src.wait(1.0) == IsrBit.QUEUE | IsrBit.CONFIG
    assert isr_reads == [1] and config.writes == [0x0006]  # only the bit cleared
    pci.unmask_intx(config)
    assert config.writes == [0x0006]  # already unmasked: no second write
    os.close(w)
    src.close()


def test_set_irqs_carries_one_eventfd_per_vector_and_count_zero_tears_down(
        monkeypatch: Any) -> None:
    calls: list[tuple[int, int, int, int, int, list[int]]] = []

    def fake_ioctl(fd: int, request: int, arg: Any) -> int:
        assert request == vfio_ioctl.VFIO_DEVICE_SET_IRQS
        raw = bytes(arg)
        argsz, flags, index, start, count = (int.from_bytes(raw[i:i + 4], "little")
                                             for i in range(0, 20, 4))
        assert argsz == len(raw) == 20 + 4 * count
        fds = [int.from_bytes(raw[20 + 4 * i:24 + 4 * i], "little") for i in range(count)]
        calls.append((fd, flags, index, start, count, fds))
        return 0
    monkeypatch.setattr(vfio_ioctl, "_ioctl", fake_ioctl)
    msix = interrupts.VfioMsix(42, 2)
    assert len(msix.fds) == 2
    msix.close()
    trigger, eventfd, none = (vfio_ioctl.VFIO_IRQ_SET_ACTION_TRIGGER,
                              vfio_ioctl.VFIO_IRQ_SET_DATA_EVENTFD,
                              vfio_ioctl.VFIO_IRQ_SET_DATA_NONE)
    assert calls[0][:5] == (42, trigger | eventfd, vfio_ioctl.VFIO_PCI_MSIX_IRQ_INDEX, 0, 2)
    assert calls[1] == (42, trigger | none, vfio_ioctl.VFIO_PCI_MSIX_IRQ_INDEX, 0, 0, [])
    assert msix.fds == []
    assert ctypes.sizeof(vfio_ioctl.vfio_irq_set) == 20


def test_msix_vector_refused_by_the_device_is_an_error(monkeypatch: Any) -> None:
    class Backend:
        bdf = "0000:00:10.0"

        def refresh_msix(self) -> bool:
            return True

    class Transport:
        def set_config_vector(self, vector: int) -> int:
            return vector

        def set_queue_vector(self, index: int, vector: int) -> int:
            return 0xFFFF
    with pytest.raises(interrupts.DeviceError, match="queue 0: the device refused it"):
        interrupts._route_vectors(Backend(), Transport())  # type: ignore[arg-type]


# -- the packed ring: the same waiter, through the driver event suppression structure --

class PackedSource:
    """Completes everything during a sleep; interrupts only if the driver enabled them."""

    kind = "fake"

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.flags_at_sleep: list[int] = []

    def wait(self, timeout: float) -> IsrBit | None:
        flags = self.dev.driver_event_flags
        self.flags_at_sleep.append(flags)
        for buf in self.dev.take():
            self.dev.complete(buf.id)
        return IsrBit.QUEUE if flags == int(RingEventFlags.RING_EVENT_FLAGS_ENABLE) else None

    def close(self) -> None:
        pass


def packed(spins: int = 0) -> tuple[Any, Any, PackedSource]:
    from packed_device import PackedDevice
    region = DmaRegion.anonymous(2 << 20, contiguous=2 << 20)
    q: PackedQueue[Any] = PackedQueue(DmaAllocator(region), 8, lambda: None, indirect=False,
                                      event_idx=True, on_fault=lambda: None)
    dev = PackedDevice([region], 8, q.desc_bus, q.driver_bus, q.device_bus)
    src = PackedSource(dev)
    q.waiter = Waiter("interrupt", src, spins=spins)
    return q, dev, src


def test_packed_queue_sleeps_with_notifications_enabled_then_disables_them() -> None:
    q, dev, src = packed()
    disable = int(RingEventFlags.RING_EVENT_FLAGS_DISABLE)
    assert dev.driver_event_flags == disable
    q.add(SEG, "a")
    q.kick()
    assert q.wait(5.0) == [("a", 1)]
    assert src.flags_at_sleep == [int(RingEventFlags.RING_EVENT_FLAGS_ENABLE)]
    assert dev.driver_event_flags == disable
    assert q.waiter is not None and q.waiter.wakeups == 1


def test_packed_completion_before_arming_is_found_by_the_re_check() -> None:
    q, dev, src = packed()
    q.add(SEG, "a")
    q.kick()
    for buf in dev.take():  # written while the driver still had notifications disabled
        dev.complete(buf.id)
    assert q.arm_interrupts() is True
    q.disarm_interrupts()
    assert q.wait(5.0) == [("a", 1)] and src.flags_at_sleep == []


# -- VirtioBlk and the CLI with a waiter, on the Python device model --------------------

class ModelSource:
    """The device model serves requests only during a sleep, then interrupts with what
    its ISR holds (like INTx: the read acknowledges)."""

    kind = "model-intx"

    def __init__(self, device: Any) -> None:
        self.device = device
        self.closed = False

    def wait(self, timeout: float) -> IsrBit | None:
        if self.device.process():
            self.device.isr |= IsrBit.QUEUE
        bits, self.device.isr = IsrBit(self.device.isr), 0
        return bits or None

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def model_irqs(monkeypatch: Any) -> list[ModelSource]:
    """open_source gives a ModelSource for the fake backend; the list collects them."""
    made: list[ModelSource] = []

    def open_source(backend: Any, transport: Any, queues: int = 1) -> ModelSource:
        backend.device.auto = False  # completions only come while the driver sleeps
        made.append(ModelSource(backend.device))
        return made[-1]
    monkeypatch.setattr(interrupts, "open_source", open_source)
    return made


def test_blk_reads_and_writes_in_interrupt_mode(model_irqs: list[ModelSource]) -> None:
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice
    device = FakeBlkDevice()
    with VirtioBlk(FakeBackend(device), timeout=1.0, wait="interrupt") as blk:
        assert blk.info()["wait"] == "interrupt"
        assert blk.info()["interrupts"] == "model-intx"
        blk.write(8, b"\x5a" * 4096)
        assert blk.read(8, 8) == b"\x5a" * 4096
        assert blk.waiter is not None and blk.waiter.wakeups >= 2
    assert model_irqs[0].closed  # vectors / fds released with the device


def test_blk_config_interrupt_reports_the_new_capacity(model_irqs: list[ModelSource],
                                                       caplog: Any) -> None:
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice
    device = FakeBlkDevice(capacity=2048)
    with VirtioBlk(FakeBackend(device), timeout=1.0, wait="interrupt") as blk:
        device.resize(4096)  # raises the ISR's config bit, seen at the next sleep
        caplog.set_level("WARNING", logger="virtio_user")
        blk.read(0, 1)
        assert blk.capacity == 4096 and blk.capacity_changes == [(2048, 4096)]
    assert "capacity changed from 2048 to 4096 sectors" in caplog.text


def test_cli_wait_interrupt_bench_reports_cpu_and_waiting(model_irqs: list[ModelSource],
                                                          capsys: Any) -> None:
    from virtio_user import cli
    from virtio_user.blk import VirtioBlk
    from fake_device import FakeBackend, FakeBlkDevice

    def opener(args: Any) -> VirtioBlk:
        return VirtioBlk(FakeBackend(FakeBlkDevice()), timeout=1.0, wait=args.wait)
    argv = ["--wait", "interrupt", "bench", "--ios", "200", "--iodepth", "4"]
    assert cli.main(argv + ["--json"], opener=opener) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["wait"] == "interrupt" and result["irq"] == "model-intx"
    assert result["ios"] == 200 and result["interrupts"] > 0
    assert result["cpu_s_per_io"] == pytest.approx(result["cpu_s"] / 200, abs=1e-4)
    assert cli.main(argv, opener=opener) == 0
    text = capsys.readouterr().out
    assert "wait interrupt (model-intx:" in text and "us/IO" in text


def test_cli_refuses_an_unknown_wait_mode(capsys: Any) -> None:
    from virtio_user import cli
    assert cli.main(["--wait", "sometimes", "info"]) == 1
    assert "--wait" in capsys.readouterr().err


def test_a_backend_without_interrupts_is_refused_and_the_device_closed() -> None:
    from virtio_user.blk import VirtioBlk
    from virtio_user.errors import CannotOpen
    from fake_device import FakeBackend, FakeBlkDevice
    backend = FakeBackend(FakeBlkDevice())
    with pytest.raises(CannotOpen, match="fake backend has no interrupts"):
        VirtioBlk(backend, wait="interrupt")
    assert backend.closed and backend.device.status == 0


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_eventfds_made_before_one_fails_are_closed(monkeypatch: Any) -> None:
    """The third eventfd fails (EMFILE, say): the two made before it must not stay open."""
    real, made = os.eventfd, []

    def eventfd(initval: int, flags: int = 0) -> int:
        if len(made) == 2:
            raise OSError(24, "Too many open files")
        made.append(real(initval, flags))
        return made[-1]
    monkeypatch.setattr(os, "eventfd", eventfd)
    monkeypatch.setattr(vfio_ioctl, "_ioctl", lambda *a: pytest.fail("no SET_IRQS"))
    before = _open_fds()
    with pytest.raises((interrupts.CannotOpen, OSError), match="Too many open files"):
        interrupts.VfioMsix(42, 3)
    assert len(made) == 2
    assert _open_fds() == before, "eventfds leaked"


def test_uio_source_closes_its_fd_when_unmasking_fails(tmp_path: Any,
                                                     monkeypatch: Any) -> None:
    uio = tmp_path / "uio3"
    uio.write_bytes(b"")
    monkeypatch.setattr(UioIntx, "find", staticmethod(lambda bdf: uio))

    class Broken(Config):
        def write_at(self, offset: int, width: int, value: int) -> None:
            raise interrupts.DeviceError("config space write failed")
    before = _open_fds()
    with pytest.raises(interrupts.DeviceError):
        UioIntx("0000:00:10.0", lambda: 0, Broken(0x0006 | pci.PCI_COMMAND_INTX_DISABLE))
    assert _open_fds() == before, "/dev/uioN left open"



# -- several request queues: a vector each (Linux's vp_find_vqs order), or one shared --

class FakeVfio:
    """irq_info and SET_IRQS of a vfio device with ``msix`` MSI-X vectors."""

    def __init__(self, monkeypatch: Any, msix: int) -> None:
        self.msix = msix
        monkeypatch.setattr(vfio_ioctl, "_ioctl", lambda fd, request, arg: 0)
        monkeypatch.setattr(vfio_ioctl, "irq_info", self.irq_info)

    def irq_info(self, device: int, index: int) -> Any:
        class Info:
            count = self.msix if index == vfio_ioctl.VFIO_PCI_MSIX_IRQ_INDEX else 1
        return Info()


class RoutingTransport:
    def __init__(self) -> None:
        self.vectors: dict[str, int] = {}

    def isr(self) -> IsrBit:
        return IsrBit(0)

    def set_config_vector(self, vector: int) -> int:
        self.vectors["config"] = vector
        return vector

    def set_queue_vector(self, index: int, vector: int) -> int:
        self.vectors[f"queue {index}"] = vector
        return vector


class VfioBackend:
    name = "bench"
    bdf = "0000:00:10.0"

    def __init__(self) -> None:
        class Vfio:
            device = 7
        self.name = "vfio"
        self.vfio = Vfio()

    def refresh_msix(self) -> bool:
        return True


@pytest.mark.parametrize("msix,shared", [(5, False), (4, True), (2, True)])
def test_vfio_gives_each_queue_its_vector_or_one_shared(monkeypatch: Any, msix: int,
                                                        shared: bool) -> None:
    FakeVfio(monkeypatch, msix)
    transport = RoutingTransport()
    source = interrupts.open_source(VfioBackend(), transport, queues=4)
    try:
        assert isinstance(source, interrupts.VfioMsix) and source.shared == shared
        assert len(source.fds) == (2 if shared else 5)
        want = {"config": 0, **{f"queue {i}": 1 if shared else 1 + i for i in range(4)}}
        assert transport.vectors == want
        # Each queue's owner sleeps on its own vector (and the config one) only.
        views = [interrupts.queue_source(source, i) for i in range(4)]
        os.eventfd_write(source.fds[source.vector(2)], 1)
        assert views[2].wait(0.5) == IsrBit.QUEUE
        if not shared:
            assert views[1].wait(0.01) is None  # queue 2's interrupt is not queue 1's
        os.eventfd_write(source.fds[0], 1)
        assert views[3].wait(0.5) == IsrBit.CONFIG
        views[0].close()  # a view closes nothing
        assert len(source.fds) == (2 if shared else 5)
    finally:
        source.close()


def test_uio_wakes_every_owner_from_its_own_open_file(tmp_path: Any, monkeypatch: Any) -> None:
    (tmp_path / "0000:00:10.0" / "uio" / "uio3").mkdir(parents=True)
    dev_file = tmp_path / "uio3"
    dev_file.write_bytes(b"")
    monkeypatch.setattr(interrupts, "SYSFS_PCI", tmp_path)
    monkeypatch.setattr(interrupts.UioIntx, "find", staticmethod(lambda bdf: dev_file))
    monkeypatch.setattr(interrupts.pci, "unmask_intx", lambda config: None)
    src = interrupts.UioIntx("0000:00:10.0", lambda: 0, None)  # type: ignore[arg-type]
    try:
        assert interrupts.queue_source(src, 3) is src  # one line for every queue
        inherited = src.fd
        os.set_inheritable(inherited, True)
        src.after_fork()
        assert src.fd != inherited and os.path.samefile(f"/proc/self/fd/{src.fd}", dev_file)
    finally:
        src.close()
