"""Choosing QEMU's accelerator: KVM only where it is proven to work, TCG otherwise.

/dev/kvm can exist where KVM does not work: on machines whose /proc/cpuinfo lacks the
vmx/svm flag, a guest started with ``-accel kvm`` hangs right after the real-mode setup
code, at 100% system time with nothing on the serial console. So "auto" never trusts
/dev/kvm alone: it wants the CPU's vmx/svm flag and a short, bounded boot probe that
must print the kernel banner.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROBE_SECONDS = 4.0


def cpu_has_virt() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "vmx" in flags or "svm" in flags
    return False


def kvm_boots(vmlinuz: Path, seconds: float = PROBE_SECONDS) -> bool:
    """Start a KVM guest kernel and wait (bounded) for its banner on the serial port."""
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256",
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-serial", "stdio", "-kernel", str(vmlinuz),
           "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.read() or b""
            if b"Linux version" in seen:
                return True
            time.sleep(0.1)
        return False
    finally:
        proc.kill()
        proc.wait()


def choose(requested: str, vmlinuz: Path) -> str:
    """Resolve ``auto|kvm|tcg`` to ``kvm`` or ``tcg``, saying on stderr why auto fell back."""
    if requested != "auto":
        return requested
    if not cpu_has_virt():
        reason = "the CPU has no vmx/svm flag"
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "/dev/kvm is not usable"
    elif not kvm_boots(vmlinuz):
        reason = f"a KVM guest printed nothing within {PROBE_SECONDS:g} s"
    else:
        return "kvm"
    print(f"run-in-qemu: --accel auto: using TCG because {reason}", file=sys.stderr)
    return "tcg"
