"""Suite-wide: how many times the run started QEMU, said just before pytest's own
closing line (scripts/test.sh points $VIRTIO_USER_BOOT_LOG at a file that
virtio_user.host.machine appends one line to per QEMU start, naming the test)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    log = os.environ.get("VIRTIO_USER_BOOT_LOG")
    if not log or not Path(log).exists():
        return
    lines = Path(log).read_text().splitlines()
    terminalreporter.write_sep("-", f"QEMU started {len(lines)} times")
    for line in lines:
        terminalreporter.write_line(f"  {line}")
