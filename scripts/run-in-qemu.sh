#!/usr/bin/env bash
# Boot a QEMU guest with virtio-blk disks and run a command in it (default: the
# virtio-user demo). Sets up what a fresh Debian 12 machine lacks on first use.
#   scripts/run-in-qemu.sh [--disk PATH]... [--vhost-user-disk PATH]...
#                          [--accel auto|kvm|tcg] [--backend uio|vfio]
#                          [--memory MIB] [--qemu-arg ARG]... [--timeout SECONDS]
#                          [--kernel 6.1|6.12] [--qemu 7.2|10.0]
#                          [-- COMMAND [ARG...]]
# --kernel 6.12 and --qemu 10.0 come from bookworm-backports, fetched into the cache on
# first use (docs/kernels-and-qemu.md); the defaults are Debian 12's 6.1 and QEMU 7.2.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
exec "${VIRTIO_USER_VENV:-$repo/.venv}/bin/python" -m virtio_user.host.run "$@"
