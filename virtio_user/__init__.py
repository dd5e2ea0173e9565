"""virtio_user: a user-space driver for legacy virtio-blk PCI devices.

``with VirtioBlk.open("0000:00:10.0") as dev: data = dev.read(0, 8)``
"""

import logging

from .blk import Request, VirtioBlk

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Request", "VirtioBlk"]
