"""io_uring through its raw system calls: the UAPI layouts (spec) and one ring (ring)."""

from .uring import Ring, RingError, RingFull, map_readonly, syscall

__all__ = ["Ring", "RingError", "RingFull", "map_readonly", "syscall"]
