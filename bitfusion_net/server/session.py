"""One client connection on the server: its leases, its frames, its replies, its clean-up.

Frames are handled in arrival order on the event loop. Device work is submitted to the GPU's
executor, which runs it in order on its worker thread; a reply is sent when the work completes.
No-reply requests (launch, memset, copy from host, free, ...) send nothing on success; their errors
stay on the tenant and answer the next request that wants a reply (docs/PROTOCOL.md, "Errors").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from executors import Executor, Tenant
from executors.base import DeferredError
from executors.errors import (
    DeviceError,
    DeviceOutOfMemory,
    InvalidHandle,
    InvalidValue,
    KernelFault,
    Unsupported,
)

from ..protocol import (
    ERROR_DEFERRED,
    ERROR_FATAL,
    BitfusionError,
    DeviceGrant,
    ErrorCode,
    ErrorReply,
    Frame,
    FrameDecoder,
    InvalidValueError,
    Limits,
    Message,
    Opcode,
    ProtocolError,
    Reply,
    encode_reply,
)
from ..protocol import messages as m
from ..transport import FrameConnection
from .leases import GpuPool, Placement

log = logging.getLogger(__name__)

_DEVICE_ERROR_CODES: dict[type[DeviceError], ErrorCode] = {
    DeviceOutOfMemory: ErrorCode.OUT_OF_MEMORY,
    InvalidHandle: ErrorCode.INVALID_HANDLE,
    InvalidValue: ErrorCode.INVALID_VALUE,
    KernelFault: ErrorCode.KERNEL,
    Unsupported: ErrorCode.UNSUPPORTED,
}
_session_ids = itertools.count(1)
# Operations one lease may have queued on its GPU before the session stops reading (each costs a
# few hundred bytes of server memory; far more than any pipeline needs to keep a GPU busy).
MAX_QUEUED_OPERATIONS = 10_000
BACKLOG_POLL_S = 0.002


def _nothing() -> None:
    """A give-back for requests that staged nothing."""


# Requests that only read state or wait: answered on the event loop when the lease is idle.
_QUERIES = frozenset(
    {m.MemGetInfo, m.Synchronize, m.StreamSynchronize, m.EventSynchronize, m.TenantStats}
)


@dataclass
class Lease:
    """One GPU of a session: where it is placed and the tenant context on its executor."""

    placement: Placement
    executor: Executor
    tenant: Tenant


# What a request turns into: the device operation, and how its result becomes a reply
# (None for no-reply requests).
Work = tuple[Callable[[], Any], Callable[[Any], tuple[Reply, memoryview | None]] | None]


class ServerSession:
    """The ``FrameHandler`` of one client connection."""

    def __init__(
        self,
        connection: FrameConnection,
        pool: GpuPool,
        executors: list[Executor],
        limits: Limits,
        on_closed: Callable[[ServerSession], None],
    ) -> None:
        self.connection = connection
        self.id = next(_session_ids)
        self.leases: list[Lease] = []
        self._pool = pool
        self._executors = executors
        self._limits = limits
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # Payload bytes staged in host memory (copies from host not yet on the device, copies to
        # host not yet sent). Above the budget the session stops reading: real back-pressure.
        self._staged = 0
        self._staging_budget = limits.max_payload
        self._client_name = ""
        self._backlog_check: asyncio.TimerHandle | None = None

        self.decoder = FrameDecoder(
            receives_replies=False, limits=limits, payload_sink=self._payload_buffer
        )

    def _payload_buffer(
        self, opcode: int, request_id: int, message: Message, length: int
    ) -> memoryview | None:
        """Where an incoming payload lands: the tenant's staging memory (pinned on a GPU)."""
        device = getattr(message, "device", None)
        if not self.leases or device is None or device >= len(self.leases):
            return None  # the frame is refused once complete; read and drop its payload
        self._staged += length
        return self.leases[device].tenant.staging_buffer(length)

    # -- FrameHandler ---------------------------------------------------------------------------
    def frame_received(self, frame: Frame) -> None:
        message = frame.message
        try:
            if frame.request_id == 0:
                raise ProtocolError("request id 0 is reserved for connection-level errors")
            if isinstance(message, m.Hello):
                self._hello(frame.request_id, message)
            elif not self.leases:
                raise ProtocolError(f"expected HELLO first, got {Opcode(frame.opcode).name}")
            else:
                self._submit(frame)
        except ProtocolError as exc:
            self.protocol_error(exc, frame.request_id)
        except BitfusionError as exc:
            self._send_error(frame.request_id, exc.code, exc.message)
        except Exception:  # noqa: BLE001 - a server bug must cost one request, not the server
            log.exception("session %d: internal error handling %s", self.id, type(message).__name__)
            self._send_error(frame.request_id, ErrorCode.INTERNAL, "internal server error")
        self._update_flow()

    def protocol_error(self, error: ProtocolError, request_id: int = 0) -> None:
        log.warning("session %d (%s): protocol error: %s", self.id, self.connection.peer, error)
        self._refuse(request_id, ErrorCode.PROTOCOL, str(error))

    def _refuse(self, request_id: int, code: ErrorCode, text: str) -> None:
        """Answer with a fatal error, handle nothing more, close once it is sent."""
        self._send_error(request_id, code, text, flags=ERROR_FATAL)
        self.connection.stop_receiving()
        self.connection.close_after_flush()

    def connection_lost(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._backlog_check is not None:
            self._backlog_check.cancel()
        how = f"lost ({error})" if error else "closed"
        log.info(
            "session %d (%s) %s; releasing %d lease(s)",
            self.id,
            self.connection.peer,
            how,
            len(self.leases),
        )
        for lease in self.leases:
            self._release(lease)
        self.leases = []
        self._on_closed(self)

    def _release(self, lease: Lease) -> None:
        def memory_freed() -> None:
            self._loop.call_soon_threadsafe(self._pool.release, lease.placement)

        lease.executor.close_tenant(lease.tenant, on_done=memory_freed)

    # -- HELLO ----------------------------------------------------------------------------------
    def _hello(self, request_id: int, hello: m.Hello) -> None:
        if self.leases:
            raise ProtocolError("HELLO sent twice")
        try:
            if hello.mode not in (m.MODE_SHARE, m.MODE_CAP):
                raise InvalidValueError(f"unknown scheduling mode {hello.mode} (0 share, 1 cap)")
            if not (
                hello.weight == 0 or (math.isfinite(hello.weight) and 0 < hello.weight <= 1000)
            ):
                raise InvalidValueError(f"weight must be in (0, 1000], got {hello.weight}")
            placements = self._pool.request(hello.gpus, hello.fraction, hello.memory)
        except BitfusionError as exc:
            log.info("session %d (%s): refused: %s", self.id, self.connection.peer, exc)
            self._refuse(request_id, exc.code, exc.message)
            return
        leases: list[Lease] = []
        try:
            for placement in placements:
                executor = self._executors[placement.gpu]
                tenant = executor.open_tenant(
                    placement.memory_limit,
                    weight=hello.weight or placement.fraction,
                    cap=placement.fraction if hello.mode == m.MODE_CAP else None,
                )
                leases.append(Lease(placement, executor, tenant))
        except DeviceError as exc:  # the executor disagrees with the pool: report, undo, close
            for lease in leases:
                lease.executor.close_tenant(lease.tenant)
            for placement in placements:
                self._pool.release(placement)
            self._refuse(request_id, ErrorCode.CAPACITY, f"the executor refused the lease: {exc}")
            return
        self.leases = leases
        self._client_name = hello.client_name
        grants = [
            DeviceGrant(
                index=i,
                server_gpu=lease.placement.gpu,
                total_memory=lease.executor.properties.total_memory,
                memory_limit=lease.placement.memory_limit,
                fraction=lease.placement.fraction,
                weight=lease.tenant.weight,
                mode=hello.mode,
                name=lease.executor.properties.name,
                executor=lease.executor.properties.executor,
            )
            for i, lease in enumerate(leases)
        ]
        log.info(
            "session %d (%s%s): leased %s",
            self.id,
            self.connection.peer,
            f", {hello.client_name}" if hello.client_name else "",
            ", ".join(
                f"gpu{g.server_gpu}@{g.fraction:g} (weight {g.weight:g}, "
                f"{'cap' if g.mode == m.MODE_CAP else 'share'})"
                for g in grants
            ),
        )
        reply = m.HelloReply.with_devices(
            self.id, self._limits.max_payload, self._limits.max_metadata, grants
        )
        self.connection.send(encode_reply(Opcode.HELLO, request_id, reply))

    # -- device requests ------------------------------------------------------------------------
    def _submit(self, frame: Frame) -> None:
        message: Any = frame.message  # a device request: every one has a ``device`` field
        device: int = message.device
        request = type(message)
        no_reply = getattr(request, "NO_REPLY", False)
        if device >= len(self.leases):
            text = f"device {device} is not in this session (it has {len(self.leases)})"
            if no_reply:  # nobody waits to hear it; a client that sends this is broken
                raise ProtocolError(text)
            raise InvalidValueError(text)
        lease = self.leases[device]
        if request is m.MemcpyDtoH and message.nbytes > self._limits.max_payload:
            raise InvalidValueError(
                f"copy of {message.nbytes} bytes exceeds the frame payload limit "
                f"{self._limits.max_payload}; split it"
            )
        op, to_reply = _work(lease.executor, lease.tenant, message, frame.payload)
        give_back: Callable[[], None] = _nothing
        if frame.payload is not None:
            op, give_back = self._unstaging(op, lease.tenant, frame.payload)
        if no_reply:
            lease.executor.submit(
                lease.tenant,
                op,
                wants_reply=False,
                tag=frame.request_id,
                on_done=lambda _result, _error: give_back(),
            )
            return
        assert to_reply is not None
        opcode, request_id = frame.opcode, frame.request_id
        if request in _QUERIES:
            error: BaseException | None
            try:
                ran, result = lease.executor.run_if_idle(lease.tenant, op)
            except Exception as exc:  # noqa: BLE001 - its error is the reply, as from the worker
                ran, result, error = True, None, exc
            else:
                error = None
            if ran:
                self._complete(opcode, request_id, to_reply, result, error, 0, lease.tenant)
                return
        staged = message.nbytes if request is m.MemcpyDtoH else 0
        self._staged += staged

        def on_done(result: Any, error: BaseException | None) -> None:  # on the worker thread
            give_back()  # if the operation never ran (an earlier error, a closed tenant)
            self._loop.call_soon_threadsafe(
                self._complete, opcode, request_id, to_reply, result, error, staged, lease.tenant
            )

        lease.executor.submit(lease.tenant, op, wants_reply=True, tag=request_id, on_done=on_done)

    def _unstaging(
        self, op: Callable[[], Any], tenant: Tenant, payload: memoryview
    ) -> tuple[Callable[[], Any], Callable[[], None]]:
        """Wrap ``op`` so the staged payload goes back for reuse once the device has it; also
        returns the give-back itself, for the completion to call when ``op`` never ran (work
        refused, or skipped for an earlier error), so that no payload is ever lost. Giving back
        happens once: ``op`` and its completion run one after the other, never together."""
        returned = False

        def give_back() -> None:
            nonlocal returned
            if not returned:
                returned = True
                tenant.return_staging(payload)
                self._loop.call_soon_threadsafe(self._unstage, len(payload))

        def run() -> Any:
            try:
                return op()
            finally:
                give_back()

        return run, give_back

    def _unstage(self, nbytes: int) -> None:
        self._staged -= nbytes
        self._update_flow()

    def _complete(
        self,
        opcode: int,
        request_id: int,
        to_reply: Callable[[Any], tuple[Reply, memoryview | None]],
        result: Any,
        error: BaseException | None,
        staged: int,
        tenant: Tenant,
    ) -> None:
        """Send the reply of a finished request (on the event loop). ``staged``: its host bytes;
        a payload is handed back to ``tenant`` for reuse once sent."""
        if self._closed:
            if isinstance(result, memoryview):  # a copy's bytes nobody will read: reuse them
                tenant.return_staging(result)
            return
        if error is not None:
            self._send_device_error(request_id, error)
            self._unstage(staged)
            return
        reply, payload = to_reply(result)
        if payload is None:
            self.connection.send(encode_reply(opcode, request_id, reply))
            self._unstage(staged)
        else:

            def sent() -> None:
                tenant.return_staging(payload)
                self._unstage(staged)

            self.connection.send(
                encode_reply(opcode, request_id, reply, len(payload)), payload, on_sent=sent
            )
            self._update_flow()

    def _send_device_error(self, request_id: int, error: BaseException) -> None:
        deferred_from, later, flags = 0, 0, 0
        if isinstance(error, DeferredError):
            deferred_from, later, flags = (
                error.failure.tag,
                error.failure.later_failures,
                ERROR_DEFERRED,
            )
            error = error.failure.error
        code = next((c for cls, c in _DEVICE_ERROR_CODES.items() if isinstance(error, cls)), None)
        if code is None:
            log.error("session %d: internal error", self.id, exc_info=error)
            code = ErrorCode.INTERNAL
        self._send_error(
            request_id, code, str(error), flags=flags, deferred_from=deferred_from, later=later
        )

    def _send_error(
        self,
        request_id: int,
        code: ErrorCode,
        text: str,
        *,
        flags: int = 0,
        deferred_from: int = 0,
        later: int = 0,
    ) -> None:
        # The text may echo what the client sent (a kernel name): keep the frame within limits.
        room = self._limits.max_metadata - ErrorReply._struct.size - 4
        raw = text.encode()
        if len(raw) > room:
            text = raw[: room - 3].decode(errors="ignore") + "..."
        reply = ErrorReply(int(code), flags, deferred_from, later, text)
        self.connection.send(encode_reply(Opcode.ERROR, request_id, reply))

    def _update_flow(self) -> None:
        if self._closed:
            return
        if self._staged > self._staging_budget or not self.connection.writable:
            self.connection.pause_reading()
        elif self._backlogged():
            # Queued operations finish on the device, which tells nobody: look again shortly.
            self.connection.pause_reading()
            if self._backlog_check is None:
                self._backlog_check = self._loop.call_later(BACKLOG_POLL_S, self._recheck_backlog)
        else:
            self.connection.resume_reading()

    def _backlogged(self) -> bool:
        """True while one of the leases has more operations queued than a session may queue:
        a client that pipelines without limit is held back instead of filling server memory."""
        limit = MAX_QUEUED_OPERATIONS if self._backlog_check is None else MAX_QUEUED_OPERATIONS // 2
        return any(lease.executor.queued(lease.tenant) > limit for lease in self.leases)

    def _recheck_backlog(self) -> None:
        self._backlog_check = None
        if self._closed:
            return
        if not self.connection.peer_alive():  # gone while we were not reading: free its GPUs now
            self.connection.abort()
            return
        if self._backlogged():
            self._backlog_check = self._loop.call_later(BACKLOG_POLL_S, self._recheck_backlog)
        else:
            self._update_flow()

    def status(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "peer": self.connection.peer,
            "client": self._client_name,
            "leases": [
                {
                    "gpu": lease.placement.gpu,
                    "fraction": lease.placement.fraction,
                    "memory_limit": lease.placement.memory_limit,
                    "weight": lease.tenant.weight,
                    "mode": "share" if lease.tenant.cap is None else "cap",
                    "queued": lease.executor.queued(lease.tenant),
                    "usage": asdict(lease.executor.usage(lease.tenant)),
                }
                for lease in self.leases
            ],
        }


def _done(_result: Any) -> tuple[Reply, None]:
    return m.Done(), None


def _handle(result: int) -> tuple[Reply, None]:
    return m.HandleReply(result), None


def _work(executor: Executor, tenant: Tenant, msg: Any, payload: memoryview | None) -> Work:
    """The device operation for a request and how its result becomes the reply."""
    t = tenant
    if isinstance(msg, m.Launch):  # first: the most frequent request by far
        return (
            lambda: t.launch(
                msg.function, msg.grid, msg.block, msg.shared_mem, msg.stream, msg.args
            )
        ), None
    if isinstance(msg, m.MemAlloc):
        return (lambda: t.mem_alloc(msg.nbytes)), lambda r: (m.MemAllocReply(r), None)
    if isinstance(msg, m.MemFree):
        return (lambda: t.mem_free(msg.ptr)), None
    if isinstance(msg, m.MemGetInfo):
        return t.mem_get_info, lambda r: (m.MemGetInfoReply(*r), None)
    if isinstance(msg, m.MemcpyHtoD):
        data = payload if payload is not None else memoryview(b"")  # an empty copy is a no-op
        return (lambda: t.memcpy_htod(msg.dst, data, msg.stream)), None
    if isinstance(msg, m.MemcpyDtoH):

        def copy_out() -> memoryview:
            buffer = t.staging_buffer(msg.nbytes)
            try:
                t.memcpy_dtoh(buffer, msg.src, msg.stream)
            except BaseException:
                t.return_staging(buffer)  # a refused copy must not keep the buffer from reuse
                raise
            return buffer

        return copy_out, lambda r: (m.MemcpyDtoHReply(), r)
    if isinstance(msg, m.MemcpyDtoD):
        return (lambda: t.memcpy_dtod(msg.dst, msg.src, msg.nbytes, msg.stream)), None
    if isinstance(msg, m.Memset):
        return (lambda: t.memset(msg.ptr, msg.value, msg.itemsize, msg.count, msg.stream)), None
    if isinstance(msg, m.Synchronize):
        return t.synchronize, _done
    if isinstance(msg, m.TenantStats):
        return (lambda: executor.usage(t)), lambda u: (
            m.TenantStatsReply(
                round(u.device_time * 1e9),
                round(u.queue_wait * 1e9),
                u.operations,
                u.kernels,
                u.memory_used,
                u.memory_high_water,
            ),
            None,
        )
    if isinstance(msg, m.ModuleLoad):
        image = bytes(payload) if payload is not None else b""
        return (lambda: t.module_load(image)), lambda r: (m.ModuleLoadReply(r), None)
    if isinstance(msg, m.ModuleUnload):
        return (lambda: t.module_unload(msg.module)), None
    if isinstance(msg, m.GetFunction):
        return (lambda: t.get_function(msg.module, msg.name, msg.arg_types or None)), lambda r: (
            m.GetFunctionReply(r.handle, r.arg_types),
            None,
        )
    if isinstance(msg, m.StreamCreate):
        return t.stream_create, _handle
    if isinstance(msg, m.StreamDestroy):
        return (lambda: t.stream_destroy(msg.stream)), None
    if isinstance(msg, m.StreamSynchronize):
        return (lambda: t.stream_synchronize(msg.stream)), _done
    if isinstance(msg, m.EventCreate):
        return t.event_create, _handle
    if isinstance(msg, m.EventDestroy):
        return (lambda: t.event_destroy(msg.event)), None
    if isinstance(msg, m.EventRecord):
        return (lambda: t.event_record(msg.event, msg.stream)), None
    if isinstance(msg, m.EventSynchronize):
        return (lambda: t.event_synchronize(msg.event)), _done
    if isinstance(msg, m.EventElapsed):
        return (lambda: t.event_elapsed_ms(msg.start, msg.end)), lambda r: (
            m.EventElapsedReply(r),
            None,
        )
    raise ProtocolError(f"unexpected request {type(msg).__name__}")
