#!/usr/bin/env bash
# Run the whole test suite: unit tests and the QEMU integration tests (TCG here).
# Sets up what a fresh Debian 12 machine lacks first. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
cd "$repo"
exec "${VIRTIO_USER_VENV:-$repo/.venv}/bin/python" -m pytest -p no:cacheprovider "$@"
