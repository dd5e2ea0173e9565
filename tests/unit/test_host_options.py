"""The QEMU harness's option parsing and QEMU command-line building, without booting."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest

from virtio_user.host import machine, run
from virtio_user.host.errors import BadOption, VMLaunchFailure
from virtio_user.host.machine import Disk, Machine, MachineConfig, split_spec
from virtio_user.host.vhost_user import StorageDaemon, VhostUserDisk


@pytest.mark.parametrize("argv", [
    ["--qemu-arg", "-device", "--qemu-arg", "virtio-blk-pci,drive=x"],
    ["--qemu-arg=-device", "--qemu-arg=virtio-blk-pci,drive=x"],
    ["--qemu-arg", "-device", "--qemu-arg=virtio-blk-pci,drive=x"],
])
def test_qemu_arg_takes_any_value_in_both_forms(argv: list[str]) -> None:
    args = run.parse_args([*argv, "--", "true"])
    assert args.qemu_arg == ["-device", "virtio-blk-pci,drive=x"]
    assert args.command == ["true"]


def test_qemu_arg_value_may_look_like_a_harness_option() -> None:
    args = run.parse_args(["--qemu-arg", "--timeout", "--qemu-arg", "--", "true"])
    assert args.qemu_arg == ["--timeout", "--"]
    assert args.timeout == 600.0
    assert args.command == ["true"]


def test_command_options_are_left_to_the_command() -> None:
    args = run.parse_args(["--timeout", "5", "--", "sh", "--qemu-arg", "-c", "x"])
    assert args.qemu_arg == []
    assert args.command == ["sh", "--qemu-arg", "-c", "x"]
    args = run.parse_args(["echo", "--disk", "x"])
    assert args.disk == [] and args.command == ["echo", "--disk", "x"]


# -- every bad option: one exit status, a message naming the limit ---------------------

def exit_status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    code = exc.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "nan"], "--timeout: 'nan' is not a number of seconds"),
    (["--timeout", "inf"], "--timeout: 'inf' is not a number of seconds"),
    (["--timeout=-inf"], "--timeout: '-inf' is not a number of seconds"),
    (["--timeout", "0"], "--timeout: '0' must be a number of seconds above 0"),
    (["--timeout", "soon"], "--timeout: 'soon' is not a number of seconds"),
    (["--memory", "255"], "--memory: 255: give 256 to 1048576 MiB"),
    (["--memory", "100"], "--memory: 100: give 256 to 1048576 MiB"),
    (["--disk", "x,readonly=yes"], "readonly=yes: use readonly=on or readonly=off"),
    (["--memory", "٤٠٩٦"], "is not a number of MiB"),
    (["--accel", "xen"], "invalid choice: 'xen'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["--time", "5"], "unrecognized arguments: --time"),
    (["--disk", "a.img,readonly=yes"], "readonly=yes: use readonly=on or readonly=off"),
    (["--disk", "a.img,readonly=ON"], "readonly=ON: use readonly=on or readonly=off"),
    (["--disk", "a.img,queue-size=abc"], "queue-size=abc: not a number; use a power of 2 "
                                         "from 4 to 1024"),
    (["--disk", "a.img,queue-size=96"], "queue-size=96: use a power of 2 from 4 to 1024"),
])
def test_bad_option_exits_125_with_the_limit(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, err = exit_status([*argv, "--", "true"], capsys)
    assert code == run.EXIT_HARNESS == 125
    assert message in err
    assert "Traceback" not in err


def test_qemu_arg_without_a_value_exits_125(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = exit_status(["--qemu-arg"], capsys)  # "--qemu-arg -- true" would run true
    assert (code, err.splitlines()[-1]) == (
        125, "run-in-qemu.sh: error: argument --qemu-arg: expected one argument")


def test_help_still_exits_0() -> None:
    with pytest.raises(SystemExit) as exc:
        run.parse_args(["--help"])
    assert exc.value.code == 0


# -- --disk: values checked, commas escaped ---------------------------------------------

def qemu_options(option: str) -> dict[str, str]:
    """An option string split the way QEMU does (``,,`` is a comma of the value)."""
    kind, *pairs = split_spec(option)
    out = {"": kind}
    for pair in pairs:
        key, _, value = pair.partition("=")
        assert key not in out, f"{key} given twice in {option!r}"
        out[key] = value
    return out


def device_of(disk: Disk, index: int = 0) -> dict[str, str]:
    args = disk.qemu_args(index)
    return qemu_options(args[args.index("-device") + 1])


def test_disk_spec_with_every_option(tmp_path: Path) -> None:
    disk = Disk.parse(f"{tmp_path}/a.img,format=raw,readonly=on,cache=none,queue-size=1024,"
                      "serial=S1")
    assert (disk.path, disk.format, disk.readonly, disk.cache, disk.queue_size,
            disk.serial) == (tmp_path / "a.img", "raw", True, "none", 1024, "S1")
    assert Disk.parse("a.img,readonly=off").readonly is False
    dev = device_of(disk)
    assert (dev["addr"], dev["queue-size"], dev["serial"]) == ("0x10", "1024", "S1")


@pytest.mark.parametrize("spec, message", [
    ("a.img,readonly", "'readonly' is not key=value"),
    ("a.img,readonly=", "'readonly=' is not key=value"),
    ("a.img,readonly=true", "use readonly=on or readonly=off"),
    ("a.img,queue-size=2", "queue-size=2: use a power of 2 from 4 to 1024"),
    ("a.img,queue-size=2048", "queue-size=2048: use a power of 2 from 4 to 1024"),
    ("a.img,queue-size= 64", "not a number"),
    ("a.img,cache=fast", "cache=fast: use one of writeback, writethrough, none"),
    ("a.img,format=vmdk", "format=vmdk: use one of raw, qcow2"),
    ("a.img,serial=123456789012345678901", "at most 20 bytes"),
    ("a.img,serial=a\tb", "printable characters only"),
    ("a.img,addr=0x5", "unknown option 'addr'"),
    ("a.img,cache=none,cache=none", "cache given twice"),
    (",readonly=on", "no image path"),
])
def test_bad_disk_spec_is_refused_by_name(spec: str, message: str) -> None:
    with pytest.raises(BadOption, match=re.escape(message)):
        Disk.parse(spec)


def test_disk_fields_are_checked_in_the_python_api_too(tmp_path: Path) -> None:
    with pytest.raises(BadOption, match="queue-size=3"):
        Disk(tmp_path / "a.img", queue_size=3).qemu_args(0)


def test_double_comma_in_a_disk_spec_is_a_comma_of_the_path() -> None:
    disk = Disk.parse("dir,,x/a,,addr=0x5,,logfile=x.img,serial=s,,t,readonly=on")
    assert disk.path == Path("dir,x/a,addr=0x5,logfile=x.img")
    assert (disk.serial, disk.readonly) == ("s,t", True)


def test_commas_in_path_and_serial_cannot_inject_device_options(tmp_path: Path) -> None:
    path = tmp_path / "img,addr=0x5,logfile=evil"
    disk = Disk(path, format="raw", serial="a,addr=0x6")
    dev = device_of(disk, 2)
    assert (dev["addr"], dev["serial"]) == ("0x12", "a,addr=0x6")
    assert "logfile" not in dev
    default = device_of(Disk(path, format="raw"))
    assert default["serial"] == "img,addr=0x5,logfile"  # the base name, cut to 20 bytes
    blockdev = json.loads(disk.qemu_args(0)[1])
    assert blockdev["file"]["filename"] == str(path)


def test_commas_in_tmpdir_and_cwd_cannot_inject_qemu_options(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = tmp_path / "t,logfile=injected,x"
    evil.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(evil))
    machine = Machine(MachineConfig(cwd=evil, accel="tcg"))
    try:
        cmd = machine.command()
    finally:
        machine.close()
    opts = [qemu_options(cmd[i + 1]) for i, word in enumerate(cmd)
            if word in ("-chardev", "-virtfs", "-device")]
    paths = [o["path"] for o in opts if "path" in o]
    assert len(paths) == 5  # serial log, QMP, agent, host root, current directory
    assert all(p == "/" or p.startswith(str(evil)) for p in paths), paths
    assert all("logfile" not in o for o in opts)


# -- transports and feature switches for modern devices ---------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("a.img", {"disable-modern": "on", "disable-legacy": "off"}),
    ("a.img,transport=legacy", {"disable-modern": "on", "disable-legacy": "off"}),
    ("a.img,transport=modern", {"disable-modern": "off", "disable-legacy": "on"}),
    ("a.img,transport=transitional", {"disable-modern": "off", "disable-legacy": "off"}),
    ("a.img,transport=modern,iommu_platform=on",
     {"disable-legacy": "on", "iommu_platform": "on"}),
    ("a.img,transport=modern,packed=on", {"disable-legacy": "on", "packed": "on"}),
    ("a.img,transport=transitional,packed=on", {"disable-legacy": "off", "packed": "on"}),
    ("a.img,indirect_desc=off", {"indirect_desc": "off"}),
    ("a.img,event_idx=off", {"event_idx": "off"}),
    ("a.img,transport=modern,packed=off,iommu_platform=off,indirect_desc=on,event_idx=on",
     {"disable-legacy": "on"}),
])
def test_transport_and_feature_options_become_device_properties(
        spec: str, expected: dict[str, str]) -> None:
    dev = device_of(Disk.parse(spec.replace("a.img", "a.img,format=raw")))
    assert {k: dev[k] for k in expected} == expected
    switches = {"iommu_platform", "packed", "indirect_desc", "event_idx"}
    assert switches & dev.keys() == switches & expected.keys()  # defaults left to QEMU


def test_python_api_has_the_same_fields() -> None:
    disk = Disk(Path("a.img"), format="raw", transport="modern", iommu_platform=True,
                packed=True, indirect_desc=False, event_idx=False)
    dev = device_of(disk)
    assert [dev[k] for k in ("disable-legacy", "disable-modern", "iommu_platform", "packed",
                             "indirect_desc", "event_idx")] == ["on", "off", "on", "on",
                                                                "off", "off"]


@pytest.mark.parametrize("spec, message", [
    ("a.img,transport=virtio1", "transport=virtio1: use one of legacy, modern, transitional"),
    ("a.img,iommu_platform=on", "iommu_platform=on needs transport=modern"),
    ("a.img,transport=transitional,iommu_platform=on",
     "iommu_platform=on needs transport=modern"),
    ("a.img,packed=on", "packed=on needs transport=modern or transitional"),
    ("a.img,packed=yes", "packed=yes: use packed=on or packed=off"),
    ("a.img,event_idx=0", "event_idx=0: use event_idx=on or event_idx=off"),
    ("a.img,indirect_desc=OFF", "indirect_desc=OFF: use indirect_desc=on or"),
])
def test_bad_transport_options_are_refused(spec: str, message: str) -> None:
    with pytest.raises(BadOption, match=re.escape(message)):
        Disk.parse(spec)


# -- vhost-user disks: the daemon's and QEMU's command lines, the daemon's lifetime ------

def test_vhost_user_disk_option(tmp_path: Path) -> None:
    args = run.parse_args(["--vhost-user-disk", "a,,b.img", "--vhost-user-disk",
                           "c.img,readonly=on", "--", "true"])
    assert args.vhost_user_disk == [VhostUserDisk(Path("a,b.img")),
                                    VhostUserDisk(Path("c.img"), readonly=True)]
    for spec, message in (("c.img,readonly=yes", "readonly=yes: use readonly=on or"),
                          ("c.img,num-queues=2", "unknown option 'num-queues=2'")):
        with pytest.raises(BadOption, match=re.escape(message)):
            VhostUserDisk.parse(spec)


def test_vhost_user_devices_follow_the_disks_with_shared_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "t,x"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    config = MachineConfig(disks=[Disk(Path("a.img"), format="raw"),
                                  Disk(Path("b.img"), format="raw")],
                           vhost_user_disks=[VhostUserDisk(Path("c.img"))], accel="tcg",
                           memory_mib=768)
    machine = Machine(config)
    try:
        cmd = machine.command()
    finally:
        machine.close()
    assert cmd[cmd.index("-object") + 1] == "memory-backend-memfd,id=mem,size=768M,share=on"
    assert cmd[cmd.index("-numa") + 1] == "node,memdev=mem"
    dev = qemu_options(cmd[len(cmd) - 1])
    assert (dev[""], dev["chardev"], dev["num-queues"], dev["addr"], dev["disable-legacy"]) \
        == ("vhost-user-blk-pci", "vhost-user0", "1", "0x12", "on")
    chardev = qemu_options(cmd[len(cmd) - 3])
    assert chardev["path"] == str(machine.vhost_user_socket(0))
    assert "x" not in chardev  # the comma in TMPDIR stayed inside the path


def test_storage_daemon_starts_and_always_stops(tmp_path: Path) -> None:
    image = tmp_path / "served.raw"
    image.write_bytes(bytes(1 << 20))
    daemon = StorageDaemon(VhostUserDisk(image, readonly=True), tmp_path / "s.sock",
                           tmp_path / "log")
    export = json.loads(VhostUserDisk(image).daemon_command(daemon.socket)[-1])
    assert (export["type"], export["writable"]) == ("vhost-user-blk", True)
    with pytest.raises(RuntimeError):
        with daemon:
            proc = daemon.proc
            assert proc is not None and proc.poll() is None and daemon.socket.exists()
            raise RuntimeError("the session failed")
    assert proc.poll() is not None and not daemon.socket.exists()


def test_storage_daemon_that_exits_at_once_is_a_launch_failure(tmp_path: Path) -> None:
    image = tmp_path / "served.raw"
    image.write_bytes(bytes(1 << 20))
    socket = tmp_path / "no-such-dir" / "s.sock"  # it cannot listen there
    daemon = StorageDaemon(VhostUserDisk(image), socket, tmp_path / "log")
    with pytest.raises(VMLaunchFailure, match="qemu-storage-daemon exited with status"):
        with daemon:
            pass
    assert daemon.proc is None and not daemon.socket.exists()


def test_each_qemu_start_is_logged_with_the_test_that_made_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "boots"
    monkeypatch.setenv(machine.BOOT_LOG_ENV, str(log))
    machine.record_boot()
    machine.record_boot()
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert all(ln.endswith("test_each_qemu_start_is_logged_with_the_test_that_made_it "
                           "(call)") for ln in lines), lines
    monkeypatch.delenv(machine.BOOT_LOG_ENV)
    machine.record_boot()
    assert len(log.read_text().splitlines()) == 2
