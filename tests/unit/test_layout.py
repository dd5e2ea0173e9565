"""The legacy split-virtqueue layout ("Split Virtqueues", "Legacy Interfaces: A Note on
Virtqueue Layout") pinned: sizes, field offsets, 4096-aligned used ring."""

import pytest

from virtio_user.ring.split import (DESC_DTYPE, USED_ELEM_DTYPE, avail_dtype, legacy_layout,
                                    used_dtype)


def test_descriptor_and_used_element_sizes() -> None:
    assert DESC_DTYPE.itemsize == 16
    assert [DESC_DTYPE.fields[f][1] for f in ("addr", "len", "flags", "next")] == [0, 8, 12, 14]
    assert USED_ELEM_DTYPE.itemsize == 8
    assert all(DESC_DTYPE.fields[f][0].str[0] in "<|" for f in DESC_DTYPE.names)


@pytest.mark.parametrize("size", [1 << k for k in range(16)])
def test_layout_for_every_power_of_two(size: int) -> None:
    lay = legacy_layout(size)
    a, u = avail_dtype(size), used_dtype(size)
    assert a.itemsize == 2 * (3 + size)  # flags, idx, ring[size], used_event
    assert a.fields["used_event"][1] == 4 + 2 * size
    assert u.itemsize == 6 + 8 * size  # flags, idx, ring[size] of (id, len), avail_event
    assert u.fields["avail_event"][1] == 4 + 8 * size
    assert lay.desc == 0 and lay.avail == 16 * size
    assert lay.used % 4096 == 0
    assert lay.avail + a.itemsize <= lay.used < lay.avail + a.itemsize + 4096
    assert lay.total % 4096 == 0 and lay.total >= lay.used + u.itemsize
    # Linux's vring_size() for the legacy alignment gives the same used-ring end.
    linux = ((16 * size + 2 * (3 + size) + 4095) & ~4095) + 2 * 3 + 8 * size
    assert lay.used + u.itemsize == linux


@pytest.mark.parametrize("size", [0, 3, 100, 65536, -4])
def test_layout_rejects_sizes_that_are_not_powers_of_two(size: int) -> None:
    with pytest.raises(ValueError):
        legacy_layout(size)
