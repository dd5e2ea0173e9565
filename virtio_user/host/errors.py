"""Errors of the host-side QEMU harness.

    HarnessError                 anything the harness cannot do; exit status 125
     +-- AssetsMissing           kernel or packages not set up (run scripts/setup.sh)
     +-- BadOption               a --disk/--accel/... value the harness refuses
     +-- VMLaunchFailure         QEMU exited before the guest agent said it was ready
     +-- GuestTimeout            a boot or a command did not finish within its timeout
     +-- GuestDied               QEMU or the guest kernel went away during a session
"""


class HarnessError(Exception):
    """Base of every error the host harness raises."""


class AssetsMissing(HarnessError):
    pass


class BadOption(HarnessError):
    pass


class VMLaunchFailure(HarnessError):
    def __init__(self, message: str, exitcode: int | None = None,
                 command: list[str] | None = None, output: str = "") -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.command = command or []
        self.output = output


class GuestTimeout(HarnessError):
    pass


class GuestDied(HarnessError):
    pass
