"""Guest side of test_integrity_soak: thousands of writes of random sizes at random
offsets with random content, each read back, then the whole disk read back and compared;
the expected image is written to a file for the host to compare after QEMU exits."""

import json
import sys

import numpy as np

from virtio_user import VirtioBlk

SECTOR = 512


def main() -> None:
    bdf, writes, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(20261123)
    mismatches = 0
    with VirtioBlk.open(bdf) as dev:
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
    with open(out, "wb") as f:
        f.write(expected)
    print(json.dumps({"writes": writes, "mismatches": mismatches + bad_sectors,
                      "capacity": capacity}))


if __name__ == "__main__":
    main()
