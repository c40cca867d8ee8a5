"""The PyCUDA executor: a real NVIDIA GPU behind the executor interface.

Isolation: every tenant gets its **own CUDA context** on the GPU, created on its first operation.
Memory one context allocates is not addressable from another, and a kernel fault (an illegal
address, say) makes only the faulting context unusable: that tenant's later calls fail with
``KernelFault`` until it releases its lease (which destroys the context), and its neighbours never
notice.

Accounting: a tenant's memory is what it allocates (rounded up to 256 bytes, as on the NumPy
device) plus what its context and its modules cost the GPU, measured as the drop in the device's
free memory around their creation (``CUDA_MODULE_LOADING=EAGER`` is set before CUDA starts, so a
module's code is resident, and paid for, from the moment it loads). What the driver adds beyond
that (allocations mapped in 2 MiB pages, stacks a launch grows) is not charged: the memory the
executor offers tenants leaves a headroom for it (3 % of the GPU, at least 256 MiB). Copies and
built-in kernels are bounds-checked against the tenant's allocations (and the module globals it
has looked up) before they reach the GPU, with the NumPy device's errors; user kernels run
unchecked, inside their own context.

Time-slicing: all device work goes through the executor's one worker thread, in the fair
scheduler's order, and each operation runs to completion before the next starts: the worker
records CUDA events around it on the tenant's stream and waits for the second. The device is thus
never shared by two tenants' work at once, the scheduler decides every switch, and the time the
worker held the device for a tenant (which includes that tenant's launch overhead, not just its
kernels, so a tenant of many tiny kernels cannot starve the others of throughput) is what the
tenant is charged. The events' own measure of GPU time is kept per tenant as ``gpu_time``.

Because every operation has finished when the worker returns, a tenant's streams all run in one
FIFO (stronger ordering than CUDA promises, and correct), events complete as they are recorded,
and ``synchronize`` has nothing left to wait for.

PyCUDA is imported lazily (``cuda_driver``): this module imports on machines without it.
Kernel arguments are marshalled by ``cuda_kernels``, the built-in library is built and test-loaded
by ``cuda_library``, and the worker's CUDA context stack is ``cuda_contexts``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .allocations import AllocationTable
from .base import (
    ARG_TYPE_CODES,
    BUILTIN_MODULE,
    DeviceProperties,
    FunctionInfo,
    MemoryBudget,
    SerialTenant,
    aligned_size,
    check_launch,
)
from .builtins import Builtin, lookup
from .cuda_build import (
    NvccError,
    NvccNotFound,
    ptx_to_cubin,
)
from .cuda_contexts import ContextStack
from .cuda_driver import (
    GpuUnavailable,
    classify_cuda_error,
    gpu_count,
    gpu_unavailable_reason,
    load_driver,
)
from .cuda_images import image_kind
from .cuda_kernels import Kernel
from .cuda_library import BuiltinLibrary
from .errors import (
    DeviceOutOfMemory,
    InvalidHandle,
    InvalidValue,
    KernelFault,
)
from .ptx import check_arg_types, kernel_params
from .staging import STAGING_POOL_BYTES, StagingArena, StagingPool, return_free_heap
from .worker import WorkerExecutor

__all__ = [
    "GpuUnavailable",
    "PycudaExecutor",
    "PycudaTenant",
    "gpu_count",
    "gpu_unavailable_reason",
    "load_driver",
]

log = logging.getLogger(__name__)

# Device memory kept back from tenants' limits: allocation granularity (the driver maps memory in
# 2 MiB pages) and the per-thread stacks a launch may grow make real use exceed the bytes asked.
HEADROOM_FRACTION = 0.03
MIN_HEADROOM = 256 * 2**20
# Page-locked host memory per GPU for copies' payloads: room for a few full 64 MiB frames at once.
PINNED_STAGING_BYTES = 256 * 2**20
BOUNCE_BYTES = 64 * 2**20  # host memory an overlapping device-to-device copy goes through


@dataclass(eq=False)
class _Module:
    module: Any  # pycuda Module
    charged: int  # device memory its load took
    kernels: dict[str, list[str]] | None  # PTX parameter types by kernel, for PTX modules


class PycudaTenant(SerialTenant):
    """One tenant's CUDA context on a ``PycudaExecutor``.

    Every method but ``staging_buffer``/``return_staging`` and the pure bookkeeping queries
    (``mem_get_info``, the synchronisations) runs on the device's worker thread, which makes the
    tenant's context current first.
    """

    def __init__(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None,
        device: PycudaExecutor,
        budget: MemoryBudget | None = None,
    ) -> None:
        super().__init__(memory_limit, weight, cap, budget)
        self._device = device
        self._context: Any = None
        self._stream: Any = None
        self._timing: tuple[Any, Any] | None = None  # events around every device operation
        self._overhead = 0  # device memory of the context itself
        # Backed by PyCUDA DeviceAllocations: freed explicitly, never by the garbage collector.
        self._allocations: AllocationTable[Any] = AllocationTable()
        # Modules' global variables the tenant has looked up, which its copies and kernels may
        # then address like its allocations (backed by the module's handle; never freed alone).
        self._globals: AllocationTable[int] = AllocationTable()
        self._global_ranges: dict[tuple[int, str], tuple[int, int]] = {}
        self._modules: dict[int, _Module] = {}
        self._builtins_module: int | None = None
        self._functions: dict[int, Kernel] = {}
        self._function_handles: dict[tuple[int, str], int] = {}
        self._recorded: set[int] = set()  # events recorded at least once (self._events: Event)
        self._lost: str | None = None  # why the context is unusable, after a fault
        self._released = False
        self.gpu_time = 0.0  # seconds of GPU time its operations took, by CUDA events

    # -- context --------------------------------------------------------------------------------
    def _activate(self) -> Any:
        """Make this tenant's context current on the worker (creating it the first time)."""
        self._check_alive()
        if self._context is None:
            self._create_context()
        with self._cuda_errors("switching to the tenant's CUDA context"):
            self._device.contexts.make_current(self._context)
        return self._device.cuda

    def _create_context(self) -> None:
        cuda, device = self._device.cuda, self._device
        device.contexts.make_current(device.primary)
        with self._cuda_errors("creating the tenant's CUDA context"):
            free_before = cuda.mem_get_info()[0]
            # make_context takes whatever is current off CUDA's stack before it creates; if
            # creating then fails, that context would be gone from CUDA's stack but not from
            # PyCUDA's. With nothing current there is nothing to lose.
            device.contexts.clear()
            context = device.cuda_device.make_context(cuda.ctx_flags.SCHED_AUTO)
        # make_context pushed it on this thread's stack; record that so make_current stays exact.
        device.contexts.pushed(context)
        try:
            with self._cuda_errors("creating the tenant's CUDA context"):
                self._stream = cuda.Stream()
                self._timing = (cuda.Event(), cuda.Event())
                cost = max(0, free_before - cuda.mem_get_info()[0])
            if not self._fits(cost):
                raise DeviceOutOfMemory(
                    f"out of memory: a CUDA context on this GPU takes {cost} bytes, more than "
                    f"the lease has free ({self._in_use()}); lease a larger fraction"
                )
        except BaseException:
            self._stream = self._timing = None
            device.contexts.destroy(context)
            raise
        self._context = context
        self._overhead = cost
        self._charge(cost)

    @contextmanager
    def _cuda_errors(self, what: str) -> Iterator[None]:
        """Turn PyCUDA's errors into executor errors; remember a lost context."""
        cuda = self._device.cuda
        try:
            yield
        except cuda.Error as exc:
            error, lost = classify_cuda_error(what, str(exc), isinstance(exc, cuda.MemoryError))
            if lost:
                self._lost = str(error)
                raise KernelFault(self._lost) from None
            raise error from None

    def _on_device(self, what: str, work: Callable[[Any], None]) -> None:
        """Run ``work(stream)`` on the GPU between the timing events and wait for it to finish."""
        self._activate()
        assert self._timing is not None
        start, end = self._timing
        with self._cuda_errors(what):
            start.record(self._stream)
            work(self._stream)
            end.record(self._stream)
            end.synchronize()
            self.gpu_time += end.time_since(start) * 1e-3

    # -- host side ------------------------------------------------------------------------------
    def staging_buffer(self, nbytes: int) -> memoryview:
        if nbytes < 0:
            raise InvalidValue(f"staging buffer size must not be negative, got {nbytes}")
        return self._device.staging.take(nbytes)

    def return_staging(self, buffer: memoryview) -> None:
        self._device.staging.give_back(buffer)

    # -- memory ---------------------------------------------------------------------------------
    def _addressable(self, ptr: int, nbytes: int) -> bool:
        """Whether [ptr, ptr + nbytes) lies inside one allocation or one looked-up global."""
        return (
            self._allocations.find(ptr, nbytes) is not None
            or self._globals.find(ptr, nbytes) is not None
        )

    def _check_range(self, ptr: int, nbytes: int, what: str) -> None:
        if self._globals.find(ptr, nbytes) is None:
            self._allocations.check_range(ptr, nbytes, what)

    def mem_alloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise InvalidValue(f"allocation size must be positive, got {nbytes}")
        cuda = self._activate()
        charged = aligned_size(nbytes)
        if not self._fits(charged):
            raise DeviceOutOfMemory(
                f"out of memory: requested {nbytes} bytes ({charged} with alignment), "
                f"{self._in_use()} ({self._overhead} by this tenant's CUDA context, "
                f"{self._module_bytes()} by its modules)"
            )
        with self._cuda_errors("mem_alloc"):
            memory = cuda.mem_alloc(nbytes)
        start = int(memory)
        self._allocations.add(start, nbytes, memory)
        self._charge(charged)
        return start

    def _module_bytes(self) -> int:
        return sum(module.charged for module in self._modules.values())

    def mem_free(self, ptr: int) -> None:
        allocation = self._allocations.at(ptr)
        self._activate()
        with self._cuda_errors("mem_free"):
            allocation.backing.free()
        self._allocations.remove(allocation)
        self._uncharge(allocation.charged)

    def memcpy_htod(self, dst: int, src: memoryview, stream: int) -> None:
        self._check_stream(stream)
        if src.nbytes == 0:
            return
        self._check_range(dst, src.nbytes, "memcpy_htod destination")
        cuda = self._device.cuda
        self._on_device("memcpy_htod", lambda s: cuda.memcpy_htod_async(dst, src, s))

    def memcpy_dtoh(self, dst: memoryview, src: int, stream: int) -> None:
        self._check_stream(stream)
        if dst.readonly:
            raise InvalidValue("memcpy_dtoh: the host destination buffer is read-only")
        if dst.nbytes == 0:
            return
        self._check_range(src, dst.nbytes, "memcpy_dtoh source")
        cuda = self._device.cuda
        self._on_device("memcpy_dtoh", lambda s: cuda.memcpy_dtoh_async(dst, src, s))

    def memcpy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check_stream(stream)
        if nbytes < 0:
            raise InvalidValue(f"memcpy_dtod: size must not be negative, got {nbytes}")
        if nbytes == 0:
            return
        self._check_range(src, nbytes, "memcpy_dtod source")
        self._check_range(dst, nbytes, "memcpy_dtod destination")
        if dst < src + nbytes and src < dst + nbytes:
            self._move_overlapping(dst, src, nbytes, stream)
            return
        cuda = self._device.cuda
        self._on_device("memcpy_dtod", lambda s: cuda.memcpy_dtod_async(dst, src, nbytes, s))

    def _move_overlapping(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Copy between overlapping ranges as memmove does (the NumPy device's semantics; CUDA
        leaves them undefined): through a bounded host buffer, chunk by chunk, starting at the
        end the destination moves away from, so no chunk is overwritten before it is read."""
        chunk = min(nbytes, BOUNCE_BYTES)
        bounce = np.empty(chunk, np.uint8).data
        offsets = range(0, nbytes, chunk)
        for offset in offsets if dst < src else reversed(offsets):
            part = min(chunk, nbytes - offset)
            self.memcpy_dtoh(bounce[:part], src + offset, stream)
            self.memcpy_htod(dst + offset, bounce[:part], stream)

    def memset(self, ptr: int, value: int, itemsize: int, count: int, stream: int) -> None:
        self._check_stream(stream)
        self._check_memset(ptr, itemsize, count)
        if count == 0:
            return
        self._check_range(ptr, count * itemsize, "memset")
        cuda = self._device.cuda
        if itemsize == 1:
            self._on_device("memset", lambda s: cuda.memset_d8_async(ptr, value & 0xFF, count, s))
        elif itemsize == 2:
            self._on_device(
                "memset", lambda s: cuda.memset_d16_async(ptr, value & 0xFFFF, count, s)
            )
        else:
            self._on_device(
                "memset", lambda s: cuda.memset_d32_async(ptr, value & 0xFFFF_FFFF, count, s)
            )

    # -- the device -----------------------------------------------------------------------------
    def device_attributes(self) -> dict[int, int]:
        return dict(self._device.attributes)  # read at start-up: no CUDA call, any thread

    # -- code -----------------------------------------------------------------------------------
    def module_load(self, image: bytes) -> int:
        kind = image_kind(image)  # checks cubin/fatbin sizes: the driver trusts them
        if kind != "ptx":
            return self._load(bytes(image), kind)
        kernels = kernel_params(image.decode("utf-8", "replace"))
        return self._load(self._device.assemble(bytes(image)), kind, kernels)

    def _load(self, image: bytes, kind: str, kernels: dict[str, list[str]] | None = None) -> int:
        cuda = self._activate()
        jit_log: list[str] = []

        def keep_log(success: bool, info: str, error: str) -> None:
            if error:
                jit_log.append(error.strip())

        free_before = cuda.mem_get_info()[0]
        try:
            module = cuda.module_from_buffer(image, message_handler=keep_log)
        except cuda.Error as exc:
            error, lost = classify_cuda_error(
                "module_load", str(exc), isinstance(exc, cuda.MemoryError)
            )
            if lost or isinstance(error, DeviceOutOfMemory):  # the GPU's trouble, not the image's
                with self._cuda_errors("module_load"):
                    raise
            detail = f": {jit_log[0]}" if jit_log else ""
            raise InvalidValue(f"the GPU refused the {kind} module ({exc}){detail}") from None
        cost = max(0, free_before - cuda.mem_get_info()[0])
        if not self._fits(cost):
            del module  # unloaded here, on the worker, with its context current
            raise DeviceOutOfMemory(
                f"out of memory: loading the {kind} module takes {cost} bytes of device memory, "
                f"{self._in_use()}"
            )
        handle = self._new_handle()
        self._modules[handle] = _Module(module, cost, kernels)
        self._charge(cost)
        return handle

    def module_unload(self, module: int) -> None:
        if module == BUILTIN_MODULE:
            raise InvalidHandle("module 0 is the built-in kernel library, which cannot be unloaded")
        if module not in self._modules or module == self._builtins_module:
            raise InvalidHandle(f"module {module} is not loaded")
        self._activate()
        self._unload(module)

    def _unload(self, module: int) -> None:
        entry = self._modules.pop(module)
        for key in [key for key in self._global_ranges if key[0] == module]:
            del self._global_ranges[key]
        for variable in [g for g in self._globals if g.backing == module]:
            self._globals.remove(variable)
        for handle in [h for h, kernel in self._functions.items() if kernel.module == module]:
            del self._functions[handle]
        for key in [key for key in self._function_handles if key[0] == module]:
            del self._function_handles[key]
        # PyCUDA unloads a module when its last reference goes; the functions above were the
        # others, so this is the unload.
        del entry.module
        self._uncharge(entry.charged)

    def module_get_global(self, module: int, name: str) -> tuple[int, int]:
        if module == BUILTIN_MODULE:
            raise InvalidValue(
                f"module 0 (the built-in kernel library) has no global {name!r}: it has no globals"
            )
        if module not in self._modules or module == self._builtins_module:
            raise InvalidHandle(f"module {module} is not loaded")
        known = self._global_ranges.get((module, name))
        if known is not None:
            return known
        cuda = self._activate()
        try:
            ptr, nbytes = self._modules[module].module.get_global(name)
        except cuda.Error as exc:
            error, lost = classify_cuda_error(
                "module_get_global", str(exc), isinstance(exc, cuda.MemoryError)
            )
            if lost:
                with self._cuda_errors("module_get_global"):
                    raise
            raise InvalidValue(f"no global {name!r} in module {module} ({exc})") from None
        found = (int(ptr), int(nbytes))
        self._global_ranges[(module, name)] = found
        if found[1] > 0 and self._globals.find(found[0], found[1]) is None:
            self._globals.add(found[0], found[1], module)
        return found

    def get_function(self, module: int, name: str, arg_types: str | None) -> FunctionInfo:
        builtin: Builtin | None = None
        if module == BUILTIN_MODULE:
            builtin = lookup(name, arg_types)
            arg_types = builtin.arg_types
        elif module not in self._modules or module == self._builtins_module:
            raise InvalidHandle(f"module {module} is not loaded")
        elif not arg_types and (self._modules[module].kernels or {}).get(name) == []:
            arg_types = ""  # PTX shows a kernel without parameters: nothing to declare
        elif not arg_types:
            raise InvalidValue(
                f"declare the argument types of kernel {name!r} (struct codes such as 'iPP': "
                "i int32, q int64, f float32, d float64, P device pointer)"
            )
        elif not set(arg_types) <= ARG_TYPE_CODES:
            raise InvalidValue(
                f"argument types {arg_types!r} of {name!r} use codes outside "
                f"{''.join(sorted(ARG_TYPE_CODES))!r}"
            )
        if builtin is None:
            kernels = self._modules[module].kernels
            if kernels is not None:  # PTX says what the kernel takes: hold the declaration to it
                if name not in kernels:
                    raise InvalidHandle(
                        f"no kernel {name!r} in module {module}; it has "
                        f"{', '.join(sorted(kernels)) or 'none'}"
                    )
                check_arg_types(name, arg_types, kernels[name])
        assert arg_types is not None
        handle = self._function_handles.get((module, name))
        if handle is not None:
            known = self._functions[handle]
            if known.arg_types != arg_types:
                raise InvalidValue(
                    f"kernel {name!r} was declared with arg_types {known.arg_types!r}, "
                    f"not {arg_types!r}"
                )
            return FunctionInfo(handle, arg_types)
        cuda = self._activate()
        source = self._builtins() if builtin is not None else module
        try:
            function = self._modules[source].module.get_function(name)
        except cuda.Error as exc:
            raise InvalidHandle(f"no kernel {name!r} in module {module} ({exc})") from None
        handle = self._new_handle()
        self._functions[handle] = Kernel(function, source, arg_types, builtin)
        self._function_handles[(module, name)] = handle
        return FunctionInfo(handle, arg_types)

    def _builtins(self) -> int:
        """The built-in library's module in this context, loaded the first time it is needed."""
        if self._builtins_module is None:
            image = self._device.builtins_image()
            self._builtins_module = self._load(image, "built-in")
        return self._builtins_module

    def launch(
        self,
        function: int,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: int,
        args: bytes,
    ) -> None:
        kernel = self._functions.get(function)
        if kernel is None:
            raise InvalidHandle(f"launch: function {function} is not one of this tenant's")
        self._check_stream(stream)
        check_launch(self._device.properties, grid, block, shared_mem)
        if len(args) != kernel.wire.size:
            raise InvalidValue(
                f"launch: the kernel takes {kernel.wire.size} bytes of arguments "
                f"({kernel.arg_types!r}), got {len(args)}"
            )
        if kernel.builtin is not None:
            kernel.builtin.check_grid(grid)
            self._check_builtin(kernel.builtin, kernel.wire.unpack(args))
        parameters = kernel.parameters(args)
        if kernel.builtin is not None:
            shared_mem = 0  # the built-ins use none (their static shared memory is their own)
        self.kernels_launched += 1
        self._on_device(
            "launch",
            lambda s: kernel.function._launch_kernel(
                tuple(grid), tuple(block), parameters, shared_mem, s
            ),
        )

    def _check_builtin(self, builtin: Builtin, values: tuple[Any, ...]) -> None:
        """Refuse what the NumPy twin refuses, with its errors, before the GPU sees it."""
        for ptr, nbytes in builtin.check(values):
            if ptr % 4:
                raise KernelFault(f"misaligned address {ptr:#x} for 4-byte float32")
            if not self._addressable(ptr, nbytes):
                raise KernelFault(
                    f"illegal address: {builtin.name} would address {nbytes} bytes at {ptr:#x}, "
                    "which are not inside one of the tenant's allocations"
                )

    # -- streams and events ---------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._released:
            raise InvalidHandle("the tenant is closed")
        if self._lost is not None:
            raise KernelFault(self._lost)

    def event_create(self) -> int:
        cuda = self._activate()
        with self._cuda_errors("event_create"):
            event = cuda.Event()
        handle = self._new_handle()
        self._events[handle] = event
        return handle

    def event_destroy(self, event: int) -> None:
        self._check_event(event)
        del self._events[event]
        self._recorded.discard(event)

    def stream_wait_event(self, stream: int, event: int) -> None:
        self._check_stream(stream)
        self._check_event(event)
        cuda_event = self._events[event]
        self._activate()
        # All of a tenant's work runs on its one CUDA stream and has finished when the worker
        # returns (see the module docstring), so the wait is already satisfied; it is still made,
        # so the GPU is told what the program asked and the event is checked by the driver too.
        with self._cuda_errors("stream_wait_event"):
            self._stream.wait_for_event(cuda_event)

    def event_record(self, event: int, stream: int) -> None:
        self._check_event(event)
        self._check_stream(stream)
        cuda_event = self._events[event]
        self._activate()
        with self._cuda_errors("event_record"):
            cuda_event.record(self._stream)
            cuda_event.synchronize()  # keeps "finished when the worker returns" true
        self._recorded.add(event)

    def event_elapsed_ms(self, start: int, end: int) -> float:
        self._check_event(start)
        self._check_event(end)
        for event in (start, end):
            if event not in self._recorded:
                raise InvalidValue(f"event {event} has never been recorded")
        self._activate()
        with self._cuda_errors("event_elapsed_ms"):
            return float(self._events[end].time_since(self._events[start]))

    def release(self) -> None:
        self._released = True
        context, self._context = self._context, None
        if context is None:
            return
        # Destroying the context frees everything in it at once. The PyCUDA objects dropped
        # afterwards find their context dead and skip their own frees, silently; freeing them
        # first would cost a driver call each, and may fail in a context lost to a fault.
        try:
            self._device.contexts.destroy(context)
        finally:
            self._allocations.clear()
            self._globals.clear()
            self._global_ranges.clear()
            self._functions.clear()
            self._function_handles.clear()
            self._modules.clear()
            self._events.clear()
            self._stream = self._timing = None
            self._uncharge(self.memory_used)


class PycudaExecutor(WorkerExecutor):
    """GPU ``index`` of this host, shared by tenants through one CUDA context each.

    ``memory`` caps the device memory offered to tenants (default: what is free when the executor
    starts, less a headroom for allocation granularity). Raises ``GpuUnavailable`` when there is
    no such GPU.
    """

    def __init__(
        self, index: int = 0, memory: int | None = None, *, scheduling: str = "fair"
    ) -> None:
        cuda = load_driver()
        count = gpu_count()
        if not 0 <= index < count:
            raise GpuUnavailable(f"there is no GPU {index}: CUDA sees {count} GPU(s)")
        self.cuda = cuda
        self.index = index
        self.cuda_device = cuda.Device(index)
        attribute = cuda.device_attribute
        get = self.cuda_device.get_attribute
        self.compute_capability: tuple[int, int] = tuple(self.cuda_device.compute_capability())
        self.primary = self.cuda_device.retain_primary_context()
        self.primary.push()
        try:
            free, total = cuda.mem_get_info()
        finally:
            cuda.Context.pop()
        headroom = max(MIN_HEADROOM, int(total * HEADROOM_FRACTION))
        offered = free - headroom
        if memory is not None:
            offered = min(offered, memory)
        if offered <= 0:
            raise GpuUnavailable(
                f"GPU {index} has only {free} bytes free, less than the {headroom}-byte headroom"
            )
        self.properties = DeviceProperties(
            name=str(self.cuda_device.name()),
            total_memory=offered,
            executor="pycuda",
            max_threads_per_block=get(attribute.MAX_THREADS_PER_BLOCK),
            max_block=(
                get(attribute.MAX_BLOCK_DIM_X),
                get(attribute.MAX_BLOCK_DIM_Y),
                get(attribute.MAX_BLOCK_DIM_Z),
            ),
            max_grid=(
                get(attribute.MAX_GRID_DIM_X),
                get(attribute.MAX_GRID_DIM_Y),
                get(attribute.MAX_GRID_DIM_Z),
            ),
            max_shared_memory_per_block=get(attribute.MAX_SHARED_MEMORY_PER_BLOCK),
        )
        # Every attribute the driver reports, by CUdevice_attribute number: constant, so read
        # once (no context needed) and answered from here. PyCUDA warns for an attribute the
        # driver refuses and leaves it out, which is what the client should see too.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.attributes: dict[int, int] = {
                int(key): int(value) for key, value in self.cuda_device.get_attributes().items()
            }
        self.staging = self._staging_arena(cuda)
        self._jit_warned = False
        self._primary_lock = threading.Lock()  # close() releases the primary context under it
        self.library = BuiltinLibrary(
            cuda, self.primary, self._primary_lock, self.compute_capability, index
        )
        self.contexts = ContextStack(cuda)  # the worker's, used on the worker thread only
        super().__init__(f"cuda-gpu{index}", scheduling)
        log.info(
            "GPU %d: %s, compute capability %d.%d, %d of %d bytes free, %d offered to tenants",
            index,
            self.properties.name,
            *self.compute_capability,
            free,
            total,
            offered,
        )

    completes_synchronously = True  # every operation is waited for (see the module docstring)

    def _staging_arena(self, cuda: Any) -> StagingArena | StagingPool:
        """Page-locked staging memory, so copies run at full DMA speed; ordinary memory if the
        host refuses to pin it (copies still work, more slowly)."""
        pageable = StagingPool(STAGING_POOL_BYTES)
        self.primary.push()  # any context will do for portable memory
        try:
            arena = cuda.pagelocked_empty(
                PINNED_STAGING_BYTES, np.uint8, mem_flags=cuda.host_alloc_flags.PORTABLE
            )
        except cuda.Error as exc:
            log.warning(
                "GPU %d: cannot pin %d bytes of staging memory (%s); copies will use "
                "pageable memory",
                self.index,
                PINNED_STAGING_BYTES,
                exc,
            )
            return pageable
        finally:
            cuda.Context.pop()
        return StagingArena(arena, pageable)

    def _host_memory_idle(self) -> None:
        self.staging.clear()
        return_free_heap()

    def _worker_exiting(self) -> None:
        self.contexts.clear()  # PyCUDA aborts the process if a thread ends with a context current

    # -- tenants' PTX ---------------------------------------------------------------------------
    def assemble(self, ptx: bytes) -> bytes:
        """A tenant's PTX as machine code for this GPU, assembled by ptxas in a subprocess (see
        ``cuda_build.ptx_to_cubin``); the PTX itself, NUL-terminated, for the driver to compile
        if there is no ptxas for this GPU here. ``InvalidValue`` with ptxas's diagnostics if it
        refuses the PTX."""
        major, minor = self.compute_capability
        try:
            return ptx_to_cubin(ptx, f"sm_{major}{minor}")
        except NvccNotFound as exc:
            if not self._jit_warned:
                self._jit_warned = True
                log.warning("GPU %d: %s; tenants' PTX goes to the driver's JIT", self.index, exc)
        except NvccError as exc:
            if "not defined for option 'gpu-name'" in str(exc):
                if not self._jit_warned:  # a GPU newer than this ptxas: the driver knows it
                    self._jit_warned = True
                    log.warning("GPU %d: ptxas cannot target it (%s)", self.index, exc)
            else:
                raise InvalidValue(f"the PTX module does not assemble: {exc}") from None
        return ptx if ptx.endswith(b"\0") else ptx + b"\0"  # the driver reads a C string

    # -- built-in kernels -----------------------------------------------------------------------
    def builtins_image(self) -> bytes:
        """The built-in library for this GPU; ``Unsupported`` saying why if it cannot be had."""
        return self.library.image()

    # -- tenants --------------------------------------------------------------------------------
    def open_tenant(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None = None,
        budget: MemoryBudget | None = None,
    ) -> PycudaTenant:
        budget = self._admit(memory_limit, weight, cap, budget)
        tenant = PycudaTenant(memory_limit, weight, cap, self, budget)
        self._register(tenant)
        return tenant

    def close(self) -> None:
        # The start-up build test-loads the built-ins in the primary context: let it finish
        # before that context goes (nvcc is bounded; its cache makes this quick after a first run).
        self.library.close()
        super().close()  # releases every tenant's context on the worker, then stops it
        with self._primary_lock:  # no start-up test-load can be using the primary context now
            self._release_primary()

    def _release_primary(self) -> None:
        # PyCUDA frees memory from any thread only while its context is current there.
        self.primary.push()
        try:
            if isinstance(self.staging, StagingArena):
                host_allocation: Any = self.staging.arena.base  # pycuda's HostAllocation
                host_allocation.free()
        except Exception:  # noqa: BLE001 - shutting down; nothing depends on it any more
            log.debug("freeing the staging arena failed", exc_info=True)
        finally:
            self.cuda.Context.pop()
        try:
            self.primary.detach()
        except Exception:  # noqa: BLE001 - shutting down; nothing depends on it any more
            log.debug("releasing the primary context failed", exc_info=True)
