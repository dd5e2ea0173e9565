"""Constants from the virtio 1.2 specification, spelled as in the spec and Linux UAPI.

Sections are cited by title: "Split Virtqueues", "Virtqueue Descriptor Table",
"Legacy Interfaces: A Note on PCI Device Layout", "Device Status Field",
"Reserved Feature Bits" and "Block Device".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

import numpy as np

SECTOR_SIZE = 512  # "Block Device": capacity and sector are always in 512-byte units
VIRTIO_BLK_ID_BYTES = 20  # "Block Device: Device Operation": GET_ID answer length
LEGACY_QUEUE_ALIGN = 4096  # "Legacy Interfaces: A Note on Virtqueue Layout"
LEGACY_PFN_SHIFT = 12  # QUEUE_ADDRESS holds the ring's physical address >> 12
MAX_QUEUE_SIZE = 32768  # "Split Virtqueues": queue size is a power of 2, at most 32768


class Feature(IntFlag):
    """Feature bits a legacy device can offer (32 bits: legacy has no high word)."""

    VIRTIO_BLK_F_BARRIER = 1 << 0  # legacy
    VIRTIO_BLK_F_SIZE_MAX = 1 << 1
    VIRTIO_BLK_F_SEG_MAX = 1 << 2
    VIRTIO_BLK_F_GEOMETRY = 1 << 4
    VIRTIO_BLK_F_RO = 1 << 5
    VIRTIO_BLK_F_BLK_SIZE = 1 << 6
    VIRTIO_BLK_F_SCSI = 1 << 7  # legacy
    VIRTIO_BLK_F_FLUSH = 1 << 9
    VIRTIO_BLK_F_TOPOLOGY = 1 << 10
    VIRTIO_BLK_F_CONFIG_WCE = 1 << 11
    VIRTIO_BLK_F_MQ = 1 << 12
    VIRTIO_BLK_F_DISCARD = 1 << 13
    VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14
    VIRTIO_BLK_F_LIFETIME = 1 << 15
    VIRTIO_BLK_F_SECURE_ERASE = 1 << 16
    VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
    VIRTIO_F_ANY_LAYOUT = 1 << 27
    VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
    VIRTIO_RING_F_EVENT_IDX = 1 << 29
    VIRTIO_F_BAD_FEATURE = 1 << 30  # legacy: a device offering it is broken


# Exactly what this driver implements (issue 3, item 5); everything else is refused.
DRIVER_FEATURES = (
    Feature.VIRTIO_BLK_F_SIZE_MAX | Feature.VIRTIO_BLK_F_SEG_MAX | Feature.VIRTIO_BLK_F_GEOMETRY
    | Feature.VIRTIO_BLK_F_RO | Feature.VIRTIO_BLK_F_BLK_SIZE | Feature.VIRTIO_BLK_F_FLUSH
    | Feature.VIRTIO_BLK_F_TOPOLOGY | Feature.VIRTIO_BLK_F_CONFIG_WCE
    | Feature.VIRTIO_BLK_F_DISCARD | Feature.VIRTIO_BLK_F_WRITE_ZEROES
    | Feature.VIRTIO_RING_F_INDIRECT_DESC | Feature.VIRTIO_RING_F_EVENT_IDX)


def feature_names(bits: int) -> list[str]:
    """Names of the set bits, lowest first; unknown bits as ``bit N``."""
    names = []
    for n in range(32):
        if bits >> n & 1:
            try:
                names.append(str(Feature(1 << n).name))
            except ValueError:
                names.append(f"bit {n}")
    return names


class Status(IntFlag):
    """"Device Status Field"."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8  # not used by legacy devices
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class ReqType(IntEnum):
    """"Block Device: Device Operation": the ``type`` of a request header."""

    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13


class BlkStatus(IntEnum):
    """"Block Device: Device Operation": the status byte the device writes last."""

    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1
    VIRTIO_BLK_S_UNSUPP = 2


class DescFlag(IntFlag):
    """"Virtqueue Descriptor Table"."""

    VIRTQ_DESC_F_NEXT = 1
    VIRTQ_DESC_F_WRITE = 2
    VIRTQ_DESC_F_INDIRECT = 4


VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # "The Virtqueue Available Ring"
VIRTQ_USED_F_NO_NOTIFY = 1  # "The Virtqueue Used Ring"
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

# "Packed Virtqueues": the two descriptor flags that carry the wrap counters ("Driver and
# Device Ring Wrap Counters"), and the event suppression flags ("Event Suppression
# Structure Format").
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15


class RingEventFlags(IntEnum):
    """``flags`` of struct pvirtq_event_suppress."""

    RING_EVENT_FLAGS_ENABLE = 0
    RING_EVENT_FLAGS_DISABLE = 1
    RING_EVENT_FLAGS_DESC = 2  # notify at the descriptor in off_wrap (needs EVENT_IDX)


class IsrBit(IntFlag):
    """"ISR status capability" (legacy: register at offset 19, read clears it)."""

    QUEUE = 1
    CONFIG = 2


@dataclass(frozen=True)
class Reg:
    """One legacy register: where it is, how wide, and whether the driver may write it."""

    name: str
    offset: int
    width: int
    writable: bool


class LegacyReg:
    """"Legacy Interfaces: A Note on PCI Device Layout": the BAR0 register block."""

    HOST_FEATURES = Reg("HOST_FEATURES", 0, 4, False)
    GUEST_FEATURES = Reg("GUEST_FEATURES", 4, 4, True)
    QUEUE_ADDRESS = Reg("QUEUE_ADDRESS", 8, 4, True)  # page frame number of the ring
    QUEUE_SIZE = Reg("QUEUE_SIZE", 12, 2, False)
    QUEUE_SELECT = Reg("QUEUE_SELECT", 14, 2, True)
    QUEUE_NOTIFY = Reg("QUEUE_NOTIFY", 16, 2, True)
    DEVICE_STATUS = Reg("DEVICE_STATUS", 18, 1, True)
    ISR_STATUS = Reg("ISR_STATUS", 19, 1, False)
    # Only present when MSI-X is enabled; they push the device config from 20 to 24.
    CONFIG_MSIX_VECTOR = Reg("CONFIG_MSIX_VECTOR", 20, 2, True)
    QUEUE_MSIX_VECTOR = Reg("QUEUE_MSIX_VECTOR", 22, 2, True)


LEGACY_CONFIG_OFFSET = 20
LEGACY_CONFIG_OFFSET_MSIX = 24

# "Block Device: Device configuration layout" (virtio_blk_config up to unused1).
BLK_CONFIG_DTYPE = np.dtype([
    ("capacity", "<u8"),
    ("size_max", "<u4"),
    ("seg_max", "<u4"),
    ("cylinders", "<u2"), ("heads", "u1"), ("sectors", "u1"),  # struct virtio_blk_geometry
    ("blk_size", "<u4"),
    ("physical_block_exp", "u1"), ("alignment_offset", "u1"),  # struct virtio_blk_topology
    ("min_io_size", "<u2"), ("opt_io_size", "<u4"),
    ("writeback", "u1"),
    ("unused0", "u1"),
    ("num_queues", "<u2"),
    ("max_discard_sectors", "<u4"),
    ("max_discard_seg", "<u4"),
    ("discard_sector_alignment", "<u4"),
    ("max_write_zeroes_sectors", "<u4"),
    ("max_write_zeroes_seg", "<u4"),
    ("write_zeroes_may_unmap", "u1"),
    ("unused1", "u1", (3,)),
])
assert BLK_CONFIG_DTYPE.itemsize == 60

# struct virtio_blk_outhdr: type (le32) + reserved/ioprio (le32) + sector (le64).
BLK_OUTHDR_DTYPE = np.dtype([("type", "<u4"), ("reserved", "<u4"), ("sector", "<u8")])
# struct virtio_blk_discard_write_zeroes: sector (le64) + num_sectors (le32) + flags (le32).
BLK_DWZ_DTYPE = np.dtype([("sector", "<u8"), ("num_sectors", "<u4"), ("flags", "<u4")])

# PCI identity of a legacy ("transitional") virtio-blk device: "Legacy Interfaces: A Note
# on PCI Device Discovery": vendor 0x1af4, device 0x1001, subsystem device 2 (block).
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_LEGACY_BLK = 0x1001
VIRTIO_ID_BLOCK = 2
