"""Suite-wide: the lab guests shared by the integration modules (tests/lab.py), and how
many times the run started QEMU, said just before pytest's own closing line
(scripts/test.sh points $VIRTIO_USER_BOOT_LOG at a file that virtio_user.host.machine
appends one line to per QEMU start, naming the test)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

LAB_MODULES = pytest.StashKey[list]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The modules whose selected tests use the ``bay`` fixture, in run order."""
    modules: list = []
    for item in session.items:
        module = getattr(item, "module", None)
        if "bay" in getattr(item, "fixturenames", ()) and module not in modules:
            modules.append(module)
    session.config.stash[LAB_MODULES] = modules


class Labs:
    """The lab guests of this session, each booted when its first module needs it
    (a run that selects no module of the "next" lab never fetches or boots it) and
    powered off after its last one, so two labs do not share the CPUs for long."""

    def __init__(self, root: Path, modules: list) -> None:
        self.root = root
        self.modules = modules
        self.started: dict[str, Any] = {}
        self.done: set[str] = set()

    def release(self, name: str, module: Any) -> None:
        """``module`` is finished with its lab; the last one out turns it off."""
        from lab import lab_guest
        self.done.add(module.__name__)
        if all(m.__name__ in self.done for m in self.modules if lab_guest(m) == name):
            lab = self.started.pop(name, None)
            if lab is not None:
                lab.__exit__(None, None, None)

    def get(self, name: str) -> Any:
        from lab import LAB_GUESTS, Lab, lab_guest
        if name not in self.started:
            mine = [m for m in self.modules if lab_guest(m) == name]
            (self.root / name).mkdir()
            lab = Lab(self.root / name, mine, LAB_GUESTS[name])
            self.started[name] = lab.__enter__()
        return self.started[name]

    def close(self) -> None:
        for lab in self.started.values():
            lab.__exit__(None, None, None)
        self.started.clear()


@pytest.fixture(scope="session")
def labs(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Labs]:
    shared = Labs(tmp_path_factory.mktemp("labs"), request.config.stash[LAB_MODULES])
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture(scope="module")
def bay(labs: Labs, request: pytest.FixtureRequest) -> Iterator[Any]:
    """This module's disks in its lab guest (tests/lab.py)."""
    from lab import lab_guest
    name = lab_guest(request.module)
    yield labs.get(name).bay(request.module)
    labs.release(name, request.module)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    log = os.environ.get("VIRTIO_USER_BOOT_LOG")
    if not log or not Path(log).exists():
        return
    lines = Path(log).read_text().splitlines()
    terminalreporter.write_sep("-", f"QEMU started {len(lines)} times")
    for line in lines:
        terminalreporter.write_line(f"  {line}")
