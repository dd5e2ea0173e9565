"""The lab: one guest that holds the disks of every integration test module that asks for
it, booted once per pytest session instead of once or twice per module.

A module takes part by defining ``lab_disks(d: Path) -> dict[str, Disk]`` (its images
made in ``d``, its own directory) and using the ``bay`` fixture (tests/conftest.py),
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

from virtio_user.host import CommandResult, Disk, GuestSession
from virtio_user.host.session import Command

# q35 slot 0 is the host bridge and 0x1f the LPC/SMBus functions; QEMU gives the
# agent's virtio-serial and the two 9p shares the first free slots (1-3) as they come
# before the disks on the command line.
LAB_SLOTS = range(0x04, 0x1f)
LAB_MEMORY_MIB = 1536


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
    def __init__(self, root: Path, modules: Sequence[ModuleType]) -> None:
        self.root = root
        self.disks: list[Disk] = []
        self.owner: dict[str, list[tuple[str, int]]] = {}
        for module in modules:
            name = module.__name__.rpartition(".")[2]
            d = root / name
            d.mkdir()
            self.owner[module.__name__] = []
            for disk_name, disk in module.lab_disks(d).items():
                self.owner[module.__name__].append((disk_name, len(self.disks)))
                self.disks.append(disk)
        if len(self.disks) > len(LAB_SLOTS):
            raise LabFull(f"the lab holds at most {len(LAB_SLOTS)} disks on its PCI bus; "
                          f"the selected modules ask for {len(self.disks)}")
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
        self.vm = GuestSession(self.disks, backend="vfio", cwd=root,
                               memory_mib=LAB_MEMORY_MIB, warm_start=True)

    def __enter__(self) -> "Lab":
        self.vm.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.vm.close()

    def bay(self, module: ModuleType) -> Bay:
        mine = self.owner[module.__name__]
        return Bay(
            vm=self.vm, dir=self.root / module.__name__.rpartition(".")[2],
            disks={n: self.disks[i] for n, i in mine},
            bdfs={n: f"0000:00:{self.slots[i]:02x}.0" for n, i in mine},
            nodes={n: f"disk{i}" for n, i in mine},
            ids={n: f"vblk{i}" for n, i in mine})
