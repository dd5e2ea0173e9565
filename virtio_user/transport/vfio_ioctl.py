"""The VFIO ioctls the vfio backend needs, and nothing else (linux/vfio.h).

Every ctypes structure and ioctl number lives here, declared once with the kernel's names;
callers get Python values and ``OSError`` with the errno.
"""

from __future__ import annotations

import ctypes
import fcntl
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + nr): VFIO encodes no size or direction in its numbers."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_region_info(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("cap_offset", ctypes.c_uint32),
                ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("vaddr", ctypes.c_uint64), ("iova", ctypes.c_uint64),
                ("size", ctypes.c_uint64)]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("iova", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("count", ctypes.c_uint32)]


class vfio_irq_set(ctypes.Structure):
    """The fixed part; ``data`` (here: one int32 eventfd per vector) follows it."""
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("start", ctypes.c_uint32),
                ("count", ctypes.c_uint32)]


IoctlArg = ctypes.Structure | ctypes.Array[ctypes.c_char] | ctypes.c_int | int


def _ioctl(fd: int, request: int, arg: IoctlArg) -> int:
    """ioctl through libc: VFIO returns new fds as the call's value, which
    ``fcntl.ioctl`` hides when given a buffer."""
    ptr = ctypes.c_void_p(arg) if isinstance(arg, int) else ctypes.cast(
        ctypes.pointer(arg), ctypes.c_void_p)
    ret: int = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def api_version(container: int) -> int:
    return int(fcntl.ioctl(container, VFIO_GET_API_VERSION))


def has_type1(container: int) -> bool:
    return fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU) > 0


def set_iommu_type1(container: int) -> None:
    fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)


def group_viable(group: int) -> bool:
    st = vfio_group_status(argsz=ctypes.sizeof(vfio_group_status))
    _ioctl(group, VFIO_GROUP_GET_STATUS, st)
    return bool(st.flags & VFIO_GROUP_FLAGS_VIABLE)


def group_set_container(group: int, container: int) -> None:
    _ioctl(group, VFIO_GROUP_SET_CONTAINER, ctypes.c_int(container))


def group_get_device_fd(group: int, bdf: str) -> int:
    return _ioctl(group, VFIO_GROUP_GET_DEVICE_FD, ctypes.create_string_buffer(bdf.encode()))


def region_info(device: int, index: int) -> vfio_region_info:
    info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=index)
    _ioctl(device, VFIO_DEVICE_GET_REGION_INFO, info)
    return info


def map_dma(container: int, vaddr: int, iova: int, size: int) -> None:
    m = vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(vfio_iommu_type1_dma_map),
                                 flags=VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                 vaddr=vaddr, iova=iova, size=size)
    _ioctl(container, VFIO_IOMMU_MAP_DMA, m)


def unmap_dma(container: int, iova: int, size: int) -> None:
    u = vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(vfio_iommu_type1_dma_unmap),
                                   iova=iova, size=size)
    _ioctl(container, VFIO_IOMMU_UNMAP_DMA, u)


def irq_info(device: int, index: int) -> vfio_irq_info:
    """How many vectors of kind ``index`` (INTx, MSI-X) the device has (count 0: none)."""
    info = vfio_irq_info(argsz=ctypes.sizeof(vfio_irq_info), index=index)
    _ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, info)
    return info


def set_irq_eventfds(device: int, index: int, fds: list[int]) -> None:
    """Signal vector i of kind ``index`` on eventfd ``fds[i]``; an empty list tears
    every vector of that kind down (DATA_NONE with count 0)."""
    head = ctypes.sizeof(vfio_irq_set)
    buf = ctypes.create_string_buffer(head + 4 * len(fds))
    flags = VFIO_IRQ_SET_ACTION_TRIGGER | (VFIO_IRQ_SET_DATA_EVENTFD if fds
                                           else VFIO_IRQ_SET_DATA_NONE)
    hdr = vfio_irq_set.from_buffer(buf)
    hdr.argsz, hdr.flags, hdr.index, hdr.start, hdr.count = (
        len(buf), flags, index, 0, len(fds))
    data = (ctypes.c_int32 * len(fds)).from_buffer(buf, head)
    for i, fd in enumerate(fds):
        data[i] = fd
    del data
    del hdr
    _ioctl(device, VFIO_DEVICE_SET_IRQS, buf)


def unmask_intx(device: int) -> None:
    """vfio-pci masks INTx when it fires (level-triggered); unmask for the next one."""
    s = vfio_irq_set(argsz=ctypes.sizeof(vfio_irq_set),
                     flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                     index=VFIO_PCI_INTX_IRQ_INDEX, start=0, count=1)
    _ioctl(device, VFIO_DEVICE_SET_IRQS, s)
