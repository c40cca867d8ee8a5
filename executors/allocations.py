"""A tenant's allocations: interval lookup of interior pointers, charging and freeing, range checks.

Both executors keep their tenants' device memory in one of these; what backs an allocation (a NumPy
array, a PyCUDA ``DeviceAllocation``) is theirs. A pointer anywhere inside an allocation finds it
(pointer arithmetic works); anything else is ``InvalidHandle``, never a crash.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .base import aligned_size
from .errors import InvalidHandle

B = TypeVar("B")


@dataclass(eq=False)
class Allocation(Generic[B]):
    start: int
    nbytes: int
    charged: int  # nbytes rounded up to ALIGNMENT: what the tenant's quota pays
    backing: B  # what holds the bytes (exactly nbytes of them)

    @property
    def end(self) -> int:
        return self.start + self.nbytes


class AllocationTable(Generic[B]):
    """One tenant's allocations by start address (used from one thread: the device worker's)."""

    def __init__(self) -> None:
        self._starts: list[int] = []  # sorted, for bisect lookups of interior pointers
        self._by_start: dict[int, Allocation[B]] = {}

    def __len__(self) -> int:
        return len(self._by_start)

    def __iter__(self) -> Iterator[Allocation[B]]:
        return iter(self._by_start.values())

    def find(self, ptr: int, nbytes: int) -> Allocation[B] | None:
        """The allocation [ptr, ptr + nbytes) lies inside, or None."""
        index = bisect.bisect_right(self._starts, ptr) - 1
        if index < 0:
            return None
        allocation = self._by_start[self._starts[index]]
        if ptr - allocation.start >= allocation.nbytes or ptr + nbytes > allocation.end:
            return None
        return allocation

    def check_range(self, ptr: int, nbytes: int, what: str) -> Allocation[B]:
        """``find``, or ``InvalidHandle`` naming ``what`` tried to touch the range."""
        allocation = self.find(ptr, nbytes)
        if allocation is None:
            raise InvalidHandle(
                f"{what}: {nbytes} bytes at {ptr:#x} are not inside "
                "one of this tenant's allocations"
            )
        return allocation

    def add(self, start: int, nbytes: int, backing: B) -> Allocation[B]:
        allocation = Allocation(start, nbytes, aligned_size(nbytes), backing)
        bisect.insort(self._starts, start)
        self._by_start[start] = allocation
        return allocation

    def at(self, ptr: int) -> Allocation[B]:
        """The allocation starting at ``ptr`` (what ``mem_free`` takes), or ``InvalidHandle``."""
        allocation = self._by_start.get(ptr)
        if allocation is None:
            inside = self.find(ptr, 0) is not None
            detail = "is inside an allocation but not its start" if inside else "is not allocated"
            raise InvalidHandle(f"mem_free: {ptr:#x} {detail}")
        return allocation

    def remove(self, allocation: Allocation[B]) -> None:
        del self._by_start[allocation.start]
        del self._starts[bisect.bisect_left(self._starts, allocation.start)]

    def clear(self) -> None:
        self._by_start.clear()
        self._starts.clear()
