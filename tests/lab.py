"""The labs: a guest that holds the disks of every integration test module that asks for
it, booted once per pytest session instead of once or twice per module.

There are two labs (LAB_GUESTS): "default", Debian 12's kernel 6.1 under the system's
QEMU 7.2, which most modules use, and "next", bookworm-backports' kernel 6.12 under QEMU
10.0 with ublk_drv loaded (both fetched into the cache on first use). A module picks one
with ``LAB_GUEST = "next"``; a lab boots only when a selected module asks for it.

A module takes part by defining ``lab_disks(d: Path) -> dict[str, Disk]`` (its images
made in ``d``, its own directory), optionally ``lab_vhost_user_disks(d: Path) ->
dict[str, VhostUserDisk]`` (served by that lab's QEMU's qemu-storage-daemon), and using
the ``bay`` fixture (tests/conftest.py),
which gives it a :class:`Bay`: its disks' PCI addresses, QEMU node and device names, its
directory (the guest sees it at the same path) and the shared session. Only the modules
selected for a run contribute disks, so ``pytest tests/integration/test_device.py`` boots a
lab with that module's disks alone.

The guest has the virtual IOMMU, so every module can drive its devices through uio or
vfio (a device bound to one is rebound to the other on demand; QEMU lets legacy devices and
modern ones without ACCESS_PLATFORM reach guest memory past the IOMMU, so uio works too). ``virtio-user``
commands start warm (qemu/warm.py): the driver's start-up is paid once per lab, and the
commands whose start-up is under test run cold (``run(..., warm=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from virtio_user.host import CommandResult, Disk, GuestSession, VhostUserDisk
from virtio_user.host.session import Command

# q35 slot 0 is the host bridge and 0x1f the LPC/SMBus functions; QEMU gives the
# agent's virtio-serial and the two 9p shares the first free slots (1-3) as they come
# before the disks on the command line.
LAB_SLOTS = range(0x04, 0x1f)
LAB_MEMORY_MIB = 1536


@dataclass(frozen=True)
class LabGuest:
    """What a lab boots: run-in-qemu.sh's --kernel and --qemu, and modules to load."""
    kernel: str = "6.1"
    qemu: str = "7.2"
    modules: tuple[str, ...] = ()


LAB_GUESTS = {"default": LabGuest(),
              "next": LabGuest(kernel="6.12", qemu="10.0", modules=("ublk_drv",))}


def lab_guest(module: ModuleType) -> str:
    """The lab a test module asks for (its ``LAB_GUEST``, "default" without one)."""
    name = getattr(module, "LAB_GUEST", "default")
    if name not in LAB_GUESTS:
        raise LabFull(f"{module.__name__}: LAB_GUEST = {name!r}: use one of "
                      + ", ".join(LAB_GUESTS))
    return str(name)


class LabFull(Exception):
    pass


@dataclass
class Bay:
    """One module's part of the lab."""
    vm: GuestSession
    dir: Path
    disks: dict[str, Disk]
    bdfs: dict[str, str]
    nodes: dict[str, str]  # -blockdev node-name, for QMP block_resize and the like
    ids: dict[str, str]  # -device id, for QMP commands that take the device
    vhost_user_disks: dict[str, VhostUserDisk]
    vhost_user_bdfs: dict[str, str]

    @property
    def images(self) -> dict[str, Path]:
        return {name: disk.path for name, disk in self.disks.items()}

    def spawn(self, argv: Sequence[str] | str, **kw: Any) -> Command:
        kw.setdefault("cwd", self.dir)
        return self.vm.spawn(argv, **kw)

    def run(self, argv: Sequence[str] | str, *, timeout: float = 300,
            **kw: Any) -> CommandResult:
        return self.spawn(argv, **kw).wait(timeout)


class Lab:
    def __init__(self, root: Path, modules: Sequence[ModuleType],
                 guest: LabGuest = LAB_GUESTS["default"]) -> None:
        self.root = root
        self.disks: list[Disk] = []
        self.vhost_user_disks: list[VhostUserDisk] = []
        self.owner: dict[str, list[tuple[str, int]]] = {}
        self.vhost_user_owner: dict[str, list[tuple[str, int]]] = {}
        for module in modules:
            name = module.__name__.rpartition(".")[2]
            d = root / name
            d.mkdir()
            self.owner[module.__name__] = []
            self.vhost_user_owner[module.__name__] = []
            for disk_name, disk in module.lab_disks(d).items():
                self.owner[module.__name__].append((disk_name, len(self.disks)))
                self.disks.append(disk)
            served = getattr(module, "lab_vhost_user_disks", lambda _: {})(d)
            for disk_name, vdisk in served.items():
                self.vhost_user_owner[module.__name__].append(
                    (disk_name, len(self.vhost_user_disks)))
                self.vhost_user_disks.append(vdisk)
        if len(self.disks) + len(self.vhost_user_disks) > len(LAB_SLOTS):
            raise LabFull(f"the lab holds at most {len(LAB_SLOTS)} disks on its PCI bus; "
                          "the selected modules ask for "
                          f"{len(self.disks) + len(self.vhost_user_disks)}")
        # A module may pin a disk's slot (extra addr=0xNN) when a README example it runs
        # word for word names the address; the others take the free slots in order.
        pinned = [int(d.extra["addr"], 16) for d in self.disks if "addr" in d.extra]
        if len(set(pinned)) != len(pinned) or not set(pinned) <= set(LAB_SLOTS):
            raise LabFull(f"pinned slots {pinned}: each at most once, within {LAB_SLOTS}")
        free = iter(s for s in LAB_SLOTS if s not in pinned)
        self.slots = [int(d.extra["addr"], 16) if "addr" in d.extra else next(free)
                      for d in self.disks]
        for slot, disk in zip(self.slots, self.disks):
            disk.extra = {**disk.extra, "addr": hex(slot)}  # modules share extra dicts
        for vdisk in self.vhost_user_disks:  # after the disks, in the free slots left
            vdisk.slot = next(free)
        self.vm = GuestSession(self.disks, backend="vfio", cwd=root,
                               memory_mib=LAB_MEMORY_MIB, warm_start=True,
                               vhost_user_disks=self.vhost_user_disks,
                               kernel=guest.kernel, qemu=guest.qemu,
                               modules=guest.modules)

    def __enter__(self) -> "Lab":
        self.vm.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.vm.close()

    def bay(self, module: ModuleType) -> Bay:
        mine = self.owner[module.__name__]
        served = self.vhost_user_owner[module.__name__]
        return Bay(
            vm=self.vm, dir=self.root / module.__name__.rpartition(".")[2],
            disks={n: self.disks[i] for n, i in mine},
            bdfs={n: f"0000:00:{self.slots[i]:02x}.0" for n, i in mine},
            nodes={n: f"disk{i}" for n, i in mine},
            ids={n: f"vblk{i}" for n, i in mine},
            vhost_user_disks={n: self.vhost_user_disks[i] for n, i in served},
            vhost_user_bdfs={n: f"0000:00:{self.vhost_user_disks[i].slot:02x}.0"
                             for n, i in served})
