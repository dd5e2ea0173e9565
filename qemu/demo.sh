#!/bin/sh
# The main job of scripts/run-in-qemu.sh when it is given no command: a short tour of
# the user-space driver on the first legacy virtio-blk disk, run inside the guest.
# Sector 1 is written and then restored, so a disk given with --disk is left as it was.
set -eu
backend=${VIRTIO_USER_BACKEND:-uio}  # run-in-qemu.sh --backend
vu() { virtio-user --backend "$backend" "$@"; }
step() { printf '\n$ virtio-user --backend %s %s\n' "$backend" "$*"; }
saved=$(mktemp)
trap 'rm -f "$saved"' EXIT

step info
vu info

step "read 0 1 | hexdump -C"
vu read 0 1 >"$saved"
hexdump -C "$saved"
scratch=$(grep -c 'virtio-user scratch disk' "$saved" || true)  # ours to format

vu read 1 1 -o "$saved"
step write 1 --pattern 0xa5 --count 1
vu write 1 --pattern 0xa5 --count 1

step "read 1 1 | hexdump -C"
vu read 1 1 | hexdump -C

step "write 1 -i saved-sector-1.bin   # put sector 1 back as it was"
vu write 1 -i "$saved"
if [ "$scratch" = 1 ]; then  # never on a disk given with --disk: mkfs wipes it
    step "nbd /dev/nbd0   # the kernel's block layer on top of our driver"
    vu nbd /dev/nbd0
    mnt=$(mktemp -d)
    printf '$ mkfs.ext4 -q /dev/nbd0; mount /dev/nbd0 MNT; echo ... > MNT/hello; cat MNT/hello; umount MNT\n'
    mkfs.ext4 -q -F /dev/nbd0
    mount /dev/nbd0 "$mnt"
    echo "hello from ext4 on the user-space driver" >"$mnt/hello"
    cat "$mnt/hello"
    umount "$mnt" && rmdir "$mnt"
    step nbd -d /dev/nbd0
    vu nbd -d /dev/nbd0
fi
printf '\ndemo: done; the user-space driver read and wrote the disk through its own virtqueue\n'
