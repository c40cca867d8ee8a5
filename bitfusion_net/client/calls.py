"""What every API call sends and how its reply reads, written once for both APIs.

Each call is a *plan*: a generator that yields what to send (a ``Call``, or a tuple of them to be
pipelined) and receives what came back (the reply message, or the request id of a no-reply call),
then returns the call's result. The async API runs plans with ``await driver.run(plan)``, the
blocking API with ``driver.run(plan)``; neither restates what a call does. The hottest call,
a kernel launch, skips the generator: its message goes straight to the driver's ``post``.

Everything a user can get wrong is checked here, before anything is registered or sent, and
raises ``InvalidValueError``.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..protocol import DeviceGrant, InvalidValueError, Request
from ..protocol import messages as m

T = TypeVar("T")
Dim3 = int | Sequence[int]


@dataclass(frozen=True, slots=True)
class Call:
    """One request: its message, the payload sent after it, the buffer its reply's payload
    lands in."""

    message: Request
    payload: memoryview | None = None
    into: memoryview | None = None


# A plan yields a Call (and gets back its reply message, or its request id if it has no reply)
# or a tuple of Calls sent back to back (and gets back a list of those), and returns the result.
Plan = Generator[Call | tuple[Call, ...], Any, T]


class DevicePtr(int):
    """A device address. ``int(ptr)`` is the address; ``ptr + offset`` is another ``DevicePtr``."""

    def __add__(self, offset: int) -> DevicePtr:
        return DevicePtr(int(self) + int(offset))

    __radd__ = __add__

    def __sub__(self, other: int) -> DevicePtr:  # type: ignore[override]
        return DevicePtr(int(self) - int(other))

    def __repr__(self) -> str:
        return f"DevicePtr(0x{int(self):x})"


@dataclass(frozen=True)
class TenantStats:
    """This lease's account on its GPU, as the server measured it."""

    device_time: float  # seconds of device time its work used
    queue_wait: float  # seconds its work waited for the device, summed over operations
    operations: int  # operations run: kernels, copies, memsets, ...
    kernels: int  # kernels launched
    memory_used: int  # bytes allocated now
    memory_high_water: int  # most bytes allocated at once


# -- checks of what the user passes -----------------------------------------------------------------
_U64 = 2**64 - 1


def bytes_view(buffer: Any, *, writable: bool) -> memoryview:
    """A flat byte view of a C-contiguous buffer (numpy array, bytes, bytearray, memoryview)."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise InvalidValueError(
            f"host buffer must support the buffer protocol, got {type(buffer).__name__}"
        ) from None
    if not view.c_contiguous:
        raise InvalidValueError("host buffer must be C-contiguous (use numpy.ascontiguousarray)")
    if writable and view.readonly:
        raise InvalidValueError("host buffer for memcpy_dtoh must be writable")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _integer(value: Any, what: str, low: int = 0, high: int = _U64) -> int:
    if isinstance(value, bool | float):
        raise InvalidValueError(f"{what} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidValueError(f"{what} must be an integer, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise InvalidValueError(f"{what} must be in {low}..{high}, got {number}")
    return number


def size_arg(nbytes: Any, what: str = "size") -> int:
    return _integer(nbytes, what)


def pointer_arg(ptr: Any, what: str = "pointer") -> int:
    """A device pointer travels as a u64 (docs/PROTOCOL.md, section 7)."""
    return _integer(ptr, what)


def dim3(value: Dim3, what: str) -> tuple[int, int, int]:
    try:
        dims = (
            [operator.index(value)]
            if not isinstance(value, Sequence)
            else list(map(operator.index, value))
        )
    except TypeError:
        dims = []
    if not 1 <= len(dims) <= 3 or any(not 1 <= d <= 2**32 - 1 for d in dims):
        raise InvalidValueError(
            f"{what} must be a positive int or 1-3 positive ints (u32), got {value!r}"
        )
    dims += [1] * (3 - len(dims))
    return dims[0], dims[1], dims[2]


def _check_arg(code: str) -> Callable[[Any], bool]:
    if code in "fd":
        return lambda v: isinstance(v, int | float) or hasattr(v, "__float__")
    return lambda v: not isinstance(v, bool | float) and hasattr(v, "__index__")


_TYPE_NAMES = {
    "b": "int8", "B": "uint8", "h": "int16", "H": "uint16", "i": "int32", "I": "uint32",
    "q": "int64", "Q": "uint64", "f": "float32", "d": "float64", "P": "device pointer",
}  # fmt: skip


def kernel_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidValueError(f"a kernel's name is a string, got {type(name).__name__}")
    return name


def stream_handle(stream: Any) -> int:
    return stream.handle if stream is not None else 0


# -- plans --------------------------------------------------------------------------------------
def _one(message: Request) -> Plan[None]:
    """A call whose result is nothing: a no-reply request, or a wait (synchronize)."""
    yield Call(message)


class DeviceCalls:
    """The calls of one leased GPU; ``RemoteDevice`` and ``SyncRemoteDevice`` run them."""

    def __init__(
        self, grant: DeviceGrant, max_payload: int, index: int | None = None, server: str = ""
    ) -> None:
        self._max_payload = max_payload
        # The device's number in the session (0..N-1 across every server of a pool), and its
        # number on its own connection, which the frames carry.
        self.index = grant.index if index is None else index
        self._wire_index = grant.index
        self.server = server  # the address of the server it is on
        self.name = grant.name
        self.executor = grant.executor
        self.total_memory = grant.total_memory
        self.memory_limit = grant.memory_limit
        self.fraction = grant.fraction
        self.weight = grant.weight  # compute weight in fair sharing
        self.mode = "cap" if grant.mode == m.MODE_CAP else "share"
        self.server_gpu = grant.server_gpu
        self._attributes: dict[int, int] | None = None  # asked once: they never change

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.index}: {self.name} (GPU {self.server_gpu} of "
            f"{self.server or 'its server'}), "
            f"fraction {self.fraction:g} ({self.mode}, weight {self.weight:g}), "
            f"{self.memory_limit} bytes>"
        )

    # -- memory ---------------------------------------------------------------------------------
    def _mem_alloc(self, nbytes: int) -> Plan[DevicePtr]:
        reply = yield Call(m.MemAlloc(self._wire_index, size_arg(nbytes)))
        return DevicePtr(reply.ptr)

    def _mem_free(self, ptr: int) -> Plan[None]:
        return _one(m.MemFree(self._wire_index, pointer_arg(ptr)))

    def _mem_get_info(self) -> Plan[tuple[int, int]]:
        reply = yield Call(m.MemGetInfo(self._wire_index))
        return reply.free, reply.total

    def _memcpy_htod(self, dst: int, buffer: Any, stream: Any) -> Plan[None]:
        view = bytes_view(buffer, writable=False)
        dst, handle = pointer_arg(dst, "dst"), stream_handle(stream)
        pointer_arg(dst + len(view), "the copy's end")
        for offset in range(0, len(view), self._max_payload):
            chunk = view[offset : offset + self._max_payload]
            yield Call(m.MemcpyHtoD(self._wire_index, dst + offset, handle), chunk)

    def _memcpy_dtoh(self, buffer: Any, src: int, stream: Any) -> Plan[None]:
        view = bytes_view(buffer, writable=True)
        src, handle = pointer_arg(src, "src"), stream_handle(stream)
        pointer_arg(src + len(view), "the copy's end")
        calls = tuple(
            Call(m.MemcpyDtoH(self._wire_index, src + offset, len(chunk), handle), into=chunk)
            for offset in range(0, len(view), self._max_payload)
            for chunk in (view[offset : offset + self._max_payload],)
        )
        if calls:  # all chunks in flight at once: they pipeline through the server
            yield calls

    def _memcpy_dtod(self, dst: int, src: int, nbytes: int, stream: Any) -> Plan[None]:
        return _one(
            m.MemcpyDtoD(
                self._wire_index,
                pointer_arg(dst, "dst"),
                pointer_arg(src, "src"),
                size_arg(nbytes),
                stream_handle(stream),
            )
        )

    def _memset(self, ptr: int, value: int, itemsize: int, count: int, stream: Any) -> Plan[None]:
        value = _integer(value, f"memset value ({itemsize} byte(s))", 0, (1 << (8 * itemsize)) - 1)
        return _one(
            m.Memset(
                self._wire_index,
                itemsize,
                value,
                pointer_arg(ptr),
                size_arg(count, "count"),
                stream_handle(stream),
            )
        )

    def _synchronize(self) -> Plan[None]:
        return _one(m.Synchronize(self._wire_index))

    def _device_attributes(self) -> Plan[dict[int, int]]:
        if self._attributes is None:
            reply = yield Call(m.DeviceAttributes(self._wire_index))
            self._attributes = reply.as_dict()
        return dict(self._attributes)  # the caller's to change; the cache stays as it came

    def _stats(self) -> Plan[TenantStats]:
        reply = yield Call(m.TenantStats(self._wire_index))
        return TenantStats(
            reply.device_time_ns / 1e9,
            reply.queue_wait_ns / 1e9,
            reply.operations,
            reply.kernels,
            reply.memory_used,
            reply.memory_high_water,
        )

    # -- code -----------------------------------------------------------------------------------
    def _module_load(self, image: bytes) -> Plan[int]:
        view = bytes_view(image, writable=False)
        if len(view) > self._max_payload:
            raise InvalidValueError(
                f"module image of {len(view)} bytes exceeds {self._max_payload}"
            )
        reply = yield Call(m.ModuleLoad(self._wire_index), view)
        return int(reply.module)

    def _get_function(self, module: int, name: str, arg_types: str) -> Plan[tuple[int, str]]:
        if not isinstance(name, str) or not isinstance(arg_types, str):
            raise InvalidValueError("a kernel's name and argument types are strings")
        reply = yield Call(m.GetFunction(self._wire_index, module, name, arg_types))
        return reply.function, reply.arg_types

    def _module_unload(self, module: int) -> Plan[None]:
        return _one(m.ModuleUnload(self._wire_index, module))

    def _module_get_global(self, module: int, name: str) -> Plan[tuple[DevicePtr, int]]:
        if not isinstance(name, str):
            raise InvalidValueError(f"a global's name is a string, got {type(name).__name__}")
        reply = yield Call(m.ModuleGetGlobal(self._wire_index, module, name))
        return DevicePtr(reply.ptr), int(reply.nbytes)

    # -- streams and events ---------------------------------------------------------------------
    def _create_stream(self) -> Plan[int]:
        reply = yield Call(m.StreamCreate(self._wire_index))
        return int(reply.handle)

    def _create_event(self) -> Plan[int]:
        reply = yield Call(m.EventCreate(self._wire_index))
        return int(reply.handle)

    def _stream_synchronize(self, handle: int) -> Plan[None]:
        return _one(m.StreamSynchronize(self._wire_index, handle))

    def _stream_destroy(self, handle: int) -> Plan[None]:
        return _one(m.StreamDestroy(self._wire_index, handle))

    def _stream_query(self, handle: int) -> Plan[bool]:
        reply = yield Call(m.StreamQuery(self._wire_index, handle))
        return bool(reply.done)

    def _stream_wait_event(self, handle: int, event: Any) -> Plan[None]:
        if getattr(event, "device", None) is not self:
            raise InvalidValueError(
                "a stream can wait only for an event of its own device (create_event() on it)"
            )
        return _one(m.StreamWaitEvent(self._wire_index, handle, event.handle))

    def _event_record(self, handle: int, stream: Any) -> Plan[None]:
        return _one(m.EventRecord(self._wire_index, handle, stream_handle(stream)))

    def _event_synchronize(self, handle: int) -> Plan[None]:
        return _one(m.EventSynchronize(self._wire_index, handle))

    def _event_elapsed(self, start: int, end: int) -> Plan[float]:
        reply = yield Call(m.EventElapsed(self._wire_index, start, end))
        return float(reply.milliseconds)

    def _event_destroy(self, handle: int) -> Plan[None]:
        return _one(m.EventDestroy(self._wire_index, handle))

    def _event_query(self, handle: int) -> Plan[bool]:
        reply = yield Call(m.EventQuery(self._wire_index, handle))
        return bool(reply.done)


class KernelCalls:
    """A kernel's declared argument types and how a launch of it is packed (both APIs)."""

    def __init__(self, device_index: int, name: str, handle: int, arg_types: str) -> None:
        self._device_index = device_index
        self.name = name
        self.handle = handle
        self.arg_types = arg_types
        self._struct = struct.Struct(m.kernel_args_format(arg_types))
        self._checks = [_check_arg(code) for code in arg_types]

    def pack_args(self, args: Sequence[Any]) -> bytes:
        """The kernel's arguments as the wire carries them; ``InvalidValueError`` on a count,
        type or range that does not fit its declaration."""
        if isinstance(args, str | bytes) or not isinstance(args, Sequence):
            raise InvalidValueError(f"arguments of {self.name} must be a sequence, got {args!r}")
        if len(args) != len(self.arg_types):
            raise InvalidValueError(
                f"{self.name} takes {len(self.arg_types)} argument(s) ({self.arg_types}), "
                f"got {len(args)}"
            )
        for position, (check, value) in enumerate(zip(self._checks, args, strict=True)):
            if not check(value):
                code = self.arg_types[position]
                raise InvalidValueError(
                    f"argument {position} of {self.name} must be {_TYPE_NAMES[code]} ({code}), "
                    f"got {type(value).__name__}"
                )
        try:
            return self._struct.pack(*args)
        except (struct.error, OverflowError, TypeError, ValueError) as exc:
            raise InvalidValueError(f"arguments of {self.name}: {exc}") from None

    def launch_message(
        self, grid: Dim3, block: Dim3, args: Sequence[Any], shared_mem: int, stream: Any
    ) -> m.Launch:
        """The LAUNCH frame's metadata; raises here for arguments that do not fit the kernel."""
        return m.Launch(
            self._device_index,
            self.handle,
            dim3(grid, "grid"),
            dim3(block, "block"),
            _integer(shared_mem, "shared_mem", 0, 2**32 - 1),
            stream_handle(stream),
            self.pack_args(args),
        )
