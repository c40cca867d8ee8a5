#!/usr/bin/env python3
"""Fuzz target: a ``ClientConnection`` and a ``ServerConnection`` driven by fuzzer-chosen calls.

Run it for real (an hour, say, from the repository root; new inputs go into the corpus):

    python fuzz/fuzz_connections.py -max_total_time=3600 -timeout=10 fuzz/corpus/connections

and in CI for seconds (``tests/fuzz/test_fuzz_smoke.py`` does this on a copy of the corpus):

    python fuzz/fuzz_connections.py -max_total_time=8 -timeout=10 COPY_OF_CORPUS

Replay one input without fuzzing: ``python fuzz/fuzz_connections.py FILE``.

The two ends are joined by two byte queues ("wires"). The input is a 3-byte configuration (byte 0:
bits 0-1 the server's limits, bit 2 the server keeps payloads, bit 3 deliver everything at the
end, bit 4 the client's own limits, bit 5 the harness opens the connection first so the script
starts past it: with a HELLO (READY), with bit 6 an ATTACH (READY), with bit 7 instead a
RESERVE, a control connection (CONTROL); byte 1: bits 0-1 the client's receive buffer size, bit
2 the harness exchanges an AUTHENTICATE first (before its opening request, or alone without bit
5 of byte 0: the script starts AUTHENTICATED); byte 2: bits 0-1 the server's receive buffer
size), then a script of operations, each one byte and then its own choices: the client sends a
request (valid, broken, or one the phase does not allow, PROTOCOL.md 5.1), bytes move along a wire (a fuzzer-chosen count, through
``receive_data`` or ``get_buffer``/``buffer_updated``), garbage is fed to either end, either end's
events are taken, the client closes, abandons or loses the connection, and the server answers
what it received as a server should (accept, refuse, reply, error, deferred error, KEEPALIVE) or
lies (wrong opcode, unknown id, a KEEPALIVE with an id, a copy's payload of the wrong length).

What must hold (docs/PROTOCOL.md sections 3, 5, 9 and the connections' docstrings):

- no call raises, except ``send_request`` (``ProtocolError`` for a broken message or one the phase
  does not allow, with nothing registered; the connection's ``failure`` once it is over);
- a broken message, or one the phase does not allow, is refused; others are not; ids are 1, 2, ...
- every event is one of the documented dataclasses; every request that has a reply is resolved
  exactly once (``ReplyReceived``, ``RequestFailed``, or in a ``ConnectionFailed``'s orphans), by
  the end at the latest; nothing is pending once the client is closed;
- a reply is of its request's reply class, and a copy's reply carries the caller's buffer;
- while neither wire carried anything the client's rules do not allow: the server delivers the
  client's requests unchanged and in order and never sees a violation, and the client fails only
  for an ERROR frame the server sent or for the harness's own close/abandon/loss;
- everything the server writes decodes as replies; a violation's bytes are one fatal ERROR.

``FUZZ_AVOID`` names (see fuzz_support): ``hello-in-ready`` (do not send a second greeting, HELLO
or ATTACH, after the first was answered), ``greeting-behind-authenticate`` (do not send a
greeting while an AUTHENTICATE is unanswered: the client takes the AuthenticateReply for the
greeting's reply), ``bad-payload-length`` (no negative or 2**64 payload length),
``dtoh-empty-reply`` (no copy's reply with an empty payload to a non-empty buffer: neither the
lying server's, nor the honest answer to a copy of 0 bytes into a 1-byte buffer), and
``get-buffer-after-error`` (stop feeding an end whose ``get_buffer`` raised).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Fuzzing: the project's modules are instrumented for coverage as they are imported here; the
    # imports below then find them loaded. Replaying (tests) imports them plainly.
    import atheris

    with atheris.instrument_imports(include=["bitfusion_net"]):
        import bitfusion_net.protocol  # noqa: F401

import itertools  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, cast  # noqa: E402

from fuzz_support import Choices, InvariantBroken, avoiding, check, trace  # noqa: E402
from fuzz_values import REQUEST_TYPES, broken_message, message  # noqa: E402

from bitfusion_net.protocol import (  # noqa: E402
    CLIENT_LIMITS,
    RULES,
    BitfusionError,
    ClientConnection,
    ClientState,
    ConnectionFailed,
    ConnectionLostError,
    DeviceGrant,
    ErrorCode,
    FrameDecoder,
    Limits,
    Opcode,
    Phase,
    ProtocolError,
    ProtocolViolation,
    ReplyReceived,
    RequestFailed,
    RequestReceived,
    ServerConnection,
    ServerState,
    encode_reply,
)
from bitfusion_net.protocol import messages as m  # noqa: E402
from bitfusion_net.protocol.frames import MAX_REQUEST_ID  # noqa: E402

SERVER_LIMITS = (
    Limits(),
    Limits(max_metadata=64, max_payload=16),
    Limits(max_metadata=256, max_payload=1024),
    Limits(max_metadata=4096, max_payload=1),
)
BUFFER_SIZES = (24, 25, 64, 256 * 1024)
LARGEST_WRITTEN_PAYLOAD = 4096  # the harness writes payloads up to this; beyond, the wire is cut
MAX_STEPS = 200
# What one script byte can do; a name appears more than once to be chosen more often.
OPERATIONS = (
    "client_send", "client_send", "client_send", "deliver_to_server", "deliver_to_server",
    "server_events", "server_answer", "server_answer", "deliver_to_client", "deliver_to_client",
    "client_events", "client_end", "garbage", "server_keepalive", "server_lie", "server_refuse",
)  # fmt: skip
ERROR_CODES = (*(int(code) for code in ErrorCode), 0, 99, 65535)
# The phases of request each state allows (PROTOCOL.md 5.1), written out here rather than taken
# from the connections the harness checks. A client that is CLOSED sends nothing.
CLIENT_ALLOWS: dict[ClientState, frozenset[Phase]] = {
    ClientState.IDLE: frozenset({Phase.AUTH, Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    # AUTHENTICATE sent: the opening request follows, as on a fresh connection (only once).
    ClientState.AUTHENTICATED: frozenset({Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ClientState.GREETING: frozenset(),  # nothing before the greeting's answer
    ClientState.READY: frozenset({Phase.DEVICE, Phase.ANY}),
    ClientState.CONTROL: frozenset({Phase.CONTROL, Phase.ANY}),
}
# What a connection's first request (or the one after AUTHENTICATE) makes of the server.
OPENED_BY = {Phase.AUTH: ServerState.AUTHENTICATED, Phase.GREETING: ServerState.NEGOTIATING}
TOKEN = "bfnet-fuzz"  # opaque to the connections; short, to fit the smallest limits
SERVER_DELIVERS: dict[ServerState, frozenset[Phase]] = {
    ServerState.AWAITING_HELLO: frozenset({Phase.AUTH, Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ServerState.AUTHENTICATED: frozenset({Phase.GREETING, Phase.CONTROL, Phase.ANY}),
    ServerState.ACTIVE: frozenset({Phase.DEVICE, Phase.ANY}),
    ServerState.CONTROL: frozenset({Phase.CONTROL, Phase.ANY}),
}


@dataclass
class Sent:
    """A request the client sent that has a reply, until its resolution."""

    request_id: int
    message: m.Request
    token: int
    into: memoryview | None


@dataclass
class Wire:
    """Bytes written by one end, not yet delivered to the other."""

    data: bytearray = field(default_factory=bytearray)
    clean: bool = True  # nothing on it the client's rules do not allow (and nothing lost)


class Harness:
    """The two ends, the wires between them, and what has been promised so far."""

    def __init__(self, choices: Choices) -> None:
        self.choices = choices
        config = choices.byte()
        self.server_limits = SERVER_LIMITS[config & 3]
        self.keep_payloads = bool(config & 4)  # the server's sink keeps payloads, or drops them
        self.drain_at_end = bool(config & 8)
        self.handshake = bool(config & 32)  # start past a first request the harness exchanged:
        self.attach = bool(config & 64)  # an ATTACH rather than a HELLO (READY)
        self.control = bool(config & 128)  # a RESERVE: a control connection (CONTROL)
        client_config = choices.byte()
        self.authenticated = bool(client_config & 4)  # an AUTHENTICATE first (before any greeting)
        self.client = ClientConnection(
            # The metadata limit is version 2's, which servers size their error texts to.
            limits=CLIENT_LIMITS if config & 16 else Limits(max_payload=LARGEST_WRITTEN_PAYLOAD),
            buffer_size=BUFFER_SIZES[client_config & 3],
        )
        self.server = ServerConnection(
            self.server_limits,
            payload_sink=self._keep_payload if self.keep_payloads else None,
            buffer_size=BUFFER_SIZES[choices.byte() & 3],
        )
        self.to_server, self.to_client = Wire(), Wire()
        self.tokens = itertools.count(1)
        self.last_id = 0
        self.outstanding: dict[int, Sent] = {}  # by token
        self.by_id: dict[int, Sent] = {}  # the same, by request id
        self.resolved: set[int] = set()
        self.expected: deque[tuple[int, bytes, bytes | None]] = deque()  # what the server gets
        self.inbox: list[RequestReceived] = []  # requests the server has not answered
        self.no_reply_ids: list[int] = []
        self.error_texts: set[str] = set()  # of every ERROR frame the server wrote
        self.own_errors: set[int] = set()  # ids of the errors the harness's calls caused

    @property
    def strict(self) -> bool:
        """Both wires carried only what the rules allow: every failure has a known cause."""
        return self.to_server.clean and self.to_client.clean

    @staticmethod
    def _keep_payload(opcode: int, request_id: int, message: m.Message, length: int) -> memoryview:
        return memoryview(bytearray(length))

    # -- the script ------------------------------------------------------------------------------
    def run(self) -> None:
        if self.authenticated:
            self.authenticate()
        if self.handshake:
            self.greet()
        for _ in range(MAX_STEPS):
            if not self.choices.remaining:
                break
            operation = self.choices.pick(OPERATIONS)
            trace(operation, self.client.state.name, self.server.state.name)
            getattr(self, operation)()
            self.check_states()
        self.finish()

    def authenticate(self) -> None:
        """An AUTHENTICATE sent, delivered and answered, its reply taken: both ends then wait for
        the opening request (AUTHENTICATED), as on a fresh connection (PROTOCOL.md 5.1)."""
        request_id, head = self.client.send_request(m.Authenticate(TOKEN))
        self.last_id = request_id
        check(self.client.state is ClientState.AUTHENTICATED, "AUTHENTICATE left the client idle")
        self.server.receive_data(head)
        event = _next_event(self.server)
        check(isinstance(event, RequestReceived), f"the AUTHENTICATE arrived as {event!r}")
        check(self.server.state is ServerState.AUTHENTICATED, "AUTHENTICATE left the server")
        answer = self.server.reply(Opcode.AUTHENTICATE, request_id, m.AuthenticateReply("fuzz"))
        self.client.receive_data(answer)
        check(isinstance(_next_event(self.client), ReplyReceived), "AUTHENTICATE was not answered")
        check(self.client.state is ClientState.AUTHENTICATED, "its reply moved the client")
        check(self.client.hello is None, "an AuthenticateReply taken for a greeting's reply")

    def greet(self) -> None:
        """A HELLO or ATTACH (or a RESERVE) sent, delivered, accepted and its reply taken, so
        scripts start READY (or CONTROL)."""
        first: m.Request
        if self.control:
            first = m.Reserve(1, 0.5, 0, hold=m.HOLD_BY_IDLE_TIMEOUT)
        elif self.attach:
            first = m.Attach(3, bytes(32), "server", "fuzz")
        else:
            first = m.Hello(1, 1.0, 0)
        request_id, head = self.client.send_request(first)
        self.last_id = request_id
        self.server.receive_data(head)
        event = _next_event(self.server)
        check(isinstance(event, RequestReceived), f"the {first!r} arrived as {event!r}")
        grants = [self._grant(0)]
        if self.control:
            reserved = m.ReserveReply(3, 0.0, bytes(32), "server", m.encode_grants(grants))
            answer = self.server.reply(first.OPCODE, request_id, reserved)
        else:
            reply = m.HelloReply.with_devices(7, 4096, 65536, grants)
            answer = self.server.accept(request_id, reply)
        self.client.receive_data(answer)
        check(isinstance(_next_event(self.client), ReplyReceived), f"{first!r} was not answered")
        expected = ClientState.CONTROL if self.control else ClientState.READY
        check(self.client.state is expected, f"the handshake left the client {self.client.state}")

    def check_states(self) -> None:
        if self.client.state is ClientState.CLOSED:
            check(self.client.waiting == 0, "a closed client still has requests pending")
            check(self.client.failure is not None, "a closed client has no failure")

    # -- the client side -------------------------------------------------------------------------
    def client_send(self) -> None:
        choices, client = self.choices, self.client
        cls = choices.pick(REQUEST_TYPES)
        broken = choices.byte() < 32
        msg = broken_message(choices, cls) if broken else None
        if msg is None:
            broken = False
            msg = message(choices, cls)
        assert isinstance(msg, m.Request)
        phase = msg.RULE.phase
        if (
            phase is Phase.GREETING
            and client.state is ClientState.READY
            and avoiding("hello-in-ready")
        ):
            return
        if (
            phase is Phase.GREETING
            and any(type(sent.message) is m.Authenticate for sent in self.outstanding.values())
            and avoiding("greeting-behind-authenticate")
        ):
            return
        payload_length = self._payload_length(msg)
        bad_length = not 0 <= payload_length < 2**64
        into = self._into(msg)
        token = next(self.tokens)
        state, waiting = client.state, client.waiting
        allowed = phase in CLIENT_ALLOWS.get(state, frozenset())
        # A copy-out with a buffer of the wrong size: the client may refuse it at once, or fail
        # when the reply's payload does not fit; it must not report success with the buffer unfilled.
        misfit = isinstance(msg, m.MemcpyDtoH) and into is not None and len(into) != msg.nbytes
        try:
            request_id, head = client.send_request(msg, payload_length, into=into, token=token)
        except BitfusionError as exc:
            if state is ClientState.CLOSED:
                check(exc is client.failure, f"a closed client raised {exc!r}, not its failure")
            else:
                check(isinstance(exc, ProtocolError), f"send_request raised {exc!r}")
                check(
                    broken or bad_length or misfit or not allowed,
                    f"a valid {msg!r} was refused: {exc}",
                )
            check(client.waiting == waiting, "a refused request was registered")
            return
        check(state is not ClientState.CLOSED, "a closed client sent a request")
        check(allowed, f"{type(msg).__name__} was sent in state {state.name}, which forbids it")
        check(not broken and not bad_length, f"a broken request was sent: {msg!r}")
        expected_id = 1 if self.last_id == MAX_REQUEST_ID else self.last_id + 1
        check(request_id == expected_id, f"request id {request_id}, expected {expected_id}")
        self.last_id = request_id
        if msg.RULE.reply is not None:
            sent = Sent(request_id, msg, token, into)
            self.outstanding[token] = sent
            self.by_id[request_id] = sent
        self._write_request(msg, request_id, head, payload_length)

    def _payload_length(self, msg: m.Request) -> int:
        choice = self.choices.byte()
        if choice < 8 and not avoiding("bad-payload-length"):
            return (-1, 2**64)[choice & 1]
        if choice < 24:
            return choice  # some on opcodes that carry none: the server refuses those
        if not type(msg).HAS_PAYLOAD:
            return 0
        return self.choices.pick((0, 1, 15, 16, 17, 1024, 1025, 100_000))

    def _into(self, msg: m.Request) -> memoryview | None:
        if not isinstance(msg, m.MemcpyDtoH) or self.choices.byte() < 16:
            return None  # no buffer: any payload in its reply is a protocol error
        nbytes = msg.nbytes if isinstance(msg.nbytes, int) and 0 <= msg.nbytes <= 65536 else 16
        if self.choices.byte() < 16 and not (nbytes == 0 and avoiding("dtoh-empty-reply")):
            nbytes += 1  # the wrong size: the reply's payload cannot land
        return memoryview(bytearray(nbytes))

    def _write_request(
        self, msg: m.Request, request_id: int, head: bytes, payload_length: int
    ) -> None:
        limits = self.server_limits
        payload = bytes(range(256)) * (1 + payload_length // 256)
        payload = payload[: min(payload_length, LARGEST_WRITTEN_PAYLOAD)]
        fits = (
            len(head) - 24 <= limits.max_metadata
            and (
                payload_length == 0
                or (type(msg).HAS_PAYLOAD and payload_length <= limits.max_payload)
            )
            and len(payload) == payload_length
        )
        self.to_server.data += head + payload
        if not fits:
            self.to_server.clean = False  # the server refuses it; that is not the client's rule
        if self.to_server.clean:
            kept = payload if self.keep_payloads and payload else None
            self.expected.append((request_id, head[24:], kept))

    def deliver_to_client(self) -> None:
        self._deliver(self.to_client, self.client)

    def client_events(self) -> None:
        for _ in range(1 + self.choices.below(8)):
            event = _next_event(self.client)
            if event is None:
                return
            self.client_event(event)

    def client_event(self, event: Any, own: bool = False) -> None:
        """Check one client event and account for the requests it resolves."""
        trace("client event", event)
        if type(event) is ReplyReceived:
            sent = self._resolve(event.token, event.request_id)
            rule = RULES[sent.message.OPCODE]
            check(type(event.message) is rule.reply, f"{event.message!r} answers {sent.message!r}")
            if sent.into is not None and len(sent.into):
                check(
                    event.payload is sent.into,
                    f"the reply to {sent.message!r} did not fill its buffer",
                )
            else:
                check(event.payload is None, "a payload in a reply without a buffer")
            if sent.message.RULE.phase is Phase.AUTH:
                check(self.client.hello is not event.message, "an AuthenticateReply as the hello")
                check(self.client.state is not ClientState.IDLE, "an AuthenticateReply when IDLE")
            if sent.message.RULE.phase is Phase.GREETING:
                check(
                    self.client.state is ClientState.READY,
                    "a greeting's reply did not make it READY",
                )
                check(
                    self.client.hello is event.message, "client.hello is not the greeting's reply"
                )
        elif type(event) is RequestFailed:
            self._resolve(event.token, event.request_id)
            self._check_cause(event.error, own)
        elif type(event) is ConnectionFailed:
            check(self.client.state is ClientState.CLOSED, "ConnectionFailed but not CLOSED")
            for token in event.orphans:
                self._resolve(token, None)
            self._check_cause(event.error, own)
        else:
            raise InvariantBroken(f"the client produced {event!r}")

    def _resolve(self, token: int, request_id: int | None) -> Sent:
        if token in self.resolved:
            raise InvariantBroken(f"request with token {token} resolved twice")
        sent = self.outstanding.pop(token, None)
        if sent is None:
            raise InvariantBroken(f"token {token!r} resolved, but no request with a reply has it")
        if request_id is not None:
            check(
                sent.request_id == request_id,
                f"token of #{sent.request_id} came with #{request_id}",
            )
        self.resolved.add(token)
        self.by_id.pop(sent.request_id, None)
        return sent

    def _check_cause(self, error: BaseException, own: bool) -> None:
        check(
            isinstance(error, BitfusionError), f"a failure that is not a BitfusionError: {error!r}"
        )
        assert isinstance(error, BitfusionError)
        if own or id(error) in self.own_errors or not self.strict:
            return
        if error.message not in self.error_texts:
            raise InvariantBroken(f"the client failed with {error!r}, which the server never sent")

    def client_end(self) -> None:
        """close, abandon or connection_lost, as a driver would."""
        client, how = self.client, self.choices.below(4)
        was_closed = client.state is ClientState.CLOSED
        event: ConnectionFailed | None
        if how == 0:
            event = client.close()
        elif how == 1:
            error = self.choices.pick((ConnectionLostError, ProtocolError, BitfusionError))(
                "given up"
            )
            self.own_errors.add(id(error))
            event = client.abandon(error)
            check(event.error is error, "abandon() reported another error than the one given")
        else:
            lost = OSError("reset") if how == 3 else None
            event = client.connection_lost(lost)
            check((event is None) == was_closed, "connection_lost() answered wrongly for its state")
        if event is not None:
            self.own_errors.add(id(event.error))
            self.client_event(event, own=True)
        check(client.state is ClientState.CLOSED, "the client is not CLOSED after it ended")

    # -- the server side -------------------------------------------------------------------------
    def deliver_to_server(self) -> None:
        self._deliver(self.to_server, self.server)

    def server_events(self) -> None:
        server = self.server
        for _ in range(1 + self.choices.below(8)):
            before = server.state
            event = _next_event(server)
            if event is None:
                return
            check(
                before not in (ServerState.NEGOTIATING, ServerState.CLOSING),
                f"an event in {before.name}",
            )
            if type(event) is RequestReceived:
                self._received(event, before)
            elif type(event) is ProtocolViolation:
                check(isinstance(event.error, ProtocolError), "a violation without a ProtocolError")
                check(server.state is ServerState.CLOSING, "a violation did not close the server")
                frames = self.server_wrote(event.data)
                check(len(frames) == 1, "a violation's data is not one frame")
                reply = frames[0].message
                check(
                    isinstance(reply, m.ErrorReply) and bool(reply.flags & m.ERROR_FATAL),
                    "a violation's frame is not a fatal ERROR",
                )
                check(
                    frames[0].request_id == event.request_id, "a violation's ERROR has another id"
                )
                if self.to_server.clean:
                    raise InvariantBroken(
                        f"the server refused what the client was allowed to send: {event.error}"
                    )
                return
            else:
                raise InvariantBroken(f"the server produced {event!r}")

    def _received(self, event: RequestReceived, before: ServerState) -> None:
        msg = event.message
        check(event.request_id != 0, "a request with id 0 was delivered")
        check(type(msg) is RULES[msg.OPCODE].request, f"{msg!r} delivered as a request")
        phase = msg.RULE.phase
        check(
            phase in SERVER_DELIVERS.get(before, frozenset()),
            f"{type(msg).__name__} was delivered in {before.name}, which forbids it",
        )
        if before in (ServerState.AWAITING_HELLO, ServerState.AUTHENTICATED):
            after = OPENED_BY.get(phase, ServerState.CONTROL)
            check(
                self.server.state is after, f"{type(msg).__name__} first did not make {after.name}"
            )
        else:
            check(self.server.state is before, f"{type(msg).__name__} moved the server")
        if self.to_server.clean:
            check(bool(self.expected), "the server delivered a request the client never sent")
            request_id, meta, payload = self.expected.popleft()
            check(
                event.request_id == request_id, f"#{event.request_id} delivered, #{request_id} sent"
            )
            check(msg.encode() == meta, f"{msg!r} delivered differently from how it was sent")
            got = None if event.payload is None else bytes(event.payload)
            check(got == payload, "a payload delivered differently from how it was sent")
        if msg.RULE.reply is None:
            self.no_reply_ids.append(event.request_id)
        else:
            self.inbox.append(event)

    def server_wrote(self, data: bytes) -> list[Any]:
        """Put server bytes on the wire, holding them to the protocol; returns their frames."""
        decoder = FrameDecoder(receives_replies=True, limits=Limits(max_payload=2**40))
        try:
            decoder.receive_data(data)
        except ProtocolError as exc:
            raise InvariantBroken(f"the server wrote a malformed frame: {exc}") from None
        check(not decoder.in_frame, "the server wrote part of a frame")
        frames = []
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
            if isinstance(frame.message, m.ErrorReply):
                self.error_texts.add(frame.message.message)
        self.to_client.data += data
        return frames

    def server_answer(self) -> None:
        """Answer one request the way a server does."""
        server, choices = self.server, self.choices
        if not self.inbox or server.state is ServerState.CLOSING:
            return
        event = self.inbox.pop(choices.below(len(self.inbox)))
        msg, request_id = event.message, event.request_id
        how = choices.below(8)
        if msg.RULE.phase is Phase.GREETING:
            check(
                server.state is ServerState.NEGOTIATING,
                "an unanswered greeting outside NEGOTIATING",
            )
            if how < 6:
                grants = [self._grant(i) for i in range(choices.below(3))]
                reply = m.HelloReply.with_devices(7, 4096, 65536, grants)
                self.server_wrote(server.accept(request_id, reply))
                check(server.state is ServerState.ACTIVE, "accept() did not make the server ACTIVE")
            else:
                self.server_refuse(request_id)
            return
        rule = msg.RULE
        assert rule.reply is not None
        if how < 5:
            if isinstance(msg, m.MemcpyDtoH):
                self._answer_copy(msg, request_id)
            else:
                answer = message(choices, rule.reply)
                assert isinstance(answer, m.Reply)
                self.server_wrote(server.reply(msg.OPCODE, request_id, answer))
        elif how < 7:
            deferred = (
                choices.pick(self.no_reply_ids) if self.no_reply_ids and choices.flag() else 0
            )
            text = choices.pick(("out of memory", "bad handle", "\u00e9" * 40000, ""))
            self.server_wrote(
                server.error(
                    request_id,
                    # Unknown codes too: a client must take them as a generic error (9.2).
                    cast(ErrorCode, choices.pick(ERROR_CODES)),
                    text,
                    deferred_from=deferred,
                    later_failures=choices.byte(),
                )
            )
        else:
            self.server_refuse(request_id)

    def _answer_copy(self, msg: m.MemcpyDtoH, request_id: int) -> None:
        if msg.nbytes > LARGEST_WRITTEN_PAYLOAD:
            self.server_wrote(
                self.server.error(request_id, ErrorCode.INVALID_VALUE, "too big; split it")
            )
            return
        sent = self.by_id.get(request_id)
        if sent is None or sent.into is None or len(sent.into) != msg.nbytes:
            # No buffer, or one of the wrong size: the reply's payload cannot land, and the client
            # rightly fails. Not a lie, but a failure the error texts do not explain.
            if msg.nbytes:
                self.to_client.clean = False
        head = self.server.reply(msg.OPCODE, request_id, m.MemcpyDtoHReply(), msg.nbytes)
        self.server_wrote(head + bytes(msg.nbytes))

    def _grant(self, index: int) -> DeviceGrant:
        return DeviceGrant(
            index, index, 2**30, 2**29, 0.5, 0.5, 0, "NumPy reference device", "numpy"
        )

    def server_refuse(self, request_id: int | None = None) -> None:
        server = self.server
        if server.state is ServerState.CLOSING and request_id is None:
            return
        if request_id is None:
            request_id = self.choices.pick((0, self.last_id, 12345))
        code = self.choices.pick(
            (
                ErrorCode.PROTOCOL,
                ErrorCode.CAPACITY,
                ErrorCode.INVALID_VALUE,
                ErrorCode.LEASE_ENDED,
                ErrorCode.AUTH,  # a token refused, or (id 0) revoked during the session
                ErrorCode.QUOTA,
            )
        )
        self.server_wrote(server.refuse(request_id, code, "refused"))
        check(server.state is ServerState.CLOSING, "refuse() did not close the server")

    def server_keepalive(self) -> None:
        if self.server.state is not ServerState.CLOSING:
            self.server_wrote(self.server.keepalive())

    def server_lie(self) -> None:
        """Write what no correct server writes; the client must fail cleanly."""
        choices = self.choices
        how = choices.below(5)
        if how == 4 and avoiding("dtoh-empty-reply"):
            return
        self.to_client.clean = False
        target = choices.pick([e.request_id for e in self.inbox] or [self.last_id or 1])
        lie: bytes
        if how == 0:  # a reply of a random class, with a random opcode, to any id
            opcode = choices.pick(sorted(RULES))
            reply_cls = choices.pick(
                [rule.reply for rule in RULES.values() if rule.reply is not None]
            )
            lie = encode_reply(opcode, choices.pick((target, 0, 999)), message(choices, reply_cls))
        elif how == 1:  # a KEEPALIVE that claims to answer something
            lie = encode_reply(Opcode.KEEPALIVE, target, m.Keepalive())
        elif how == 2:  # raw bytes
            lie = choices.take(choices.below(64))
        elif how == 3:  # an ERROR for a request with no reply: a connection-level error
            lie = self.server.error(
                choices.pick(self.no_reply_ids or [0]), ErrorCode.KERNEL, "late"
            )
        else:  # a copy's reply with a payload of another length, or none
            length = choices.pick((0, 1, 17))
            lie = encode_reply(Opcode.MEMCPY_DTOH, target, m.MemcpyDtoHReply(), length) + bytes(
                length
            )
        trace("lie", how, lie)
        self.to_client.data += lie  # not through server_wrote: it holds frames to the protocol

    # -- both ------------------------------------------------------------------------------------
    def garbage(self) -> None:
        """Fuzzer bytes straight into one end, as if the wire had carried them."""
        raw = self.choices.take(self.choices.below(48))
        if self.choices.flag():
            self.to_client.clean = False
            self._feed(self.client, raw)
        else:
            self.to_server.clean = False
            self._feed(self.server, raw)

    def _deliver(self, wire: Wire, end: ClientConnection | ServerConnection) -> None:
        count = self.choices.pick((1, 2, 7, 23, 24, 25, 100, 1 << 30))
        data = bytes(wire.data[:count])
        del wire.data[:count]
        self._feed(end, data)

    def _feed(self, end: ClientConnection | ServerConnection, data: bytes) -> None:
        if self.choices.flag():
            end.receive_data(data)  # never raises: a protocol error becomes an event
            return
        view = memoryview(data)
        while view:  # as an asyncio BufferedProtocol transport does
            try:
                target = end.get_buffer()
            except ProtocolError as exc:
                # asyncio's transports treat this as a fatal error of the protocol (logged at
                # ERROR, the connection dropped before the end can say why): a bug.
                if avoiding("get-buffer-after-error"):
                    return
                raise InvariantBroken(f"get_buffer() raised {exc!r}") from exc
            count = min(len(target), len(view))
            check(count > 0, "get_buffer() offered no room")
            target[:count] = view[:count]
            view = view[count:]
            end.buffer_updated(count)

    def finish(self) -> None:
        """End the conversation; then every request with a reply must have been resolved."""
        client = self.client
        if self.drain_at_end:
            for _ in range(4):
                self.deliver_to_server()
                self.server_events()
            self._feed(client, bytes(self.to_client.data))
            self.to_client.data.clear()
        for _ in range(10_000):
            event = _next_event(client)
            if event is None:
                break
            self.client_event(event)
        else:
            raise InvariantBroken("the client produces events without end")
        ended = client.connection_lost(None)
        if ended is not None:
            self.own_errors.add(id(ended.error))
            self.client_event(ended, own=True)
        while (event := _next_event(client)) is not None:
            self.client_event(event)
        self.check_states()
        if self.outstanding:
            lost = sorted(sent.request_id for sent in self.outstanding.values())
            raise InvariantBroken(f"requests never resolved: {lost}")


def _next_event(end: ClientConnection | ServerConnection) -> Any:
    """``end.next_event()``, which never raises: its failures are events (a crash says which)."""
    try:
        return end.next_event()
    except Exception as exc:  # noqa: BLE001 - any exception is the bug being reported
        raise InvariantBroken(f"{type(end).__name__}.next_event() raised {exc!r}") from exc


def test_one_input(data: bytes) -> None:
    Harness(Choices(data)).run()


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
