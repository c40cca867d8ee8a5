"""The two ends of a conversation, with no I/O: ``ClientConnection`` and ``ServerConnection``.

A connection owns the rules of the conversation (docs/PROTOCOL.md, sections 3.3, 5, 8, 9): request
ids, the table of requests waiting for a reply, the session phase, and what an ERROR frame means.
It is fed received bytes (``receive_data``, or ``get_buffer``/``buffer_updated`` to have a transport
read straight into its buffers), returns events from ``next_event()``, and returns the bytes to
write from its ``send_*`` methods. Drivers (the asyncio one, the blocking one, tests pairing a
client and a server in memory) move the bytes; none of them restates a rule.

Everything that affects a connection's phase lives here, in the transition tables and the methods
beside them. Events are frozen dataclasses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .decoder import Frame, FrameDecoder, PayloadSink
from .encoder import encode_reply, encode_request
from .errors import (
    BitfusionError,
    ConnectionLostError,
    ErrorCode,
    ProtocolError,
    error_class,
)
from .frames import DEFAULT_LIMITS, MAX_REQUEST_ID, Limits
from .messages import (
    ERROR_DEFERRED,
    ERROR_FATAL,
    ErrorReply,
    HelloReply,
    Keepalive,
    Message,
    Opcode,
    Reply,
    Request,
)
from .rules import Phase

# The client receives only payloads it asked for, into buffers it owns, so it accepts any length
# it requested (the check is against the pending request, not a limit).
CLIENT_LIMITS = Limits(max_metadata=DEFAULT_LIMITS.max_metadata, max_payload=2**63 - 1)


# -- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The reply to request ``request_id``; ``token`` is what its sender attached to it."""

    request_id: int
    token: Any
    message: Reply
    payload: memoryview | None


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Request ``request_id`` failed (``error.deferred_from``: an earlier no-reply call did)."""

    request_id: int
    token: Any
    error: BitfusionError


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The conversation is over; ``orphans`` are the tokens of requests never to be answered.

    The driver closes (or aborts) the transport. Every later send raises ``error``.
    """

    error: BitfusionError
    orphans: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request for the server to handle; ``payload`` is where its sink put the bulk data."""

    request_id: int
    message: Request
    payload: memoryview | None


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The client broke the protocol. ``data`` is the fatal ERROR frame to write before closing;
    the connection delivers nothing more (docs/PROTOCOL.md, section 9.4)."""

    request_id: int
    error: ProtocolError
    data: bytes


ClientEvent = ReplyReceived | RequestFailed | ConnectionFailed
ServerEvent = RequestReceived | ProtocolViolation


class ClientState(enum.Enum):
    IDLE = "idle"  # nothing sent yet: AUTHENTICATE, HELLO, ATTACH or a control request first
    AUTHENTICATED = "authenticated"  # AUTHENTICATE sent: a greeting or control request follows
    GREETING = "greeting"  # HELLO or ATTACH sent, its answer not yet received
    READY = "ready"  # leased: device requests flow
    CONTROL = "control"  # a control connection: reservations and queries, no GPUs
    CLOSED = "closed"  # refused, failed or closed; ``failure`` says why


class ServerState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"  # AUTHENTICATE, HELLO, ATTACH or a control request first
    AUTHENTICATED = "authenticated"  # AUTHENTICATE received: a greeting or control request next
    NEGOTIATING = "negotiating"  # HELLO or ATTACH delivered; no event until accepted or refused
    ACTIVE = "active"
    CONTROL = "control"  # a control connection: RESERVE, RELEASE and SERVER_INFO only
    CLOSING = "closing"  # a fatal ERROR was produced: nothing more is read or delivered


# What moves a client: (state, what happened) -> next state. Anything else in CLOSED is refused
# with the failure; a send in the wrong state is a bug of the caller (ProtocolError, nothing sent).
CLIENT_TRANSITIONS: dict[tuple[ClientState, str], ClientState] = {
    (ClientState.IDLE, "send auth"): ClientState.AUTHENTICATED,
    (ClientState.IDLE, "send greeting"): ClientState.GREETING,
    (ClientState.IDLE, "send control"): ClientState.CONTROL,
    (ClientState.AUTHENTICATED, "send greeting"): ClientState.GREETING,
    (ClientState.AUTHENTICATED, "send control"): ClientState.CONTROL,
    (ClientState.AUTHENTICATED, "failed"): ClientState.CLOSED,
    (ClientState.GREETING, "greeting reply"): ClientState.READY,
    (ClientState.GREETING, "ERROR"): ClientState.CLOSED,  # every refusal of a greeting is fatal
    (ClientState.IDLE, "failed"): ClientState.CLOSED,
    (ClientState.GREETING, "failed"): ClientState.CLOSED,
    (ClientState.READY, "failed"): ClientState.CLOSED,
    (ClientState.CONTROL, "failed"): ClientState.CLOSED,
}
# How a connection's opening request moves the client (a greeting, or anything else: control).
_FIRST_MOVES = {Phase.AUTH: "send auth", Phase.GREETING: "send greeting"}
# Which phases of request each client state may send (a GREETING sends nothing more).
CLIENT_MAY_SEND: dict[ClientState, frozenset[Phase]] = {
    ClientState.IDLE: frozenset({Phase.AUTH, Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ClientState.AUTHENTICATED: frozenset({Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ClientState.GREETING: frozenset(),
    ClientState.READY: frozenset({Phase.DEVICE, Phase.ANY}),
    ClientState.CONTROL: frozenset({Phase.CONTROL, Phase.ANY}),
}

# What moves a server. A protocol violation in any state but CLOSING leads to CLOSING.
SERVER_TRANSITIONS: dict[tuple[ServerState, str], ServerState] = {
    (ServerState.AWAITING_HELLO, "auth"): ServerState.AUTHENTICATED,
    (ServerState.AWAITING_HELLO, "greeting"): ServerState.NEGOTIATING,
    (ServerState.AWAITING_HELLO, "control"): ServerState.CONTROL,
    (ServerState.AUTHENTICATED, "greeting"): ServerState.NEGOTIATING,
    (ServerState.AUTHENTICATED, "control"): ServerState.CONTROL,
    (ServerState.AUTHENTICATED, "refuse"): ServerState.CLOSING,
    (ServerState.NEGOTIATING, "accept"): ServerState.ACTIVE,
    (ServerState.AWAITING_HELLO, "refuse"): ServerState.CLOSING,
    (ServerState.NEGOTIATING, "refuse"): ServerState.CLOSING,
    (ServerState.ACTIVE, "refuse"): ServerState.CLOSING,
    (ServerState.CONTROL, "refuse"): ServerState.CLOSING,
}
# Which phases of request the server accepts in each state; anything else is a PROTOCOL error.
SERVER_MAY_RECEIVE: dict[ServerState, frozenset[Phase]] = {
    ServerState.AWAITING_HELLO: frozenset({Phase.AUTH, Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ServerState.AUTHENTICATED: frozenset({Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ServerState.ACTIVE: frozenset({Phase.DEVICE, Phase.ANY}),
    ServerState.CONTROL: frozenset({Phase.CONTROL, Phase.ANY}),
}


def error_from_reply(reply: ErrorReply) -> BitfusionError:
    """The exception an ERROR frame stands for (with its deferred origin, if it has one)."""
    cls = error_class(reply.code)
    if reply.flags & ERROR_DEFERRED:
        return cls(
            reply.message, deferred_from=reply.deferred_from, later_failures=reply.later_failures
        )
    return cls(reply.message)


@dataclass(slots=True)
class _Pending:
    opcode: int
    token: Any
    into: memoryview | None  # where the reply's payload lands (MEMCPY_DTOH)


class _Receiving:
    """The receive side both ends share: a decoder the transport reads into, and the error it
    raised, kept to be delivered after the frames decoded before it."""

    _decoder: FrameDecoder
    _broken: ProtocolError | None

    def _start_receiving(self, decoder: FrameDecoder) -> None:
        self._decoder = decoder
        self._broken = None

    def get_buffer(self) -> memoryview:
        """Where the transport writes what it reads next. Once the stream is broken or over,
        a scratch buffer whose bytes are ignored: a transport's read must never raise (asyncio
        would drop the connection before the fatal ERROR frame saying why had gone out)."""
        if self._broken is not None or not self._receiving:
            return _SCRATCH
        return self._decoder.get_buffer()

    @property
    def _receiving(self) -> bool:
        """False once nothing more is to be decoded (the conversation is over or closing)."""
        raise NotImplementedError

    @property
    def in_frame(self) -> bool:
        """Whether part of a frame has been received (a close now cuts it)."""
        return self._decoder.in_frame

    def discard_received(self) -> None:
        """Forget what was received and not yet delivered (the connection is gone)."""
        self._decoder.discard()

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``."""
        if self._broken is not None or not self._receiving:
            return
        try:
            self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._broken = exc  # delivered after the frames decoded before it

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes by copying them in (tests, in-memory pairs)."""
        view = memoryview(data).cast("B")
        while view and self._broken is None and self._receiving:
            target = self.get_buffer()
            count = min(len(target), len(view))
            target[:count] = view[:count]
            view = view[count:]
            self.buffer_updated(count)


class ClientConnection(_Receiving):
    """The client end: numbers requests, matches replies and errors, knows when it is over.

    ``send_request`` returns the bytes to write; ``next_event`` returns what came back. A request
    that has a reply gets exactly one ``ReplyReceived`` or ``RequestFailed`` with the ``token``
    given at send time, or is listed in the ``orphans`` of the ``ConnectionFailed`` that ends
    the conversation.
    """

    def __init__(
        self,
        limits: Limits = CLIENT_LIMITS,
        buffer_size: int = 256 * 1024,
        server: str = "the server",
    ) -> None:
        self.state = ClientState.IDLE
        self.server = server  # how errors name the other end (one of several, in a pool)
        self.failure: BitfusionError | None = None
        self.hello: HelloReply | None = None
        self._start_receiving(
            FrameDecoder(
                receives_replies=True,
                limits=limits,
                payload_sink=self._payload_destination,
                buffer_size=buffer_size,
            )
        )
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._events: list[ClientEvent] = []  # produced by a state change, delivered first

    def _move(self, what: str) -> None:
        self.state = CLIENT_TRANSITIONS[(self.state, what)]

    @property
    def waiting(self) -> int:
        """How many sent requests still wait for their reply."""
        return len(self._pending)

    # -- sending --------------------------------------------------------------------------------
    def send_request(
        self,
        message: Request,
        payload_length: int = 0,
        *,
        into: memoryview | None = None,
        token: Any = None,
    ) -> tuple[int, bytes]:
        """Encode ``message``; returns its request id and its header and metadata, which the
        caller writes followed by ``payload_length`` bytes of payload. ``into``: the buffer the
        reply's payload lands in. Raises the failure once the connection is over, and
        ``ProtocolError`` (nothing registered) for a request the phase does not allow or a
        message that cannot be encoded."""
        state = self.state
        rule = message.RULE
        if state is not ClientState.READY or rule.phase is not Phase.DEVICE:
            self._check_phase(message)
        if into is not None and len(into) != getattr(message, "nbytes", len(into)):
            raise ProtocolError(
                f"the buffer for the reply's payload holds {len(into)} bytes; "
                f"the request asks for {message.nbytes}"  # type: ignore[attr-defined]
            )
        request_id = self._next_id
        try:
            head = encode_request(message, request_id, payload_length)
        except ValueError as exc:
            raise ProtocolError(f"cannot encode {type(message).__name__}: {exc}") from None
        self._next_id = 1 if request_id == MAX_REQUEST_ID else request_id + 1
        if rule.reply is not None:
            self._pending[request_id] = _Pending(message.OPCODE, token, into)
        if state is ClientState.IDLE or state is ClientState.AUTHENTICATED:
            self._move(_FIRST_MOVES.get(rule.phase, "send control"))
        return request_id, head

    def _check_phase(self, message: Request) -> None:
        state = self.state
        if state is ClientState.CLOSED:
            assert self.failure is not None
            raise self.failure
        phase, name = message.RULE.phase, type(message).__name__
        if phase in CLIENT_MAY_SEND[state]:
            return
        if phase is Phase.AUTH:
            raise ProtocolError("AUTHENTICATE is a connection's first request, and only once")
        if state is ClientState.IDLE or state is ClientState.AUTHENTICATED:
            raise ProtocolError(f"HELLO, ATTACH or a control request must come first, not {name}")
        if state is ClientState.GREETING or phase is Phase.GREETING:
            raise ProtocolError("HELLO or ATTACH is sent once, and nothing before its answer")
        if state is ClientState.CONTROL:
            raise ProtocolError(f"{name} needs a device session; this is a control connection")
        raise ProtocolError(f"{name} goes on a control connection, not on a device session")

    def close(self, reason: str = "the session was closed") -> ConnectionFailed:
        """End the conversation from this side; the event lists the requests left unanswered."""
        return self._fail(ConnectionLostError(reason))

    def abandon(self, error: BitfusionError) -> ConnectionFailed:
        """End the conversation because of ``error`` (the driver gave up waiting, say); later
        sends raise it."""
        return self._fail(error)

    # -- receiving ------------------------------------------------------------------------------
    @property
    def _receiving(self) -> bool:
        return self.state is not ClientState.CLOSED

    def connection_lost(self, error: BaseException | None = None) -> ConnectionFailed | None:
        """The transport closed. Returns the event that fails what was waiting (None when the
        conversation was already over)."""
        if self.state is ClientState.CLOSED:
            return None
        reason = f": {error}" if error else ""
        if error is None and self.in_frame:
            reason = ": in the middle of a frame"
        return self._fail(ConnectionLostError(f"connection to {self.server} closed{reason}"))

    def next_event(self) -> ClientEvent | None:
        """The next event, or None until more bytes arrive."""
        if self._events:
            return self._events.pop(0)
        while self.state is not ClientState.CLOSED:
            frame = self._decoder.next_frame()
            if frame is None:
                if self._broken is not None:
                    error = ProtocolError(f"the server broke the protocol: {self._broken}")
                    return self._fail(error)
                return None
            if type(frame.message) is not Keepalive:
                return self._frame_event(frame)
            if frame.request_id != 0:  # it answers nothing: the server is broken
                return self._fail(ProtocolError("the server sent a KEEPALIVE with a request id"))
        return None

    def _frame_event(self, frame: Frame) -> ClientEvent:
        message = frame.message
        pending = self._pending.pop(frame.request_id, None)
        if type(message) is ErrorReply:
            error = error_from_reply(message)
            if pending is None:  # for id 0, or for a no-reply request: the session is over
                return self._fail(error)
            event = RequestFailed(frame.request_id, pending.token, error)
            if message.flags & ERROR_FATAL or self.state is ClientState.GREETING:
                self._events.append(self._fail(error))
            return event
        if pending is None:
            return self._fail(
                ProtocolError(f"the server answered request #{frame.request_id}, never sent")
            )
        if pending.opcode != frame.opcode:
            self._pending[frame.request_id] = pending  # so that its sender hears the failure
            return self._fail(
                ProtocolError(f"the reply to request #{frame.request_id} has the wrong opcode")
            )
        if pending.into is not None and len(pending.into) and frame.payload is None:
            self._pending[frame.request_id] = pending
            return self._fail(
                ProtocolError(f"the reply to request #{frame.request_id} carries no payload")
            )
        if self.state is ClientState.GREETING and pending.opcode != Opcode.AUTHENTICATE:
            # the greeting's answer (an AUTHENTICATE pipelined before it is answered first)
            assert isinstance(message, HelloReply)
            self.hello = message
            self._move("greeting reply")
        return ReplyReceived(frame.request_id, pending.token, message, frame.payload)  # type: ignore[arg-type]

    def _fail(self, error: BitfusionError) -> ConnectionFailed:
        if self.state is not ClientState.CLOSED:
            self._move("failed")
        if self.failure is None:
            self.failure = error
        orphans = tuple(pending.token for pending in self._pending.values())
        self._pending.clear()
        return ConnectionFailed(error, orphans)

    def _payload_destination(
        self, opcode: int, request_id: int, message: Message, length: int
    ) -> memoryview | None:
        pending = self._pending.get(request_id)
        if pending is None or pending.opcode != opcode or pending.into is None:
            raise ProtocolError(f"unexpected payload for request #{request_id}")
        if len(pending.into) != length:
            raise ProtocolError(
                f"the reply to request #{request_id} carries {length} bytes, "
                f"expected {len(pending.into)}"
            )
        return pending.into


class ServerConnection(_Receiving):
    """The server end: checks the client keeps the rules, and encodes replies and errors.

    ``payload_sink`` chooses where a request's bulk payload lands (None: read and drop it).
    """

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        payload_sink: PayloadSink | None = None,
        buffer_size: int = 256 * 1024,
    ) -> None:
        self.state = ServerState.AWAITING_HELLO
        self._greeting: int = Opcode.HELLO  # the first request's opcode, which accept answers
        self._limits = limits
        self._start_receiving(
            FrameDecoder(
                receives_replies=False,
                limits=limits,
                payload_sink=payload_sink or _drop_payload,
                buffer_size=buffer_size,
            )
        )
        # Room for an error's text within the client's metadata limit (the text may echo what
        # the client sent, a kernel name, say).
        self._error_room = limits.max_metadata - ErrorReply._struct.size - 4

    def _move(self, what: str) -> None:
        self.state = SERVER_TRANSITIONS[(self.state, what)]

    # -- receiving ------------------------------------------------------------------------------
    @property
    def _receiving(self) -> bool:
        return self.state is not ServerState.CLOSING

    def next_event(self) -> ServerEvent | None:
        """The next request to handle, a violation to answer, or None: wait for more bytes (or,
        while NEGOTIATING, for ``accept`` or ``refuse``)."""
        state = self.state
        if state is ServerState.NEGOTIATING or state is ServerState.CLOSING:
            return None
        frame = self._decoder.next_frame()
        if frame is None:
            if self._broken is not None:
                return self._violation(0, self._broken)
            return None
        request_id, message = frame.request_id, frame.message
        if request_id == 0:
            return self._violation(0, ProtocolError("request id 0 is reserved"))
        phase = message.RULE.phase  # type: ignore[attr-defined]
        if state is not ServerState.ACTIVE or phase is not Phase.DEVICE:
            if phase not in SERVER_MAY_RECEIVE[state]:
                return self._violation(request_id, self._out_of_phase(frame.opcode, phase))
            if state is ServerState.AWAITING_HELLO or state is ServerState.AUTHENTICATED:
                move = (
                    "auth"
                    if phase is Phase.AUTH
                    else ("greeting" if phase is Phase.GREETING else "control")
                )
                self._move(move)
                if phase is Phase.GREETING:
                    self._greeting = frame.opcode
        return RequestReceived(request_id, message, frame.payload)  # type: ignore[arg-type]

    def _out_of_phase(self, opcode: int, phase: Phase) -> ProtocolError:
        name = Opcode(opcode).name
        if phase is Phase.AUTH:
            return ProtocolError("AUTHENTICATE must be a connection's first request, once")
        if self.state is ServerState.AWAITING_HELLO or self.state is ServerState.AUTHENTICATED:
            return ProtocolError(f"expected HELLO, ATTACH or a control request first, got {name}")
        if phase is Phase.GREETING:
            return ProtocolError(f"{name} sent after the connection's first request")
        if self.state is ServerState.CONTROL:
            return ProtocolError(f"{name} needs a device session; this is a control connection")
        return ProtocolError(f"{name} goes on a control connection, not on a device session")

    def _violation(self, request_id: int, error: ProtocolError) -> ProtocolViolation:
        return ProtocolViolation(
            request_id, error, self.refuse(request_id, ErrorCode.PROTOCOL, str(error))
        )

    # -- sending --------------------------------------------------------------------------------
    def accept(self, request_id: int, reply: HelloReply) -> bytes:
        """Grant the HELLO or ATTACH: its reply (with the greeting's own opcode); requests after
        it are delivered from now on."""
        self._move("accept")
        return encode_reply(self._greeting, request_id, reply)

    def refuse(self, request_id: int, code: ErrorCode, text: str) -> bytes:
        """A fatal ERROR: write it, then close. Nothing more is delivered."""
        if self.state is not ServerState.CLOSING:
            self._move("refuse")
        return self._error(request_id, code, text, ERROR_FATAL, 0, 0)

    def keepalive(self) -> bytes:
        """A frame the client ignores; written while the server is not reading the client, so
        that a client that has gone is found out (its host answers it with a reset)."""
        return _KEEPALIVE

    def reply(self, opcode: int, request_id: int, message: Reply, payload_length: int = 0) -> bytes:
        """The reply to request ``request_id`` (``payload_length`` bytes of payload follow)."""
        return encode_reply(opcode, request_id, message, payload_length)

    def error(
        self,
        request_id: int,
        code: ErrorCode,
        text: str,
        *,
        deferred_from: int = 0,
        later_failures: int = 0,
    ) -> bytes:
        """A request failed (``deferred_from``: an earlier no-reply request did); not fatal."""
        flags = ERROR_DEFERRED if deferred_from else 0
        return self._error(request_id, code, text, flags, deferred_from, later_failures)

    def _error(
        self, request_id: int, code: ErrorCode, text: str, flags: int, deferred: int, later: int
    ) -> bytes:
        raw = text.encode()
        if len(raw) > self._error_room:
            text = raw[: self._error_room - 3].decode(errors="ignore") + "..."
        return encode_reply(
            Opcode.ERROR, request_id, ErrorReply(int(code), flags, deferred, later, text)
        )


_KEEPALIVE = encode_reply(Opcode.KEEPALIVE, 0, Keepalive())
_SCRATCH = memoryview(bytearray(64 * 1024))  # where bytes read after the end are dropped


def _drop_payload(opcode: int, request_id: int, message: Message, length: int) -> None:
    return None
