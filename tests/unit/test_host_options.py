"""The QEMU harness's option parsing and QEMU command-line building, without booting."""

from __future__ import annotations

import pytest

from virtio_user.host import run


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
