#!/usr/bin/env bash
# Install what a fresh Debian 12 machine lacks to run virtio-user's guest and tests:
# Debian packages, the guest kernel (into a cache folder, never /boot) and a Python
# virtual environment with the project installed. Idempotent: a second run checks a
# few stamps and returns in well under a second.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${VIRTIO_USER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virtio-user}
venv=${VIRTIO_USER_VENV:-$repo/.venv}
say() { printf 'setup: %s\n' "$*" >&2; }

debian_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    [ -x /bin/busybox ] || missing+=(busybox-static)
    command -v fio >/dev/null || missing+=(fio)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v zstd >/dev/null || missing+=(zstd)  # the 6.12 kernel is zstd-compressed
    [ ${#missing[@]} -eq 0 ] && return
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

guest_kernel() {
    local meta pkg dir
    # shellcheck source=../qemu/kernel.conf
    . "$repo/qemu/kernel.conf"
    if [ -f "$cache/kernel/VERSION" ] && [ -d "$cache/kernel/$(cat "$cache/kernel/VERSION")" ]; then
        return
    fi
    meta=$KERNEL_META
    pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [ -n "$pkg" ] || { say "cannot resolve the kernel package behind $meta"; exit 1; }
    say "downloading guest kernel $pkg"
    dir=$(mktemp -d "$cache/.kernel.XXXXXX")
    chmod 755 "$dir"  # apt downloads as the _apt user where it can
    (cd "$dir" && apt-get download -qq "$pkg" >/dev/null)
    dpkg-deb -x "$dir"/*.deb "$dir/tree"
    rm -f "$dir"/*.deb
    mkdir -p "$cache/kernel"
    rm -rf "${cache:?}/kernel/$pkg"
    mv "$dir/tree" "$cache/kernel/$pkg"
    rmdir "$dir"
    echo "$pkg" >"$cache/kernel/VERSION"
}

python_env() {
    local stamp want
    want=$(cat "$repo/pyproject.toml" | sha256sum | cut -c1-16)
    stamp="$venv/.virtio-user-stamp"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    say "creating the Python environment in $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # The machine-wide pip config names local mirrors that may be absent: hide those warnings.
    "$venv/bin/python" -m pip install -q -e "$repo[test,host]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$venv/bin/python" -c "import numpy, pyudev, qemu.qmp, elftools, matplotlib, pytest"
    echo "$want" >"$stamp"
}

mkdir -p "$cache"
debian_packages
guest_kernel
python_env
# The guest sees this checkout read-only and cannot cache bytecode: compile it here
# (a no-op when nothing changed), or every guest command compiles the driver anew.
"$venv/bin/python" -m compileall -q "$repo/virtio_user" "$repo/qemu" "$repo/tests/guest" >/dev/null
