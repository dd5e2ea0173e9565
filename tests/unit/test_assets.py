"""The kernel QEMU boots: the uncompressed ELF kernel taken out of the bzImage once
(its xz decompressor, emulated under TCG, was a third of each boot), else the bzImage."""

from __future__ import annotations

import lzma
import struct
import subprocess
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


def bzimage(elf: bytes, compress: str = "xz") -> bytes:
    """A bzImage as the boot protocol lays it out: setup sectors with the "HdrS" header,
    then the decompressor and the payload (with its size appended, as the kernel's build
    does), which payload_offset and payload_length delimit."""
    if compress == "xz":
        packed = lzma.compress(elf, format=lzma.FORMAT_XZ)
    elif compress == "zstd":
        packed = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True,
                                check=True).stdout
    else:
        packed = compress.encode()
    payload = packed + struct.pack("<I", len(elf))
    setup = bytearray(2 * 512)  # setup_sects = 1
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    decompressor = b"the decompressor"
    struct.pack_into("<II", setup, 0x248, len(decompressor), len(payload))
    return bytes(setup) + decompressor + payload + b"tail"


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
                              bzimage(b"", "\x1f\x8b\x08 a gzip-compressed payload"),
                              b"no setup header" + lzma.compress(b"\x7fELF"))):
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


def test_a_zstd_compressed_kernel_is_extracted_too(tmp_path: Path) -> None:
    """The 6.12 backports kernel is CONFIG_KERNEL_ZSTD (6.1's is xz)."""
    elf = elf_with_note(b"Xen", assets.XEN_ELFNOTE_PHYS32_ENTRY)
    kernel = kernel_with(tmp_path, bzimage(elf, "zstd"))
    assert assets.boot_image(kernel).read_bytes() == elf


def test_without_the_zstd_program_the_zstd_kernel_boots_as_a_bzimage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = kernel_with(tmp_path, bzimage(elf_with_note(b"Xen", 18), "zstd"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert assets.boot_image(kernel) == kernel.vmlinuz
