"""``pycuda.driver`` over bitfusion-net: PyCUDA's driver API on the GPUs of a reservation.

Written against PyCUDA's documented API (no PyCUDA code is used): devices, contexts, memory,
copies, memsets, streams, events, modules and kernel calls, with PyCUDA's exception classes.
A "device" is one GPU of the process's session (``bitfusion-net run -n N`` gives it N); its
total memory is what the lease may use. Calls that CUDA runs asynchronously (launches, memsets,
copies from the host, frees) are sent without waiting, and their errors surface at the next call
that waits, as CUDA's do.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

import numpy as np

from ..client import SyncEvent, SyncFunction, SyncModule, SyncRemoteDevice, SyncStream
from . import _args, _context
from ._errors import (
    CompileError,
    Error,
    LaunchError,
    LogicError,
    MemoryError,
    RuntimeError,
    translated,
    translating,
)

__all__ = [
    "ArgumentHandler", "CompileError", "Context", "Device", "DeviceAllocation", "Error",
    "Event", "Function", "In", "InOut", "LaunchError", "LogicError", "MemoryError", "Module",
    "Out", "RuntimeError", "Stream", "aligned_empty", "aligned_zeros", "ctx_flags",
    "device_attribute", "event_flags", "from_device", "from_device_like", "get_driver_version",
    "get_version", "init", "mem_alloc", "mem_alloc_like", "mem_get_info", "memcpy_dtod",
    "memcpy_dtod_async", "memcpy_dtoh", "memcpy_dtoh_async", "memcpy_htod", "memcpy_htod_async",
    "memset_d8", "memset_d8_async", "memset_d16", "memset_d16_async", "memset_d32",
    "memset_d32_async", "module_from_buffer", "module_from_file", "pagelocked_empty",
    "pagelocked_empty_like", "pagelocked_zeros", "pagelocked_zeros_like", "to_device",
]  # fmt: skip

# The CUDA version this layer presents: the toolkit it is built and tested with (its SourceModule
# compiles with the local nvcc; the remote GPU's own driver is the server's business).
CUDA_VERSION = (13, 0, 0)
PAGE = 4096


class device_attribute(IntEnum):  # noqa: N801 - PyCUDA's name
    """``CUdevice_attribute``: the numbers are CUDA's (cuda.h), the names PyCUDA's. The server's
    executors number them the same (``executors.device_attributes``, which this layer may not
    import); tests/pycuda_compat/test_device_attributes.py holds both to cuda.h."""

    MAX_THREADS_PER_BLOCK = 1
    MAX_BLOCK_DIM_X = 2
    MAX_BLOCK_DIM_Y = 3
    MAX_BLOCK_DIM_Z = 4
    MAX_GRID_DIM_X = 5
    MAX_GRID_DIM_Y = 6
    MAX_GRID_DIM_Z = 7
    MAX_SHARED_MEMORY_PER_BLOCK = 8
    TOTAL_CONSTANT_MEMORY = 9
    WARP_SIZE = 10
    MAX_PITCH = 11
    MAX_REGISTERS_PER_BLOCK = 12
    CLOCK_RATE = 13
    TEXTURE_ALIGNMENT = 14
    GPU_OVERLAP = 15
    MULTIPROCESSOR_COUNT = 16
    KERNEL_EXEC_TIMEOUT = 17
    INTEGRATED = 18
    CAN_MAP_HOST_MEMORY = 19
    COMPUTE_MODE = 20
    CONCURRENT_KERNELS = 31
    ECC_ENABLED = 32
    PCI_BUS_ID = 33
    PCI_DEVICE_ID = 34
    TCC_DRIVER = 35
    MEMORY_CLOCK_RATE = 36
    GLOBAL_MEMORY_BUS_WIDTH = 37
    L2_CACHE_SIZE = 38
    MAX_THREADS_PER_MULTIPROCESSOR = 39
    ASYNC_ENGINE_COUNT = 40
    UNIFIED_ADDRESSING = 41
    PCI_DOMAIN_ID = 50
    COMPUTE_CAPABILITY_MAJOR = 75
    COMPUTE_CAPABILITY_MINOR = 76
    STREAM_PRIORITIES_SUPPORTED = 78
    GLOBAL_L1_CACHE_SUPPORTED = 79
    LOCAL_L1_CACHE_SUPPORTED = 80
    MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81
    MAX_REGISTERS_PER_MULTIPROCESSOR = 82
    MANAGED_MEMORY = 83
    MULTI_GPU_BOARD = 84
    MULTI_GPU_BOARD_GROUP_ID = 85
    SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO = 87
    CONCURRENT_MANAGED_ACCESS = 89
    COMPUTE_PREEMPTION_SUPPORTED = 90
    COOPERATIVE_LAUNCH = 95
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
    MAX_BLOCKS_PER_MULTIPROCESSOR = 106


class ctx_flags:  # noqa: N801 - PyCUDA's name
    SCHED_AUTO = 0
    SCHED_SPIN = 1
    SCHED_YIELD = 2
    SCHED_BLOCKING_SYNC = 4
    MAP_HOST = 8
    LMEM_RESIZE_TO_MAX = 16


class event_flags:  # noqa: N801 - PyCUDA's name
    DEFAULT = 0
    BLOCKING_SYNC = 1
    DISABLE_TIMING = 2
    INTERPROCESS = 4


def init(flags: int = 0) -> None:
    """CUDA's ``cuInit``: nothing to do here (the GPUs are attached at their first use)."""
    if flags:
        raise LogicError(f"cuInit takes no flags, got {flags}")


def get_version() -> tuple[int, int, int]:
    return CUDA_VERSION


def get_driver_version() -> int:
    return CUDA_VERSION[0] * 1000 + CUDA_VERSION[1] * 10


# -- devices and contexts ---------------------------------------------------------------------
class Device:
    """One GPU of this program's reservation, by its ordinal (0..count()-1)."""

    def __init__(self, ordinal: int) -> None:
        if not isinstance(ordinal, int | np.integer):
            raise LogicError(f"a device is given by its ordinal, got {ordinal!r}")
        self.ordinal = int(ordinal)
        self._remote = _context.device(self.ordinal)
        self._attributes: dict[device_attribute, int] | None = None

    @staticmethod
    def count() -> int:
        return len(_context.session().devices)

    @property
    def remote(self) -> SyncRemoteDevice:
        """The bitfusion-net device it is (for code that wants our API too)."""
        return self._remote

    def name(self) -> str:
        return self._remote.name

    def total_memory(self) -> int:
        """What this program may allocate on it: its lease's memory, not the whole GPU's."""
        return self._remote.memory_limit

    def compute_capability(self) -> tuple[int, int]:
        attributes = self.get_attributes()
        return (
            attributes[device_attribute.COMPUTE_CAPABILITY_MAJOR],
            attributes[device_attribute.COMPUTE_CAPABILITY_MINOR],
        )

    def get_attributes(self) -> dict[device_attribute, int]:
        """Every attribute the server reports (its GPU's own values; the NumPy device's
        documented set), by PyCUDA's names."""
        if self._attributes is None:
            with translated():
                raw = self._remote.attributes()
            known = {int(a) for a in device_attribute}
            self._attributes = {device_attribute(k): v for k, v in raw.items() if k in known}
        return dict(self._attributes)

    def get_attribute(self, attribute: int) -> int:
        try:
            return self.get_attributes()[device_attribute(attribute)]
        except (KeyError, ValueError):
            raise LogicError(
                f"device attribute {attribute!r} is not known for this device"
            ) from None

    def __getattr__(self, name: str) -> int:
        """``dev.max_threads_per_block`` and the like, as PyCUDA offers them."""
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            attribute = device_attribute[name.upper()]
        except KeyError:
            raise AttributeError(f"'Device' object has no attribute {name!r}") from None
        return self.get_attribute(attribute)

    def pci_bus_id(self) -> str:
        attrs = self.get_attributes()
        return (
            f"{attrs.get(device_attribute.PCI_DOMAIN_ID, 0):04x}:"
            f"{attrs.get(device_attribute.PCI_BUS_ID, 0):02x}:"
            f"{attrs.get(device_attribute.PCI_DEVICE_ID, 0):02x}.0"
        )

    def make_context(self, flags: int = 0) -> Context:
        """A new context on this device, made current (pushed) on this thread."""
        context = Context(self)
        context.push()
        return context

    def retain_primary_context(self) -> Context:
        """The device's primary context (not made current: ``push()`` it)."""
        return _primary_contexts.setdefault(self.ordinal, Context(self, primary=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.ordinal == self.ordinal

    def __hash__(self) -> int:
        return hash(("Device", self.ordinal))

    def __repr__(self) -> str:
        return f"<pycuda.driver.Device {self.ordinal} ({self.name()}) over bitfusion-net>"


_primary_contexts: dict[int, Context] = {}


class Context:
    """A context on one device. All contexts of a process share its session; a context only
    says which device this thread's calls go to."""

    def __init__(self, device: Device, primary: bool = False) -> None:
        self._device = device
        self._primary = primary
        self._detached = False

    def push(self) -> None:
        if self._detached:
            raise LogicError("this context was detached")
        _context.stack().append(self)

    @staticmethod
    def pop() -> Context:
        contexts = _context.stack()
        if not contexts:
            raise LogicError("cannot pop: no context is current on this thread")
        return contexts.pop()  # type: ignore[return-value]

    @staticmethod
    def get_current() -> Context | None:
        return _context.current()  # type: ignore[return-value]

    @staticmethod
    def get_device() -> Device:
        return current_context()._device

    @staticmethod
    def synchronize() -> None:
        """Wait for everything this context's device was given (and surface its errors)."""
        with translated():
            current_context()._device.remote.synchronize()

    @staticmethod
    def get_api_version() -> int:
        return get_driver_version()

    def detach(self) -> None:
        """Drop this context: it stops being current wherever this thread had it."""
        contexts = _context.stack()
        while self in contexts:
            contexts.remove(self)
        self._detached = True

    def __repr__(self) -> str:
        kind = "primary context" if self._primary else "context"
        return f"<pycuda.driver.Context: {kind} of device {self._device.ordinal}>"


def current_context() -> Context:
    context = Context.get_current()
    if context is None:
        raise LogicError(
            "no CUDA context is current: 'import pycuda.autoinit' first, or make one with "
            "pycuda.driver.Device(0).make_context()"
        )
    return context


def current_device() -> SyncRemoteDevice:
    return current_context()._device.remote


# -- memory ----------------------------------------------------------------------------------
class DeviceAllocation:
    """Device memory from ``mem_alloc``: ``int(a)`` is its address. Freed by ``free()``, or when
    it is collected."""

    def __init__(self, device: SyncRemoteDevice, ptr: int, nbytes: int) -> None:
        self._ptr, self.size, self.device = int(ptr), nbytes, device
        self._finalizer = weakref.finalize(self, _free_quietly, device, self._ptr)

    def free(self) -> None:
        if self._finalizer.detach() is not None:
            with translated():
                self.device.mem_free(self._ptr)

    def __int__(self) -> int:
        return self._ptr

    __index__ = __int__

    def __add__(self, offset: int) -> int:
        return self._ptr + int(offset)

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"<DeviceAllocation 0x{self._ptr:x}, {self.size} bytes>"


def _free_quietly(device: SyncRemoteDevice, ptr: int) -> None:
    """A collected allocation's memory goes back, unless the session has already closed."""
    if not device._driver.failure:  # noqa: SLF001 - no session, nothing to free
        try:
            device.mem_free(ptr)
        except Exception:  # noqa: BLE001 - collection happens anywhere; never raise from it
            pass


@translating
def mem_alloc(nbytes: int) -> DeviceAllocation:
    device = current_device()
    return DeviceAllocation(device, device.mem_alloc(int(nbytes)), int(nbytes))


def mem_alloc_like(ary: np.ndarray) -> DeviceAllocation:
    return mem_alloc(ary.nbytes)


@translating
def mem_get_info() -> tuple[int, int]:
    """(free, total) of this context's device: its lease's, not the whole GPU's."""
    return current_device().mem_get_info()


def _remote_stream(stream: Stream | None) -> SyncStream | None:
    return stream.remote if stream is not None else None


@translating
def memcpy_htod(dest: Any, src: Any) -> None:
    current_device().memcpy_htod(int(dest), _host(src))


@translating
def memcpy_htod_async(dest: Any, src: Any, stream: Stream | None = None) -> None:
    current_device().memcpy_htod(int(dest), _host(src), _remote_stream(stream))


@translating
def memcpy_dtoh(dest: Any, src: Any) -> None:
    current_device().memcpy_dtoh(dest, int(src))


@translating
def memcpy_dtoh_async(dest: Any, src: Any, stream: Stream | None = None) -> None:
    current_device().memcpy_dtoh(dest, int(src), _remote_stream(stream))


@translating
def memcpy_dtod(dest: Any, src: Any, size: int) -> None:
    current_device().memcpy_dtod(int(dest), int(src), int(size))


@translating
def memcpy_dtod_async(dest: Any, src: Any, size: int, stream: Stream | None = None) -> None:
    current_device().memcpy_dtod(int(dest), int(src), int(size), _remote_stream(stream))


def _memset(itemsize: int) -> tuple[Callable[..., None], Callable[..., None]]:
    def memset(dest: Any, data: int, size: int) -> None:
        _memset_on(current_device(), itemsize, dest, data, size, None)

    def memset_async(dest: Any, data: int, size: int, stream: Stream | None = None) -> None:
        _memset_on(current_device(), itemsize, dest, data, size, _remote_stream(stream))

    memset.__doc__ = f"Set ``size`` {8 * itemsize}-bit values at ``dest`` to ``data``."
    memset_async.__doc__ = memset.__doc__
    return memset, memset_async


def _memset_on(
    device: SyncRemoteDevice,
    itemsize: int,
    dest: Any,
    data: int,
    size: int,
    stream: SyncStream | None,
) -> None:
    setter = {1: device.memset_d8, 2: device.memset_d16, 4: device.memset_d32}[itemsize]
    with translated():
        setter(int(dest), int(data), int(size), stream)


memset_d8, memset_d8_async = _memset(1)
memset_d16, memset_d16_async = _memset(2)
memset_d32, memset_d32_async = _memset(4)


def _host(src: Any) -> Any:
    """A host buffer to copy from: anything with the buffer protocol (numpy arrays included)."""
    if isinstance(src, np.ndarray) and not src.flags.c_contiguous:
        raise LogicError(
            "a host array copied to the device must be contiguous (numpy.ascontiguousarray)"
        )
    return src


def to_device(bf_obj: Any) -> DeviceAllocation:
    """Device memory holding a copy of ``bf_obj`` (a buffer, e.g. a numpy array)."""
    data = memoryview(bf_obj).cast("B")
    allocation = mem_alloc(data.nbytes)
    memcpy_htod(allocation, data)
    return allocation


def from_device(devptr: Any, shape: Any, dtype: Any, order: Any = "C") -> np.ndarray:
    result = np.empty(shape, dtype, order=order)
    memcpy_dtoh(result, devptr)
    return result


def from_device_like(devptr: Any, other_ary: np.ndarray) -> np.ndarray:
    result = np.empty_like(other_ary)
    memcpy_dtoh(result, devptr)
    return result


def aligned_empty(
    shape: Any, dtype: Any = np.float64, order: str = "C", alignment: int = PAGE
) -> np.ndarray:
    """A host array whose data starts at a multiple of ``alignment`` bytes."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * dtype.itemsize + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    data = raw[start : start + count * dtype.itemsize].view(dtype)
    return data.reshape(shape, order=order)  # type: ignore[no-any-return]


def aligned_zeros(
    shape: Any, dtype: Any = np.float64, order: str = "C", alignment: int = PAGE
) -> np.ndarray:
    result = aligned_empty(shape, dtype, order, alignment)
    result.fill(0)
    return result


def pagelocked_empty(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    """A page-aligned host array. The GPU is remote, so nothing is pinned here: the server
    stages copies through its own pinned memory."""
    return aligned_empty(shape, dtype, order)


def pagelocked_zeros(shape: Any, dtype: Any, order: str = "C", mem_flags: int = 0) -> np.ndarray:
    return aligned_zeros(shape, dtype, order)


def pagelocked_empty_like(array: np.ndarray, mem_flags: int = 0) -> np.ndarray:
    return pagelocked_empty(array.shape, array.dtype, "F" if np.isfortran(array) else "C")


def pagelocked_zeros_like(array: np.ndarray, mem_flags: int = 0) -> np.ndarray:
    return pagelocked_zeros(array.shape, array.dtype, "F" if np.isfortran(array) else "C")


# -- In, Out, InOut ---------------------------------------------------------------------------
class ArgumentHandler:
    """A host array passed to a kernel call, copied to the device around it."""

    copy_in = False
    copy_out = False

    def __init__(self, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise LogicError(f"{type(self).__name__} takes a contiguous numpy array")
        self.array = array
        self._allocation: DeviceAllocation | None = None

    def device_pointer(self) -> int:
        if self._allocation is None:
            self._allocation = mem_alloc(max(1, self.array.nbytes))
        return int(self._allocation)

    def pre_call(self, stream: Stream | None) -> None:
        self.device_pointer()
        if self.copy_in:
            memcpy_htod_async(self._allocation, self.array, stream)

    def post_call(self, stream: Stream | None) -> None:
        assert self._allocation is not None
        if self.copy_out:
            memcpy_dtoh_async(self.array, self._allocation, stream)
        self._allocation.free()
        self._allocation = None


class In(ArgumentHandler):
    copy_in = True


class Out(ArgumentHandler):
    copy_out = True


class InOut(ArgumentHandler):
    copy_in = copy_out = True


# -- streams and events -----------------------------------------------------------------------
class Stream:
    """A CUDA stream of the current context's device."""

    def __init__(self, flags: int = 0) -> None:
        with translated():
            self.remote: SyncStream = current_device().create_stream()
        self.handle = self.remote.handle

    @translating
    def synchronize(self) -> None:
        self.remote.synchronize()

    @translating
    def is_done(self) -> bool:
        return self.remote.query()

    @translating
    def wait_for_event(self, event: Event) -> None:
        self.remote.wait_event(event.remote)


class Event:
    """A CUDA event of the current context's device."""

    def __init__(self, flags: int = 0) -> None:
        with translated():
            self.remote: SyncEvent = current_device().create_event()
        self.handle = self.remote.handle

    @translating
    def record(self, stream: Stream | None = None) -> Event:
        self.remote.record(_remote_stream(stream))
        return self

    @translating
    def synchronize(self) -> Event:
        self.remote.synchronize()
        return self

    @translating
    def query(self) -> bool:
        return self.remote.query()

    @translating
    def time_since(self, event: Event) -> float:
        """Milliseconds from ``event`` to this one."""
        return event.remote.elapsed_ms(self.remote)

    @translating
    def time_till(self, event: Event) -> float:
        """Milliseconds from this event to ``event``."""
        return self.remote.elapsed_ms(event.remote)


# -- modules and kernels ----------------------------------------------------------------------
class Module:
    """Kernels loaded on the current context's device (``module_from_buffer``), or the
    server's built-in kernels (``bitfusion_net.pycuda_compat.builtin``)."""

    def __init__(self, device: SyncRemoteDevice, remote: SyncModule | None) -> None:
        self.device = device
        self.remote = remote  # None: the built-in kernels

    def get_function(self, name: str) -> Function:
        return Function(self, name)

    @translating
    def get_global(self, name: str) -> tuple[int, int]:
        """(address, size in bytes) of the module's global variable ``name``."""
        if self.remote is None:
            raise LogicError(f"the built-in kernels have no global {name!r}")
        return self.remote.get_global(name)


@translating
def module_from_buffer(buffer: Any, options: Any = None, message_handler: Any = None) -> Module:
    """Load a cubin, fatbin or PTX image onto the current context's device. The NumPy
    reference device loads none: the server says it needs a GPU executor."""
    device = current_device()
    return Module(device, device.module_load(bytes(buffer)))


def module_from_file(filename: str | os.PathLike[str]) -> Module:
    with open(filename, "rb") as image:
        return module_from_buffer(image.read())


class Function:
    """A kernel: call it PyCUDA's way (numpy scalars, allocations, ``In``/``Out``), or
    ``prepare`` it with its parameter types and use the ``prepared_*`` calls."""

    def __init__(self, module: Module, name: str) -> None:
        self.module = module
        self.name = name
        self._remote: dict[str, SyncFunction] = {}  # by parameter types
        self._prepared: str | None = None
        self._block: tuple[int, int, int] | None = None
        self._shared = 0

    def _resolve(self, codes: str) -> SyncFunction:
        """The remote kernel for arguments of these types (its handle asked for once)."""
        function = self._remote.get(codes)
        if function is None:
            with translated():
                if self.module.remote is None:
                    function = self.module.device.builtin(self.name)
                else:
                    function = self.module.remote.get_function(self.name, codes)
            if _interchangeable(function.arg_types) != _interchangeable(codes):
                raise TypeError(
                    f"{self.name} takes ({function.arg_types}), called with ({codes}); pass "
                    "numpy scalars of its parameter types"
                )
            self._remote[codes] = function
        return function

    def __call__(
        self,
        *args: Any,
        block: Sequence[int] | None = None,
        grid: Sequence[int] = (1, 1),
        shared: int = 0,
        stream: Stream | None = None,
        time_kernel: bool = False,
        texrefs: Sequence[Any] = (),
    ) -> float | None:
        if block is None:
            raise ValueError("a kernel call needs block=(x, y, z)")
        if texrefs:
            raise LogicError("texture references are not supported over bitfusion-net")
        handlers = [a for a in args if isinstance(a, ArgumentHandler)]
        for handler in handlers:
            handler.pre_call(stream)
        codes, values = _args.typed(args)
        function = self._resolve(codes)
        elapsed = self._launch(function, grid, block, values, shared, stream, time_kernel)
        for handler in handlers:
            handler.post_call(stream)
        if handlers and not time_kernel:
            Context.synchronize()  # as PyCUDA does: the kernel's errors surface at this call
        return elapsed

    def prepare(
        self,
        arg_types: Any,
        block: Sequence[int] | None = None,
        shared: int | None = None,
        texrefs: Sequence[Any] = (),
    ) -> Function:
        self._prepared = _args.prepared_types(arg_types)
        self._resolve(self._prepared)
        if block is not None:
            self._block = _dim3(block)
        if shared is not None:
            self._shared = shared
        return self

    def _prepared_launch(
        self,
        grid: Sequence[int],
        block: Sequence[int] | None,
        args: Sequence[Any],
        shared_size: int,
        stream: Stream | None,
        timed: bool,
    ) -> float | None:
        if self._prepared is None:
            raise LogicError(f"{self.name}: call prepare() before the prepared_* calls")
        values = _args.prepared_values(self._prepared, args)
        block = block if block is not None else self._block
        if block is None:
            raise ValueError("a prepared call needs its block")
        function = self._resolve(self._prepared)
        return self._launch(
            function, grid, block, values, shared_size or self._shared, stream, timed
        )

    def prepared_call(
        self, grid: Sequence[int], block: Sequence[int], *args: Any, shared_size: int = 0
    ) -> None:
        self._prepared_launch(grid, block, args, shared_size, None, False)

    def prepared_async_call(
        self,
        grid: Sequence[int],
        block: Sequence[int],
        stream: Stream | None,
        *args: Any,
        shared_size: int = 0,
    ) -> None:
        self._prepared_launch(grid, block, args, shared_size, stream, False)

    def prepared_timed_call(
        self, grid: Sequence[int], block: Sequence[int], *args: Any, shared_size: int = 0
    ) -> Callable[[], float]:
        """Launch now; the returned function gives the kernel's time in seconds."""
        seconds = self._prepared_launch(grid, block, args, shared_size, None, True)
        assert seconds is not None
        return lambda: seconds

    @staticmethod
    def _launch(
        function: SyncFunction,
        grid: Sequence[int],
        block: Sequence[int],
        values: list[Any],
        shared: int,
        stream: Stream | None,
        timed: bool,
    ) -> float | None:
        start = end = None
        if timed:
            start, end = Event(), Event()
            start.record(stream)
        with translated():
            function.launch(_dim3(grid), _dim3(block), values, shared, _remote_stream(stream))
        if start is None or end is None:
            return None
        end.record(stream)
        end.synchronize()
        return end.time_since(start) * 1e-3


def _interchangeable(codes: str) -> str:
    """Parameter types as the kernel sees them: a pointer is a 64-bit integer (PyCUDA programs
    pass ``numpy.intp`` for pointers), whatever its sign."""
    return codes.translate(str.maketrans("PqQ", "QQQ"))


def _dim3(value: Sequence[int]) -> tuple[int, int, int]:
    dims = [int(v) for v in value]
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"a grid or block has 1 to 3 dimensions, got {value!r}")
    dims += [1] * (3 - len(dims))
    return dims[0], dims[1], dims[2]
