"""Host staging buffers for copies' payloads, pooled per device."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

__all__ = ["STAGING_POOL_BYTES", "StagingPool"]

STAGING_POOL_BYTES = 256 * 2**20  # host memory a device keeps in idle staging buffers, at most


class StagingPool:
    """Idle host buffers for copies' payloads, reused so a large copy does not pay for fresh pages
    (page faults, then unmapping) every time. Shared by a device's tenants; bounded in bytes.

    ``allocate(nbytes)`` makes a fresh buffer when none idle fits (a GPU executor passes one that
    pins it, so copies run at full DMA speed); by default an ordinary NumPy array.
    """

    MIN_POOLED = 64 * 1024  # smaller buffers are cheaper to allocate than to look up

    def __init__(self, capacity: int, allocate: Callable[[int], np.ndarray] | None = None) -> None:
        self._capacity = capacity
        self._allocate = allocate
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
            if self._allocate is not None:
                return self._allocate(nbytes).data
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
