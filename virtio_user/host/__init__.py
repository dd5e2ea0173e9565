"""Host side: boot QEMU guests with virtio-blk disks and run commands in them.

Never imported in the guest: the driver (virtio_user.*) does not depend on it, nor on
what it needs (QMP, ELF, plotting), which comes with ``pip install virtio-user[host]``.
"""

try:
    import elftools  # noqa: F401
    import qemu.qmp  # noqa: F401
except ImportError as exc:
    raise ImportError(f"the QEMU harness needs {exc.name}: pip install "
                      "'virtio-user[host]'") from exc

from .errors import GuestDied, GuestTimeout, HarnessError, VMLaunchFailure
from .machine import Disk
from .session import CommandResult, GuestSession
from .vhost_user import VhostUserDisk

__all__ = ["CommandResult", "Disk", "GuestDied", "GuestSession", "GuestTimeout",
           "HarnessError", "VMLaunchFailure", "VhostUserDisk"]
