"""Serving a VirtioBlk to the kernel's nbd driver: the disk becomes ``/dev/nbdN``.

As SPDK's lib/nbd does, there is no network: one end of a socketpair goes to the kernel
with the nbd ioctls (include/uapi/linux/nbd.h), the other end is served here, in this
process. The kernel speaks the NBD transmission phase with simple replies (the NBD
protocol, doc/proto.md, "Transmission phase"); each request becomes one or more
virtqueue requests through ``VirtioBlk.submit``/``reap``, so many are on the device at
once, and replies go back as completions arrive, in any order.

Layers, one module each (bottom to top): the wire (constants and the two structs),
``KernelNbd`` (the ioctls and the thread that blocks in NBD_DO_IT), ``NbdServer`` (the
protocol loop over the socket and the queue), the CLI glue (``add_args``, ``prepare``,
``run``: a server in the background, ``-d``).
"""

from __future__ import annotations

from .wire import (Cmd, CmdFlag, Flag, Ioctl, NbdRequest, REPLY, REQUEST, REQUEST_MAGIC,
                   SIMPLE_REPLY_MAGIC, pack_reply, parse_request, transmission_flags)
from ..daemon import process_alive
from .kernel import (DISCONNECT_TIMEOUT, KERNEL_TIMEOUT, KernelNbd, READY_TIMEOUT,
                     disconnect, nbd_name, server_pid)
from .server import (BUFFER_BYTES, DISC_GRACE, MAX_BUFFERS, MAX_HELD, MAX_JOBS,
                     MAX_REQUEST, NbdServer, RING_LOOKS, RX_BYTES, SOCKET_BYTES,
                     SOCKET_LOOKS, SPARE_BYTES, TICK, grow_buffers)
from .command import NbdPlan, add_args, prepare, run

__all__ = ['BUFFER_BYTES', 'Cmd', 'CmdFlag', 'DISCONNECT_TIMEOUT', 'DISC_GRACE', 'Flag',
           'Ioctl', 'KERNEL_TIMEOUT', 'KernelNbd', 'MAX_BUFFERS', 'MAX_HELD',
           'MAX_JOBS', 'MAX_REQUEST', 'NbdPlan', 'NbdRequest', 'NbdServer',
           'READY_TIMEOUT', 'REPLY', 'REQUEST', 'REQUEST_MAGIC', 'RING_LOOKS',
           'RX_BYTES', 'SIMPLE_REPLY_MAGIC', 'SOCKET_BYTES', 'SOCKET_LOOKS',
           'SPARE_BYTES', 'TICK', 'add_args', 'disconnect', 'grow_buffers', 'nbd_name',
           'pack_reply', 'parse_request', 'prepare', 'process_alive', 'run',
           'server_pid', 'transmission_flags']
