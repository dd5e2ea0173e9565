"""Guest boot assets: the cached Debian kernels, the QEMU builds, and the initramfs the
project builds.

Kernels (``--kernel``): 6.1 is Debian 12's own, which scripts/setup.sh downloads into the
cache; 6.12 is bookworm-backports', fetched into the cache on its first use
(backports.py). QEMU (``--qemu``): 7.2 is the system's; 10.0 is bookworm-backports',
unpacked into the cache on its first use and run with its own data files (``-L``) and
its own qemu-storage-daemon.

The initramfs holds busybox, init.sh and the modules in modules.txt (GUEST_DIR) plus
their dependencies, resolved from each module's own ``depends=`` field (the extracted
package has no modules.dep); modules the kernel builds in (modules.builtin) are left out,
xz-compressed ones (6.12 ships ``*.ko.xz``) are stored decompressed, for busybox insmod.
The result is cached under a hash of its inputs.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from . import backports
from .errors import AssetsMissing, BadOption

# The guest's files (init.sh, agent.py, modules.txt, kernel.conf, demo.sh) are package
# data: in a checkout ``guest`` is a link to the repository's qemu/ folder, in an
# installed wheel a copy. Resolved, because the guest reads them by the same path.
GUEST_DIR = (Path(__file__).parent / "guest").resolve()
# Where ``virtio_user`` is imported from (a checkout or site-packages): the guest must
# see it, and the guest's /tmp hides the host's.
IMPORT_ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")
XZ_MAGIC = b"\xfd7zXZ\x00"  # the start of an xz stream (Debian 12's 6.1: CONFIG_KERNEL_XZ)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame (the 6.12 backports kernel: CONFIG_KERNEL_ZSTD)
# The x86 boot protocol's setup header (Documentation/arch/x86/boot.rst): "HdrS" at
# 0x202, setup_sects at 0x1f1 (0 means 4), payload_offset and payload_length at 0x248,
# relative to the protected-mode code that follows the setup sectors.
HDRS_OFFSET, HDRS = 0x202, b"HdrS"
SETUP_SECTS_OFFSET = 0x1F1
PAYLOAD_OFFSET = 0x248
UNPACK_SECONDS = 120.0
# The ELF note of the PVH entry point (Xen's XEN_ELFNOTE_PHYS32_ENTRY), through which
# QEMU boots an uncompressed kernel; Debian builds CONFIG_PVH.
XEN_ELFNOTE_PHYS32_ENTRY = 18


KERNELS = ("6.1", "6.12")  # --kernel
DEFAULT_KERNEL = "6.1"  # the 6.12 default waits for a whole suite run that passes on it
QEMUS = ("7.2", "10.0")  # --qemu
DEFAULT_QEMU = "7.2"  # the system's
# The QEMU 10.0 packages: the emulator, its helpers, its data files (-L), and
# qemu-utils, which holds 10.0's qemu-storage-daemon (7.2 had it in qemu-system-common).
QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils")


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


def bzimage_payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, as its setup header delimits it, without
    the decompressed size that the kernel's build appends to it (4 bytes, le32)."""
    if bzimage[HDRS_OFFSET:HDRS_OFFSET + 4] != HDRS or len(bzimage) < PAYLOAD_OFFSET + 8:
        return None
    setup_sects = bzimage[SETUP_SECTS_OFFSET] or 4
    offset, length = struct.unpack_from("<II", bzimage, PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    if length < 4 or start + length > len(bzimage):
        return None
    return bzimage[start:start + length - 4]


def decompress_payload(payload: bytes) -> bytes | None:
    """xz in the process; zstd (no zstd module in Python's standard library before
    3.14) through the ``zstd`` program, if it is installed."""
    if payload.startswith(XZ_MAGIC):
        try:
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        except lzma.LZMAError:
            return None
    if payload.startswith(ZSTD_MAGIC):
        try:
            out = subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True,
                                 timeout=UNPACK_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None
    return None


def _extract_elf(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage, if it is xz- or zstd-compressed and has a PVH
    entry."""
    payload = bzimage_payload(bzimage)
    elf = decompress_payload(payload) if payload is not None else None
    if elf is None or not elf.startswith(b"\x7fELF"):
        return None
    notes = (note for seg in ELFFile(io.BytesIO(elf)).iter_segments()
             if isinstance(seg, NoteSegment) for note in seg.iter_notes())
    return elf if any(_is_pvh_entry(note) for note in notes) else None


def _is_pvh_entry(note: Any) -> bool:
    kind: object = note["n_type"]  # elftools names the types it knows; Xen's stay numbers
    return note["n_name"] == "Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY


def kernel_conf() -> dict[str, str]:
    """qemu/kernel.conf's ``KEY=VALUE`` lines (the file setup.sh sources)."""
    conf: dict[str, str] = {}
    for line in (GUEST_DIR / "kernel.conf").read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            conf[key.strip()] = value.strip()
    return conf


def kernel_folder(version: str) -> Path:
    """CACHE/kernel for Debian 12's own (setup.sh), CACHE/kernel-6.12 for the other."""
    return cache_dir() / ("kernel" if version == DEFAULT_KERNEL else f"kernel-{version}")


def find_kernel(version: str = DEFAULT_KERNEL, *,
                say: backports.Say = backports.say_stderr) -> Kernel:
    """The cached kernel of series ``version`` (a key of KERNELS); the backports one is
    fetched on first use."""
    if version not in KERNELS:
        raise BadOption(f"kernel {version}: use one of {', '.join(KERNELS)}")
    root = kernel_folder(version)
    if version != DEFAULT_KERNEL:
        backports.fetch(root, lambda apt: _backports_kernel(apt, version),
                        f"kernel {version}", say)
    try:
        package = (root / "VERSION").read_text().strip()
        tree = root / package
        (release,) = os.listdir(tree / "lib" / "modules")
    except (OSError, ValueError) as exc:
        raise AssetsMissing(
            f"no guest kernel in {root} ({exc}); run scripts/setup.sh") from exc
    if not release.startswith(version + "."):
        raise AssetsMissing(f"the kernel in {tree} is {release}, not {version}")
    return Kernel(package, release, tree)


def _backports_kernel(apt: backports.PrivateApt, version: str) -> tuple[str, list[str]]:
    meta = kernel_conf()["KERNEL_BACKPORTS_META"]
    package = apt.depends(meta, "linux-image-")
    if not package.startswith(f"linux-image-{version}."):
        raise AssetsMissing(f"{backports.SUITE}'s {meta} is now {package}, not {version}: "
                            "update KERNELS in virtio_user/host/assets.py")
    return package, [package]


@dataclass(frozen=True)
class Qemu:
    """One QEMU build: the system's (``bindir`` None: found on PATH) or an unpacked one."""
    version: str
    bindir: Path | None = None
    datadir: Path | None = None  # -L: its own firmware and option ROMs
    moddir: Path | None = None  # its own loadable modules, never another build's

    def binary(self, name: str) -> str:
        return name if self.bindir is None else str(self.bindir / name)

    def args(self) -> list[str]:
        return [] if self.datadir is None else ["-L", str(self.datadir)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.moddir is not None:
            env["QEMU_MODULE_DIR"] = str(self.moddir)
        return env


def find_qemu(version: str = DEFAULT_QEMU, *,
              say: backports.Say = backports.say_stderr) -> Qemu:
    """The system's QEMU (7.2) or the backports one (10.0), fetched on first use."""
    if version not in QEMUS:
        raise BadOption(f"qemu {version}: use one of {', '.join(QEMUS)}")
    if version == DEFAULT_QEMU:
        return Qemu(version)
    tree = backports.fetch(cache_dir() / f"qemu-{version}",
                           lambda apt: _backports_qemu(apt, version), f"QEMU {version}", say)
    usr = tree / "usr"
    return Qemu(version, usr / "bin", usr / "share" / "qemu",
                usr / "lib" / "x86_64-linux-gnu" / "qemu")


def _backports_qemu(apt: backports.PrivateApt, version: str) -> tuple[str, list[str]]:
    found = apt.candidate(QEMU_PACKAGES[0])
    if not found.partition(":")[2].startswith(version + "."):
        raise AssetsMissing(f"{backports.SUITE}'s QEMU is now {found}, not {version}: "
                            "update QEMUS in virtio_user/host/assets.py")
    return "qemu-" + found.partition(":")[2], list(QEMU_PACKAGES)


MODULE_SUFFIXES = (".ko", ".ko.xz")  # 6.12 ships its modules xz-compressed


def module_name(path: Path) -> str:
    """``9pnet_virtio`` for .../9pnet_virtio.ko.xz (dashes read as underscores, as
    the kernel does)."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
    return name.replace("-", "_")


def module_index(kernel: Kernel) -> dict[str, Path]:
    """Map module name (underscores) to its .ko or .ko.xz file."""
    return {module_name(ko): ko for ko in (kernel.modules / "kernel").rglob("*.ko*")
            if ko.name.endswith(MODULE_SUFFIXES)}


def builtin_modules(kernel: Kernel) -> set[str]:
    """What the kernel builds in (modules.builtin, shipped with the package): 6.12 has
    virtio_pci and virtio_console there, 6.1 has them as modules."""
    try:
        lines = (kernel.modules / "modules.builtin").read_text().splitlines()
    except OSError:
        return set()
    return {module_name(Path(line.strip())) for line in lines if line.strip()}


def module_bytes(ko: Path) -> bytes:
    """The module's ELF file, decompressed if it is a .ko.xz."""
    data = ko.read_bytes()
    return lzma.decompress(data) if ko.name.endswith(".xz") else data


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo section."""
    section = ELFFile(io.BytesIO(module_bytes(ko))).get_section_by_name(".modinfo")
    data = section.data() if section is not None else b""
    for entry in data.split(b"\0"):
        if entry.startswith(b"depends="):
            return [d.replace("-", "_") for d in entry[8:].decode().split(",") if d]
    return []


def load_order(kernel: Kernel, wanted: Sequence[str]) -> list[Path]:
    """Modules in ``wanted`` and their dependencies, each after what it depends on.
    Built-in ones are left out; a name ending in ``?`` is left out where the kernel
    does not build it (``ublk_drv?``: 6.12 has it, 6.1 does not)."""
    index = module_index(kernel)
    builtin = builtin_modules(kernel)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise AssetsMissing(f"kernel {kernel.release} has no module {name}")
        for dep in module_depends(index[name]):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        optional = name.endswith("?")
        name = name.rstrip("?").replace("-", "_")
        if not (optional and name not in index):
            visit(name)
    return order


def wanted_modules() -> list[str]:
    lines = (GUEST_DIR / "modules.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def build_initramfs(kernel: Kernel, extra_modules: Sequence[str] = ()) -> Path:
    """Return the cached initramfs for ``kernel``, building it if its inputs changed.
    ``extra_modules`` are loaded at boot after modules.txt's (and their dependencies)."""
    modules = load_order(kernel, [*wanted_modules(), *extra_modules])
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
            (stage / "lib" / "modules" / f"{module_name(ko)}.ko").write_bytes(
                module_bytes(ko))
        (stage / "modules.order").write_text("".join(module_name(m) + "\n"
                                                     for m in modules))
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        tmp_out = out.with_suffix(".tmp")
        with tmp_out.open("wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=stage,
                           input="\n".join(names).encode(), stdout=f, check=True)
        tmp_out.rename(out)
    return out
