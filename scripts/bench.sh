#!/usr/bin/env bash
# Benchmark the Python driver next to the kernel's virtio_blk (fio, io_uring) in one
# guest: 4 KiB random read/write and 1 MiB sequential, on raw images and on null-co.
# Sets up what a fresh Debian 12 machine lacks first. Writes latest.{json,md,png} to
# --out (default bench/results).
# Beside them: modern, packed, interrupt/hybrid and nbd rows (docs/benchmarks.md);
# --update-docs writes the results into that page and the README's headline table.
#   scripts/bench.sh [--runtime SECONDS | --ios N] [--rounds N] [--quick]
#                    [--backend uio|vfio] [--out DIR] [--only WORKLOAD]...
#                    [--variant modern|packed|interrupt|hybrid|nbd]... [--no-variants]
#                    [--accel auto|kvm|tcg] [--update-docs]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
exec "${VIRTIO_USER_VENV:-$repo/.venv}/bin/python" -m virtio_user.host.bench_harness "$@"
