"""run-in-qemu.sh's way out on SIGHUP, SIGTERM and Ctrl-C, on the host: ``run()``
replaced by a stand-in whose context manager plays QEMU's clean-up (the real one, with
QEMU and the storage daemon, is tests/integration/test_harness.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

STAND_IN = r"""
import contextlib, sys, time
from pathlib import Path
from virtio_user.host import run

@contextlib.contextmanager
def qemu():
    try:
        yield
    finally:
        print("clean-up started", flush=True)
        time.sleep(float(sys.argv[1]))  # QEMU powering off: a second signal may come
        print("QEMU stopped", flush=True)

def stand_in(args, scratch):
    (scratch / "serial.log").write_text("guest output")
    with qemu():
        print(scratch, flush=True)
        time.sleep(60)
    return 0

run.run = stand_in
sys.exit(run.main(["--", "true"]))
"""


def start(tmp_path: Path, cleanup_seconds: float) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(cleanup_seconds)],
                            env=dict(os.environ, TMPDIR=str(tmp_path)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    scratch = Path(proc.stdout.readline().strip())
    assert scratch.is_dir() and scratch.parent == tmp_path
    return proc, scratch


@pytest.mark.parametrize("signum, status", [(signal.SIGHUP, 129), (signal.SIGTERM, 130),
                                            (signal.SIGINT, 130)])
def test_a_signal_stops_qemu_and_removes_the_temporary_directory(
        tmp_path: Path, signum: int, status: int) -> None:
    proc, scratch = start(tmp_path, 0)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert out == "clean-up started\nQEMU stopped\n"
    assert f"interrupted by {signal.Signals(signum).name}; QEMU stopped" in err
    assert not scratch.exists() and list(tmp_path.iterdir()) == []


def test_a_second_signal_does_not_cut_the_clean_up_short(tmp_path: Path) -> None:
    """A closing terminal sends SIGHUP, and more may follow while QEMU powers off:
    cutting the clean-up there left QEMU running with no parent."""
    proc, scratch = start(tmp_path, 1.0)
    assert proc.stdout is not None
    proc.send_signal(signal.SIGHUP)
    assert proc.stdout.readline() == "clean-up started\n"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 129, err
    assert out == "QEMU stopped\n" and "Traceback" not in err
    assert not scratch.exists()
