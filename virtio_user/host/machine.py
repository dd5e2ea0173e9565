"""One QEMU process: its command line, its sockets, its serial log, and its end.

The guest is a q35 machine booting the cached Debian kernel and the project's initramfs,
with the host's ``/`` shared read-only over 9p (so the guest runs the very same Python,
venv and project) and the host's current directory shared writable at the same path.
Each disk is a virtio-blk PCI device at 0000:00:10.0, 00:11.0, ...: legacy (1af4:1001)
unless its ``transport`` says modern (1af4:1042) or transitional.

Like QEMU's own python/qemu/machine, the launcher creates its sockets (QMP and the
agent channel) before QEMU starts, so QEMU connects to us and there is no race; it is a
context manager; it shuts down soft (poweroff through the agent), then hard (SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from . import assets
from .errors import BadOption, VMLaunchFailure
from .options import ascii_int, image_format, qemu_escape, split_spec, switch
from .vhost_user import StorageDaemon, VhostUserDisk

AGENT = assets.GUEST_DIR / "agent.py"
FIRST_DISK_SLOT = 0x10
LAUNCH_EXIT_GRACE = 2.0  # seconds for a QEMU that failed at start to exit
BOOT_LOG_ENV = "VIRTIO_USER_BOOT_LOG"  # a file that gets one line per QEMU start
KILL_WAIT_SECONDS = 10.0  # for a SIGKILLed QEMU to be reaped
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL
SERIAL_MAX = 20  # bytes: VIRTIO_BLK_ID_BYTES ("Block Device" > "Device Operation")
# -drive cache= modes as -blockdev options (writethrough also turns off the device's
# write cache, see Disk.qemu_args).
CACHE_MODES = {"writeback": {"direct": False, "no-flush": False},
               "writethrough": {"direct": False, "no-flush": False},
               "none": {"direct": True, "no-flush": False},
               "directsync": {"direct": True, "no-flush": False},
               "unsafe": {"direct": False, "no-flush": True}}
SAFE_PATH = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+@,=")


FORMATS = ("raw", "qcow2")
QUEUE_SIZES = tuple(1 << n for n in range(2, 11))  # QEMU: a power of 2, > 2, <= 1024
# Which interfaces the device offers (virtio 1.2, "Legacy Interfaces: A Note on PCI
# Device Layout"): legacy only is 1af4:1001; modern only 1af4:1042; transitional is
# 1af4:1001 with the modern capabilities as well.
TRANSPORTS = {"legacy": {"disable-modern": "on", "disable-legacy": "off"},
              "modern": {"disable-modern": "off", "disable-legacy": "on"},
              "transitional": {"disable-modern": "off", "disable-legacy": "off"}}


@dataclass
class Disk:
    """A disk image attached as a virtio-blk PCI device (legacy unless ``transport``)."""
    path: Path
    format: str | None = None  # detected with qemu-img when None
    readonly: bool = False
    cache: str = "writeback"
    queue_size: int | None = None
    serial: str | None = None  # defaults to the file's base name, cut to 20 bytes
    transport: str = "legacy"  # a key of TRANSPORTS
    iommu_platform: bool = False  # offer VIRTIO_F_ACCESS_PLATFORM (modern only)
    packed: bool = False  # offer VIRTIO_F_RING_PACKED (not on a legacy-only device)
    indirect_desc: bool = True  # offer VIRTIO_F_INDIRECT_DESC
    event_idx: bool = True  # offer VIRTIO_F_EVENT_IDX
    extra: dict[str, str] = field(default_factory=dict)  # more virtio-blk-pci properties
    # (blkdebug event, sector) pairs that fail with EIO, e.g. ("read_aio", 100)
    inject_errors: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: str) -> "Disk":
        """``PATH[,format=raw|qcow2][,readonly=on|off][,cache=MODE][,queue-size=N]
        [,serial=S][,transport=legacy|modern|transitional][,iommu_platform=on|off]
        [,packed=on|off][,indirect_desc=on|off][,event_idx=on|off]``; ``,,`` stands for
        a comma in PATH or S."""
        path, *opts = split_spec(spec)
        if not path:
            raise BadOption(f"disk {spec}: no image path")
        disk = cls(Path(path))
        seen: set[str] = set()
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or not value:
                raise BadOption(f"disk {spec}: {opt!r} is not key=value")
            if key in seen:
                raise BadOption(f"disk {spec}: {key} given twice")
            seen.add(key)
            disk.set_option(key, value, spec)
        disk.check()
        return disk

    def set_option(self, key: str, value: str, spec: str) -> None:
        if key == "format":
            self.format = value
        elif key == "readonly":
            self.readonly = switch(key, value, f"disk {spec}")
        elif key == "cache":
            self.cache = value
        elif key == "queue-size":
            try:
                self.queue_size = ascii_int(value)
            except ValueError:
                raise BadOption(f"disk {spec}: queue-size={value}: not a number; use "
                                f"a power of 2 from {QUEUE_SIZES[0]} to {QUEUE_SIZES[-1]}"
                                ) from None
        elif key == "serial":
            self.serial = value
        elif key == "transport":
            self.transport = value
        elif key in ("iommu_platform", "packed", "indirect_desc", "event_idx"):
            setattr(self, key, switch(key, value, f"disk {spec}"))
        else:
            raise BadOption(f"disk {spec}: unknown option {key!r}")

    def check(self) -> None:
        """Refuse what QEMU would refuse or misread, naming the limit."""
        where = f"disk {self.path}"
        if self.format is not None and self.format not in FORMATS:
            raise BadOption(f"{where}: format={self.format}: use one of "
                            + ", ".join(FORMATS) + " (or leave it out to detect it)")
        if self.cache not in CACHE_MODES:
            raise BadOption(f"{where}: cache={self.cache}: use one of "
                            + ", ".join(CACHE_MODES))
        if self.queue_size is not None and self.queue_size not in QUEUE_SIZES:
            raise BadOption(f"{where}: queue-size={self.queue_size}: use a power of 2 "
                            f"from {QUEUE_SIZES[0]} to {QUEUE_SIZES[-1]}")
        if self.serial is not None:
            if len(self.serial.encode()) > SERIAL_MAX:
                raise BadOption(f"{where}: serial={self.serial}: at most {SERIAL_MAX} "
                                "bytes (what GET_ID returns)")
            if not self.serial.isprintable():
                raise BadOption(f"{where}: serial={self.serial!r}: printable characters "
                                "only")
        if self.transport not in TRANSPORTS:
            raise BadOption(f"{where}: transport={self.transport}: use one of "
                            + ", ".join(TRANSPORTS))
        if self.iommu_platform and self.transport != "modern":
            raise BadOption(f"{where}: iommu_platform=on needs transport=modern (QEMU "
                            "offers VIRTIO_F_ACCESS_PLATFORM only without the legacy "
                            "interface)")
        if self.packed and self.transport == "legacy":
            raise BadOption(f"{where}: packed=on needs transport=modern or transitional "
                            "(a legacy device has no feature bit 34)")

    def detect_format(self) -> str:
        return self.format or image_format(self.path, "disk")

    def default_serial(self) -> str:
        return self.path.name.encode()[:SERIAL_MAX].decode("utf-8", "ignore")

    def blockdev(self, node: str) -> dict[str, Any]:
        """The -blockdev tree: format over file, or over blkdebug when errors are injected."""
        cache = CACHE_MODES[self.cache]
        proto: dict[str, Any] = {"driver": "file", "filename": str(self.path.resolve())}
        if self.inject_errors:
            # blkdebug fails any request touching the sector with errno 5 (EIO), which
            # virtio-blk reports as VIRTIO_BLK_S_IOERR.
            # iotype keeps a read rule off writes to the same sector, and vice versa.
            proto = {"driver": "blkdebug", "image": proto, "inject-error": [
                {"event": event, "errno": 5, "sector": sector,
                 "iotype": "write" if event.startswith("write") else "read"}
                for event, sector in self.inject_errors]}
        return {"driver": self.detect_format(), "node-name": node, "file": proto,
                "read-only": self.readonly, "discard": "unmap", "cache": cache}

    def qemu_args(self, index: int) -> list[str]:
        self.check()
        node = f"disk{index}"
        props = {"drive": node, "id": f"vblk{index}", **TRANSPORTS[self.transport],
                 "addr": hex(FIRST_DISK_SLOT + index),
                 "serial": self.serial if self.serial is not None else self.default_serial()}
        if self.queue_size:
            props["queue-size"] = str(self.queue_size)
        for prop, value, default in (("iommu_platform", self.iommu_platform, False),
                                     ("packed", self.packed, False),
                                     ("indirect_desc", self.indirect_desc, True),
                                     ("event_idx", self.event_idx, True)):
            if value != default:
                props[prop] = "on" if value else "off"
        if self.cache == "writethrough":
            props["write-cache"] = "off"
        props.update(self.extra)
        device = "virtio-blk-pci," + ",".join(f"{k}={qemu_escape(v)}"
                                              for k, v in props.items())
        return ["-blockdev", json.dumps(self.blockdev(node)), "-device", device]


@dataclass
class MachineConfig:
    disks: list[Disk] = field(default_factory=list)
    # after the disks on the bus: 0000:00:(10 + len(disks) + i).0
    vhost_user_disks: list[VhostUserDisk] = field(default_factory=list)
    accel: str = "tcg"  # already resolved: kvm or tcg
    kernel: str = assets.DEFAULT_KERNEL  # a key of assets.KERNELS: 6.1 or 6.12
    qemu: str = assets.DEFAULT_QEMU  # a key of assets.QEMUS: 7.2 or 10.0
    modules: list[str] = field(default_factory=list)  # loaded at boot after modules.txt
    backend: str = "uio"  # vfio adds a virtual IOMMU
    memory_mib: int = 1024
    cpus: int = 2
    qemu_args: list[str] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)

    def hugepages(self) -> int:
        """2 MiB pages reserved in the guest: an eighth of its memory."""
        return max(8, self.memory_mib // 16)


def record_boot() -> None:
    """One line per QEMU start in the file $VIRTIO_USER_BOOT_LOG names (scripts/test.sh
    counts the suite's boots with it), naming the test or the command that started it."""
    log = os.environ.get(BOOT_LOG_ENV)
    if log:
        who = os.environ.get("PYTEST_CURRENT_TEST") or " ".join(sys.argv)
        with open(log, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {who}\n")


class Machine:
    """A running QEMU guest. Use as a context manager; ``close()`` always kills QEMU."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.kernel = assets.find_kernel(config.kernel)
        self.qemu = assets.find_qemu(config.qemu)
        self.initramfs = assets.build_initramfs(self.kernel, config.modules)
        self.kernel_image = assets.boot_image(self.kernel)
        self.tmp = Path(tempfile.mkdtemp(prefix="vu-qemu-"))
        self.serial_log = self.tmp / "serial.log"
        self.qemu_log = self.tmp / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self._qmp_server: QEMUMonitorProtocol | None = None
        self._agent_listener: socket.socket | None = None
        self._daemons = contextlib.ExitStack()

    # -- command line -----------------------------------------------------------------

    def kernel_cmdline(self) -> str:
        cwd = str(self.config.cwd.resolve())
        venv = sys.prefix  # the guest runs this very interpreter and venv
        for what, path in (("current directory", cwd), ("virtual environment", venv),
                           ("package", str(assets.IMPORT_ROOT)),
                           ("guest files", str(assets.GUEST_DIR))):
            if not set(path) <= SAFE_PATH:
                raise BadOption(f"the {what} path {path!r} has characters the guest "
                                "kernel command line cannot carry (spaces, quotes, ...)")
        # no_timer_check: under TCG the boot-time check that the timer interrupt gets
        # through the IO-APIC can lose the race against the slow emulated CPU and panic
        # ("timer doesn't work through Interrupt-remapped IO-APIC", seen with the
        # virtual IOMMU); KVM guests skip it for the same reason.
        parts = ["console=ttyS0", "panic=-1", "quiet", "loglevel=4", "no_timer_check",
                 f"VU_CWD={cwd}", f"VU_VENV={venv}", f"VU_AGENT={AGENT}",
                 f"VU_REPO={assets.IMPORT_ROOT}",
                 f"VU_HUGEPAGES={self.config.hugepages()}"]
        if self.config.accel == "tcg":
            # TCG's TSC follows QEMU's virtual clock: monotonic and shared by all vCPUs,
            # but Linux distrusts it and falls back to the HPET, whose every read traps
            # into QEMU (1.5 us against 0.6 us from Python). Both our driver and the
            # kernel's (fio) read the clock per I/O, so this is fair to both.
            parts += ["tsc=reliable", "clocksource=tsc"]
        if self.config.backend == "vfio":
            parts.append("intel_iommu=on")
        return " ".join(parts)

    def command(self) -> list[str]:
        c = self.config
        cpu = "host" if c.accel == "kvm" else "max"  # numpy 2 needs x86-64-v2 under TCG
        cmd = [self.qemu.binary("qemu-system-x86_64"), *self.qemu.args(),
               "-machine", f"q35,accel={c.accel}", "-cpu", cpu,
               "-smp", str(c.cpus), "-m", str(c.memory_mib),
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-kernel", str(self.kernel_image), "-initrd", str(self.initramfs),
               "-append", self.kernel_cmdline(),
               "-chardev", f"file,id=console,path={qemu_escape(str(self.serial_log))}",
               "-serial", "chardev:console",
               "-chardev", f"socket,id=qmp,path={qemu_escape(str(self.tmp / 'qmp.sock'))}",
               "-mon", "chardev=qmp,mode=control",
               "-device", "virtio-serial-pci,id=vser",
               "-chardev", "socket,id=agent,path="
                           + qemu_escape(str(self.tmp / "agent.sock")),
               "-device", "virtserialport,chardev=agent,name=virtio-user.agent",
               "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                          "readonly=on,multidevs=remap"]
        cwd = c.cwd.resolve()
        if str(cwd) != "/":
            cmd += ["-virtfs", f"local,path={qemu_escape(str(cwd))},mount_tag=hostcwd,"
                               "security_model=none,multidevs=remap"]
        if c.backend == "vfio":
            # The IOMMU must exist before the devices it translates for.
            cmd[1:1] = ["-device", "intel-iommu,caching-mode=on"]
        # Extra arguments go before the disks, so a disk can sit on a bus (a
        # pcie-root-port, say) or use an object that they define.
        cmd += c.qemu_args
        for i, disk in enumerate(c.disks):
            cmd += disk.qemu_args(i)
        if c.vhost_user_disks:
            cmd += self.vhost_user_args()
        return cmd

    def vhost_user_socket(self, index: int) -> Path:
        return self.tmp / f"vhost-user{index}.sock"

    def vhost_user_args(self) -> list[str]:
        """Shared guest memory (the daemon maps it) and one device per daemon socket."""
        c = self.config
        args = ["-object", f"memory-backend-memfd,id=mem,size={c.memory_mib}M,share=on",
                "-numa", "node,memdev=mem"]
        for i, _ in enumerate(c.vhost_user_disks):
            sock = qemu_escape(str(self.vhost_user_socket(i)))
            slot = FIRST_DISK_SLOT + len(c.disks) + i
            args += ["-chardev", f"socket,id=vhost-user{i},path={sock}",
                     "-device", f"vhost-user-blk-pci,chardev=vhost-user{i},num-queues=1,"
                                f"id=vhost-user-blk{i},disable-legacy=on,"
                                f"disable-modern=off,addr={hex(slot)}"]
        return args

    # -- lifetime ---------------------------------------------------------------------

    def launch(self) -> None:
        cmd = self.command()
        sockets = [self.tmp / "agent.sock", self.tmp / "qmp.sock",
                   *map(self.vhost_user_socket, range(len(self.config.vhost_user_disks)))]
        longest = max(sockets, key=lambda p: len(bytes(p)))
        if len(bytes(longest)) > SOCKET_PATH_MAX:
            raise BadOption(f"the temporary directory {self.tmp} is too long for a unix "
                            f"socket path ({len(bytes(longest))} > {SOCKET_PATH_MAX} "
                            "bytes): set TMPDIR to a shorter one")
        self._qmp_server = QEMUMonitorProtocol(str(self.tmp / "qmp.sock"), server=True)
        self._agent_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._agent_listener.bind(str(self.tmp / "agent.sock"))
        self._agent_listener.listen(1)
        for i, disk in enumerate(self.config.vhost_user_disks):
            daemon = StorageDaemon(disk, self.vhost_user_socket(i),
                                   self.tmp / f"vhost-user{i}.log", self.qemu)
            self._daemons.enter_context(daemon)  # QEMU connects to it at start-up
        record_boot()
        with self.qemu_log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.qemu.env())
        try:
            self.qmp = self._qmp_server
            self.qmp.accept(timeout=30)
        except Exception as exc:
            raise self.launch_failure(f"QEMU did not connect to QMP: {exc}") from exc

    def accept_agent(self, timeout: float) -> socket.socket:
        assert self._agent_listener is not None
        self._agent_listener.settimeout(timeout)
        try:
            conn, _ = self._agent_listener.accept()
        except OSError as exc:
            raise self.launch_failure(f"QEMU did not open the agent channel: {exc}") from exc
        return conn

    def launch_failure(self, message: str) -> VMLaunchFailure:
        code = None
        if self.proc is not None:
            # QEMU closes its sockets a moment before it exits: give it that moment, or
            # its own words (an unknown -device, say) are missing from the message.
            try:
                code = self.proc.wait(LAUNCH_EXIT_GRACE)
            except subprocess.TimeoutExpired:
                code = None
        output = self.qemu_output()
        if code is not None:
            message += f"\nQEMU exited with status {code}:\n{output[-2000:]}"
        return VMLaunchFailure(message, code, self.command(), output)

    def qemu_output(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")
        except OSError:
            return ""

    def serial_tail(self, lines: int = 30) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def panic_line(self) -> str | None:
        """The guest's "Kernel panic - not syncing: ..." line, if it panicked."""
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if "Kernel panic" in line:
                return line.strip()
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> bool:
        """Wait for QEMU to exit by itself; True if it did."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        """Kill QEMU if it still runs, stop the storage daemons, and remove every socket
        and temporary file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                pass  # stuck in the kernel; nothing more a user process can do
        self._daemons.close()
        for closer in (self.qmp, self._agent_listener):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.qmp = None
        self._agent_listener = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
