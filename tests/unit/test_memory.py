"""DmaRegion segments and the allocator (anonymous memory, made-up bus addresses)."""

import pytest

from virtio_user.errors import DmaError
from virtio_user.memory import DmaAllocator, DmaRegion


def test_segments_split_where_bus_addresses_jump() -> None:
    region = DmaRegion.anonymous(256 << 10, base=0x10_0000, contiguous=64 << 10)
    assert region.segments(0, 4096) == [(0x10_0000, 4096)]
    segs = region.segments(60 << 10, 8 << 10)
    assert segs == [(0x10_0000 + (60 << 10), 4 << 10), (0x10_0000 + (128 << 10), 4 << 10)]
    assert region.offset_of(0x10_0000 + (128 << 10) + 5) == (64 << 10) + 5
    with pytest.raises(KeyError):
        region.offset_of(0x10_0000 + (64 << 10))  # in the gap


def test_segments_split_at_size_max() -> None:
    region = DmaRegion.anonymous(64 << 10, contiguous=64 << 10)
    segs = region.segments(100, 10000, max_seg=4096)
    assert [n for _, n in segs] == [4096, 4096, 1808]
    assert sum(n for _, n in segs) == 10000
    with pytest.raises(DmaError):
        region.segments(60 << 10, 8 << 10)


def test_allocator_aligns_frees_and_coalesces() -> None:
    alloc = DmaAllocator(DmaRegion.anonymous(64 << 10))
    a = alloc.alloc(100, 64)
    b = alloc.alloc(4096, 4096)
    assert a.offset % 64 == 0 and b.offset % 4096 == 0 and b.offset >= a.offset + 100
    assert a.bus == alloc.region.bus(a.offset)
    alloc.free(a)
    alloc.free(b)
    assert alloc.free_bytes == 64 << 10
    assert alloc.alloc(64 << 10, 4096).offset == 0
    with pytest.raises(DmaError):
        alloc.alloc(1, 64)
