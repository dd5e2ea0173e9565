"""Guest side of test_integrity_soak: on each device, thousands of writes of random sizes
at random offsets with random content, each read back, then the whole disk read back and
compared; the expected image is written to a file for the host to compare with the real
image. Several devices run one after the other in this one process (one numpy import).

Usage: soak.py WRITES BDF,TRANSPORT,EXPECTED_FILE...
Prints one JSON line per device.
"""

import json
import sys

import numpy as np

from virtio_user import VirtioBlk

SECTOR = 512


def soak(bdf: str, transport: str, writes: int, out: str) -> dict[str, object]:
    rng = np.random.default_rng(20261123)
    mismatches = 0
    with VirtioBlk.open(bdf, transport=transport) as dev:
        capacity = dev.capacity
        expected = bytearray(dev.read(0, capacity))
        for _ in range(writes):
            count = int(rng.integers(1, 129))
            sector = int(rng.integers(0, capacity - count + 1))
            data = rng.integers(0, 256, count * SECTOR, dtype=np.uint8).tobytes()
            dev.write(sector, data)
            expected[sector * SECTOR:(sector + count) * SECTOR] = data
            mismatches += dev.read(sector, count) != data
        dev.flush()
        whole = np.frombuffer(dev.read(0, capacity), np.uint8).reshape(-1, SECTOR)
        want = np.frombuffer(bytes(expected), np.uint8).reshape(-1, SECTOR)
        bad_sectors = int(np.any(whole != want, axis=1).sum())
        kind = dev.transport.kind
    with open(out, "wb") as f:
        f.write(expected)
    return {"bdf": bdf, "transport": kind, "writes": writes,
            "mismatches": mismatches + bad_sectors, "capacity": capacity}


def main() -> None:
    writes = int(sys.argv[1])
    for spec in sys.argv[2:]:
        bdf, transport, out = spec.split(",", 2)
        print(json.dumps(soak(bdf, transport, writes, out)), flush=True)


if __name__ == "__main__":
    main()
