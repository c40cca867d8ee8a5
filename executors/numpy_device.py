"""The NumPy reference device: a GPU-like executor for machines without a GPU.

It behaves like a GPU where a client can tell the difference: device memory is a simulated 64-bit
address space with bounds-checked pointers, tenants have hard memory limits, kernels are the
built-in library's NumPy twins, and streams and events exist. It is a reference device for
development, CI and integration tests, not a CUDA emulator, so user modules (PTX, cubin, fatbin)
are refused with an error that names the GPU executors.

Ordering: a tenant's work runs in submission order on the device's one worker thread (tenants
interleaved by the fair scheduler) and each operation finishes before the next starts, so stream ordering, event ordering and ``synchronize`` hold
trivially; streams are kept as handles so that client programs written for GPUs run unchanged.

Pointers: a device address is valid for a tenant only inside one of its own allocations. API calls
given anything else raise ``InvalidHandle``; kernels addressing anything else raise ``KernelFault``.
Stepping outside is always an error, never a crash or a silent read of someone else's bytes.
"""

from __future__ import annotations

import bisect
import threading
import time

import numpy as np
import numpy.typing as npt

from .allocations import AllocationTable
from .base import (
    BUILTIN_MODULE,
    DeviceProperties,
    FunctionInfo,
    MemoryBudget,
    SerialTenant,
    aligned_size,
    check_launch,
)
from .builtins import Builtin, lookup
from .device_attributes import reference_attributes
from .errors import (
    DeviceOutOfMemory,
    InvalidHandle,
    InvalidValue,
    KernelFault,
    Unsupported,
)
from .staging import STAGING_POOL_BYTES, StagingPool, return_free_heap
from .worker import WorkerExecutor

__all__ = ["NumpyExecutor", "NumpyTenant"]

# Device addresses lie where no host pointer can ever be, so that a client (or a layer that takes
# host and device pointers in one argument, as CUDA's unified addressing allows) can tell them
# apart by value. User space ends below 2**47 on x86-64 with 4-level paging, below 2**56 with
# 5-level paging (LA57), and below 2**52 on arm64 (52-bit VA); kernel addresses are the top half
# (bit 63 set). 2**57 is above all of them. Device ``i`` spans [2**57 + i * 2**40, + 2**40), so
# the addresses of every device (``_MAX_DEVICES`` of them) stay below 2**63 and read the same
# to a signed 64-bit reader (a program that keeps a pointer in an int64). This holds for the
# addresses the MMU translates; a *tagged* host pointer (arm64 TBI/MTE, x86 LAM) carries
# metadata in its top bits and may take any value there, so a program that tags pointers must
# strip the tag before comparing (as it must before handing one to CUDA).
_ADDRESS_BASE = 0x0200_0000_0000_0000
_ADDRESS_SPAN = 2**40
_MAX_DEVICES = (2**63 - _ADDRESS_BASE) // _ADDRESS_SPAN


class AddressSpace:
    """One device's simulated virtual address range, shared by all of its tenants.

    Addresses come from a roving next-fit cursor that wraps around: a freed address is not handed
    out again until the cursor has gone round the whole (1 TiB) range, so a use-after-free finds no
    allocation there and fails loudly instead of touching a newer allocation. Sharing one range
    across tenants means another tenant's pointer is never one of yours.
    """

    def __init__(self, base: int, span: int) -> None:
        self._base = base
        self._end = base + span
        self._cursor = base
        self._starts: list[int] = []  # sorted starts of live ranges, parallel to _ends
        self._ends: list[int] = []
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> int:
        """A 256-byte-aligned address with ``nbytes`` free after it."""
        size = aligned_size(nbytes)
        with self._lock:
            address = self._first_fit(self._cursor, size)
            if address is None:
                address = self._first_fit(self._base, size)
            if address is None:
                raise DeviceOutOfMemory(
                    f"device address space exhausted ({nbytes} bytes requested)"
                )
            index = bisect.bisect_left(self._starts, address)
            self._starts.insert(index, address)
            self._ends.insert(index, address + size)
            self._cursor = address + size
            return address

    def unreserve(self, address: int) -> None:
        with self._lock:
            index = bisect.bisect_left(self._starts, address)
            del self._starts[index]
            del self._ends[index]

    def _first_fit(self, start: int, size: int) -> int | None:
        # Live ranges and sizes are all multiples of ALIGNMENT, so every candidate stays aligned.
        index = bisect.bisect_right(self._starts, start)
        candidate = start
        if index > 0 and self._ends[index - 1] > candidate:
            candidate = self._ends[index - 1]
        while index < len(self._starts) and self._starts[index] < candidate + size:
            candidate = max(candidate, self._ends[index])
            index += 1
        return candidate if candidate + size <= self._end else None


class _TenantMemory:
    """The ``KernelMemory`` a launch hands to a built-in: the launching tenant's allocations."""

    def __init__(self, tenant: NumpyTenant) -> None:
        self._tenant = tenant

    def view(self, ptr: int, dtype: npt.DTypeLike, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        if count < 0:
            raise KernelFault(f"illegal address: negative element count {count} at {ptr:#x}")
        if ptr % dt.itemsize:
            raise KernelFault(f"misaligned address {ptr:#x} for {dt.itemsize}-byte {dt.name}")
        found = self._tenant._resolve(ptr, count * dt.itemsize)
        if found is None:
            raise KernelFault(
                f"illegal address: {count} x {dt.name} at {ptr:#x} "
                f"({count * dt.itemsize} bytes) is not inside one of the tenant's allocations"
            )
        return found.view(dt)


class NumpyTenant(SerialTenant):
    """One tenant's context on a ``NumpyExecutor``: its allocations, streams, events, functions.

    Every method but ``staging_buffer`` runs on the device's worker thread, so the tenant's own
    tables need no lock.
    """

    def __init__(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None,
        address_space: AddressSpace,
        properties: DeviceProperties,
        staging: StagingPool,
        budget: MemoryBudget | None = None,
        attributes: dict[int, int] | None = None,
    ) -> None:
        super().__init__(memory_limit, weight, cap, budget)
        self._staging = staging
        self._address_space = address_space
        self._properties = properties
        self._attributes = attributes if attributes is not None else {}
        # Backed by uint8 arrays exactly nbytes long, so a range past nbytes is out of bounds.
        self._allocations: AllocationTable[np.ndarray] = AllocationTable()
        # self._events: handle -> perf_counter() when recorded, or None
        self._functions: dict[int, Builtin] = {}
        self._function_handles: dict[str, int] = {}
        self._released = False
        self._memory = _TenantMemory(self)

    # -- host side ------------------------------------------------------------------------------
    def staging_buffer(self, nbytes: int) -> memoryview:
        if nbytes < 0:
            raise InvalidValue(f"staging buffer size must not be negative, got {nbytes}")
        return self._staging.take(nbytes)

    def return_staging(self, buffer: memoryview) -> None:
        self._staging.give_back(buffer)

    # -- memory ---------------------------------------------------------------------------------
    def _resolve(self, ptr: int, nbytes: int) -> np.ndarray | None:
        """The uint8 bytes [ptr, ptr + nbytes) if they lie inside one allocation, else None."""
        allocation = self._allocations.find(ptr, nbytes)
        if allocation is None:
            return None
        offset = ptr - allocation.start
        return allocation.backing[offset : offset + nbytes]

    def _device_bytes(self, ptr: int, nbytes: int, what: str) -> np.ndarray:
        allocation = self._allocations.check_range(ptr, nbytes, what)
        offset = ptr - allocation.start
        return allocation.backing[offset : offset + nbytes]

    def mem_alloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise InvalidValue(f"allocation size must be positive, got {nbytes}")
        if self._released:  # the executor no longer counts this tenant's limit against the device
            raise InvalidHandle("the tenant is closed")
        charged = aligned_size(nbytes)
        if not self._fits(charged):
            raise DeviceOutOfMemory(
                f"out of memory: requested {nbytes} bytes ({charged} with alignment), "
                f"{self._in_use()}"
            )
        try:
            data = np.empty(nbytes, np.uint8)  # not zeroed: pages stay untouched until written
        except MemoryError:
            raise DeviceOutOfMemory(
                f"out of memory: the host cannot back {nbytes} more bytes of device memory"
            ) from None
        start = self._address_space.reserve(nbytes)
        self._allocations.add(start, nbytes, data)
        self._charge(charged)
        return start

    def mem_free(self, ptr: int) -> None:
        allocation = self._allocations.at(ptr)
        self._allocations.remove(allocation)
        self._address_space.unreserve(ptr)
        self._uncharge(allocation.charged)

    def memcpy_htod(self, dst: int, src: memoryview, stream: int) -> None:
        self._check_stream(stream)
        if src.nbytes == 0:
            return
        self._device_bytes(dst, src.nbytes, "memcpy_htod destination")[:] = np.frombuffer(
            src, np.uint8
        )

    def memcpy_dtoh(self, dst: memoryview, src: int, stream: int) -> None:
        self._check_stream(stream)
        if dst.readonly:
            raise InvalidValue("memcpy_dtoh: the host destination buffer is read-only")
        if dst.nbytes == 0:
            return
        source = self._device_bytes(src, dst.nbytes, "memcpy_dtoh source")
        np.frombuffer(dst, np.uint8)[:] = source

    def memcpy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check_stream(stream)
        if nbytes < 0:
            raise InvalidValue(f"memcpy_dtod: size must not be negative, got {nbytes}")
        if nbytes == 0:
            return
        source = self._device_bytes(src, nbytes, "memcpy_dtod source")
        target = self._device_bytes(dst, nbytes, "memcpy_dtod destination")
        # NumPy detects overlapping views of one allocation and copies through a buffer, so
        # overlapping ranges behave like memmove.
        target[:] = source

    def memset(self, ptr: int, value: int, itemsize: int, count: int, stream: int) -> None:
        self._check_stream(stream)
        self._check_memset(ptr, itemsize, count)
        if count == 0:
            return
        target = self._device_bytes(ptr, count * itemsize, "memset")
        if itemsize == 1:
            target.fill(value & 0xFF)
        elif itemsize == 2:
            target.view(np.uint16).fill(value & 0xFFFF)
        else:
            target.view(np.uint32).fill(value & 0xFFFF_FFFF)

    # -- the device -----------------------------------------------------------------------------
    def device_attributes(self) -> dict[int, int]:
        return dict(self._attributes)  # a copy: the executor's table is every tenant's

    # -- code -----------------------------------------------------------------------------------
    def module_load(self, image: bytes) -> int:
        raise Unsupported(
            "the NumPy reference device runs only the built-in kernels (module 0); "
            "load PTX/cubin/fatbin modules on a GPU executor (--executor pycuda)"
        )

    def module_unload(self, module: int) -> None:
        raise InvalidHandle(
            f"module {module} is not loaded (the NumPy reference device has only the built-ins, "
            "which cannot be unloaded)"
        )

    def module_get_global(self, module: int, name: str) -> tuple[int, int]:
        if module != BUILTIN_MODULE:
            raise InvalidHandle(f"module {module} is not loaded")
        raise InvalidValue(
            f"module 0 (the built-in kernel library) has no global {name!r}: it has no globals"
        )

    def get_function(self, module: int, name: str, arg_types: str | None) -> FunctionInfo:
        if module != BUILTIN_MODULE:
            raise InvalidHandle(f"module {module} is not loaded")
        builtin = lookup(name, arg_types)
        handle = self._function_handles.get(name)
        if handle is None:
            handle = self._function_handles[name] = self._new_handle()
            self._functions[handle] = builtin
        return FunctionInfo(handle, builtin.arg_types)

    def launch(
        self,
        function: int,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: int,
        args: bytes,
    ) -> None:
        builtin = self._functions.get(function)
        if builtin is None:
            raise InvalidHandle(f"launch: function {function} is not one of this tenant's")
        self._check_stream(stream)
        check_launch(self._properties, grid, block, shared_mem)
        builtin.check_grid(grid)
        layout = builtin.layout
        if len(args) != layout.size:
            raise InvalidValue(
                f"launch: {builtin.name} takes {layout.size} bytes of arguments "
                f"({builtin.arg_types!r}), got {len(args)}"
            )
        self.kernels_launched += 1
        # A GPU computes NaN/Inf silently; NumPy's floating-point warnings would only be noise.
        with np.errstate(all="ignore"):
            builtin.run(self._memory, layout.unpack(args))

    # -- streams and events ---------------------------------------------------------------------
    def event_create(self) -> int:
        event = self._new_handle()
        self._events[event] = None
        return event

    def event_destroy(self, event: int) -> None:
        self._check_event(event)
        del self._events[event]

    def event_record(self, event: int, stream: int) -> None:
        self._check_event(event)
        self._check_stream(stream)
        # Everything submitted before has already finished, so "now" is when the stream reaches it.
        self._events[event] = time.perf_counter()

    def event_elapsed_ms(self, start: int, end: int) -> float:
        self._check_event(start)
        self._check_event(end)
        started, ended = self._events[start], self._events[end]
        if started is None or ended is None:
            never = start if started is None else end
            raise InvalidValue(f"event {never} has never been recorded")
        return (ended - started) * 1000.0

    def release(self) -> None:
        self._released = True
        for allocation in self._allocations:
            self._address_space.unreserve(allocation.start)
        self._allocations.clear()
        self._uncharge(self.memory_used)
        self._streams.clear()
        self._events.clear()
        self._functions.clear()
        self._function_handles.clear()


class NumpyExecutor(WorkerExecutor):
    """A NumPy reference device with ``memory`` bytes, shared by tenants with hard memory limits.

    The sum of the open tenants' limits never exceeds the device's memory, so a tenant's limit is
    a guarantee: an allocation within it never fails because a neighbour used the device up.
    """

    def __init__(
        self,
        index: int = 0,
        memory: int = 16 * 2**30,
        name: str = "NumPy reference device",
        *,
        scheduling: str = "fair",
    ) -> None:
        if not 0 <= index < _MAX_DEVICES:
            raise ValueError(f"device index must be in 0..{_MAX_DEVICES - 1}, got {index}")
        if memory <= 0:
            raise ValueError(f"device memory must be positive, got {memory}")
        super().__init__(f"numpy-gpu{index}", scheduling)
        self.index = index
        self.properties = DeviceProperties(name, memory, "numpy")
        self.attributes = reference_attributes(self.properties, index)
        # Each device gets its own 1 TiB range, so a pointer from another device is never valid.
        self._address_space = AddressSpace(_ADDRESS_BASE + index * _ADDRESS_SPAN, _ADDRESS_SPAN)
        self._staging = StagingPool(STAGING_POOL_BYTES)

    completes_synchronously = True  # kernels and copies run to the end on the worker thread

    def _host_memory_idle(self) -> None:
        self._staging.clear()
        return_free_heap()

    def open_tenant(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None = None,
        budget: MemoryBudget | None = None,
    ) -> NumpyTenant:
        budget = self._admit(memory_limit, weight, cap, budget)
        tenant = NumpyTenant(
            memory_limit,
            weight,
            cap,
            self._address_space,
            self.properties,
            self._staging,
            budget,
            self.attributes,
        )
        self._register(tenant)
        return tenant
