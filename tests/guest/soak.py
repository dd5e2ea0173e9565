"""Guest side of test_integrity_soak: on each device, thousands of writes of random sizes
at random offsets with random content, each read back, then the whole disk read back and
compared; the expected image is written to a file for the host to compare with the real
image. Several devices run one after the other in this one process (one numpy import).

Rounds alternate: BATCH writes one at a time through write() and read(), then up to
BATCH writes to ranges that do not overlap (the device may complete them in any order)
submitted at once and read back the same way.

Usage: soak.py WRITES BDF,TRANSPORT,EXPECTED_FILE...
Prints one JSON line per device.
"""

import json
import sys

import numpy as np

from virtio_user import Request, VirtioBlk
from virtio_user.spec import ReqType

SECTOR = 512
MAX_SECTORS = 128
BATCH = 16
# Content is a window at a random byte offset in one random pool: as good as fresh random
# bytes for telling writes apart, where generating 640 MiB of those took 18 s under TCG.
POOL_BYTES = 4 << 20


def plan(rng: np.random.Generator, capacity: int, writes: int) -> list[tuple[int, int, int]]:
    """(sector, count, offset in the pool) of every write, drawn at once (a numpy call
    per draw costs more than the write under TCG)."""
    counts = rng.integers(1, MAX_SECTORS + 1, writes)
    sectors = rng.integers(0, capacity - counts + 1)
    starts = rng.integers(0, POOL_BYTES - counts * SECTOR + 1)
    return list(zip(sectors.tolist(), counts.tolist(), starts.tolist()))


def disjoint_prefix(todo: list[tuple[int, int, int]]) -> int:
    """How many of the next writes (up to BATCH) touch no sector another of them does."""
    n = 0
    for sector, count, _ in todo[:BATCH]:
        if any(sector < s + c and s < sector + count for s, c, _ in todo[:n]):
            break
        n += 1
    return n


def batch(dev: VirtioBlk, kind: ReqType, ranges: list[tuple[int, int, int]], bufs: list,
          datas: list[bytes] | None = None) -> list[bytes]:
    """The ranges written from ``datas`` (OUT) or read (IN) in one submit; what each
    buffer holds after, in range order."""
    reqs = []
    for buf, (sector, count, _), data in zip(bufs, ranges, datas or [None] * len(ranges)):
        # Reads land on a poisoned buffer: one the device never wrote cannot match.
        buf.mv[:count * SECTOR] = b"\xa5" * (count * SECTOR) if data is None else data
        reqs.append(Request(kind, sector=sector, count=count, buffer=buf,
                            nbytes=count * SECTOR))
    dev.submit(reqs)
    while dev.in_flight:
        for req in dev.reap():
            assert req.status == 0, (str(req), req.status)
    return [bytes(buf.mv[:count * SECTOR]) for buf, (_, count, _) in zip(bufs, ranges)]


def soak(bdf: str, transport: str, writes: int, out: str) -> dict[str, object]:
    rng = np.random.default_rng(20261123)
    mismatches = 0
    with VirtioBlk.open(bdf, transport=transport) as dev:
        capacity = dev.capacity
        expected = bytearray(dev.read(0, capacity))
        pool = rng.bytes(POOL_BYTES)
        todo = plan(rng, capacity, writes)
        bufs = [dev.alloc_buffer(MAX_SECTORS * SECTOR) for _ in range(BATCH)]
        one_by_one = False
        while todo:
            one_by_one = not one_by_one
            n = BATCH if one_by_one else disjoint_prefix(todo)
            ranges, todo = todo[:n], todo[n:]
            datas = [pool[start:start + count * SECTOR] for _, count, start in ranges]
            if one_by_one:
                got = []
                for (sector, count, _), data in zip(ranges, datas):  # they may overlap
                    dev.write(sector, data)
                    got.append(dev.read(sector, count))
            else:
                batch(dev, ReqType.VIRTIO_BLK_T_OUT, ranges, bufs, datas)
                got = batch(dev, ReqType.VIRTIO_BLK_T_IN, ranges, bufs)
            for (sector, count, _), data, back in zip(ranges, datas, got):
                expected[sector * SECTOR:(sector + count) * SECTOR] = data
                mismatches += back != data
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
