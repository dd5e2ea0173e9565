"""Constants from the virtio 1.2 specification, spelled as in the spec and Linux UAPI.

Sections are cited by title: "Split Virtqueues", "Virtqueue Descriptor Table",
"Legacy Interfaces: A Note on PCI Device Layout", "Device Status Field",
"Reserved Feature Bits", "Block Device", and from "Virtio Over PCI Bus": "Virtio
Structure PCI Capabilities", "Common configuration structure layout" and "Notification
structure layout".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

import numpy as np

SECTOR_SIZE = 512  # "Block Device": capacity and sector are always in 512-byte units
VIRTIO_BLK_ID_BYTES = 20  # "Block Device: Device Operation": GET_ID answer length
LEGACY_QUEUE_ALIGN = 4096  # "Legacy Interfaces: A Note on Virtqueue Layout"
LEGACY_PFN_SHIFT = 12  # QUEUE_ADDRESS holds the ring's physical address >> 12
MAX_QUEUE_SIZE = 32768  # "Split Virtqueues": queue size is a power of 2, at most 32768


class Feature(IntFlag):
    """Feature bits, 64 of them: a legacy device has only the low 32; bits 32 and up
    ("Reserved Feature Bits") exist only on the modern interface."""

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
    VIRTIO_F_VERSION_1 = 1 << 32  # the modern interface; required by it
    VIRTIO_F_ACCESS_PLATFORM = 1 << 33  # the device's DMA goes through the IOMMU
    VIRTIO_F_RING_PACKED = 1 << 34
    VIRTIO_F_IN_ORDER = 1 << 35
    VIRTIO_F_ORDER_PLATFORM = 1 << 36
    VIRTIO_F_SR_IOV = 1 << 37
    VIRTIO_F_NOTIFICATION_DATA = 1 << 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 1 << 39
    VIRTIO_F_RING_RESET = 1 << 40


# Exactly what this driver implements; everything else is refused.
DRIVER_FEATURES = (
    Feature.VIRTIO_BLK_F_SIZE_MAX | Feature.VIRTIO_BLK_F_SEG_MAX | Feature.VIRTIO_BLK_F_GEOMETRY
    | Feature.VIRTIO_BLK_F_RO | Feature.VIRTIO_BLK_F_BLK_SIZE | Feature.VIRTIO_BLK_F_FLUSH
    | Feature.VIRTIO_BLK_F_TOPOLOGY | Feature.VIRTIO_BLK_F_CONFIG_WCE
    | Feature.VIRTIO_BLK_F_DISCARD | Feature.VIRTIO_BLK_F_WRITE_ZEROES
    | Feature.VIRTIO_BLK_F_MQ
    | Feature.VIRTIO_RING_F_INDIRECT_DESC | Feature.VIRTIO_RING_F_EVENT_IDX)


def feature_names(bits: int) -> list[str]:
    """Names of the set bits, lowest first; unknown bits as ``bit N``."""
    names = []
    for n in range(64):
        if bits >> n & 1:
            try:
                name = Feature(1 << n).name  # None for a bit the enum does not name
            except ValueError:
                name = None
            names.append(name or f"bit {n}")
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


class CommonCfg:
    """"Common configuration structure layout" (struct virtio_pci_common_cfg), in the
    memory the COMMON capability points at. 64-bit fields are accessed as two 32-bit
    halves, low first, which the spec allows and devices (QEMU) expect."""

    DEVICE_FEATURE_SELECT = Reg("device_feature_select", 0x00, 4, True)
    DEVICE_FEATURE = Reg("device_feature", 0x04, 4, False)
    DRIVER_FEATURE_SELECT = Reg("driver_feature_select", 0x08, 4, True)
    DRIVER_FEATURE = Reg("driver_feature", 0x0C, 4, True)
    CONFIG_MSIX_VECTOR = Reg("config_msix_vector", 0x10, 2, True)
    NUM_QUEUES = Reg("num_queues", 0x12, 2, False)
    DEVICE_STATUS = Reg("device_status", 0x14, 1, True)
    CONFIG_GENERATION = Reg("config_generation", 0x15, 1, False)
    QUEUE_SELECT = Reg("queue_select", 0x16, 2, True)
    QUEUE_SIZE = Reg("queue_size", 0x18, 2, True)
    QUEUE_MSIX_VECTOR = Reg("queue_msix_vector", 0x1A, 2, True)
    QUEUE_ENABLE = Reg("queue_enable", 0x1C, 2, True)
    QUEUE_NOTIFY_OFF = Reg("queue_notify_off", 0x1E, 2, False)
    QUEUE_DESC = Reg("queue_desc", 0x20, 8, True)  # descriptor area
    QUEUE_DRIVER = Reg("queue_driver", 0x28, 8, True)  # driver area (available ring)
    QUEUE_DEVICE = Reg("queue_device", 0x30, 8, True)  # device area (used ring)


COMMON_CFG_MIN_LENGTH = 0x38  # up to queue_device; 1.2's queue_notify_data/reset are optional
VIRTIO_MSI_NO_VECTOR = 0xFFFF


class PciCapType(IntEnum):
    """"Virtio Structure PCI Capabilities": cfg_type of a vendor capability."""

    VIRTIO_PCI_CAP_COMMON_CFG = 1
    VIRTIO_PCI_CAP_NOTIFY_CFG = 2
    VIRTIO_PCI_CAP_ISR_CFG = 3
    VIRTIO_PCI_CAP_DEVICE_CFG = 4
    VIRTIO_PCI_CAP_PCI_CFG = 5
    VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
    VIRTIO_PCI_CAP_VENDOR_CFG = 9


# struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2] (u8),
# offset (le32), length (le32); struct virtio_pci_notify_cap adds notify_off_multiplier.
VIRTIO_PCI_CAP_DTYPE = np.dtype([
    ("cap_vndr", "u1"), ("cap_next", "u1"), ("cap_len", "u1"), ("cfg_type", "u1"),
    ("bar", "u1"), ("id", "u1"), ("padding", "u1", (2,)),
    ("offset", "<u4"), ("length", "<u4")])
assert VIRTIO_PCI_CAP_DTYPE.itemsize == 16
VIRTIO_PCI_NOTIFY_CAP_LEN = 20  # the above + notify_off_multiplier (le32)
PCI_CAP_ID_VNDR = 0x09
PCI_STATUS = 0x06  # PCI config: status register (le16)
PCI_STATUS_CAP_LIST = 1 << 4
PCI_CAPABILITY_LIST = 0x34  # PCI config: first capability pointer (u8)
PCI_STD_HEADER_SIZEOF = 0x40  # capabilities live after the standard header
PCI_CFG_SPACE_SIZE = 0x100  # the conventional space the capability list lives in
PCI_STD_NUM_BARS = 6

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
# The same header as a struct, for the hot path (packing with numpy costs more).
BLK_OUTHDR = struct.Struct("<IIQ")
assert BLK_OUTHDR.size == BLK_OUTHDR_DTYPE.itemsize == 16

# "Virtqueue Descriptor Table" (split): addr (le64) + len (le32) + flags (le16) + next
# (le16); "Packed Virtqueues" descriptors have the same shape: addr, len, id, flags.
VIRTQ_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"),
                             ("next", "<u2")])
VIRTQ_DESC = struct.Struct("<QIHH")
assert VIRTQ_DESC.size == VIRTQ_DESC_DTYPE.itemsize == 16
# struct virtio_blk_discard_write_zeroes: sector (le64) + num_sectors (le32) + flags (le32).
BLK_DWZ_DTYPE = np.dtype([("sector", "<u8"), ("num_sectors", "<u4"), ("flags", "<u4")])

# PCI identity of a virtio-blk device ("PCI Device Discovery"): vendor 0x1af4; a
# transitional device is 0x1001 with subsystem device 2 (block) ("Legacy Interfaces: A
# Note on PCI Device Discovery"), a modern-only one 0x1040 + 2.
VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_LEGACY_BLK = 0x1001
VIRTIO_ID_BLOCK = 2
VIRTIO_PCI_MODERN_BLK = 0x1040 + VIRTIO_ID_BLOCK
