"""The blocking API: the async API's calls with the same names, for code without an event loop.

Each blocking session drives its own socket from the calling thread (``BlockingDriver``): no loop
thread, no hop between threads. A session may be shared by threads; calls are serialised. What
each call sends is in ``calls``, shared with the async API; the methods here only run it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from ..protocol import BitfusionError, DeviceGrant, InvalidValueError
from ..protocol import messages as m
from ..transport import BlockingStream, ClientTls
from .blocking_driver import BlockingDriver
from .calls import DeviceCalls, DevicePtr, Dim3, KernelCalls, TenantStats, kernel_name
from .session import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    LeaseRequest,
    lease_requests,
    number_devices,
    peer_chunks,
)

__all__ = [
    "SyncEvent", "SyncFunction", "SyncModule", "SyncRemoteDevice", "SyncSession", "SyncStream",
    "connect_sync",
]  # fmt: skip


class SyncStream:
    """Blocking twin of ``Stream``."""

    def __init__(self, device: SyncRemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    def synchronize(self) -> None:
        self.device._run(self.device._stream_synchronize(self.handle))

    def query(self) -> bool:
        return self.device._run(self.device._stream_query(self.handle))

    def wait_event(self, event: SyncEvent) -> None:
        self.device._run(self.device._stream_wait_event(self.handle, event))

    def destroy(self) -> None:
        self.device._run(self.device._stream_destroy(self.handle))


class SyncEvent:
    """Blocking twin of ``Event``."""

    def __init__(self, device: SyncRemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    def record(self, stream: SyncStream | None = None) -> None:
        self.device._run(self.device._event_record(self.handle, stream))

    def synchronize(self) -> None:
        self.device._run(self.device._event_synchronize(self.handle))

    def elapsed_ms(self, end: SyncEvent) -> float:
        return self.device._run(self.device._event_elapsed(self.handle, end.handle))

    def query(self) -> bool:
        return self.device._run(self.device._event_query(self.handle))

    def destroy(self) -> None:
        self.device._run(self.device._event_destroy(self.handle))


class SyncFunction(KernelCalls):
    """Blocking twin of ``Function``."""

    def __init__(self, device: SyncRemoteDevice, name: str, handle: int, arg_types: str) -> None:
        super().__init__(device._wire_index, name, handle, arg_types)
        self.device = device
        self._post = device._driver.post

    def launch(
        self,
        grid: Dim3,
        block: Dim3,
        args: Sequence[Any],
        shared_mem: int = 0,
        stream: SyncStream | None = None,
    ) -> None:
        """Queue the kernel: written to the socket, no round trip; see ``Function.launch``."""
        self._post(self.launch_message(grid, block, args, shared_mem, stream))


class SyncModule:
    """Blocking twin of ``Module``."""

    def __init__(self, device: SyncRemoteDevice, handle: int) -> None:
        self.device = device
        self.handle = handle

    def get_function(self, name: str, arg_types: str = "") -> SyncFunction:
        return self.device._function(self.handle, name, arg_types)

    def get_global(self, name: str) -> tuple[DevicePtr, int]:
        return self.device._run(self.device._module_get_global(self.handle, name))

    def unload(self) -> None:
        self.device._run(self.device._module_unload(self.handle))


class SyncRemoteDevice(DeviceCalls):
    """Blocking twin of ``RemoteDevice``; see it for what each call does."""

    def __init__(
        self,
        driver: BlockingDriver,
        grant: DeviceGrant,
        max_payload: int,
        index: int | None = None,
        server: str = "",
    ) -> None:
        super().__init__(grant, max_payload, index, server)
        self._driver = driver
        self._run = driver.run
        self._builtins: dict[str, SyncFunction] = {}

    def mem_alloc(self, nbytes: int) -> DevicePtr:
        return self._run(self._mem_alloc(nbytes))

    def mem_free(self, ptr: int) -> None:
        self._run(self._mem_free(ptr))

    def mem_get_info(self) -> tuple[int, int]:
        return self._run(self._mem_get_info())

    def memcpy_htod(self, dst: int, buffer: Any, stream: SyncStream | None = None) -> None:
        self._run(self._memcpy_htod(dst, buffer, stream))

    def memcpy_dtoh(self, buffer: Any, src: int, stream: SyncStream | None = None) -> None:
        self._run(self._memcpy_dtoh(buffer, src, stream))

    def memcpy_dtod(
        self, dst: int, src: int, nbytes: int, stream: SyncStream | None = None
    ) -> None:
        self._run(self._memcpy_dtod(dst, src, nbytes, stream))

    def memset_d8(
        self, ptr: int, value: int, nbytes: int, stream: SyncStream | None = None
    ) -> None:
        self._run(self._memset(ptr, value, 1, nbytes, stream))

    def memset_d16(
        self, ptr: int, value: int, count: int, stream: SyncStream | None = None
    ) -> None:
        self._run(self._memset(ptr, value, 2, count, stream))

    def memset_d32(
        self, ptr: int, value: int, count: int, stream: SyncStream | None = None
    ) -> None:
        self._run(self._memset(ptr, value, 4, count, stream))

    def synchronize(self) -> None:
        self._run(self._synchronize())

    def stats(self) -> TenantStats:
        return self._run(self._stats())

    def attributes(self) -> dict[int, int]:
        return self._run(self._device_attributes())

    def builtin(self, name: str) -> SyncFunction:
        function = self._builtins.get(kernel_name(name))
        if function is None:
            function = self._builtins[name] = self._function(0, name, "")
        return function

    def module_load(self, image: bytes) -> SyncModule:
        return SyncModule(self, self._run(self._module_load(image)))

    def _function(self, module: int, name: str, arg_types: str) -> SyncFunction:
        handle, declared = self._run(self._get_function(module, name, arg_types))
        return SyncFunction(self, name, handle, declared)

    def create_stream(self) -> SyncStream:
        return SyncStream(self, self._run(self._create_stream()))

    def create_event(self) -> SyncEvent:
        return SyncEvent(self, self._run(self._create_event()))


class SyncSession:
    """Blocking twin of ``Session``: use it as a context manager, or call ``close()``."""

    def __init__(self, parts: list[tuple[LeaseRequest, BlockingDriver, m.HelloReply]]) -> None:
        self._drivers = [driver for _, driver, _ in parts]
        self._driver = self._drivers[0]
        self.id = parts[0][2].session_id
        self.max_payload = min(reply.max_payload for _, _, reply in parts)
        self.devices: list[SyncRemoteDevice] = number_devices(parts, SyncRemoteDevice)

    @property
    def closed(self) -> bool:
        return all(driver.failure is not None for driver in self._drivers)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Release the session's GPUs; waits up to ``timeout`` s for each server to close."""
        for driver in self._drivers:
            driver.close(timeout)

    def memcpy_peer(
        self, dst_device: int, dst: int, src_device: int, src: int, nbytes: int
    ) -> None:
        """Blocking ``Session.memcpy_peer``: between devices the bytes pass through this client."""
        source, target = self.devices[src_device], self.devices[dst_device]
        if source is target:
            source.memcpy_dtod(dst, src, nbytes)
            return
        for offset, view in peer_chunks(nbytes, self.max_payload):
            source.memcpy_dtoh(view, src + offset)
            target.memcpy_htod(dst + offset, view)

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect_sync(
    address: str | None = None,
    gpus: int = 1,
    fraction: float | None = None,
    memory: str | int | None = None,
    *,
    mode: str = "share",
    weight: float | None = None,
    client_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    call_timeout: float | None = None,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> SyncSession:
    """Blocking ``connect`` (same arguments): ``with connect_sync(address, fraction=0.05) as s:``.
    With no address, the reservation in ``BITFUSION_NET_LEASE`` (see ``connect``)."""
    requests = lease_requests(
        address,
        gpus,
        fraction,
        memory,
        mode,
        weight,
        client_name,
        timeout,
        call_timeout,
        tls,
        token,
    )
    parts: list[tuple[LeaseRequest, BlockingDriver, m.HelloReply]] = []
    try:
        for request in requests:
            driver, reply = _greet(request)
            parts.append((request, driver, reply))
    except BaseException:
        for _, driver, _ in parts:
            driver.stream.close()
        raise
    return SyncSession(parts)


def _greet(request: LeaseRequest) -> tuple[BlockingDriver, m.HelloReply]:
    try:
        stream = BlockingStream.connect(request.address, request.timeout, request.tls)
    except OSError as exc:
        raise request.unreachable(exc) from None
    except ValueError as exc:  # the TLS settings' files cannot be used
        raise InvalidValueError(str(exc)) from None
    driver = BlockingDriver(stream)
    try:
        stream.settimeout(request.timeout)
        reply = driver.run(request.greet())
        driver.set_call_timeout(request.call_timeout)
    except BaseException as exc:
        stream.close()
        if isinstance(exc, OSError) and not isinstance(exc, BitfusionError):
            raise request.unreachable(exc) from None
        raise
    return driver, reply
