"""One client connection on the server: the driver of its ``ServerConnection``.

Frames are handled in arrival order on the event loop. The first request says what the
connection is: a HELLO (GPUs leased for this connection) or an ATTACH (a reservation's GPUs)
makes it a device session; RESERVE, RELEASE or SERVER_INFO make it a control connection
(``reservations``). On a device session every later request becomes device work by the dispatch
table (``dispatch``) and is submitted to its GPU's executor, which runs it in order on its worker thread; a reply is
written when the work completes. No-reply requests (launch, memset, copy from host, free, ...)
send nothing on success; their errors stay on the tenant and answer the next request that wants
a reply (docs/PROTOCOL.md, "Errors"). When to stop reading is ``flow``'s business.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from executors import Tenant
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
    BitfusionError,
    ErrorCode,
    InvalidValueError,
    LeaseEndedError,
    Limits,
    Message,
    Phase,
    ProtocolViolation,
    RequestReceived,
    ServerConnection,
    ServerState,
)
from ..protocol import messages as m
from ..transport import Stream
from .auth import HOW_TO_GET_ONE, Gatekeeper
from .dispatch import DISPATCH, ToReply
from .flow import BACKLOG_POLL_S, SessionFlow
from .reservations import EndedBy, Lease, Reservation, ReservationTable
from .stats import ServerStats, refusal_reason
from .tokens import TokenRecord

log = logging.getLogger(__name__)

_DEVICE_ERROR_CODES: dict[type[DeviceError], ErrorCode] = {
    DeviceOutOfMemory: ErrorCode.OUT_OF_MEMORY,
    InvalidHandle: ErrorCode.INVALID_HANDLE,
    InvalidValue: ErrorCode.INVALID_VALUE,
    KernelFault: ErrorCode.KERNEL,
    Unsupported: ErrorCode.UNSUPPORTED,
}
_session_ids = itertools.count(1)
FRAMES_PER_TURN = 64  # requests one connection has handled per loop iteration
# What one read takes in (payloads are read straight into their staging buffers; the buffer grows
# only while a frame with larger metadata arrives). It is what an idle connection costs, and a
# read's frames are decoded in one go, so it bounds how long one flooding client's read holds the
# loop (about 180 launch frames).
RECEIVE_BUFFER = 16 * 1024


def _nothing() -> None:
    """A give-back for requests that staged nothing."""


class ServerSession:
    """The ``StreamOwner`` of one client connection."""

    def __init__(
        self,
        stream: Stream,
        reservations: ReservationTable,
        limits: Limits,
        describe_server: Callable[[int], str],
        on_closed: Callable[[ServerSession], None],
        gate: Gatekeeper | None = None,
        stats: ServerStats | None = None,
    ) -> None:
        self.stream = stream
        self.id = next(_session_ids)
        self._stats = stats if stats is not None else ServerStats()
        self.received_bytes = 0
        self.sent_bytes = 0
        self._gate = gate if gate is not None else Gatekeeper(None)
        self.user: TokenRecord | None = None  # whose token it presented (servers with tokens)
        self.reservation: Reservation | None = None  # the one this session's GPUs are from
        self.leases: list[Lease] = []
        self._held: list[Reservation] = []  # reservations this connection holds
        # Per device, replies handed to the worker and not yet written: while any is, a query
        # must not be answered on the loop, or it would overtake them (PROTOCOL.md section 8).
        self._replies_due: list[int] = []
        self._reservations = reservations
        self._describe_server = describe_server
        self._limits = limits
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.client_name = ""
        self._flow = SessionFlow(limits.max_payload)
        self._reading = True  # False while flow control holds the connection
        self._yielding = False  # paused until the next loop iteration: its turn is over
        self._backlog_check: asyncio.TimerHandle | None = None
        self._opened = self._last_data = time.monotonic()  # for the stall timeout
        self.connection = ServerConnection(
            limits,
            payload_sink=self._payload_buffer,
            buffer_size=RECEIVE_BUFFER,
        )
        self.get_buffer = self.connection.get_buffer

    @property
    def peer(self) -> str:
        return self.stream.peer

    def _payload_buffer(
        self, opcode: int, request_id: int, message: Message, length: int
    ) -> memoryview | None:
        """Where an incoming payload lands: the tenant's staging memory (pinned on a GPU)."""
        device = getattr(message, "device", None)
        if not self.leases or device is None or device >= len(self.leases):
            return None  # the frame is refused once complete; read and drop its payload
        self._flow.staged += length
        return self.leases[device].tenant.staging_buffer(length)

    # -- StreamOwner ----------------------------------------------------------------------------
    def buffer_updated(self, nbytes: int) -> None:
        self._last_data = time.monotonic()
        self.received_bytes += nbytes
        self.connection.buffer_updated(nbytes)
        self._process()

    def refuse(self, code: ErrorCode, text: str, reason: str) -> None:
        """Turn the connection away before anything was read from it (a fatal ERROR, id 0);
        ``reason`` is what operators count it as (``stats.refusal_reason``)."""
        log.warning("connection from %s refused: %s", self.peer, text)
        self._refuse(0, code, text, refused=reason)

    def _refuse(
        self, request_id: int, code: ErrorCode, text: str, *, refused: str | None = None
    ) -> None:
        """Answer with a fatal ERROR and close; ``refused``: this turns a greeting away, and
        is counted as that reason."""
        self._stats.errors[code] += 1
        if refused is not None:
            self._stats.refused[refused] += 1
        self._close_with(self.connection.refuse(request_id, code, text))

    def _error(self, request_id: int, code: ErrorCode, text: str, **deferred: int) -> bytes:
        """An ERROR reply to one request (the connection goes on), counted."""
        self._stats.errors[code] += 1
        return self.connection.error(request_id, code, text, **deferred)

    def close_if_stalled(self, now: float, timeout: float) -> None:
        """Close a connection that has sat mid-frame with no byte arriving for ``timeout`` s, or
        has not sent its HELLO in that time: it holds server memory and proves nothing. One the
        server stopped reading (back-pressure) is not stalled: the wait is ours."""
        if self._closed or not self._reading or self._yielding:
            return
        if self.connection.state in (ServerState.AWAITING_HELLO, ServerState.AUTHENTICATED):
            idle, what = now - self._opened, "no HELLO"
        elif self.connection.in_frame:
            idle, what = now - self._last_data, "a frame stalled halfway"
        else:
            return
        if idle > timeout:
            text = f"{what} for {idle:.1f} s (the limit is {timeout:g} s); closing"
            log.info("session %d (%s): %s", self.id, self.peer, text)
            self._refuse(0, ErrorCode.PROTOCOL, text)

    def _process(self) -> None:
        """Handle decoded requests until none is left, flow control says stop, or this
        connection has had its turn: after ``FRAMES_PER_TURN`` requests it stops reading and
        goes on in the next loop iteration, so a client flooding frames cannot hold the event
        loop while its neighbours' requests wait."""
        connection = self.connection
        handled = 0
        while self._reading and not self._closed:
            if handled == FRAMES_PER_TURN:
                if not self._yielding:
                    self._yielding = True
                    self.stream.pause_reading()
                    self._loop.call_soon(self._next_turn)
                return
            event = connection.next_event()
            if event is None:
                return
            handled += 1
            if type(event) is RequestReceived:
                self._handle(event)  # type: ignore[arg-type]
            else:
                assert isinstance(event, ProtocolViolation)
                log.warning("session %d (%s): protocol error: %s", self.id, self.peer, event.error)
                self._stats.errors[event.error.code] += 1
                self._close_with(event.data)
                return

    def _next_turn(self) -> None:
        self._yielding = False
        if self._closed:
            return
        if self._reading:  # flow control may have paused it meanwhile; then it resumes it
            self.stream.resume_reading()
        self._process()

    def _handle(self, event: RequestReceived) -> None:
        message = event.message
        opcode = message.OPCODE
        self._stats.requests[opcode] += 1
        try:
            if message.RULE.phase is Phase.DEVICE:
                self._submit(event)
            elif (
                self.user is None
                and self._gate.required
                and type(message) is not m.Authenticate
                and not self._certified()
            ):
                log.warning("session %d (%s): refused: no token", self.id, self.peer)
                self._refuse(event.request_id, ErrorCode.AUTH, HOW_TO_GET_ONE, refused="auth")
            else:
                started = time.perf_counter()
                _NOT_DEVICE[type(message)](self, event.request_id, message)
                self._stats.replied(opcode, time.perf_counter() - started)
        except BitfusionError as exc:
            self._write(self._error(event.request_id, exc.code, exc.message))
        except Exception:  # noqa: BLE001 - a server bug must cost one request, not the server
            log.exception("session %d: internal error handling %s", self.id, type(message).__name__)
            self._write(self._error(event.request_id, ErrorCode.INTERNAL, "internal error"))
        self._update_flow()

    def _write(self, head: bytes, payload: memoryview | None = None, on_sent: Any = None) -> None:
        """Write a reply now: someone waits for it (everything queued before goes first)."""
        self.sent_bytes += len(head) if payload is None else len(head) + len(payload)
        self.stream.write(head, payload, on_sent)
        self.stream.flush()

    def _close_with(self, fatal_error: bytes) -> None:
        """Write a fatal ERROR, handle nothing more, close once it is sent."""
        self._reading = False
        self.stream.pause_reading()
        self._write(fatal_error)
        self.stream.close()

    def connection_lost(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._backlog_check is not None:
            self._backlog_check.cancel()
        if error is None and self.connection.in_frame:
            error = ConnectionResetError("the peer closed the connection in the middle of a frame")
        self.connection.discard_received()  # requests not yet handled will never be
        self._stats.closed_received_bytes += self.received_bytes
        self._stats.closed_sent_bytes += self.sent_bytes
        how = f"lost ({error})" if error else "closed"
        log.info(
            "session %d (%s) %s; releasing %d lease(s)", self.id, self.peer, how, len(self.leases)
        )
        table = self._reservations
        if self.reservation is not None:
            table.detach(self.reservation, self)
        self.reservation, self.leases = None, []
        for reservation in self._held:
            table.holder_gone(reservation)
        self._held = []
        self._on_closed(self)

    # -- greetings and control requests ---------------------------------------------------------
    @property
    def _who(self) -> str:
        return f"{self.peer}, {self.client_name}" if self.client_name else self.peer

    def _certified(self) -> bool:
        """Whether a verified client certificate (mutual TLS) names a user with a live token;
        if so the session is that user's."""
        name = self.stream.peer_certificate_name
        if name is None:
            return False
        self.user = self._gate.by_certificate(name, self.peer.rpartition(":")[0] or self.peer)
        return self.user is not None

    def _authenticate(self, request_id: int, request: m.Authenticate) -> None:
        host = self.peer.rpartition(":")[0] or self.peer
        try:
            self.user = self._gate.authenticate(request.token, host)
        except BitfusionError as exc:
            self._refuse(request_id, exc.code, exc.message, refused=refusal_reason(exc.code))
            return
        reply = m.AuthenticateReply(self.user.user if self.user is not None else "")
        self._write(self.connection.reply(m.Opcode.AUTHENTICATE, request_id, reply))

    def _hello(self, request_id: int, hello: m.Hello) -> None:
        """Lease GPUs for this connection: a reservation it holds, with itself attached."""
        self.client_name = hello.client_name
        table = self._reservations
        try:
            reservation = table.reserve(
                hello.gpus,
                hello.fraction,
                hello.memory,
                hello.weight,
                hello.mode,
                hello.client_name,
                holder=self,
                implicit=True,
                user=self.user,
            )
            self._held.append(reservation)
            leases = table.attach(reservation, self)
        except BitfusionError as exc:
            log.info("session %d (%s): refused: %s", self.id, self._who, exc)
            self._refuse(request_id, exc.code, exc.message, refused=refusal_reason(exc.code))
            return
        self._attached(request_id, reservation, leases, "leased")

    def _attach(self, request_id: int, attach: m.Attach) -> None:
        self.client_name = attach.client_name
        table = self._reservations
        try:
            reservation = table.find(attach.reservation, attach.secret, attach.server_id)
            if self._gate.required and (
                reservation.user is None
                or self.user is None
                or reservation.user.user != self.user.user
            ):  # another user's: as if it did not exist
                raise InvalidValueError(
                    f"no reservation {attach.reservation} with that secret on this server"
                )
        except BitfusionError as exc:
            log.info("session %d (%s): attach refused: %s", self.id, self._who, exc)
            self._refuse(request_id, exc.code, exc.message, refused=refusal_reason(exc.code))
            return
        # Nothing more is delivered until the ATTACH is answered (the connection negotiates).
        table.when_settled(reservation, lambda: self._attach_now(request_id, reservation))

    def _attach_now(self, request_id: int, reservation: Reservation) -> None:
        if self._closed or self.connection.state is not ServerState.NEGOTIATING:
            return
        try:
            if reservation.ended is not None:
                raise LeaseEndedError(
                    f"reservation {reservation.id} has ended: {reservation.ended}"
                )
            leases = self._reservations.attach(reservation, self)
        except BitfusionError as exc:
            log.info("session %d (%s): attach refused: %s", self.id, self._who, exc)
            self._refuse(request_id, exc.code, exc.message, refused=refusal_reason(exc.code))
            return
        self._attached(
            request_id,
            reservation,
            leases,
            f"attached to reservation {reservation.id}:",
        )

    def _attached(
        self,
        request_id: int,
        reservation: Reservation,
        leases: list[Lease],
        how: str,
    ) -> None:
        self.reservation, self.leases = reservation, leases
        self._replies_due = [0] * len(leases)
        log.info("session %d (%s): %s %s", self.id, self._who, how, reservation.describe())
        reply = m.HelloReply.with_devices(
            self.id,
            self._limits.max_payload,
            self._limits.max_metadata,
            reservation.grants(self._reservations.executors),
        )
        self._write(self.connection.accept(request_id, reply))

    def _reserve(self, request_id: int, request: m.Reserve) -> None:
        table = self._reservations
        self.client_name = self.client_name or request.client_name
        if request.hold not in (m.HOLD_BY_CONNECTION, m.HOLD_BY_IDLE_TIMEOUT):
            raise InvalidValueError(
                f"unknown hold {request.hold} (1: by this connection, 0: by idle timeout)"
            )
        reservation = table.reserve(
            request.gpus,
            request.fraction,
            request.memory,
            request.weight,
            request.mode,
            request.client_name,
            holder=self if request.hold == m.HOLD_BY_CONNECTION else None,
            idle_timeout=request.idle_timeout,
            allowed=request.allowed_gpus(),
            user=self.user,
        )
        if reservation.holder is self:
            self._held.append(reservation)
        log.info(
            "session %d (%s): reserved %s as reservation %d (%s, idle timeout %s)",
            self.id,
            self._who,
            reservation.describe(),
            reservation.id,
            "held by this connection" if reservation.holder is self else "until released",
            f"{reservation.idle_timeout:g} s" if reservation.idle_timeout else "none",
        )
        reply = m.ReserveReply(
            reservation.id,
            reservation.idle_timeout,
            reservation.secret,
            table.server_id,
            m.encode_grants(reservation.grants(table.executors)),
        )
        self._write(self.connection.reply(m.Opcode.RESERVE, request_id, reply))

    def _release(self, request_id: int, request: m.Release) -> None:
        table = self._reservations
        reservation = table.find(request.reservation, request.secret, "")
        if self._gate.required and (
            reservation.user is None or self.user is None or reservation.user.user != self.user.user
        ):  # another user's: as if it did not exist
            raise InvalidValueError(
                f"no reservation {request.reservation} with that secret on this server"
            )
        table.end(reservation, f"released by {self._who}", EndedBy.RELEASED)
        self._write(self.connection.reply(m.Opcode.RELEASE, request_id, m.Done()))

    def _server_info(self, request_id: int, request: m.ServerInfo) -> None:
        info = m.ServerInfoReply(self._describe_server(request.detail))
        self._write(self.connection.reply(m.Opcode.SERVER_INFO, request_id, info))

    # -- what a reservation needs of its sessions (``reservations.Attachment``) ----------------
    def lease_ended(self, reason: str) -> None:
        """The reservation has ended (its table closes the tenants): say why, then close."""
        self.reservation, self.leases = None, []
        if self._closed or self.connection.state is ServerState.CLOSING:
            return
        log.info("session %d (%s): %s", self.id, self._who, reason)
        self._refuse(0, ErrorCode.LEASE_ENDED, reason)

    def token_ended(self, reason: str) -> None:
        """The session's token was revoked or expired: tell the client (AUTH), then close."""
        if not self._closed and self.connection.state is not ServerState.CLOSING:
            log.info("session %d (%s): %s; ending it", self.id, self._who, reason)
            self._refuse(0, ErrorCode.AUTH, f"{reason}; the session is over")

    def shut_down(self, reason: str) -> None:
        """The server is stopping: tell the client why (LEASE_ENDED), then close."""
        if not self._closed and self.connection.state is not ServerState.CLOSING:
            self._refuse(0, ErrorCode.LEASE_ENDED, reason)

    def last_request(self) -> float:
        return self._last_data

    def busy(self) -> bool:
        return any(self._replies_due) or any(
            lease.executor.queued(lease.tenant) for lease in self.leases
        )

    # -- device requests ------------------------------------------------------------------------
    def _submit(self, event: RequestReceived) -> None:
        message: Any = event.message  # a device request: every one has a ``device`` field
        request_id, payload = event.request_id, event.payload
        rule = message.RULE
        # When it was handled, for its latency; a request without a reply has none to time.
        started = time.perf_counter() if rule.reply is not None else 0.0
        device: int = message.device
        if device >= len(self.leases):
            text = f"device {device} is not in this session (it has {len(self.leases)})"
            if rule.reply is None:  # nobody waits to hear it; a client that sends this is broken
                self._refuse(request_id, ErrorCode.PROTOCOL, text)
                return
            raise InvalidValueError(text)
        lease = self.leases[device]
        executor, tenant = lease.executor, lease.tenant
        if type(message) is m.MemcpyDtoH and message.nbytes > self._limits.max_payload:
            raise InvalidValueError(
                f"copy of {message.nbytes} bytes exceeds the frame payload limit "
                f"{self._limits.max_payload}; split it"
            )
        op, to_reply = DISPATCH[type(message)](executor, tenant, message, payload)
        self._flow.unchecked += 1
        give_back: Callable[[], None] = _nothing
        if payload is not None:
            op, give_back = self._unstaging(op, tenant, payload)
        if to_reply is None:
            executor.submit(
                tenant,
                op,
                wants_reply=False,
                tag=request_id,
                on_done=lambda _result, _error: give_back(),
            )
            return
        opcode = message.OPCODE
        if rule.query and not self._replies_due[device]:
            error: BaseException | None
            try:
                ran, result = executor.run_if_idle(tenant, op)
            except Exception as exc:  # noqa: BLE001 - its error is the reply, as from the worker
                ran, result, error = True, None, exc
            else:
                error = None
            if ran:
                self._complete(opcode, request_id, to_reply, result, error, 0, tenant, started)
                return
        staged = message.nbytes if type(message) is m.MemcpyDtoH else 0
        self._flow.staged += staged

        def on_done(result: Any, error: BaseException | None) -> None:  # on the worker thread
            give_back()  # if the operation never ran (an earlier error, a closed tenant)
            self._loop.call_soon_threadsafe(
                self._complete_due,
                device,
                opcode,
                request_id,
                to_reply,
                result,
                error,
                staged,
                tenant,
                started,
            )

        self._replies_due[device] += 1
        executor.submit(tenant, op, wants_reply=True, tag=request_id, on_done=on_done)

    def _complete_due(self, device: int, *completion: Any) -> None:
        self._replies_due[device] -= 1
        self._complete(*completion)

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
        self._flow.staged -= nbytes
        self._update_flow()

    def _complete(
        self,
        opcode: int,
        request_id: int,
        to_reply: ToReply,
        result: Any,
        error: BaseException | None,
        staged: int,
        tenant: Tenant,
        started: float,
    ) -> None:
        """Write the reply of a finished request (on the event loop). ``staged``: its host
        bytes; a payload is handed back to ``tenant`` for reuse once sent. ``started``: when
        the request was handled (``time.perf_counter``)."""
        if self._closed:
            if isinstance(result, memoryview):  # a copy's bytes nobody will read: reuse them
                tenant.return_staging(result)
            return
        self._stats.replied(opcode, time.perf_counter() - started)
        if error is not None:
            self._write(self._device_error(request_id, error))
            self._unstage(staged)
            return
        reply, payload = to_reply(result)
        if payload is None:
            self._write(self.connection.reply(opcode, request_id, reply))
            self._unstage(staged)
        else:

            def sent() -> None:
                tenant.return_staging(payload)
                self._unstage(staged)

            self._write(
                self.connection.reply(opcode, request_id, reply, len(payload)), payload, sent
            )
            self._update_flow()

    def _device_error(self, request_id: int, error: BaseException) -> bytes:
        deferred_from, later = 0, 0
        if isinstance(error, DeferredError):
            deferred_from, later = error.failure.tag, error.failure.later_failures
            error = error.failure.error
        code = next((c for cls, c in _DEVICE_ERROR_CODES.items() if isinstance(error, cls)), None)
        if code is None:
            log.error("session %d: internal error", self.id, exc_info=error)
            code = ErrorCode.INTERNAL
        return self._error(
            request_id, code, str(error), deferred_from=deferred_from, later_failures=later
        )

    # -- flow control ---------------------------------------------------------------------------
    def _update_flow(self) -> None:
        if self._closed or self.connection.state is ServerState.CLOSING:
            return
        most_queued = 0
        if self._flow.depths_due():
            most_queued = max(
                (lease.executor.queued(lease.tenant) for lease in self.leases), default=0
            )
        if self._flow.should_read(self.stream.writable, most_queued):
            if not self._reading:
                self._reading = True
                if not self._yielding:  # else its next turn resumes it
                    self.stream.resume_reading()
                self._loop.call_soon(self._process)  # frames decoded before the pause wait
            return
        self._reading = False
        self.stream.pause_reading()
        if self._flow.backlogged and self._backlog_check is None:
            self._backlog_check = self._loop.call_later(BACKLOG_POLL_S, self._recheck_backlog)

    def _recheck_backlog(self) -> None:
        self._backlog_check = None
        if not self._closed:
            self._update_flow()

    def probe(self) -> None:
        """Called every ``PROBE_PERIOD_S``: end the session now if its client has gone.

        A client that dies while the server is not reading it, or while it has work queued and
        bytes still in flight, goes unheard until the server reads everything it sent: its FIN
        waits behind those bytes, so its GPUs would stay held while its dead work runs. So a
        session that is paused or has work queued asks the transport whether the peer is still
        there, and writes it a KEEPALIVE: a dead peer's host answers that with a reset, which
        the transport reports at once if reading, else the next probe sees."""
        if self._closed or self.connection.state is ServerState.CLOSING:
            return
        if self._reading and not any(lease.executor.queued(lease.tenant) for lease in self.leases):
            return  # a dead client's FIN or reset reaches us at the next read
        if not self.stream.peer_alive():
            log.info("session %d (%s): the client has gone; ending it", self.id, self.peer)
            self.stream.abort()
        elif self.stream.writable:  # else writes are pending: they meet a dead peer's reset
            self._write(self.connection.keepalive())

    def status(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "peer": self.peer,
            "client": self.client_name,
            "reservation": self.reservation.id if self.reservation is not None else None,
            "received_bytes": self.received_bytes,
            "sent_bytes": self.sent_bytes,
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


# What handles each request that is not device work, by its class.
_NOT_DEVICE: dict[type, Callable[[ServerSession, int, Any], None]] = {
    m.Hello: ServerSession._hello,
    m.Attach: ServerSession._attach,
    m.Reserve: ServerSession._reserve,
    m.Release: ServerSession._release,
    m.ServerInfo: ServerSession._server_info,
    m.Authenticate: ServerSession._authenticate,
}
