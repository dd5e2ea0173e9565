"""The choices and defaults that ``VirtioBlk.open`` takes and the command line offers,
declared once. This module imports nothing: the command line builds its parser from it
without loading the driver (under TCG, numpy alone costs seconds)."""

from __future__ import annotations

DEFAULT_TIMEOUT = 5.0  # seconds one wait for the device may take (VirtioBlk, --timeout)
BACKENDS = ("uio", "vfio")  # who owns the PCI function: uio_pci_generic or vfio-pci
TRANSPORTS = ("auto", "legacy", "modern")  # auto: modern where the device has it
RINGS = ("auto", "split", "packed")  # auto: packed where the device offers it
WAIT_MODES = ("poll", "interrupt", "hybrid")  # how to wait for completions
# The most request queues --queues may ask for: each costs its own DMA region (ring,
# request slots, bounce pool: about 5 MiB of hugepages) and, to run in parallel, a
# worker process and a CPU. Linux caps virtio_blk's queues at the CPU count the same way.
MAX_QUEUES = 64
