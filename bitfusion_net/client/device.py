"""A leased GPU as the client sees it: memory, copies, kernels, streams and events (async API).

Calls with asynchronous CUDA semantics (launch, memset, copy from host, copy on the device, free,
event record) send a no-reply frame and return once it is queued: their errors are *sticky* and
are raised by the next call that waits for a reply (``synchronize()``, ``mem_get_info()``, ...),
as CUDA reports asynchronous errors.
"""

from __future__ import annotations

import asyncio
import operator
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..protocol import DeviceGrant, InvalidValueError
from ..protocol import messages as m
from .core import ClientCore

Dim3 = int | Sequence[int]


class DevicePtr(int):
    """A device address. ``int(ptr)`` is the address; ``ptr + offset`` is another ``DevicePtr``."""

    def __add__(self, offset: int) -> DevicePtr:
        return DevicePtr(int(self) + int(offset))

    __radd__ = __add__

    def __sub__(self, other: int) -> DevicePtr:  # type: ignore[override]
        return DevicePtr(int(self) - int(other))

    def __repr__(self) -> str:
        return f"DevicePtr(0x{int(self):x})"


def _bytes_view(buffer: Any, *, writable: bool) -> memoryview:
    """A flat byte view of a C-contiguous buffer (numpy array, bytes, bytearray, memoryview)."""
    view = memoryview(buffer)
    if not view.c_contiguous:
        raise InvalidValueError("host buffer must be C-contiguous (use numpy.ascontiguousarray)")
    if writable and view.readonly:
        raise InvalidValueError("host buffer for memcpy_dtoh must be writable")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _dim3(value: Dim3, what: str) -> tuple[int, int, int]:
    try:
        dims = (
            [operator.index(value)]
            if not isinstance(value, Sequence)
            else list(map(operator.index, value))
        )
    except TypeError:
        dims = []
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise InvalidValueError(
            f"{what} must be a positive int or 1-3 positive ints, got {value!r}"
        )
    dims += [1] * (3 - len(dims))
    return dims[0], dims[1], dims[2]


def _check_arg(code: str) -> Callable[[Any], bool]:
    if code == "P":
        return lambda v: not isinstance(v, (bool, float)) and hasattr(v, "__index__")
    if code in "fd":
        return lambda v: isinstance(v, (int, float)) or hasattr(v, "__float__")
    return lambda v: not isinstance(v, (bool, float)) and hasattr(v, "__index__")


_TYPE_NAMES = {
    "b": "int8", "B": "uint8", "h": "int16", "H": "uint16", "i": "int32", "I": "uint32",
    "q": "int64", "Q": "uint64", "f": "float32", "d": "float64", "P": "device pointer",
}  # fmt: skip


@dataclass(frozen=True)
class TenantStats:
    """This lease's account on its GPU, as the server measured it."""

    device_time: float  # seconds of device time its work used
    queue_wait: float  # seconds its work waited for the device, summed over operations
    operations: int  # operations run: kernels, copies, memsets, ...
    kernels: int  # kernels launched
    memory_used: int  # bytes allocated now
    memory_high_water: int  # most bytes allocated at once


class Stream:
    """A device stream: work on one stream runs in order; different streams may interleave."""

    def __init__(self, device: RemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    async def synchronize(self) -> None:
        await self.device._core.request(m.StreamSynchronize(self.device.index, self.handle))

    async def destroy(self) -> None:
        await self.device._core.post(m.StreamDestroy(self.device.index, self.handle))


class Event:
    """A marker in a stream: ``record`` it, ``synchronize`` on it, time between two of them."""

    def __init__(self, device: RemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    async def record(self, stream: Stream | None = None) -> None:
        handle = stream.handle if stream is not None else 0
        await self.device._core.post(m.EventRecord(self.device.index, self.handle, handle))

    async def synchronize(self) -> None:
        await self.device._core.request(m.EventSynchronize(self.device.index, self.handle))

    async def elapsed_ms(self, end: Event) -> float:
        """Device time in milliseconds from this event to ``end``."""
        reply = await self.device._core.request(
            m.EventElapsed(self.device.index, self.handle, end.handle)
        )
        return float(reply.milliseconds)

    async def destroy(self) -> None:
        await self.device._core.post(m.EventDestroy(self.device.index, self.handle))


class Function:
    """A kernel that can be launched; its argument types are declared (struct codes, P = pointer)."""

    def __init__(self, device: RemoteDevice, name: str, handle: int, arg_types: str) -> None:
        self.device = device
        self.name = name
        self.handle = handle
        self.arg_types = arg_types
        self._struct = struct.Struct(m.kernel_args_format(arg_types))
        self._checks = [_check_arg(code) for code in arg_types]

    def pack_args(self, args: Sequence[Any]) -> bytes:
        """The kernel's arguments as the wire carries them; raises on a count or type mismatch."""
        if len(args) != len(self.arg_types):
            raise TypeError(
                f"{self.name} takes {len(self.arg_types)} argument(s) ({self.arg_types}), "
                f"got {len(args)}"
            )
        for position, (check, value) in enumerate(zip(self._checks, args, strict=True)):
            if not check(value):
                code = self.arg_types[position]
                raise TypeError(
                    f"argument {position} of {self.name} must be {_TYPE_NAMES[code]} ({code}), "
                    f"got {type(value).__name__}"
                )
        try:
            return self._struct.pack(*args)
        except struct.error as exc:
            raise InvalidValueError(f"arguments of {self.name}: {exc}") from None

    async def launch(
        self,
        grid: Dim3,
        block: Dim3,
        args: Sequence[Any],
        shared_mem: int = 0,
        stream: Stream | None = None,
    ) -> None:
        """Queue the kernel; returns without a round trip. Errors surface at the next synchronising call."""
        await self.device._core.post(self.launch_message(grid, block, args, shared_mem, stream))

    def launch_message(
        self,
        grid: Dim3,
        block: Dim3,
        args: Sequence[Any],
        shared_mem: int = 0,
        stream: Stream | None = None,
    ) -> m.Launch:
        """The LAUNCH frame's metadata; raises here for arguments that do not fit the kernel."""
        return m.Launch(
            self.device.index,
            self.handle,
            _dim3(grid, "grid"),
            _dim3(block, "block"),
            shared_mem,
            stream.handle if stream is not None else 0,
            self.pack_args(args),
        )


class Module:
    """A code module (PTX, cubin, fatbin) loaded on a device."""

    def __init__(self, device: RemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    async def get_function(self, name: str, arg_types: str = "") -> Function:
        """Look up kernel ``name``; ``arg_types`` declares its parameters (e.g. ``"PPi"``)."""
        return await self.device._get_function(self.handle, name, arg_types)

    async def unload(self) -> None:
        await self.device._core.post(m.ModuleUnload(self.device.index, self.handle))


class RemoteDevice:
    """One leased GPU (or fraction of one), numbered ``index`` within the session."""

    def __init__(self, core: ClientCore, grant: DeviceGrant, max_payload: int) -> None:
        self._core = core
        self._max_payload = max_payload
        self._builtins: dict[str, Function] = {}
        self.index = grant.index
        self.name = grant.name
        self.executor = grant.executor
        self.total_memory = grant.total_memory
        self.memory_limit = grant.memory_limit
        self.fraction = grant.fraction
        self.weight = grant.weight  # compute weight in fair sharing
        self.mode = "cap" if grant.mode == m.MODE_CAP else "share"
        self.server_gpu = grant.server_gpu

    def __repr__(self) -> str:
        return (
            f"<RemoteDevice {self.index}: {self.name} (server GPU {self.server_gpu}), "
            f"fraction {self.fraction:g} ({self.mode}, weight {self.weight:g}), "
            f"{self.memory_limit} bytes>"
        )

    # -- memory ---------------------------------------------------------------------------------
    async def mem_alloc(self, nbytes: int) -> DevicePtr:
        reply = await self._core.request(m.MemAlloc(self.index, _size(nbytes)))
        return DevicePtr(reply.ptr)

    async def mem_free(self, ptr: int) -> None:
        await self._core.post(m.MemFree(self.index, int(ptr)))

    async def mem_get_info(self) -> tuple[int, int]:
        """(free, total) of this lease: total is the lease's ``memory_limit``."""
        reply = await self._core.request(m.MemGetInfo(self.index))
        return reply.free, reply.total

    async def memcpy_htod(self, dst: int, buffer: Any, stream: Stream | None = None) -> None:
        """Copy a host buffer to the device. Returns once ``buffer`` may be reused (no round trip)."""
        view = _bytes_view(buffer, writable=False)
        handle = stream.handle if stream is not None else 0
        for offset in range(0, len(view), self._max_payload):
            chunk = view[offset : offset + self._max_payload]
            await self._core.post(m.MemcpyHtoD(self.index, int(dst) + offset, handle), chunk)

    async def memcpy_dtoh(self, buffer: Any, src: int, stream: Stream | None = None) -> None:
        """Fill all of ``buffer`` from device memory at ``src``; the bytes land in it directly."""
        view = _bytes_view(buffer, writable=True)
        handle = stream.handle if stream is not None else 0
        requests = [
            self._core.request(
                m.MemcpyDtoH(self.index, int(src) + offset, len(chunk), handle), into=chunk
            )
            for offset in range(0, len(view), self._max_payload)
            for chunk in (view[offset : offset + self._max_payload],)
        ]
        await asyncio.gather(*requests)

    async def memcpy_dtod(
        self, dst: int, src: int, nbytes: int, stream: Stream | None = None
    ) -> None:
        handle = stream.handle if stream is not None else 0
        await self._core.post(m.MemcpyDtoD(self.index, int(dst), int(src), _size(nbytes), handle))

    async def memset_d8(
        self, ptr: int, value: int, nbytes: int, stream: Stream | None = None
    ) -> None:
        await self._memset(ptr, value, 1, nbytes, stream)

    async def memset_d32(
        self, ptr: int, value: int, count: int, stream: Stream | None = None
    ) -> None:
        await self._memset(ptr, value, 4, count, stream)

    async def _memset(
        self, ptr: int, value: int, itemsize: int, count: int, stream: Stream | None
    ) -> None:
        if not 0 <= value < 1 << (8 * itemsize):
            raise InvalidValueError(f"memset value {value} does not fit in {itemsize} byte(s)")
        handle = stream.handle if stream is not None else 0
        await self._core.post(m.Memset(self.index, itemsize, value, int(ptr), _size(count), handle))

    async def synchronize(self) -> None:
        """Wait for all work queued on this device; raises any sticky error from earlier calls."""
        await self._core.request(m.Synchronize(self.index))

    async def stats(self) -> TenantStats:
        """Device time, queue wait, work done and memory of this lease (after earlier calls ran)."""
        reply = await self._core.request(m.TenantStats(self.index))
        return TenantStats(
            reply.device_time_ns / 1e9,
            reply.queue_wait_ns / 1e9,
            reply.operations,
            reply.kernels,
            reply.memory_used,
            reply.memory_high_water,
        )

    # -- code -----------------------------------------------------------------------------------
    async def builtin(self, name: str) -> Function:
        """A kernel of the built-in library (saxpy, fill, gemm, relu, softmax, reduce_sum, busy)."""
        function = self._builtins.get(name)
        if function is None:
            function = self._builtins[name] = await self._get_function(0, name, "")
        return function

    async def module_load(self, image: bytes) -> Module:
        """Load a PTX, cubin or fatbin image (GPU executors only)."""
        view = _bytes_view(image, writable=False)
        if len(view) > self._max_payload:
            raise InvalidValueError(
                f"module image of {len(view)} bytes exceeds {self._max_payload}"
            )
        reply = await self._core.request(m.ModuleLoad(self.index), view)
        return Module(self, reply.module)

    async def _get_function(self, module: int, name: str, arg_types: str) -> Function:
        reply = await self._core.request(m.GetFunction(self.index, module, name, arg_types))
        return Function(self, name, reply.function, reply.arg_types)

    # -- streams and events ---------------------------------------------------------------------
    async def create_stream(self) -> Stream:
        reply = await self._core.request(m.StreamCreate(self.index))
        return Stream(self, reply.handle)

    async def create_event(self) -> Event:
        reply = await self._core.request(m.EventCreate(self.index))
        return Event(self, reply.handle)


def _size(nbytes: int) -> int:
    value = int(nbytes)
    if value < 0:
        raise InvalidValueError(f"size must not be negative, got {value}")
    return value
