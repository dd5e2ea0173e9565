"""Serving a VirtioBlk to the kernel through ublk: the disk becomes ``/dev/ublkbN``.

ublk (drivers/block/ublk_drv.c, include/uapi/linux/ublk_cmd.h) hands block requests to
a user-space server over io_uring (IORING_OP_URING_CMD): the server fetches a request
per tag, the kernel copies write data into the tag's buffer (and read data out of it on
commit), the server answers with COMMIT_AND_FETCH_REQ. Here each tag's buffer is one of
the virtio device's DMA buffers, so the data moves between the kernel and the device
without passing through Python.

Layers, one module each (bottom to top): spec (the UAPI), control (/dev/ublk-control),
params (the disk's parameters and the request translation), server (one queue's loop),
device (a device's life: add, start, serve, stop, delete; del and list), command (CLI).
"""

from .command import UblkPlan, add_args, prepare, run

__all__ = ["UblkPlan", "add_args", "prepare", "run"]
