"""Host side: boot QEMU guests with virtio-blk disks and run commands in them.

Never imported in the guest: the driver (virtio_user.*) does not depend on it.
"""

from .errors import GuestDied, GuestTimeout, HarnessError, VMLaunchFailure
from .machine import Disk
from .session import CommandResult, GuestSession
from .vhost_user import VhostUserDisk

__all__ = ["CommandResult", "Disk", "GuestDied", "GuestSession", "GuestTimeout",
           "HarnessError", "VMLaunchFailure", "VhostUserDisk"]
