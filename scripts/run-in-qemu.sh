#!/usr/bin/env bash
# Boot a QEMU guest with virtio-blk disks and run a command in it (default: the
# virtio-user demo). Sets up what a fresh Debian 12 machine lacks on first use.
#   scripts/run-in-qemu.sh [--disk PATH]... [--vhost-user-disk PATH]...
#                          [--accel auto|kvm|tcg] [--backend uio|vfio]
#                          [--memory MIB] [--qemu-arg ARG]... [--timeout SECONDS]
#                          [-- COMMAND [ARG...]]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
exec "${VIRTIO_USER_VENV:-$repo/.venv}/bin/python" -m virtio_user.host.run "$@"
