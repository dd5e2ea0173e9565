"""Guest boot assets: the cached Debian kernel and the initramfs the project builds.

scripts/setup.sh downloads the kernel package into the cache; this module finds it and
packs an initramfs from busybox, init.sh and the modules in modules.txt (GUEST_DIR) plus
their dependencies, resolved from each module's own ``depends=`` field (the extracted
package has no modules.dep). The result is cached under a hash of its inputs.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from .errors import AssetsMissing

# The guest's files (init.sh, agent.py, modules.txt, kernel.conf, demo.sh) are package
# data: in a checkout ``guest`` is a link to the repository's qemu/ folder, in an
# installed wheel a copy. Resolved, because the guest reads them by the same path.
GUEST_DIR = (Path(__file__).parent / "guest").resolve()
# Where ``virtio_user`` is imported from (a checkout or site-packages): the guest must
# see it, and the guest's /tmp hides the host's.
IMPORT_ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
XZ_MAGIC = b"\xfd7zXZ\x00"  # the start of an xz stream (Debian's kernels: CONFIG_KERNEL_XZ)
# The ELF note of the PVH entry point (Xen's XEN_ELFNOTE_PHYS32_ENTRY), through which
# QEMU boots an uncompressed kernel; Debian builds CONFIG_PVH.
XEN_ELFNOTE_PHYS32_ENTRY = 18


def cache_dir() -> Path:
    env = os.environ.get("VIRTIO_USER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "virtio-user"


@dataclass(frozen=True)
class Kernel:
    package: str
    release: str  # uname -r of the guest, e.g. 6.1.0-56-amd64
    tree: Path

    @property
    def vmlinuz(self) -> Path:
        return self.tree / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.tree / "lib" / "modules" / self.release


def boot_image(kernel: Kernel) -> Path:
    """The kernel file to give QEMU: the uncompressed ELF kernel where the bzImage holds
    one with a PVH entry point (extracted once, cached beside it), else the bzImage.

    Under TCG the bzImage's own xz decompressor, emulated, took 2.7 of a boot's 8.5 s;
    here it runs once, natively."""
    out = kernel.tree / "boot" / f"vmlinux-{kernel.release}"
    unusable = out.with_name(out.name + ".unusable")
    if out.exists():
        return out
    if unusable.exists():
        return kernel.vmlinuz
    try:
        elf = _extract_elf(kernel.vmlinuz.read_bytes())
        if elf is None:  # for good: this bzImage will never have one
            unusable.touch()
        else:
            _write_atomically(out, elf)
            return out
    except OSError:  # unreadable, or a cache we cannot write to: the bzImage boots too
        pass
    return kernel.vmlinuz


def _write_atomically(path: Path, data: bytes) -> None:
    """A concurrent boot sees all of ``path`` or none of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _extract_elf(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage, if it is xz-compressed and has a PVH entry."""
    try:
        start = bzimage.index(XZ_MAGIC)
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except (ValueError, lzma.LZMAError):
        return None
    if not elf.startswith(b"\x7fELF"):
        return None
    notes = (note for seg in ELFFile(io.BytesIO(elf)).iter_segments()
             if isinstance(seg, NoteSegment) for note in seg.iter_notes())
    return elf if any(_is_pvh_entry(note) for note in notes) else None


def _is_pvh_entry(note: Any) -> bool:
    kind: object = note["n_type"]  # elftools names the types it knows; Xen's stay numbers
    return note["n_name"] == "Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY


def find_kernel() -> Kernel:
    root = cache_dir() / "kernel"
    try:
        package = (root / "VERSION").read_text().strip()
        tree = root / package
        (release,) = os.listdir(tree / "lib" / "modules")
    except (OSError, ValueError) as exc:
        raise AssetsMissing(
            f"no guest kernel in {root} ({exc}); run scripts/setup.sh") from exc
    return Kernel(package, release, tree)


def module_index(kernel: Kernel) -> dict[str, Path]:
    """Map module name (underscores) to its .ko file."""
    return {ko.name[:-3].replace("-", "_"): ko
            for ko in (kernel.modules / "kernel").rglob("*.ko")}


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section."""
    with ko.open("rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        data = section.data() if section is not None else b""
    for entry in data.split(b"\0"):
        if entry.startswith(b"depends="):
            return [d.replace("-", "_") for d in entry[8:].decode().split(",") if d]
    return []


def load_order(kernel: Kernel, wanted: list[str]) -> list[Path]:
    """Modules in ``wanted`` and their dependencies, each after what it depends on."""
    index = module_index(kernel)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise AssetsMissing(f"kernel {kernel.release} has no module {name}")
        for dep in module_depends(index[name]):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def wanted_modules() -> list[str]:
    lines = (GUEST_DIR / "modules.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def build_initramfs(kernel: Kernel) -> Path:
    """Return the cached initramfs for ``kernel``, building it if its inputs changed."""
    modules = load_order(kernel, wanted_modules())
    init = (GUEST_DIR / "init.sh").read_bytes()
    digest = hashlib.sha256()
    for part in (kernel.release.encode(), init, BUSYBOX.read_bytes(),
                 "\n".join(str(m) for m in modules).encode()):
        digest.update(hashlib.sha256(part).digest())
    out = cache_dir() / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    if not BUSYBOX.exists():
        raise AssetsMissing(f"{BUSYBOX} is missing; run scripts/setup.sh")
    with tempfile.TemporaryDirectory(prefix="virtio-user-initramfs-") as tmp:
        stage = Path(tmp)
        for d in ("bin", "lib/modules", "proc", "sys", "dev", "newroot"):
            (stage / d).mkdir(parents=True)
        shutil.copy(BUSYBOX, stage / "bin" / "busybox")
        (stage / "init").write_bytes(init)
        (stage / "init").chmod(0o755)
        for ko in modules:
            shutil.copy(ko, stage / "lib" / "modules" / ko.name)
        (stage / "modules.order").write_text("".join(m.name[:-3] + "\n" for m in modules))
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        tmp_out = out.with_suffix(".tmp")
        with tmp_out.open("wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=stage,
                           input="\n".join(names).encode(), stdout=f, check=True)
        tmp_out.rename(out)
    return out
