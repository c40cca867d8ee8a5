"""The sans-io connections: every rule of the conversation, a client and a server paired in memory."""

from __future__ import annotations

import pytest
from connection_pair import ConnectionPair
from hypothesis import given, settings
from hypothesis import strategies as st

from bitfusion_net.protocol import (
    CapacityError,
    ClientState,
    ConnectionFailed,
    ConnectionLostError,
    ErrorCode,
    InvalidHandleError,
    ProtocolError,
    ProtocolViolation,
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
    with pytest.raises(ProtocolError, match="HELLO must come first"):
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
        ([encode_request(m.Synchronize(0), 5)], 5, "expected HELLO first"),
        ([encode_request(m.Hello(1, 0.5, 0), 0)], 0, "request id 0"),
        (
            [encode_request(m.Hello(1, 0.5, 0), 1), encode_request(m.Hello(1, 0.5, 0), 2)],
            2,
            "HELLO sent twice",
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
    (ended,) = pair.client_receives(encode_reply(m.Opcode.MEM_GET_INFO, sync, m.MemGetInfoReply(1, 2)))
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
