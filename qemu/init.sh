#!/bin/busybox sh
# PID 1 of the virtio-user guest, packed into the initramfs as /init.
#
# It loads the modules listed in /modules.order (already in dependency order), mounts the
# host's root filesystem read-only over 9p, puts the guest's own /proc, /sys, /dev, /tmp
# and hugetlbfs on top, mounts the host's current directory writable at the same path,
# and runs the session agent (qemu/agent.py) chrooted there with the host's own Python.
# When the agent returns, the guest powers off and QEMU exits.
#
# Parameters arrive as environment variables from the kernel command line (VU_*), set
# by virtio_user/host/machine.py.
/bin/busybox --install -s /bin
export PATH=/bin

log() { echo "virtio-user-init: $*" >/dev/console; }
die() { log "$*"; poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || log "insmod $mod failed"
done </modules.order

R=/newroot
mkdir -p $R
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot $R ||
    die "cannot mount the host's root filesystem (9p tag hostroot)"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
# The guest gets its own /tmp, but a checkout or venv living under the host's /tmp (a
# fresh clone in CI, say) must stay visible: keep the host's /tmp aside and bind them back.
mkdir -p /hosttmp
mount --bind $R/tmp /hosttmp
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
for keep in "$VU_REPO" "$VU_VENV"; do
    case "$keep" in
    /tmp/*)
        mkdir -p "$R$keep"
        mount --bind "/hosttmp/${keep#/tmp/}" "$R$keep" || die "cannot keep $keep visible"
        ;;
    esac
done
mount -t tmpfs tmpfs $R/run
mkdir -p $R/dev/hugepages $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
echo "${VU_HUGEPAGES:-64}" >/proc/sys/vm/nr_hugepages
mount -t hugetlbfs hugetlbfs $R/dev/hugepages
if [ -n "$VU_CWD" ] && [ "$VU_CWD" != / ]; then
    # Under /tmp the directory is not in the fresh tmpfs yet; elsewhere it already exists.
    mkdir -p "$R$VU_CWD" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 hostcwd "$R$VU_CWD" ||
        die "cannot mount the host's current directory at $VU_CWD"
fi

chroot $R /usr/bin/env -i \
    PATH="$VU_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    HOME=/root XDG_CACHE_HOME=/tmp/.cache MPLCONFIGDIR=/tmp/.cache/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 TERM=dumb VIRTUAL_ENV="$VU_VENV" \
    "$VU_VENV/bin/python" "$VU_AGENT"
log "agent exited with status $?"
poweroff -f
