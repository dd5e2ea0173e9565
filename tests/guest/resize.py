"""Guest side of test_block_resize_grow_and_shrink_while_open: holds the device open
while the host resizes the image through QMP, and shows which bounds the driver applies.

The host touches ``grown`` and ``shrunk`` in the shared directory after each resize.
"""

import sys
import time
from pathlib import Path

from virtio_user import VirtioBlk
from virtio_user.errors import OutOfRange


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"resize.py: {path} did not appear within {timeout:g} s")
        time.sleep(0.05)


def main() -> None:
    bdf, cwd = sys.argv[1], Path(sys.argv[2])
    with VirtioBlk.open(bdf) as dev:
        print("capacity", dev.capacity, flush=True)
        wait_for(cwd / "grown")
        dev.read(32767, 1)  # beyond the old capacity: allowed once growth is noticed
        print("capacity", dev.capacity, flush=True)
        print("read 32767 ok", flush=True)
        wait_for(cwd / "shrunk")
        try:
            dev.read(8192, 1)  # within the old capacity, beyond the new one
            print("read 8192 accepted", flush=True)
        except OutOfRange:
            print("capacity", dev.capacity, flush=True)
            print("read 8192 refused: out of range", flush=True)


if __name__ == "__main__":
    main()
