"""The allocation table both executors keep their tenants' memory in."""

from __future__ import annotations

import pytest

from executors.allocations import AllocationTable
from executors.base import ALIGNMENT
from executors.errors import InvalidHandle


def test_interior_pointers_find_their_allocation_and_ranges_must_fit() -> None:
    table: AllocationTable[str] = AllocationTable()
    first = table.add(0x1000, 100, "first")
    table.add(0x2000, 10, "second")
    assert first.charged == ALIGNMENT and first.end == 0x1064
    assert table.find(0x1000, 100) is first
    assert table.find(0x1063, 1) is first
    assert table.find(0x1063, 2) is None  # runs past the end
    assert table.find(0x1064, 0) is None  # one past the end is outside
    assert table.find(0x0FFF, 1) is None
    with pytest.raises(InvalidHandle, match="memset: 8 bytes at 0x1060"):
        table.check_range(0x1060, 8, "memset")
    assert table.check_range(0x2000, 10, "copy").backing == "second"


def test_only_a_start_address_frees_and_the_error_says_which_mistake() -> None:
    table: AllocationTable[None] = AllocationTable()
    allocation = table.add(0x1000, 64, None)
    with pytest.raises(InvalidHandle, match="inside an allocation but not its start"):
        table.at(0x1010)
    with pytest.raises(InvalidHandle, match="is not allocated"):
        table.at(0x5000)
    table.remove(table.at(0x1000))
    assert table.find(0x1000, 1) is None and len(table) == 0
    assert allocation.backing is None


def test_many_allocations_in_any_order() -> None:
    table: AllocationTable[int] = AllocationTable()
    starts = [0x9000, 0x1000, 0x5000, 0x3000, 0x7000]
    for index, start in enumerate(starts):
        table.add(start, 0x800, index)
    for index, start in enumerate(starts):
        found = table.find(start + 0x7FF, 1)
        assert found is not None and found.backing == index
        assert table.find(start + 0x800, 1) is None  # the gaps between them are nobody's
    table.clear()
    assert list(table) == []
