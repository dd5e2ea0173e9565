"""The kernel QEMU boots: the uncompressed ELF kernel taken out of the bzImage once
(its xz decompressor, emulated under TCG, was a third of each boot), else the bzImage."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from virtio_user.host import assets


def elf_with_note(name: bytes, ntype: int) -> bytes:
    """A minimal x86-64 ELF: the header, one PT_NOTE program header, one note."""
    note = struct.pack("<III", len(name) + 1, 4, ntype) + name + b"\0" + b"\0" * 4
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(note), len(note), 4)
    return header + phdr + note


def kernel_with(tmp_path: Path, bzimage: bytes) -> assets.Kernel:
    (tmp_path / "boot").mkdir(parents=True)
    (tmp_path / "boot" / "vmlinuz-6.1.0-test").write_bytes(bzimage)
    return assets.Kernel("linux-image-test", "6.1.0-test", tmp_path)


def bzimage(elf: bytes) -> bytes:
    return b"setup and decompressor" + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"tail"


def test_the_elf_kernel_with_a_pvh_entry_is_extracted_once(tmp_path: Path) -> None:
    elf = elf_with_note(b"Xen", assets.XEN_ELFNOTE_PHYS32_ENTRY)
    kernel = kernel_with(tmp_path, bzimage(elf))
    image = assets.boot_image(kernel)
    assert image == tmp_path / "boot" / "vmlinux-6.1.0-test"
    assert image.read_bytes() == elf
    kernel.vmlinuz.write_bytes(b"changed")  # cached: not read again
    assert assets.boot_image(kernel) == image


def test_without_a_pvh_entry_or_an_xz_payload_the_bzimage_boots(tmp_path: Path) -> None:
    for i, data in enumerate((bzimage(elf_with_note(b"Xen", 17)),  # another Xen note
                              bzimage(elf_with_note(b"GNU", 18)),
                              bzimage(b"not an ELF file"),
                              b"a gzip-compressed bzImage\x1f\x8b\x08")):
        kernel = kernel_with(tmp_path / str(i), data)
        assert assets.boot_image(kernel) == kernel.vmlinuz
        assert not (tmp_path / str(i) / "boot" / "vmlinux-6.1.0-test").exists()
        assert assets.boot_image(kernel) == kernel.vmlinuz  # and is not tried again


def test_a_cache_it_cannot_write_to_boots_the_bzimage(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(assets.os, "replace", refuse)
    kernel = kernel_with(tmp_path, bzimage(elf_with_note(b"Xen", 18)))
    assert assets.boot_image(kernel) == kernel.vmlinuz
    assert sorted(p.name for p in (tmp_path / "boot").iterdir()) == ["vmlinuz-6.1.0-test"]
