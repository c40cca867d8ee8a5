"""Host staging buffers for copies' payloads, pooled per device."""

from __future__ import annotations

import bisect
import threading

import numpy as np

__all__ = ["STAGING_POOL_BYTES", "StagingArena", "StagingPool"]

STAGING_POOL_BYTES = 256 * 2**20  # host memory a device keeps in idle staging buffers, at most


class StagingPool:
    """Idle host buffers for copies' payloads, reused so a large copy does not pay for fresh pages
    (page faults, then unmapping) every time. Shared by a device's tenants; bounded in bytes."""

    MIN_POOLED = 64 * 1024  # smaller buffers are cheaper to allocate than to look up

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._idle: list[np.ndarray] = []
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> memoryview:
        if nbytes >= self.MIN_POOLED:
            with self._lock:
                # The smallest idle buffer that fits, unless it is more than twice too big.
                fits = [i for i, a in enumerate(self._idle) if nbytes <= a.nbytes <= 2 * nbytes]
                if fits:
                    array = self._idle.pop(min(fits, key=lambda i: self._idle[i].nbytes))
                    self._idle_bytes -= array.nbytes
                    return memoryview(array.data)[:nbytes]
        # np.empty does not touch the pages, so asking for a buffer costs nothing until written.
        return np.empty(nbytes, np.uint8).data

    def give_back(self, buffer: memoryview) -> None:
        array = buffer.obj  # the ndarray behind the view that ``take`` handed out
        if not isinstance(array, np.ndarray) or array.nbytes < self.MIN_POOLED:
            return
        with self._lock:
            if self._idle_bytes + array.nbytes <= self._capacity and all(
                a is not array for a in self._idle
            ):
                self._idle.append(array)
                self._idle_bytes += array.nbytes


class StagingArena:
    """Staging buffers carved out of one big host buffer (page-locked on a GPU), with ordinary
    pooled memory once it is full or for small payloads.

    One allocation made up front, rather than one per buffer, because pinning is slow (the
    kernel must lock every page) and because the GPU driver ties pinned memory to a CUDA context
    whose owner must free it: a single arena is freed once, deliberately, when the device closes.
    ``take`` and ``give_back`` are thread-safe and cheap (first fit over a short free list).
    """

    GRANULE = 4096  # buffers start on page boundaries, as DMA engines like

    def __init__(self, arena: np.ndarray, fallback: StagingPool) -> None:
        self.arena = arena
        self._fallback = fallback
        self._base = arena.ctypes.data
        self._free: list[tuple[int, int]] = [(0, arena.nbytes)]  # (offset, size), sorted
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> memoryview:
        if nbytes >= StagingPool.MIN_POOLED:
            size = -(-nbytes // self.GRANULE) * self.GRANULE
            with self._lock:
                for index, (offset, free) in enumerate(self._free):
                    if free >= size:
                        if free == size:
                            del self._free[index]
                        else:
                            self._free[index] = (offset + size, free - size)
                        return memoryview(self.arena.data)[offset : offset + nbytes]
        return self._fallback.take(nbytes)

    def give_back(self, buffer: memoryview) -> None:
        if buffer.obj is not self.arena:
            self._fallback.give_back(buffer)
            return
        offset = np.frombuffer(buffer, np.uint8).ctypes.data - self._base
        size = -(-buffer.nbytes // self.GRANULE) * self.GRANULE
        with self._lock:
            index = bisect.bisect_left(self._free, (offset, 0))
            self._free.insert(index, (offset, size))
            # Merge with the neighbours so that large buffers can be carved again.
            if index + 1 < len(self._free) and offset + size == self._free[index + 1][0]:
                size += self._free.pop(index + 1)[1]
                self._free[index] = (offset, size)
            if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:
                before = self._free.pop(index - 1)
                self._free[index - 1] = (before[0], before[1] + size)

    def idle_bytes(self) -> int:
        """Bytes of the arena not handed out (for tests and reports)."""
        with self._lock:
            return sum(size for _, size in self._free)
