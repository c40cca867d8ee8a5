"""The sans-io connections: every rule of the conversation, a client and a server paired in memory."""

from __future__ import annotations

import pytest
from connection_pair import GRANT, SECRET, SERVER_ID, ConnectionPair
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfusion_net.protocol import (
    RULES,
    AuthenticationError,
    CapacityError,
    ClientState,
    ConnectionFailed,
    ConnectionLostError,
    ErrorCode,
    Frame,
    FrameDecoder,
    InvalidHandleError,
    InvalidValueError,
    LeaseEndedError,
    Phase,
    ProtocolError,
    ProtocolViolation,
    QuotaExceededError,
    ReplyReceived,
    RequestFailed,
    RequestReceived,
    ServerState,
    encode_reply,
    encode_request,
)
from bitfusion_net.protocol import messages as m
from bitfusion_net.protocol.frames import MAX_REQUEST_ID


def test_handshake_moves_both_ends_to_ready() -> None:
    pair = ConnectionPair()
    assert pair.client.state is ClientState.IDLE
    assert pair.server.state is ServerState.AWAITING_HELLO
    reply = pair.handshake()
    assert pair.client.state is ClientState.READY and pair.client.hello == reply
    assert pair.server.state is ServerState.ACTIVE


def test_the_client_sends_hello_first_and_once_and_nothing_before_its_answer() -> None:
    pair = ConnectionPair()
    with pytest.raises(ProtocolError, match="must come first"):
        pair.client.send_request(m.Synchronize(0))
    pair.client.send_request(m.Hello(1, 0.5, 0))
    for message in (m.Synchronize(0), m.Hello(1, 0.5, 0)):
        with pytest.raises(ProtocolError, match="once"):
            pair.client.send_request(message)
    assert pair.client.waiting == 1  # only the HELLO was registered


def test_the_server_holds_requests_after_hello_until_it_answers() -> None:
    pair = ConnectionPair()
    pair.client_sends(m.Hello(1, 0.5, 0))
    # A client that pipelines behind its HELLO (the reference one does not) is served in order.
    pair.server.receive_data(encode_request(m.Synchronize(0), 2))
    (hello,) = pair.server_events()
    assert isinstance(hello.message, m.Hello)
    assert pair.server.next_event() is None  # NEGOTIATING: nothing until accept or refuse
    pair.server.accept(hello.request_id, m.HelloReply.with_devices(1, 1, 1, []))
    (sync,) = pair.server_events()
    assert isinstance(sync, RequestReceived) and sync.request_id == 2


@pytest.mark.parametrize(
    ("frames", "request_id", "reason"),
    [
        ([encode_request(m.Synchronize(0), 5)], 5, "expected HELLO, ATTACH"),
        ([encode_request(m.Hello(1, 0.5, 0), 0)], 0, "request id 0"),
        (
            [encode_request(m.Hello(1, 0.5, 0), 1), encode_request(m.Hello(1, 0.5, 0), 2)],
            2,
            "HELLO sent after the connection's first request",
        ),
    ],
)
def test_the_server_refuses_a_broken_conversation_fatally(
    frames: list[bytes], request_id: int, reason: str
) -> None:
    pair = ConnectionPair()
    for frame in frames:
        pair.server.receive_data(frame)
    events = pair.server_events()
    if len(frames) == 2:  # the first HELLO is fine; accept it to see the second
        pair.server.accept(events[0].request_id, m.HelloReply.with_devices(1, 1, 1, []))
        events = pair.server_events()
    (violation,) = events
    assert isinstance(violation, ProtocolViolation) and reason in str(violation.error)
    assert violation.request_id == request_id
    assert pair.server.state is ServerState.CLOSING
    # The bytes to send are the fatal ERROR a client reads as the end of the session.
    pair.server.receive_data(encode_request(m.Synchronize(0), 9))
    assert pair.server.next_event() is None  # nothing more is delivered


def test_garbage_after_good_frames_is_reported_after_them() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.server.receive_data(encode_request(m.Synchronize(0), 2) + b"NOPE" + b"\0" * 40)
    first, second = pair.server_events()
    assert isinstance(first, RequestReceived)
    assert isinstance(second, ProtocolViolation) and "bad magic" in str(second.error)


def test_a_refused_hello_fails_the_hello_and_ends_the_session() -> None:
    pair = ConnectionPair()
    pair.client_sends(m.Hello(4, 1.0, 0), token="hello")
    (hello,) = pair.server_events()
    refusal = pair.server.refuse(hello.request_id, ErrorCode.CAPACITY, "no room for 4 GPUs")
    failed, ended = pair.client_receives(refusal)
    assert isinstance(failed, RequestFailed) and failed.token == "hello"
    assert isinstance(failed.error, CapacityError)
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ()
    assert pair.client.state is ClientState.CLOSED
    with pytest.raises(CapacityError):
        pair.client.send_request(m.Synchronize(0))


def test_replies_find_their_requests_by_id_whatever_the_order() -> None:
    pair = ConnectionPair()
    pair.handshake()
    first = pair.client_sends(m.MemAlloc(0, 64), token="first")
    second = pair.client_sends(m.MemGetInfo(0), token="second")
    events = pair.client_receives(
        pair.server.reply(m.Opcode.MEM_GET_INFO, second, m.MemGetInfoReply(1, 2))
        + pair.server.reply(m.Opcode.MEM_ALLOC, first, m.MemAllocReply(0x1000))
    )
    assert [(e.token, type(e.message)) for e in events] == [
        ("second", m.MemGetInfoReply),
        ("first", m.MemAllocReply),
    ]
    assert pair.client.waiting == 0


def test_keepalives_are_ignored_wherever_they_fall_between_frames() -> None:
    pair = ConnectionPair()
    keepalive = pair.server.keepalive()
    assert pair.client_receives(keepalive) == []  # even before the HELLO's answer
    pair.handshake()
    alloc = pair.client_sends(m.MemAlloc(0, 64), token="alloc")
    info = pair.client_sends(m.MemGetInfo(0), token="info")
    events = pair.client_receives(
        keepalive * 2
        + pair.server.reply(m.Opcode.MEM_ALLOC, alloc, m.MemAllocReply(0x1000))
        + keepalive
        + pair.server.reply(m.Opcode.MEM_GET_INFO, info, m.MemGetInfoReply(1, 2))
        + keepalive
    )
    assert [e.token for e in events] == ["alloc", "info"]
    assert pair.client.state is ClientState.READY and pair.client.waiting == 0


def test_a_keepalive_that_claims_to_answer_a_request_ends_the_session() -> None:
    pair = ConnectionPair()
    pair.handshake()
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    (ended,) = pair.client_receives(encode_reply(m.Opcode.KEEPALIVE, sync, m.Keepalive()))
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ("sync",)
    assert "KEEPALIVE" in str(ended.error)


def test_a_second_hello_is_refused_once_ready_and_registers_nothing() -> None:
    pair = ConnectionPair()
    pair.handshake()
    with pytest.raises(ProtocolError, match="once"):
        pair.client.send_request(m.Hello(1, 0.5, 0))
    assert pair.client.waiting == 0


def test_a_payload_length_out_of_the_wire_range_is_typed_and_registers_nothing() -> None:
    pair = ConnectionPair()
    pair.handshake()
    for length in (-1, 2**64):
        with pytest.raises(ProtocolError, match="cannot encode"):
            pair.client.send_request(m.MemcpyHtoD(0, 0x1000), length)
    assert pair.client.waiting == 0


def test_a_copy_back_reply_without_its_payload_ends_the_session() -> None:
    pair = ConnectionPair()
    pair.handshake()
    with pytest.raises(ProtocolError, match="holds 3 bytes"):  # checked before anything is sent
        pair.client.send_request(m.MemcpyDtoH(0, 0x1000, 8), into=memoryview(bytearray(3)))
    copy = pair.client_sends(m.MemcpyDtoH(0, 0x1000, 8), into=memoryview(bytearray(8)), token="c")
    (ended,) = pair.client_receives(
        pair.server.reply(m.Opcode.MEMCPY_DTOH, copy, m.MemcpyDtoHReply())
    )
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ("c",)
    assert "no payload" in str(ended.error)


def test_no_reply_requests_are_not_waited_for_but_use_an_id() -> None:
    pair = ConnectionPair()
    pair.handshake()
    free = pair.client_sends(m.MemFree(0, 0x1000))
    sync = pair.client_sends(m.Synchronize(0))
    assert sync == free + 1 and pair.client.waiting == 1


def test_request_ids_wrap_to_one_never_zero() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.client._next_id = MAX_REQUEST_ID
    assert pair.client.send_request(m.MemFree(0, 1))[0] == MAX_REQUEST_ID
    assert pair.client.send_request(m.MemFree(0, 1))[0] == 1


def test_a_deferred_error_fails_the_request_it_answers_naming_the_earlier_call() -> None:
    pair = ConnectionPair()
    pair.handshake()
    free = pair.client_sends(m.MemFree(0, 0xBAD))
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    error = pair.server.error(
        sync, ErrorCode.INVALID_HANDLE, "not allocated", deferred_from=free, later_failures=2
    )
    (failed,) = pair.client_receives(error)
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, InvalidHandleError)
    assert (failed.error.deferred_from, failed.error.later_failures) == (free, 2)
    assert pair.client.state is ClientState.READY  # not fatal: the session goes on


@pytest.mark.parametrize("target", ["id 0", "a no-reply request"])
def test_an_error_for_no_waiting_request_ends_the_session(target: str) -> None:
    pair = ConnectionPair()
    pair.handshake()
    free = pair.client_sends(m.MemFree(0, 1))
    pair.client_sends(m.Synchronize(0), token="sync")
    request_id = 0 if target == "id 0" else free
    (ended,) = pair.client_receives(pair.server.refuse(request_id, ErrorCode.PROTOCOL, "bye"))
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ("sync",)
    assert isinstance(ended.error, ProtocolError)
    with pytest.raises(ProtocolError, match="bye"):
        pair.client.send_request(m.Synchronize(0))


def test_a_fatal_error_for_a_waiting_request_fails_it_then_the_rest() -> None:
    pair = ConnectionPair()
    pair.handshake()
    first = pair.client_sends(m.Synchronize(0), token="first")
    pair.client_sends(m.Synchronize(0), token="second")
    failed, ended = pair.client_receives(pair.server.refuse(first, ErrorCode.PROTOCOL, "no"))
    assert isinstance(failed, RequestFailed) and failed.token == "first"
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ("second",)


def test_replies_that_answer_nothing_or_the_wrong_opcode_end_the_session() -> None:
    pair = ConnectionPair()
    pair.handshake()
    (ended,) = pair.client_receives(encode_reply(m.Opcode.SYNCHRONIZE, 77, m.Done()))
    assert isinstance(ended, ConnectionFailed) and "#77" in str(ended.error)

    pair = ConnectionPair()
    pair.handshake()
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    (ended,) = pair.client_receives(
        encode_reply(m.Opcode.MEM_GET_INFO, sync, m.MemGetInfoReply(1, 2))
    )
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ("sync",)
    assert "wrong opcode" in str(ended.error)


def test_a_copy_back_lands_in_the_buffer_given_at_send_time() -> None:
    pair = ConnectionPair()
    pair.handshake()
    into = memoryview(bytearray(5))
    request = pair.client_sends(m.MemcpyDtoH(0, 0x1000, 5), into=into, token="copy")
    head = pair.server.reply(m.Opcode.MEMCPY_DTOH, request, m.MemcpyDtoHReply(), 5)
    (answered,) = pair.client_receives(head + b"hello")
    assert isinstance(answered, ReplyReceived) and answered.payload is into
    assert bytes(into) == b"hello"


def test_a_copy_back_of_the_wrong_size_ends_the_session() -> None:
    pair = ConnectionPair()
    pair.handshake()
    request = pair.client_sends(m.MemcpyDtoH(0, 0x1000, 5), into=memoryview(bytearray(5)))
    head = pair.server.reply(m.Opcode.MEMCPY_DTOH, request, m.MemcpyDtoHReply(), 6)
    (ended,) = pair.client_receives(head + b"hello!")
    assert isinstance(ended, ConnectionFailed) and "6 bytes, expected 5" in str(ended.error)


def test_good_replies_before_garbage_are_delivered_first() -> None:
    pair = ConnectionPair()
    pair.handshake()
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    pending = pair.client_sends(m.Synchronize(0), token="pending")
    data = pair.server.reply(m.Opcode.SYNCHRONIZE, sync, m.Done()) + b"junk" * 10
    answered, ended = pair.client_receives(data)
    assert answered.token == "sync"
    assert isinstance(ended, ConnectionFailed) and ended.orphans == ("pending",)
    assert pending and "broke the protocol" in str(ended.error)


def test_a_close_fails_what_waits_and_says_whether_a_frame_was_cut() -> None:
    pair = ConnectionPair()
    pair.handshake()
    pair.client_sends(m.Synchronize(0), token="sync")
    pair.client.receive_data(pair.server.reply(m.Opcode.SYNCHRONIZE, 9, m.Done())[:10])
    ended = pair.client.connection_lost()
    assert ended is not None and ended.orphans == ("sync",)
    assert isinstance(ended.error, ConnectionLostError) and "middle of a frame" in str(ended.error)
    assert pair.client.connection_lost() is None  # only once


def test_a_message_that_cannot_be_encoded_registers_nothing() -> None:
    pair = ConnectionPair()
    pair.handshake()
    before = pair.client._next_id
    with pytest.raises(ProtocolError, match="cannot encode"):
        pair.client.send_request(m.MemAlloc(0, 2**64))
    assert pair.client.waiting == 0 and pair.client._next_id == before


def test_error_text_is_cut_to_fit_the_metadata_limit() -> None:
    pair = ConnectionPair()
    pair.handshake()
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    (failed,) = pair.client_receives(pair.server.error(sync, ErrorCode.INVALID_VALUE, "é" * 70000))
    assert isinstance(failed, RequestFailed) and failed.error.message.endswith("...")


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["sync", "free", "alloc"]), min_size=1, max_size=30),
    order=st.randoms(use_true_random=False),
    fail=st.sets(st.integers(0, 29)),
)
def test_every_request_with_a_reply_is_answered_exactly_once(
    kinds: list[str], order: object, fail: set[int]
) -> None:
    """Whatever the mix and whatever order the server answers in, each waiting request gets
    exactly one event with its own token, and no-reply requests get none."""
    pair = ConnectionPair()
    pair.handshake()
    waiting: dict[int, tuple[int, str]] = {}
    for index, kind in enumerate(kinds):
        if kind == "free":
            pair.client_sends(m.MemFree(0, index))
        elif kind == "sync":
            waiting[pair.client_sends(m.Synchronize(0), token=index)] = (index, kind)
        else:
            waiting[pair.client_sends(m.MemAlloc(0, 64), token=index)] = (index, kind)
    answers = list(waiting.items())
    order.shuffle(answers)  # type: ignore[attr-defined]
    data = b""
    for request_id, (index, kind) in answers:
        if index in fail:
            data += pair.server.error(request_id, ErrorCode.INVALID_VALUE, "no")
        elif kind == "sync":
            data += pair.server.reply(m.Opcode.SYNCHRONIZE, request_id, m.Done())
        else:
            data += pair.server.reply(m.Opcode.MEM_ALLOC, request_id, m.MemAllocReply(index))
    events = pair.client_receives(data)
    assert sorted(e.token for e in events) == sorted(index for index, _ in waiting.values())
    for event in events:
        assert isinstance(event, RequestFailed) == (event.token in fail)
    assert pair.client.waiting == 0


def test_garbage_in_the_middle_of_a_long_feed_ends_the_session_not_the_caller() -> None:
    """More bytes than one receive buffer, broken halfway: the client does not raise from
    receive_data; it delivers the good reply, then the failure, and reads nothing more."""
    pair = ConnectionPair()
    pair.handshake()
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    data = pair.server.reply(m.Opcode.SYNCHRONIZE, sync, m.Done()) + b"junk" + b"\0" * 400_000
    answered, ended = pair.client_receives(data)
    assert answered.token == "sync"
    assert isinstance(ended, ConnectionFailed) and "broke the protocol" in str(ended.error)


# -- connection phases (PROTOCOL.md 5.1): what the first request makes a connection --------------


# One request of every opcode, with plain values (phases do not look at the values).
def _sample(cls: type[m.Request]) -> m.Request:
    values: dict[str, object] = {}
    for name, code in cls.FIXED:
        values[name] = (1,) * int(code[:-1]) if len(code) > 1 else 0
    for name, kind in cls.VARIABLE:
        values[name] = "" if kind == "str" else b""
    return cls(**values)  # type: ignore[arg-type]


SAMPLES = {opcode: _sample(rule.request) for opcode, rule in sorted(RULES.items())}
AUTH = {m.Opcode.AUTHENTICATE}
GREETINGS = {m.Opcode.HELLO, m.Opcode.ATTACH}
CONTROL = {m.Opcode.RESERVE, m.Opcode.RELEASE}
ANYWHERE = {m.Opcode.SERVER_INFO}
DEVICE = set(SAMPLES) - AUTH - GREETINGS - CONTROL - ANYWHERE
# What each kind of connection may carry, written out here rather than read from the code. A
# connection that began with AUTHENTICATE ("auth+...") carries what the same kind carries.
ALLOWED = {
    "new": AUTH | GREETINGS | CONTROL | ANYWHERE,
    "authenticated": GREETINGS | CONTROL | ANYWHERE,  # AUTHENTICATE sent: as new, but only once
    "greeting": set(),
    "device session": DEVICE | ANYWHERE,
    "control connection": CONTROL | ANYWHERE,
}


def _allowed(kind: str) -> set[int]:
    return ALLOWED[kind.removeprefix("auth+")]


def test_the_phases_are_the_documented_ones() -> None:
    assert {op for op, rule in RULES.items() if rule.phase is Phase.AUTH} == AUTH
    assert {op for op, rule in RULES.items() if rule.phase is Phase.GREETING} == GREETINGS
    assert {op for op, rule in RULES.items() if rule.phase is Phase.CONTROL} == CONTROL
    assert {op for op, rule in RULES.items() if rule.phase is Phase.ANY} == ANYWHERE
    assert DEVICE and all(RULES[op].phase is Phase.DEVICE for op in DEVICE)


def _pair_in(kind: str, first: int) -> ConnectionPair:
    """A pair whose connection has become ``kind`` by the request ``first`` (after an answered
    AUTHENTICATE for an ``auth+`` kind)."""
    pair = ConnectionPair()
    if kind.startswith("auth+") or kind == "authenticated":
        pair.authenticate()
        kind = kind.removeprefix("auth+")
    if kind == "greeting":
        pair.client_sends(SAMPLES[first])
        assert pair.client.state is ClientState.GREETING
    elif kind == "device session":
        pair.handshake(SAMPLES[first])
        assert pair.server.state is ServerState.ACTIVE
    elif kind == "control connection":
        pair.control(SAMPLES[first])
        assert pair.client.state is ClientState.CONTROL
        assert pair.server.state is ServerState.CONTROL
    return pair


KINDS = [
    ("new", 0),
    ("authenticated", m.Opcode.AUTHENTICATE),
    *[("greeting", op) for op in sorted(GREETINGS)],
    *[("device session", op) for op in sorted(GREETINGS)],
    *[("control connection", op) for op in sorted(CONTROL | ANYWHERE)],
    ("auth+greeting", m.Opcode.HELLO),
    *[("auth+device session", op) for op in sorted(GREETINGS)],
    *[("auth+control connection", op) for op in sorted(CONTROL | ANYWHERE)],
]


@pytest.mark.parametrize(("kind", "first"), KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("opcode", sorted(SAMPLES), ids=lambda op: m.Opcode(op).name)
def test_the_client_refuses_every_request_out_of_phase_with_nothing_registered(
    kind: str, first: int, opcode: int
) -> None:
    pair = _pair_in(kind, first)
    client = pair.client
    state, waiting, next_id = client.state, client.waiting, client._next_id
    message = SAMPLES[opcode]
    if opcode in _allowed(kind):
        request_id, head = client.send_request(message)
        assert request_id == next_id and head[5] == opcode
        return
    with pytest.raises(ProtocolError) as refused:
        client.send_request(message)
    assert (client.state, client.waiting, client._next_id) == (state, waiting, next_id)
    assert client.failure is None  # a refusal is the caller's bug, not the end of the session
    text = str(refused.value)
    kind = kind.removeprefix("auth+")
    if opcode in AUTH:
        assert text == "AUTHENTICATE is a connection's first request, and only once"
    elif kind in ("new", "authenticated"):
        assert "must come first" in text
    elif kind == "greeting" or opcode in GREETINGS:
        assert "once" in text
    elif kind == "control connection":
        assert "needs a device session" in text
    else:
        assert "goes on a control connection" in text


@pytest.mark.parametrize(("kind", "first"), [k for k in KINDS if not k[0].endswith("greeting")])
@pytest.mark.parametrize("opcode", sorted(SAMPLES), ids=lambda op: m.Opcode(op).name)
def test_the_server_refuses_every_request_out_of_phase_fatally(
    kind: str, first: int, opcode: int
) -> None:
    pair = _pair_in(kind, first)
    server = pair.server
    server.receive_data(encode_request(SAMPLES[opcode], 9))
    (event,) = pair.server_events()
    if opcode in _allowed(kind):
        assert isinstance(event, RequestReceived) and event.request_id == 9
        assert type(event.message) is RULES[opcode].request
        return
    assert isinstance(event, ProtocolViolation) and event.request_id == 9
    assert server.state is ServerState.CLOSING
    (frame,) = _decoded_replies(event.data)
    assert frame.request_id == 9 and isinstance(frame.message, m.ErrorReply)
    assert frame.message.code == ErrorCode.PROTOCOL and frame.message.flags & m.ERROR_FATAL
    name = m.Opcode(opcode).name
    kind = kind.removeprefix("auth+")
    if opcode in AUTH:
        reason = "AUTHENTICATE must be a connection's first request, once"
    elif kind in ("new", "authenticated"):
        reason = f"expected HELLO, ATTACH or a control request first, got {name}"
    elif opcode in GREETINGS:
        reason = f"{name} sent after the connection's first request"
    elif kind == "control connection":
        reason = f"{name} needs a device session; this is a control connection"
    else:
        reason = f"{name} goes on a control connection, not on a device session"
    assert str(event.error) == reason == frame.message.message
    server.receive_data(encode_request(m.ServerInfo(), 10))
    assert server.next_event() is None  # nothing more is delivered


def _decoded_replies(data: bytes) -> list[Frame]:
    decoder = FrameDecoder(receives_replies=True)
    decoder.receive_data(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert not decoder.in_frame
    return frames


@pytest.mark.parametrize(
    "first",
    [
        m.Reserve(1, 0.5, 0, client_name="tool"),
        m.Release(3, SECRET),
        m.ServerInfo(m.INFO_BRIEF),
    ],
    ids=lambda message: type(message).__name__,
)
def test_a_control_request_first_makes_a_control_connection(first: m.Request) -> None:
    pair = ConnectionPair()
    received = pair.control(first)
    assert pair.client.state is ClientState.CONTROL and pair.server.state is ServerState.CONTROL
    assert pair.client.hello is None  # no session: no limits, no grants
    # Any number of control requests may follow, pipelined, before the first is answered.
    reserve = pair.client_sends(m.Reserve(2, 0.25, 0, hold=m.HOLD_BY_IDLE_TIMEOUT), token="r")
    info = pair.client_sends(m.ServerInfo(m.INFO_FULL), token="i")
    release = pair.client_sends(m.Release(4, SECRET), token="x")
    later = pair.server_events()
    assert [type(e.message) for e in later] == [m.Reserve, m.ServerInfo, m.Release]
    assert [e.request_id for e in later] == [reserve, info, release] == [2, 3, 4]
    answers = {
        m.Opcode.RESERVE: m.ReserveReply(3, 600.0, SECRET, SERVER_ID, m.encode_grants([GRANT])),
        m.Opcode.RELEASE: m.Done(),
        m.Opcode.SERVER_INFO: m.ServerInfoReply('{"server": {"protocol": 3}}'),
    }
    data = b"".join(
        pair.server.reply(e.message.OPCODE, e.request_id, answers[e.message.OPCODE])
        for e in [received, *later]
    )
    events = pair.client_receives(data)
    assert [e.token for e in events] == ["first", "r", "i", "x"]
    assert all(isinstance(e, ReplyReceived) for e in events)
    assert [type(e.message) for e in events] == [
        type(answers[first.OPCODE]),
        m.ReserveReply,
        m.ServerInfoReply,
        m.Done,
    ]
    assert events[1].message.devices == [GRANT]
    assert pair.client.state is ClientState.CONTROL and pair.client.waiting == 0
    assert pair.server.state is ServerState.CONTROL


def test_server_info_on_a_device_session_is_answered_among_device_replies() -> None:
    pair = ConnectionPair()
    pair.handshake()
    sync = pair.client_sends(m.Synchronize(0), token="sync")
    info = pair.client_sends(m.ServerInfo(), token="info")
    received = pair.server_events()
    assert [type(e.message) for e in received] == [m.Synchronize, m.ServerInfo]
    assert pair.server.state is ServerState.ACTIVE
    # It names no device: its reply may overtake the device's (PROTOCOL.md 8).
    events = pair.client_receives(
        pair.server.reply(m.Opcode.SERVER_INFO, info, m.ServerInfoReply("{}"))
        + pair.server.reply(m.Opcode.SYNCHRONIZE, sync, m.Done())
    )
    assert [(e.token, type(e.message)) for e in events] == [
        ("info", m.ServerInfoReply),
        ("sync", m.Done),
    ]
    assert pair.client.state is ClientState.READY


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (ErrorCode.CAPACITY, CapacityError),
        (ErrorCode.INVALID_VALUE, InvalidValueError),
    ],
)
def test_a_refused_reserve_is_not_fatal_on_either_end(
    code: ErrorCode, error_type: type[Exception]
) -> None:
    pair = ConnectionPair()
    reserve = pair.control(m.Reserve(8, 1.0, 0, client_name="greedy"))
    (failed,) = pair.client_receives(
        pair.server.error(reserve.request_id, code, "not enough free share on 8 GPUs")
    )
    assert isinstance(failed, RequestFailed) and failed.token == "first"
    assert isinstance(failed.error, error_type)
    assert pair.client.state is ClientState.CONTROL and pair.client.failure is None
    assert pair.server.state is ServerState.CONTROL
    # The client tries again, with less, on the same connection.
    again = pair.client_sends(m.Reserve(1, 0.5, 0), token="again")
    (received,) = pair.server_events()
    assert isinstance(received, RequestReceived) and received.request_id == again
    reply = m.ReserveReply(1, 0.0, SECRET, SERVER_ID, m.encode_grants([GRANT]))
    (answered,) = pair.client_receives(pair.server.reply(m.Opcode.RESERVE, again, reply))
    assert isinstance(answered, ReplyReceived) and answered.message == reply


def test_a_refused_release_of_an_ended_reservation_is_not_fatal_either() -> None:
    """LEASE_ENDED raises as a kind of ConnectionLostError, but answering a RELEASE it is an
    ordinary error: only ERROR_FATAL (or an id nobody waits for) ends a control connection."""
    pair = ConnectionPair()
    release = pair.control(m.Release(3, SECRET))
    text = "reservation 3 has ended: idle for 601.0 s"
    (failed,) = pair.client_receives(
        pair.server.error(release.request_id, ErrorCode.LEASE_ENDED, text)
    )
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, LeaseEndedError)
    assert failed.error.message == text
    assert pair.client.state is ClientState.CONTROL and pair.server.state is ServerState.CONTROL
    pair.client_sends(m.ServerInfo())
    assert len(pair.server_events()) == 1


def test_attach_is_a_greeting_answered_by_a_hello_reply() -> None:
    pair = ConnectionPair()
    attach = m.Attach(3, SECRET, SERVER_ID, "job")
    pair.client_sends(attach, token="attach")
    assert pair.client.state is ClientState.GREETING
    pair.server.receive_data(encode_request(m.Synchronize(0), 2))  # pipelined behind it
    (received,) = pair.server_events()
    assert received.message == attach and pair.server.state is ServerState.NEGOTIATING
    assert pair.server.next_event() is None  # nothing until it is accepted or refused
    reply = m.HelloReply.with_devices(5, 2**26, 2**16, [GRANT])
    accepted = pair.server.accept(received.request_id, reply)
    (frame,) = _decoded_replies(accepted)
    assert frame.opcode == m.Opcode.ATTACH and frame.message == reply
    (answered,) = pair.client_receives(accepted)
    assert isinstance(answered, ReplyReceived) and answered.token == "attach"
    assert answered.message == reply and pair.client.hello == reply
    assert pair.client.state is ClientState.READY and pair.server.state is ServerState.ACTIVE
    (sync,) = pair.server_events()
    assert isinstance(sync, RequestReceived) and sync.request_id == 2


def test_an_attach_is_answered_with_its_own_opcode() -> None:
    pair = ConnectionPair()
    pair.client_sends(m.Attach(3, SECRET, SERVER_ID), token="attach")
    (received,) = pair.server_events()
    reply = m.HelloReply.with_devices(5, 2**26, 2**16, [GRANT])
    head = pair.server.accept(received.request_id, reply)
    assert head[5] == m.Opcode.ATTACH  # the header's opcode byte
    (answered,) = pair.client_receives(head)
    assert isinstance(answered, ReplyReceived) and answered.token == "attach"


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (ErrorCode.LEASE_ENDED, LeaseEndedError),  # the server restarted, or it ended
        (ErrorCode.INVALID_VALUE, InvalidValueError),  # unknown id or wrong secret
        (ErrorCode.CAPACITY, CapacityError),
    ],
)
def test_a_refused_attach_ends_the_session(code: ErrorCode, error_type: type[Exception]) -> None:
    pair = ConnectionPair()
    attach = pair.client_sends(m.Attach(3, b"wrong", SERVER_ID), token="attach")
    (received,) = pair.server_events()
    refusal = pair.server.refuse(received.request_id, code, "no reservation 3 on this server")
    assert pair.server.state is ServerState.CLOSING
    failed, ended = pair.client_receives(refusal)
    assert isinstance(failed, RequestFailed) and failed.request_id == attach
    assert isinstance(failed.error, error_type)
    assert isinstance(ended, ConnectionFailed) and pair.client.state is ClientState.CLOSED
    with pytest.raises(error_type):
        pair.client.send_request(m.ServerInfo())


@pytest.mark.parametrize("greeting", ["hello", "attach"])
def test_the_end_of_a_reservation_ends_its_sessions_with_lease_ended(greeting: str) -> None:
    """PROTOCOL.md 5.5.5: a fatal ERROR with id 0 and the reason; what waited is orphaned."""
    pair = ConnectionPair()
    if greeting == "attach":
        pair.attach()
    else:
        pair.handshake()
    pair.client_sends(m.Synchronize(0), token="sync")
    pair.client_sends(m.ServerInfo(), token="info")
    pair.server_events()
    reason = "reservation 3 has ended: released by 10.0.0.5:40000, tool"
    (ended,) = pair.client_receives(pair.server.refuse(0, ErrorCode.LEASE_ENDED, reason))
    assert isinstance(ended, ConnectionFailed) and set(ended.orphans) == {"sync", "info"}
    assert isinstance(ended.error, LeaseEndedError) and isinstance(ended.error, ConnectionLostError)
    assert ended.error.message == reason
    with pytest.raises(LeaseEndedError, match="released by"):
        pair.client.send_request(m.Synchronize(0))


def test_a_control_request_pipelined_behind_a_hello_is_refused_once_it_is_accepted() -> None:
    pair = ConnectionPair()
    pair.server.receive_data(
        encode_request(m.Hello(1, 0.5, 0), 1) + encode_request(m.Reserve(1, 0.5, 0), 2)
    )
    (hello,) = pair.server_events()
    pair.server.accept(hello.request_id, m.HelloReply.with_devices(1, 1, 1, []))
    (violation,) = pair.server_events()
    assert isinstance(violation, ProtocolViolation) and violation.request_id == 2
    assert "RESERVE goes on a control connection" in str(violation.error)


@settings(max_examples=150, deadline=None)
@given(script=st.lists(st.sampled_from(sorted(SAMPLES)), min_size=1, max_size=12))
def test_the_client_sends_exactly_what_the_server_accepts(script: list[int]) -> None:
    """Whatever the client is asked to send, in whatever order: it refuses exactly what is out of
    phase, and the server, answering greetings as they come, never sees a violation."""
    pair = ConnectionPair()
    kind = "new"
    for opcode in script:
        allowed = opcode in ALLOWED[kind]
        try:
            request_id = pair.client_sends(SAMPLES[opcode])
        except ProtocolError:
            assert not allowed, m.Opcode(opcode).name
            continue
        assert allowed, m.Opcode(opcode).name
        (event,) = pair.server_events()
        assert isinstance(event, RequestReceived) and event.request_id == request_id
        if opcode in AUTH:  # answered at once (a server without tokens: anonymous)
            reply = m.AuthenticateReply("")
            (answered,) = pair.client_receives(pair.server.reply(opcode, request_id, reply))
            assert isinstance(answered, ReplyReceived) and answered.message == reply
            kind = "authenticated"
        elif kind in ("new", "authenticated"):
            if opcode in GREETINGS:
                reply = m.HelloReply.with_devices(1, 2**26, 2**16, [GRANT])
                (answered,) = pair.client_receives(pair.server.accept(request_id, reply))
                assert isinstance(answered, ReplyReceived)
                kind = "device session"
            else:
                kind = "control connection"
        expected = {
            "authenticated": (ClientState.AUTHENTICATED, ServerState.AUTHENTICATED),
            "device session": (ClientState.READY, ServerState.ACTIVE),
            "control connection": (ClientState.CONTROL, ServerState.CONTROL),
        }[kind]
        assert (pair.client.state, pair.server.state) == expected


# -- AUTHENTICATE (PROTOCOL.md 5.1, 5.7) ----------------------------------------------------------
TOKEN = "bfnet_5c2e9a417d03b8f6_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


def test_authenticate_first_then_hello_after_its_answer() -> None:
    pair = ConnectionPair()
    assert pair.authenticate(TOKEN, "alice") == m.AuthenticateReply("alice")
    assert pair.client.state is ClientState.AUTHENTICATED
    assert pair.server.state is ServerState.AUTHENTICATED
    assert pair.client.hello is None  # the token's answer opens no session
    reply = pair.handshake()
    assert pair.client.state is ClientState.READY and pair.client.hello == reply
    assert pair.server.state is ServerState.ACTIVE
    alloc = pair.client_sends(m.MemAlloc(0, 64), token="alloc")
    assert alloc == 3  # AUTHENTICATE was #1, HELLO #2
    (received,) = pair.server_events()
    assert isinstance(received, RequestReceived) and received.request_id == alloc


@pytest.mark.parametrize("greeting", ["hello", "attach"])
def test_authenticate_then_a_greeting_pipelined_behind_it(greeting: str) -> None:
    """PROTOCOL.md 5.1: the opening request may follow AUTHENTICATE at once; the server answers
    AUTHENTICATE first, then the greeting, which opens the session."""
    pair = ConnectionPair()
    first: m.Request = (
        m.Hello(1, 0.5, 0, "job") if greeting == "hello" else m.Attach(3, SECRET, SERVER_ID, "job")
    )
    auth = pair.client_sends(m.Authenticate(TOKEN), token="auth")
    assert pair.client.state is ClientState.AUTHENTICATED
    hello = pair.client_sends(first, token="hello")  # without waiting for the answer
    assert (auth, hello) == (1, 2) and pair.client.state is ClientState.GREETING
    received = pair.server_events()
    assert [type(e.message) for e in received] == [m.Authenticate, type(first)]
    assert received[0].message.token == TOKEN
    assert pair.server.state is ServerState.NEGOTIATING
    reply = m.HelloReply.with_devices(4, 2**26, 2**16, [GRANT])
    data = pair.server.reply(m.Opcode.AUTHENTICATE, auth, m.AuthenticateReply("alice"))
    accepted = pair.server.accept(hello, reply)
    assert accepted[5] == first.OPCODE  # the greeting's own opcode, not AUTHENTICATE's
    events = pair.client_receives(data + accepted)
    assert [(e.token, type(e.message)) for e in events] == [
        ("auth", m.AuthenticateReply),
        ("hello", m.HelloReply),
    ]
    assert events[0].message.user == "alice"
    assert pair.client.state is ClientState.READY and pair.client.hello == reply
    assert pair.server.state is ServerState.ACTIVE


@pytest.mark.parametrize(
    "first",
    [m.Reserve(1, 0.5, 0, client_name="tool"), m.Release(3, SECRET), m.ServerInfo(m.INFO_BRIEF)],
    ids=lambda message: type(message).__name__,
)
def test_authenticate_then_a_control_request_makes_a_control_connection(
    first: m.Request,
) -> None:
    pair = ConnectionPair()
    auth = pair.client_sends(m.Authenticate(TOKEN), token="auth")
    control = pair.client_sends(first, token="first")  # pipelined
    info = pair.client_sends(m.ServerInfo(), token="info")
    assert pair.client.state is ClientState.CONTROL
    received = pair.server_events()
    assert [e.request_id for e in received] == [auth, control, info] == [1, 2, 3]
    assert pair.server.state is ServerState.CONTROL
    answers = {
        m.Opcode.RESERVE: m.ReserveReply(3, 600.0, SECRET, SERVER_ID, m.encode_grants([GRANT])),
        m.Opcode.RELEASE: m.Done(),
        m.Opcode.SERVER_INFO: m.ServerInfoReply("{}"),
    }
    data = pair.server.reply(m.Opcode.AUTHENTICATE, auth, m.AuthenticateReply(""))
    data += pair.server.reply(first.OPCODE, control, answers[first.OPCODE])
    data += pair.server.reply(m.Opcode.SERVER_INFO, info, m.ServerInfoReply("{}"))
    events = pair.client_receives(data)
    assert [e.token for e in events] == ["auth", "first", "info"]
    assert all(isinstance(e, ReplyReceived) for e in events)
    assert events[0].message == m.AuthenticateReply("")  # anonymous: no tokens there
    assert pair.client.state is ClientState.CONTROL and pair.client.waiting == 0


@pytest.mark.parametrize("before", ["authenticate", "hello", "attach", "reserve", "server-info"])
def test_authenticate_after_the_first_request_is_refused_on_both_ends(before: str) -> None:
    """AUTHENTICATE twice, after a greeting, after a control request: the client refuses it
    locally with nothing registered; the server, sent it anyway, refuses it fatally."""
    pair = ConnectionPair()
    if before == "authenticate":
        pair.authenticate()
    elif before == "hello":
        pair.handshake()
    elif before == "attach":
        pair.attach()
    else:
        pair.control(m.Reserve(1, 0.5, 0) if before == "reserve" else m.ServerInfo())
    state, next_id = pair.client.state, pair.client._next_id
    with pytest.raises(ProtocolError, match="first request, and only once"):
        pair.client.send_request(m.Authenticate(TOKEN))
    assert (pair.client.state, pair.client._next_id, pair.client.failure) == (state, next_id, None)
    pair.server.receive_data(encode_request(m.Authenticate(TOKEN), next_id))
    (violation,) = pair.server_events()
    assert isinstance(violation, ProtocolViolation) and violation.request_id == next_id
    assert str(violation.error) == "AUTHENTICATE must be a connection's first request, once"
    assert pair.server.state is ServerState.CLOSING
    (frame,) = _decoded_replies(violation.data)
    assert frame.message.code == ErrorCode.PROTOCOL and frame.message.flags & m.ERROR_FATAL


def test_two_authenticates_pipelined_the_server_refuses_the_second() -> None:
    pair = ConnectionPair()
    pair.server.receive_data(
        encode_request(m.Authenticate(TOKEN), 1) + encode_request(m.Authenticate(TOKEN), 2)
    )
    first, second = pair.server_events()
    assert isinstance(first, RequestReceived) and isinstance(second, ProtocolViolation)
    assert second.request_id == 2 and "first request, once" in str(second.error)


def test_a_device_request_right_after_authenticate_is_out_of_phase() -> None:
    pair = ConnectionPair()
    pair.authenticate()
    with pytest.raises(ProtocolError, match="must come first"):
        pair.client.send_request(m.Synchronize(0))
    pair.server.receive_data(encode_request(m.Synchronize(0), 2))
    (violation,) = pair.server_events()
    assert isinstance(violation, ProtocolViolation)
    assert (
        str(violation.error) == "expected HELLO, ATTACH or a control request first, got SYNCHRONIZE"
    )


@pytest.mark.parametrize(
    ("pipelined", "text"),
    [
        (None, "token refused: unknown token"),
        (m.Hello(1, 0.5, 0), "the token of alice was revoked at 2026-01-01T00:00:00Z"),
        (m.Reserve(1, 0.5, 0), "too many failed attempts from 10.0.0.7; try again in 42 s"),
    ],
    ids=["alone", "hello-behind", "reserve-behind"],
)
def test_a_refused_token_is_fatal_on_both_ends(pipelined: m.Request | None, text: str) -> None:
    """PROTOCOL.md 5.7.1: a fatal AUTH ERROR answers AUTHENTICATE; what the client pipelined
    behind it is never delivered, and fails with the same error."""
    pair = ConnectionPair()
    auth = pair.client_sends(m.Authenticate("bfnet-wrong"), token="auth")
    if pipelined is not None:
        pair.client_sends(pipelined, token="behind")
    received = pair.server_events()
    assert isinstance(received[0], RequestReceived) and received[0].request_id == auth
    refusal = pair.server.refuse(auth, ErrorCode.AUTH, text)
    assert pair.server.state is ServerState.CLOSING
    assert pair.server.next_event() is None  # what came behind is discarded
    failed, ended = pair.client_receives(refusal)
    assert isinstance(failed, RequestFailed) and failed.token == "auth"
    assert isinstance(failed.error, AuthenticationError) and failed.error.message == text
    assert isinstance(failed.error, PermissionError)
    assert isinstance(ended, ConnectionFailed) and pair.client.state is ClientState.CLOSED
    assert ended.orphans == (
        () if pipelined is None or pipelined.RULE.reply is None else ("behind",)
    )
    with pytest.raises(AuthenticationError, match=text.split(";")[0]):
        pair.client.send_request(m.ServerInfo())


@pytest.mark.parametrize(
    "first",
    [m.Hello(1, 0.5, 0), m.Attach(3, SECRET, SERVER_ID), m.Reserve(1, 0.5, 0), m.ServerInfo()],
    ids=lambda message: type(message).__name__,
)
def test_no_token_where_one_is_required_is_refused_fatally(first: m.Request) -> None:
    """A server that uses tokens refuses any other first request with a fatal AUTH ERROR, a
    control request too (not the ordinary, non-fatal refusal of a control connection)."""
    pair = ConnectionPair()
    request_id = pair.client_sends(first, token="first")
    (received,) = pair.server_events()
    assert isinstance(received, RequestReceived) and received.request_id == request_id
    text = "this server requires a token: ask its operator for one"
    failed, ended = pair.client_receives(pair.server.refuse(request_id, ErrorCode.AUTH, text))
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, AuthenticationError)
    assert isinstance(ended, ConnectionFailed) and pair.client.state is ClientState.CLOSED
    assert pair.server.state is ServerState.CLOSING


@pytest.mark.parametrize("kind", ["hello", "attach", "control"])
def test_a_revoked_token_ends_an_open_session_with_auth_id_0(kind: str) -> None:
    """PROTOCOL.md 5.7.3: a fatal AUTH ERROR with id 0 ends the session; what waited is
    orphaned and every later call raises AuthenticationError."""
    pair = ConnectionPair()
    pair.authenticate(TOKEN, "alice")
    if kind == "control":
        pair.control(m.Reserve(1, 0.5, 0))
    elif kind == "attach":
        pair.attach()
    else:
        pair.handshake()
    if kind != "control":
        pair.client_sends(m.Synchronize(0), token="sync")
        pair.client_sends(m.MemFree(0, 0x1000))  # no reply: nothing to orphan
    pair.client_sends(m.ServerInfo(), token="info")
    pair.server_events()
    reason = "the token of alice was revoked; the session is over"
    (ended,) = pair.client_receives(pair.server.refuse(0, ErrorCode.AUTH, reason))
    assert isinstance(ended, ConnectionFailed) and pair.client.state is ClientState.CLOSED
    expected = {"info", "first"} if kind == "control" else {"sync", "info"}
    assert set(ended.orphans) == expected  # the control connection's RESERVE was never answered
    assert isinstance(ended.error, AuthenticationError) and ended.error.message == reason
    assert not isinstance(ended.error, ConnectionLostError)
    with pytest.raises(AuthenticationError, match="revoked"):
        pair.client.send_request(m.ServerInfo())
    assert pair.client.waiting == 0


def test_a_quota_refusal_of_reserve_is_not_fatal_and_of_hello_is() -> None:
    """PROTOCOL.md 5.7.2: QUOTA is a CapacityError; a RESERVE refused for it leaves the control
    connection open, a HELLO refused for it ends the connection like every refused HELLO."""
    text = "alice may hold 1 GPU(s); 1 held, 1 more asked"
    pair = ConnectionPair()
    pair.authenticate()
    reserve = pair.control(m.Reserve(1, 0.5, 0))
    (failed,) = pair.client_receives(pair.server.error(reserve.request_id, ErrorCode.QUOTA, text))
    assert isinstance(failed, RequestFailed) and isinstance(failed.error, QuotaExceededError)
    assert isinstance(failed.error, CapacityError) and failed.error.message == text
    assert pair.client.state is ClientState.CONTROL and pair.server.state is ServerState.CONTROL

    pair = ConnectionPair()
    pair.authenticate()
    hello = pair.client_sends(m.Hello(1, 0.5, 0), token="hello")
    pair.server_events()
    failed, ended = pair.client_receives(pair.server.refuse(hello, ErrorCode.QUOTA, text))
    assert isinstance(failed.error, QuotaExceededError) and isinstance(ended, ConnectionFailed)
    assert pair.client.state is ClientState.CLOSED and pair.server.state is ServerState.CLOSING
