#!/bin/sh
# The main job of scripts/run-in-qemu.sh when it is given no command: a short tour of
# the user-space driver on the first legacy virtio-blk disk, run inside the guest.
# Sector 1 is written and then restored, so a disk given with --disk is left as it was.
set -eu
step() { printf '\n$ %s\n' "$*"; }
saved=$(mktemp)
trap 'rm -f "$saved"' EXIT

step virtio-user info
virtio-user info

step "virtio-user read 0 1 | hexdump -C"
virtio-user read 0 1 | hexdump -C

virtio-user read 1 1 -o "$saved"
step virtio-user write 1 --pattern 0xa5 --count 1
virtio-user write 1 --pattern 0xa5 --count 1

step "virtio-user read 1 1 | hexdump -C"
virtio-user read 1 1 | hexdump -C

step "virtio-user write 1 -i saved-sector-1.bin   # put sector 1 back as it was"
virtio-user write 1 -i "$saved"
printf '\ndemo: done; the user-space driver read and wrote the disk through its own virtqueue\n'
