"""Suite-wide: the lab guest shared by the integration modules (tests/lab.py), and how
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


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from lab import Lab
    with Lab(tmp_path_factory.mktemp("lab"), request.config.stash[LAB_MODULES]) as shared:
        yield shared


@pytest.fixture(scope="module")
def bay(lab: Any, request: pytest.FixtureRequest) -> Any:
    """This module's disks in the lab guest (tests/lab.py)."""
    return lab.bay(request.module)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    log = os.environ.get("VIRTIO_USER_BOOT_LOG")
    if not log or not Path(log).exists():
        return
    lines = Path(log).read_text().splitlines()
    terminalreporter.write_sep("-", f"QEMU started {len(lines)} times")
    for line in lines:
        terminalreporter.write_line(f"  {line}")
