"""virtio_user: a user-space driver for virtio-blk PCI devices (legacy and modern).

``with VirtioBlk.open("0000:00:10.0") as dev: data = dev.read(0, 8)``
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows it)
if TYPE_CHECKING:
    from .blk import Request, VirtioBlk
    from .options import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # re-exported: public API

__all__ = ["Request", "VirtioBlk"]


def __getattr__(name: str) -> object:
    """Import the driver on first use, so ``virtio_user.host`` (the QEMU harness, on the
    host) does not pay for numpy; and even ``options`` only when asked, since under TCG
    each module file costs (``virtio-user --help`` loads this package and three more)."""
    if name == "DEFAULT_TIMEOUT":
        from .options import DEFAULT_TIMEOUT
        return DEFAULT_TIMEOUT
    if name in __all__:
        from . import blk
        return getattr(blk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
