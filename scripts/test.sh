#!/usr/bin/env bash
# Run the whole test suite: unit tests and the QEMU integration tests (TCG here).
# Sets up what a fresh Debian 12 machine lacks first. Extra arguments go to pytest.
# pytest's summary says how many times QEMU was started (tests/conftest.py; each line of
# the boot log names the test that started it).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
cd "$repo"
boots=$(mktemp "${TMPDIR:-/tmp}/virtio-user-boots.XXXXXX")
trap 'rm -f "$boots"' EXIT
VIRTIO_USER_BOOT_LOG=$boots "${VIRTIO_USER_VENV:-$repo/.venv}/bin/python" -m pytest \
    -p no:cacheprovider "$@"
