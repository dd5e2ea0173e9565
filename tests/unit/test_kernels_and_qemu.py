"""Choosing the guest kernel and QEMU (docs/kernels-and-qemu.md) and fetching the
bookworm-backports ones into the cache, without network and without booting: apt is
replaced by packages built here with dpkg-deb."""

from __future__ import annotations

import lzma
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from virtio_user.host import assets, backports, machine, run
from virtio_user.host.errors import AssetsMissing, BadOption
from virtio_user.host.machine import Disk, Machine, MachineConfig
from virtio_user.host.vhost_user import StorageDaemon, VhostUserDisk

# -- the options, in the form the docs show them -----------------------------------------


def test_kernel_and_qemu_options_as_the_docs_show_them() -> None:
    args = run.parse_args(["--kernel", "6.12", "--qemu", "10.0", "--", "uname", "-r"])
    assert (args.kernel, args.qemu, args.command) == ("6.12", "10.0", ["uname", "-r"])
    args = run.parse_args(["--kernel", "6.1", "--qemu", "7.2", "--", "true"])
    assert (args.kernel, args.qemu) == ("6.1", "7.2")
    args = run.parse_args(["--", "true"])
    assert (args.kernel, args.qemu) == ("6.1", "7.2")  # the defaults
    args = run.parse_args(["--kernel=6.12", "--qemu=10.0", "--", "true"])
    assert (args.kernel, args.qemu) == ("6.12", "10.0")


@pytest.mark.parametrize("argv, message", [
    (["--kernel", "6.6"], "argument --kernel: invalid choice: '6.6' (choose from '6.1', '6.12')"),
    (["--qemu", "9.2"], "argument --qemu: invalid choice: '9.2' (choose from '7.2', '10.0')"),
])
def test_an_unknown_kernel_or_qemu_exits_125(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run.main([*argv, "--", "true"])
    assert exc.value.code == 125
    assert message in capsys.readouterr().err


def test_the_python_api_refuses_an_unknown_version_by_name() -> None:
    with pytest.raises(BadOption, match="kernel 5.10: use one of 6.1, 6.12"):
        assets.find_kernel("5.10")
    with pytest.raises(BadOption, match="qemu 8.0: use one of 7.2, 10.0"):
        assets.find_qemu("8.0")


# -- QEMU 10.0's command lines: its binary, its data files, its storage daemon -----------

def unpacked_qemu(root: Path) -> assets.Qemu:
    usr = root / "usr"
    return assets.Qemu("10.0", usr / "bin", usr / "share" / "qemu",
                       usr / "lib" / "x86_64-linux-gnu" / "qemu")


def test_qemu_10_runs_its_own_binary_with_its_own_data_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qemu = unpacked_qemu(tmp_path)
    asked: list[str] = []
    monkeypatch.setattr(machine.assets, "find_qemu",
                        lambda version: asked.append(version) or qemu)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    vm = Machine(MachineConfig(disks=[Disk(Path("a.img"), format="raw")], qemu="10.0"))
    try:
        cmd = vm.command()
    finally:
        vm.close()
    assert asked == ["10.0"]
    assert cmd[:3] == [str(tmp_path / "usr/bin/qemu-system-x86_64"), "-L",
                       str(tmp_path / "usr/share/qemu")]
    assert qemu.env()["QEMU_MODULE_DIR"] == str(tmp_path / "usr/lib/x86_64-linux-gnu/qemu")


def test_the_system_qemu_is_found_on_path_without_l() -> None:
    qemu = assets.find_qemu("7.2")
    assert (qemu.binary("qemu-system-x86_64"), qemu.args()) == ("qemu-system-x86_64", [])
    assert "QEMU_MODULE_DIR" not in qemu.env() or qemu.moddir is None


def test_vhost_user_disks_are_served_by_that_qemus_storage_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script in the place of 10.0's qemu-storage-daemon records how it was started
    (with 10.0's module folder) and listens on the socket it is given."""
    qemu = unpacked_qemu(tmp_path)
    assert qemu.bindir is not None
    qemu.bindir.mkdir(parents=True)
    fake = qemu.bindir / "qemu-storage-daemon"
    fake.write_text("#!/bin/sh\necho \"$QEMU_MODULE_DIR\" >\"$(dirname \"$0\")/ran\"\n"
                    "exec python3 -c 'import socket, sys, time; s = socket.socket("
                    "socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); time.sleep(60)' "
                    "\"$SOCK\"\n")
    fake.chmod(0o755)
    image = tmp_path / "served.raw"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "s.sock"
    monkeypatch.setenv("SOCK", str(sock))
    assert VhostUserDisk(image).daemon_command(sock, qemu.binary("qemu-storage-daemon"))[0] \
        == str(fake)
    with StorageDaemon(VhostUserDisk(image), sock, tmp_path / "log", qemu) as daemon:
        assert daemon.proc is not None and sock.exists()
    assert (qemu.bindir / "ran").read_text().strip() == str(qemu.moddir)


# -- kernels: the cache layout, the modules of 6.12 -------------------------------------

def fake_kernel(root: Path, release: str, modules: dict[str, bytes],
                builtin: list[str] = ()) -> Path:  # type: ignore[assignment]
    """A kernel tree as the package unpacks: boot/, lib/modules/RELEASE/kernel/..."""
    mods = root / "lib" / "modules" / release
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{release}").write_bytes(b"not a bzImage")
    for rel, data in modules.items():
        (mods / "kernel" / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / "kernel" / rel).write_bytes(data)
    mods.mkdir(parents=True, exist_ok=True)
    (mods / "modules.builtin").write_text("".join(f"kernel/{b}\n" for b in builtin))
    return root


def module_elf(depends: str) -> bytes:
    """A relocatable ELF with only a .modinfo section, as elftools reads it."""
    import struct
    modinfo = f"license=GPL\0depends={depends}\0".encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    body = modinfo + shstr
    shoff = 64 + len(body)
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2))
    null = bytes(64)
    sec_modinfo = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, 64, len(modinfo), 0, 0, 1, 0)
    sec_shstr = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, 64 + len(modinfo), len(shstr),
                            0, 0, 1, 0)
    return header + body + null + sec_modinfo + sec_shstr


def test_xz_modules_builtins_and_optional_ones(tmp_path: Path) -> None:
    """6.12: modules are .ko.xz, virtio_pci is built in, ublk_drv exists; a ``?`` name
    the kernel lacks is skipped, a plain one is an error naming it."""
    def xz(data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    tree = fake_kernel(tmp_path, "6.12.1-amd64", {
        "drivers/block/virtio_blk.ko.xz": xz(module_elf("virtio_ring")),
        "drivers/virtio/virtio_ring.ko.xz": xz(module_elf("")),
        "drivers/vfio/pci/vfio-pci-core.ko": module_elf(""),
        "drivers/block/ublk_drv.ko.xz": xz(module_elf("")),
    }, builtin=["drivers/virtio/virtio_pci.ko", "drivers/char/virtio_console.ko"])
    kernel = assets.Kernel("linux-image-6.12.1-amd64", "6.12.1-amd64", tree)
    assert sorted(assets.module_index(kernel)) == ["ublk_drv", "vfio_pci_core",
                                                   "virtio_blk", "virtio_ring"]
    assert assets.builtin_modules(kernel) == {"virtio_pci", "virtio_console"}
    order = assets.load_order(kernel, ["virtio_pci", "virtio_console", "virtio_blk",
                                       "vfio-pci-core", "nbd?", "ublk_drv?"])
    assert [assets.module_name(p) for p in order] == ["virtio_ring", "virtio_blk",
                                                      "vfio_pci_core", "ublk_drv"]
    assert assets.module_bytes(order[0]).startswith(b"\x7fELF")
    with pytest.raises(AssetsMissing, match="kernel 6.12.1-amd64 has no module nbd"):
        assets.load_order(kernel, ["nbd"])


def test_a_cached_backports_kernel_is_used_without_fetching(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTIO_USER_CACHE", str(tmp_path))
    fake_kernel(tmp_path / "kernel-6.12" / "linux-image-6.12.9-amd64", "6.12.9-amd64", {})
    (tmp_path / "kernel-6.12" / "VERSION").write_text("linux-image-6.12.9-amd64\n")
    monkeypatch.setattr(backports, "PrivateApt", None)  # any apt use would fail
    kernel = assets.find_kernel("6.12")
    assert (kernel.release, kernel.tree) == (
        "6.12.9-amd64", tmp_path / "kernel-6.12" / "linux-image-6.12.9-amd64")


def test_a_kernel_of_another_series_in_its_folder_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTIO_USER_CACHE", str(tmp_path))
    fake_kernel(tmp_path / "kernel-6.12" / "linux-image-6.16.2-amd64", "6.16.2-amd64", {})
    (tmp_path / "kernel-6.12" / "VERSION").write_text("linux-image-6.16.2-amd64\n")
    with pytest.raises(AssetsMissing, match="is 6.16.2-amd64, not 6.12"):
        assets.find_kernel("6.12")


# -- the fetch: private apt, unpack, VERSION, once ---------------------------------------

def test_debian_uri_comes_from_the_systems_sources(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert backports.debian_uri([tmp_path / "sources.list", d]) == \
        "http://mirror.example/debian"
    (d / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert backports.debian_uri([tmp_path / "sources.list", d]) == "http://old.example/debian"
    assert backports.debian_uri([tmp_path / "none"]) == backports.DEFAULT_URI


def test_the_private_apt_configuration_names_only_the_cache(tmp_path: Path) -> None:
    apt = backports.PrivateApt(tmp_path / "apt", "http://m.example/debian")
    apt.prepare()
    options = apt.options()
    paths = [o.partition("=")[2] for o in options[1::2]]
    assert "Dir::Etc::SourceList=/dev/null" in options
    assert all(p.startswith(str(tmp_path)) for p in paths
               if p.startswith("/") and p != "/dev/null")
    assert (tmp_path / "apt" / "bpo.sources").read_text() == (
        "Types: deb\nURIs: http://m.example/debian\nSuites: bookworm-backports\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    assert (tmp_path / "apt" / "status").read_text() == ""  # not the host's dpkg status


def test_apt_cache_answers_are_read() -> None:
    assert backports.depends_on(
        "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n",
        "linux-image-", "linux-image-amd64") == "linux-image-6.12.95+deb12-amd64"
    assert backports.candidate_in(
        "qemu-system-x86:\n  Installed: (none)\n  Candidate: 1:10.0.2+ds-2\n",
        "qemu-system-x86") == "1:10.0.2+ds-2"
    with pytest.raises(AssetsMissing, match="has no qemu-system-x86"):
        backports.candidate_in("qemu-system-x86:\n  Candidate: (none)\n", "qemu-system-x86")


def build_deb(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    root = folder / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1:10.0.2\nArchitecture: amd64\n"
        "Maintainer: test <t@example.org>\nDescription: test\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    deb = folder / f"{name}_10.0.2_amd64.deb"
    subprocess.run(["dpkg-deb", "-b", "-Zxz", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


class FakeApt:
    """PrivateApt without network: ``apt-get download`` copies packages built here."""
    calls: list[str] = []

    def __init__(self, root: Path, uri: str = "") -> None:
        self.root = root

    def update(self) -> None:
        FakeApt.calls.append("update")

    def candidate(self, package: str) -> str:
        return "1:10.0.2+ds-2~bpo12+1"

    def download(self, packages: list[str], folder: Path) -> list[Path]:
        FakeApt.calls.append("download " + " ".join(packages))
        return [build_deb(folder, p, {f"usr/bin/{p}-tool": p.encode()}) for p in packages]


def test_qemu_10_is_fetched_once_into_its_own_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTIO_USER_CACHE", str(tmp_path))
    monkeypatch.setattr(backports, "PrivateApt", FakeApt)
    FakeApt.calls = []
    said: list[str] = []
    qemu = assets.find_qemu("10.0", say=said.append)
    tree = tmp_path / "qemu-10.0" / "qemu-10.0.2+ds-2~bpo12+1"
    assert qemu.bindir == tree / "usr" / "bin"
    assert sorted(p.name for p in qemu.bindir.iterdir()) == [
        f"{p}-tool" for p in sorted(assets.QEMU_PACKAGES)]
    assert (tmp_path / "qemu-10.0" / "VERSION").read_text() == tree.name + "\n"
    assert FakeApt.calls == ["update", "download " + " ".join(assets.QEMU_PACKAGES)]
    assert said[0].startswith("first use of QEMU 10.0: fetching it from bookworm-backports")
    assert sorted(p.name for p in (tmp_path / "qemu-10.0").iterdir()) == [
        "VERSION", tree.name]  # the download folder is gone
    assert assets.find_qemu("10.0", say=said.append) == qemu
    assert len(FakeApt.calls) == 2 and len(said) == 2  # the second use fetched nothing


def test_a_newer_qemu_in_backports_is_refused_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Moved(FakeApt):
        def candidate(self, package: str) -> str:
            return "1:10.1.0+ds-1~bpo12+1"
    monkeypatch.setenv("VIRTIO_USER_CACHE", str(tmp_path))
    monkeypatch.setattr(backports, "PrivateApt", Moved)
    with pytest.raises(AssetsMissing, match="QEMU is now 1:10.1.0.*not 10.0"):
        assets.find_qemu("10.0", say=lambda _: None)
    assert not (tmp_path / "qemu-10.0" / "VERSION").exists()


def test_a_failed_download_leaves_no_version_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(FakeApt):
        def download(self, packages: list[str], folder: Path) -> list[Path]:
            raise AssetsMissing("apt-get download failed: network unreachable")
    monkeypatch.setenv("VIRTIO_USER_CACHE", str(tmp_path))
    monkeypatch.setattr(backports, "PrivateApt", Broken)
    with pytest.raises(AssetsMissing, match="network unreachable"):
        assets.find_qemu("10.0", say=lambda _: None)
    assert list((tmp_path / "qemu-10.0").iterdir()) == []


def test_a_second_process_waits_for_the_first_ones_fetch(tmp_path: Path) -> None:
    """The lock is held: a bounded wait, then a clear error; released: it goes on."""
    holder = backports.CacheLock(tmp_path).__enter__()
    with pytest.raises(AssetsMissing, match="for more than 0.2 s"):
        with backports.CacheLock(tmp_path, timeout=0.2):
            pass
    released = threading.Timer(0.3, holder.__exit__, (None, None, None))
    released.start()
    with backports.CacheLock(tmp_path, timeout=10):
        pass
    released.join()
