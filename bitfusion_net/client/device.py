"""A leased GPU as the async API sees it: memory, copies, kernels, streams and events.

Calls with asynchronous CUDA semantics (launch, memset, copy from host, copy on the device, free,
event record) send a no-reply frame and return once it is queued: their errors are *sticky* and
are raised by the next call that waits for a reply (``synchronize()``, ``mem_get_info()``, ...),
as CUDA reports asynchronous errors. What each call sends is in ``calls``, shared with the
blocking API; the methods here only run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..protocol import DeviceGrant
from .async_driver import AsyncDriver
from .calls import DeviceCalls, DevicePtr, Dim3, KernelCalls, TenantStats, kernel_name

__all__ = ["DevicePtr", "Event", "Function", "Module", "RemoteDevice", "Stream", "TenantStats"]


class Stream:
    """A device stream: work on one stream runs in order; different streams may interleave."""

    def __init__(self, device: RemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    async def synchronize(self) -> None:
        await self.device._run(self.device._stream_synchronize(self.handle))

    async def query(self) -> bool:
        """Whether all work queued on this stream so far has completed (a round trip)."""
        return await self.device._run(self.device._stream_query(self.handle))

    async def wait_event(self, event: Event) -> None:
        """Make work queued on this stream from now on wait until ``event`` has been reached
        (no round trip). ``event`` must be of the same device."""
        await self.device._run(self.device._stream_wait_event(self.handle, event))

    async def destroy(self) -> None:
        await self.device._run(self.device._stream_destroy(self.handle))


class Event:
    """A marker in a stream: ``record`` it, ``synchronize`` on it, time between two of them."""

    def __init__(self, device: RemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    async def record(self, stream: Stream | None = None) -> None:
        await self.device._run(self.device._event_record(self.handle, stream))

    async def synchronize(self) -> None:
        await self.device._run(self.device._event_synchronize(self.handle))

    async def elapsed_ms(self, end: Event) -> float:
        """Device time in milliseconds from this event to ``end``."""
        return await self.device._run(self.device._event_elapsed(self.handle, end.handle))

    async def query(self) -> bool:
        """Whether the event has been reached (True if it was never recorded, as in CUDA)."""
        return await self.device._run(self.device._event_query(self.handle))

    async def destroy(self) -> None:
        await self.device._run(self.device._event_destroy(self.handle))


class Function(KernelCalls):
    """A kernel that can be launched; its argument types are declared (struct codes, P = pointer)."""

    def __init__(self, device: RemoteDevice, name: str, handle: int, arg_types: str) -> None:
        super().__init__(device._wire_index, name, handle, arg_types)
        self.device = device

    async def launch(
        self,
        grid: Dim3,
        block: Dim3,
        args: Sequence[Any],
        shared_mem: int = 0,
        stream: Stream | None = None,
    ) -> None:
        """Queue the kernel; returns without a round trip. Errors surface at the next
        synchronising call; arguments that do not fit raise ``InvalidValueError`` here."""
        await self.device._driver.post(self.launch_message(grid, block, args, shared_mem, stream))


class Module:
    """A code module (PTX, cubin, fatbin) loaded on a device."""

    def __init__(self, device: RemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    async def get_function(self, name: str, arg_types: str = "") -> Function:
        """Look up kernel ``name``; ``arg_types`` declares its parameters (e.g. ``"PPi"``)."""
        return await self.device._function(self.handle, name, arg_types)

    async def get_global(self, name: str) -> tuple[DevicePtr, int]:
        """(device address, size in bytes) of the module's global variable ``name``
        (``__device__`` or ``__constant__``): copy to and from it like an allocation."""
        return await self.device._run(self.device._module_get_global(self.handle, name))

    async def unload(self) -> None:
        await self.device._run(self.device._module_unload(self.handle))


class RemoteDevice(DeviceCalls):
    """One leased GPU (or fraction of one), numbered ``index`` within the session."""

    def __init__(
        self,
        driver: AsyncDriver,
        grant: DeviceGrant,
        max_payload: int,
        index: int | None = None,
        server: str = "",
    ) -> None:
        super().__init__(grant, max_payload, index, server)
        self._driver = driver
        self._run = driver.run
        self._builtins: dict[str, Function] = {}

    # -- memory ---------------------------------------------------------------------------------
    async def mem_alloc(self, nbytes: int) -> DevicePtr:
        return await self._run(self._mem_alloc(nbytes))

    async def mem_free(self, ptr: int) -> None:
        await self._run(self._mem_free(ptr))

    async def mem_get_info(self) -> tuple[int, int]:
        """(free, total) of this lease: total is the lease's ``memory_limit``."""
        return await self._run(self._mem_get_info())

    async def memcpy_htod(self, dst: int, buffer: Any, stream: Stream | None = None) -> None:
        """Copy a host buffer to the device. Returns once ``buffer`` may be reused (no round trip)."""
        await self._run(self._memcpy_htod(dst, buffer, stream))

    async def memcpy_dtoh(self, buffer: Any, src: int, stream: Stream | None = None) -> None:
        """Fill all of ``buffer`` from device memory at ``src``; the bytes land in it directly."""
        await self._run(self._memcpy_dtoh(buffer, src, stream))

    async def memcpy_dtod(
        self, dst: int, src: int, nbytes: int, stream: Stream | None = None
    ) -> None:
        await self._run(self._memcpy_dtod(dst, src, nbytes, stream))

    async def memset_d8(
        self, ptr: int, value: int, nbytes: int, stream: Stream | None = None
    ) -> None:
        await self._run(self._memset(ptr, value, 1, nbytes, stream))

    async def memset_d16(
        self, ptr: int, value: int, count: int, stream: Stream | None = None
    ) -> None:
        """Set ``count`` 16-bit items at ``ptr`` (2-byte aligned) to ``value``."""
        await self._run(self._memset(ptr, value, 2, count, stream))

    async def memset_d32(
        self, ptr: int, value: int, count: int, stream: Stream | None = None
    ) -> None:
        await self._run(self._memset(ptr, value, 4, count, stream))

    async def synchronize(self) -> None:
        """Wait for all work queued on this device; raises any sticky error from earlier calls."""
        await self._run(self._synchronize())

    async def stats(self) -> TenantStats:
        """Device time, queue wait, work done and memory of this lease (after earlier calls ran)."""
        return await self._run(self._stats())

    async def attributes(self) -> dict[int, int]:
        """The device's CUDA attributes, by ``CUdevice_attribute`` number (e.g. 75 and 76, the
        compute capability). Asked of the server once, then answered here: they never change."""
        return await self._run(self._device_attributes())

    # -- code -----------------------------------------------------------------------------------
    async def builtin(self, name: str) -> Function:
        """A kernel of the built-in library (saxpy, fill, gemm, relu, softmax, reduce_sum, busy)."""
        function = self._builtins.get(kernel_name(name))
        if function is None:
            function = self._builtins[name] = await self._function(0, name, "")
        return function

    async def module_load(self, image: bytes) -> Module:
        """Load a PTX, cubin or fatbin image (GPU executors only)."""
        return Module(self, await self._run(self._module_load(image)))

    async def _function(self, module: int, name: str, arg_types: str) -> Function:
        handle, declared = await self._run(self._get_function(module, name, arg_types))
        return Function(self, name, handle, declared)

    # -- streams and events ---------------------------------------------------------------------
    async def create_stream(self) -> Stream:
        return Stream(self, await self._run(self._create_stream()))

    async def create_event(self) -> Event:
        return Event(self, await self._run(self._create_event()))
