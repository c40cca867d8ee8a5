"""The blocking API: the async API's twins, with the same names, for code without an event loop.

Each blocking session runs its connection on a private event loop in a background thread, so
no-reply calls keep flowing to the server while the caller computes, exactly as in the async API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from ..protocol import Request
from ..transport import new_event_loop
from .core import ClientCore
from .device import DevicePtr, Dim3, Event, Function, Module, RemoteDevice, Stream, TenantStats
from .session import DEFAULT_CONNECT_TIMEOUT, Session, open_session

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread; ``run`` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="bitfusion-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def post(self, core: ClientCore, message: Request) -> None:
        """Queue a no-reply frame without waiting for the loop thread: a blocking launch costs
        a wake-up, not a round trip between threads. It waits only while the send queue is full."""
        if core.failure is not None:
            raise core.failure
        if not core.connection.writable:
            self.run(core.connection.drain())
        self.loop.call_soon_threadsafe(core.post_nowait, message)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def _stream(stream: SyncStream | None) -> Stream | None:
    return stream._stream if stream is not None else None


class SyncStream:
    def __init__(self, runner: _LoopThread, stream: Stream) -> None:
        self._runner = runner
        self._stream = stream
        self.handle = stream.handle

    def synchronize(self) -> None:
        self._runner.run(self._stream.synchronize())

    def destroy(self) -> None:
        self._runner.run(self._stream.destroy())


class SyncEvent:
    def __init__(self, runner: _LoopThread, event: Event) -> None:
        self._runner = runner
        self._event = event
        self.handle = event.handle

    def record(self, stream: SyncStream | None = None) -> None:
        self._runner.run(self._event.record(_stream(stream)))

    def synchronize(self) -> None:
        self._runner.run(self._event.synchronize())

    def elapsed_ms(self, end: SyncEvent) -> float:
        return self._runner.run(self._event.elapsed_ms(end._event))

    def destroy(self) -> None:
        self._runner.run(self._event.destroy())


class SyncFunction:
    def __init__(self, runner: _LoopThread, function: Function) -> None:
        self._runner = runner
        self._function = function
        self.name = function.name
        self.arg_types = function.arg_types

    def launch(
        self,
        grid: Dim3,
        block: Dim3,
        args: Sequence[Any],
        shared_mem: int = 0,
        stream: SyncStream | None = None,
    ) -> None:
        message = self._function.launch_message(grid, block, args, shared_mem, _stream(stream))
        self._runner.post(self._function.device._core, message)


class SyncModule:
    def __init__(self, runner: _LoopThread, module: Module) -> None:
        self._runner = runner
        self._module = module

    def get_function(self, name: str, arg_types: str = "") -> SyncFunction:
        return SyncFunction(
            self._runner, self._runner.run(self._module.get_function(name, arg_types))
        )

    def unload(self) -> None:
        self._runner.run(self._module.unload())


class SyncRemoteDevice:
    """Blocking twin of ``RemoteDevice``; see it for what each call does."""

    def __init__(self, runner: _LoopThread, device: RemoteDevice) -> None:
        self._runner = runner
        self._device = device
        self._builtins: dict[str, SyncFunction] = {}
        self.index = device.index
        self.name = device.name
        self.executor = device.executor
        self.total_memory = device.total_memory
        self.memory_limit = device.memory_limit
        self.fraction = device.fraction
        self.weight = device.weight
        self.mode = device.mode
        self.server_gpu = device.server_gpu

    def __repr__(self) -> str:
        return repr(self._device)

    def mem_alloc(self, nbytes: int) -> DevicePtr:
        return self._runner.run(self._device.mem_alloc(nbytes))

    def mem_free(self, ptr: int) -> None:
        self._runner.run(self._device.mem_free(ptr))

    def mem_get_info(self) -> tuple[int, int]:
        return self._runner.run(self._device.mem_get_info())

    def memcpy_htod(self, dst: int, buffer: Any, stream: SyncStream | None = None) -> None:
        self._runner.run(self._device.memcpy_htod(dst, buffer, _stream(stream)))

    def memcpy_dtoh(self, buffer: Any, src: int, stream: SyncStream | None = None) -> None:
        self._runner.run(self._device.memcpy_dtoh(buffer, src, _stream(stream)))

    def memcpy_dtod(
        self, dst: int, src: int, nbytes: int, stream: SyncStream | None = None
    ) -> None:
        self._runner.run(self._device.memcpy_dtod(dst, src, nbytes, _stream(stream)))

    def memset_d8(
        self, ptr: int, value: int, nbytes: int, stream: SyncStream | None = None
    ) -> None:
        self._runner.run(self._device.memset_d8(ptr, value, nbytes, _stream(stream)))

    def memset_d32(
        self, ptr: int, value: int, count: int, stream: SyncStream | None = None
    ) -> None:
        self._runner.run(self._device.memset_d32(ptr, value, count, _stream(stream)))

    def synchronize(self) -> None:
        self._runner.run(self._device.synchronize())

    def stats(self) -> TenantStats:
        return self._runner.run(self._device.stats())

    def builtin(self, name: str) -> SyncFunction:
        function = self._builtins.get(name)
        if function is None:
            function = self._builtins[name] = SyncFunction(
                self._runner, self._runner.run(self._device.builtin(name))
            )
        return function

    def module_load(self, image: bytes) -> SyncModule:
        return SyncModule(self._runner, self._runner.run(self._device.module_load(image)))

    def create_stream(self) -> SyncStream:
        return SyncStream(self._runner, self._runner.run(self._device.create_stream()))

    def create_event(self) -> SyncEvent:
        return SyncEvent(self._runner, self._runner.run(self._device.create_event()))


class SyncSession:
    """Blocking twin of ``Session``: use it as a context manager, or call ``close()``."""

    def __init__(self, runner: _LoopThread, session: Session) -> None:
        self._runner = runner
        self._session = session
        self.id = session.id
        self.devices = [SyncRemoteDevice(runner, device) for device in session.devices]

    @property
    def closed(self) -> bool:
        return self._session.closed

    def close(self) -> None:
        if self._runner.loop.is_closed():
            return
        try:
            self._runner.run(self._session.close())
        finally:
            self._runner.stop()

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
    address: str,
    gpus: int = 1,
    fraction: float | None = None,
    memory: str | int | None = None,
    *,
    mode: str = "share",
    weight: float | None = None,
    client_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> SyncSession:
    """Blocking ``connect``: ``with connect_sync("tcp://HOST:PORT", fraction=0.05) as session:``."""
    runner = _LoopThread()
    try:
        session = runner.run(
            open_session(
                address,
                gpus,
                fraction,
                memory,
                mode=mode,
                weight=weight,
                client_name=client_name,
                timeout=timeout,
            )
        )
    except BaseException:
        runner.stop()
        raise
    return SyncSession(runner, session)
