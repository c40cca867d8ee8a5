"""FrameDecoder under adversity: any chunking, every truncation, garbage, oversize lengths, sinks.

The properties are the ones docs/PROTOCOL.md promises a peer: how bytes are cut by the network
never changes the frames; an incomplete frame only waits; anything malformed raises
``ProtocolError`` (never another exception, never a hang) and nothing is allocated for a length
beyond the limits; a decoder that failed stays failed.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from wire_strategies import (
    MIN_BUFFER,
    REPLY_ENTRIES,
    REQUEST_CLASSES,
    SMALL_LIMITS,
    U32,
    U64,
    FrameSpec,
    RecordingSink,
    chunked,
    decoder_for,
    drain,
    frame_specs,
    make_spec,
    messages,
    request_ids,
)

from bitfusion_net.protocol import (
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    REPLIES,
    REQUESTS,
    Frame,
    FrameDecoder,
    Limits,
    Opcode,
    ProtocolError,
)
from bitfusion_net.protocol import messages as m
from bitfusion_net.protocol.frames import FLAG_REPLY, HEADER, KNOWN_FLAGS, pack_header

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
directions = pytest.mark.parametrize("is_reply", [False, True], ids=["server", "client"])
SINKS = ["default", "buffers", "discard"]


def _sink(kind: str) -> RecordingSink | None:
    return None if kind == "default" else RecordingSink(discard=kind == "discard")


def _check_frames(frames: list[Frame], specs: list[FrameSpec], sink_kind: str) -> None:
    assert len(frames) == len(specs)
    for frame, spec in zip(frames, specs, strict=True):
        if sink_kind == "discard":
            assert frame.payload is None
            spec = FrameSpec(spec.is_reply, spec.opcode, spec.request_id, spec.message)
        spec.check(frame)


streams = st.lists  # readability below: a stream is a list of frames


# -- chunking -------------------------------------------------------------------------------------


@directions
@pytest.mark.parametrize("sink_kind", SINKS)
@pytest.mark.parametrize(
    "buffer_size", [HEADER_SIZE, MIN_BUFFER, 256 * 1024], ids=["header-buffer", "min-buffer", "big-buffer"]
)
@FAST
@given(data=st.data())
def test_any_chunking_gives_the_same_frames(
    is_reply: bool, sink_kind: str, buffer_size: int, data: st.DataObject
) -> None:
    specs = data.draw(streams(frame_specs(is_reply, max_payload=3000), min_size=1, max_size=6))
    stream = b"".join(spec.encoded for spec in specs)
    sizes = data.draw(
        st.one_of(
            st.just([1]),
            st.lists(st.integers(1, max(1, len(stream))), min_size=1, max_size=12),
        ),
        label="chunk sizes",
    )
    sink = _sink(sink_kind)
    decoder = decoder_for(is_reply, sink, buffer_size=buffer_size)
    frames: list[Frame] = []
    for piece in chunked(stream, sizes):
        decoder.receive_data(piece)
        frames.extend(drain(decoder))
    _check_frames(frames, specs, sink_kind)
    assert not decoder.in_frame
    if sink is not None:
        with_payload = [spec for spec in specs if spec.payload]
        assert [call[:2] for call in sink.calls] == [
            (spec.opcode, spec.request_id) for spec in with_payload
        ]
        assert sink.sizes == [len(spec.payload) for spec in with_payload]
        assert [call[2] for call in sink.calls] == [spec.message for spec in with_payload]


@directions
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_one_byte_at_a_time_as_a_buffered_protocol(is_reply: bool, data: st.DataObject) -> None:
    """Drive get_buffer()/buffer_updated() as asyncio does, one byte per read."""
    specs = data.draw(streams(frame_specs(is_reply), min_size=1, max_size=4))
    stream = b"".join(spec.encoded for spec in specs)
    decoder = decoder_for(is_reply, RecordingSink(), buffer_size=MIN_BUFFER)
    frames: list[Frame] = []
    ends = set()
    offset = 0
    for spec in specs:
        offset += len(spec.encoded)
        ends.add(offset)
    for position in range(len(stream)):
        target = decoder.get_buffer()
        assert len(target) >= 1
        target[0] = stream[position]
        decoder.buffer_updated(1)
        frames.extend(drain(decoder))
        # Between frames the decoder holds nothing; inside one it says so.
        assert decoder.in_frame == (position + 1 not in ends)
    _check_frames(frames, specs, "buffers")


# -- truncation -----------------------------------------------------------------------------------


@directions
@pytest.mark.parametrize("sink_kind", SINKS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_truncation_point_waits(is_reply: bool, sink_kind: str, data: st.DataObject) -> None:
    spec = data.draw(frame_specs(is_reply))
    encoded = spec.encoded
    for cut in range(1, len(encoded)):
        decoder = decoder_for(is_reply, _sink(sink_kind))
        decoder.receive_data(encoded[:cut])  # no exception
        assert decoder.next_frame() is None
        assert decoder.in_frame
        decoder.receive_data(encoded[cut:])  # the rest completes it, wherever the cut was
        _check_frames(drain(decoder), [spec], sink_kind)
        assert not decoder.in_frame


@directions
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_truncated_last_frame_after_complete_ones(is_reply: bool, data: st.DataObject) -> None:
    specs = data.draw(streams(frame_specs(is_reply), min_size=2, max_size=4))
    stream = b"".join(spec.encoded for spec in specs)
    cut = len(stream) - data.draw(st.integers(1, len(specs[-1].encoded) - 1))
    decoder = decoder_for(is_reply)
    decoder.receive_data(stream[:cut])
    _check_frames(drain(decoder), specs[:-1], "default")
    assert decoder.in_frame


# -- garbage --------------------------------------------------------------------------------------


def _valid_looking_headers(is_reply: bool) -> st.SearchStrategy[bytes]:
    """Headers that pass the magic check, with every other field drawn at random."""
    table = REPLIES if is_reply else REQUESTS
    return st.builds(
        lambda version, opcode, flags, rid, meta, payload: HEADER.pack(
            MAGIC, version, opcode, flags, rid, meta, payload
        ),
        st.one_of(st.just(PROTOCOL_VERSION), st.integers(0, 255)),
        st.one_of(st.sampled_from(sorted(table)), st.integers(0, 255)),
        st.one_of(st.sampled_from([0, FLAG_REPLY]), st.integers(0, 0xFFFF)),
        request_ids,
        st.one_of(st.integers(0, 64), st.integers(0, U32)),
        st.one_of(st.integers(0, 64), st.integers(0, U64)),
    )


def _mutated(is_reply: bool) -> st.SearchStrategy[bytes]:
    """A valid stream with bytes overwritten, inserted or deleted."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        specs = draw(streams(frame_specs(is_reply), min_size=1, max_size=3))
        data = bytearray(b"".join(spec.encoded for spec in specs))
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data) - 1))
            action = draw(st.sampled_from(["set", "insert", "delete"]))
            if action == "set":
                data[position] = draw(st.integers(0, 255))
            elif action == "insert":
                data[position:position] = draw(st.binary(min_size=1, max_size=8))
            elif len(data) > 1:
                del data[position]
        return bytes(data)

    return build()


def _garbage(is_reply: bool) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        st.builds(bytes.__add__, _valid_looking_headers(is_reply), st.binary(max_size=300)),
        _mutated(is_reply),
    )


def _feed_garbage(decoder: FrameDecoder, garbage: bytes, sizes: list[int]) -> list[Frame]:
    """Feed until the decoder objects. Only ProtocolError may come out."""
    frames: list[Frame] = []
    for piece in chunked(garbage, sizes):
        try:
            decoder.receive_data(piece)
        except ProtocolError:
            frames.extend(drain(decoder))
            return frames
        frames.extend(drain(decoder))
    return frames


@directions
@pytest.mark.parametrize("discard", [False, True], ids=["buffers", "discard"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_garbage_raises_protocol_error_or_waits_and_never_overallocates(
    is_reply: bool, discard: bool, data: st.DataObject
) -> None:
    garbage = data.draw(_garbage(is_reply), label="garbage")
    sizes = data.draw(st.lists(st.integers(1, 64), min_size=1, max_size=5), label="chunk sizes")
    sink = RecordingSink(discard=discard)
    decoder = decoder_for(is_reply, sink, buffer_size=MIN_BUFFER)
    frames = _feed_garbage(decoder, garbage, sizes)
    assert all(size <= SMALL_LIMITS.max_payload for size in sink.sizes)
    table = REPLIES if is_reply else REQUESTS
    for frame in frames:  # a mutation may leave valid frames; they must be well-formed ones
        assert isinstance(frame.message, table[frame.opcode])
        assert frame.is_reply == is_reply
        if frame.payload is not None:
            assert 0 < len(frame.payload) <= SMALL_LIMITS.max_payload


@directions
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_garbage_fails_at_its_first_wrong_byte(is_reply: bool, data: st.DataObject) -> None:
    """A peer that is not speaking this protocol is refused at once, not after a whole header."""
    prefix_length = data.draw(st.integers(0, 3))
    wrong = data.draw(st.integers(0, 255).filter(lambda b: b != MAGIC[prefix_length]))
    tail = data.draw(st.binary(max_size=40))
    decoder = decoder_for(is_reply, RecordingSink())
    decoder.receive_data(MAGIC[:prefix_length])
    assert decoder.next_frame() is None
    with pytest.raises(ProtocolError, match="magic"):
        decoder.receive_data(bytes([wrong]) + tail)
    assert decoder.next_frame() is None


@directions
@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=200))
def test_random_bytes_yield_no_frame(is_reply: bool, garbage: bytes) -> None:
    assume(not garbage.startswith(MAGIC[: len(garbage)]))
    sink = RecordingSink()
    decoder = decoder_for(is_reply, sink)
    with pytest.raises(ProtocolError):
        decoder.receive_data(garbage)
    assert decoder.next_frame() is None
    assert sink.calls == []


# -- limits ---------------------------------------------------------------------------------------


def _all_opcodes(is_reply: bool) -> list[tuple[int, type[m.Message]]]:
    return REPLY_ENTRIES if is_reply else [(cls.OPCODE, cls) for cls in REQUEST_CLASSES]


def _opcodes_with_payload(is_reply: bool) -> list[int]:
    return [opcode for opcode, cls in _all_opcodes(is_reply) if cls.HAS_PAYLOAD]


@directions
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_oversize_metadata_fails_on_the_header_alone(is_reply: bool, data: st.DataObject) -> None:
    opcode, _cls = data.draw(st.sampled_from(_all_opcodes(is_reply)))
    meta_len = data.draw(st.integers(SMALL_LIMITS.max_metadata + 1, U32))
    sink = RecordingSink()
    decoder = decoder_for(is_reply, sink)
    header = pack_header(opcode, FLAG_REPLY if is_reply else 0, 1, meta_len, 0)
    with pytest.raises(ProtocolError, match="metadata"):
        decoder.receive_data(header)
    assert sink.calls == []


@directions
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_oversize_payload_fails_before_the_sink_is_asked(
    is_reply: bool, data: st.DataObject
) -> None:
    opcode = data.draw(st.sampled_from(_opcodes_with_payload(is_reply)))
    payload_len = data.draw(st.integers(SMALL_LIMITS.max_payload + 1, U64))
    cls = (REPLIES if is_reply else REQUESTS)[opcode]
    meta = data.draw(messages(cls)).encode()
    sink = RecordingSink()
    decoder = decoder_for(is_reply, sink)
    header = pack_header(opcode, FLAG_REPLY if is_reply else 0, 1, len(meta), payload_len)
    with pytest.raises(ProtocolError, match="payload"):
        decoder.receive_data(header)  # refused on the header, before the metadata is even read
    assert sink.calls == []
    decoder = decoder_for(is_reply, sink)
    with pytest.raises(ProtocolError, match="payload"):
        decoder.receive_data(header + meta)
    assert sink.calls == []


@directions
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_payload_on_an_opcode_without_one_is_refused(is_reply: bool, data: st.DataObject) -> None:
    opcode, cls = data.draw(
        st.sampled_from([e for e in _all_opcodes(is_reply) if not e[1].HAS_PAYLOAD])
    )
    meta = data.draw(messages(cls)).encode()
    payload_len = data.draw(st.integers(1, U64))
    sink = RecordingSink()
    decoder = decoder_for(is_reply, sink)
    with pytest.raises(ProtocolError):
        decoder.receive_data(
            pack_header(opcode, FLAG_REPLY if is_reply else 0, 1, len(meta), payload_len)
        )
    assert sink.calls == []


def test_lengths_exactly_at_the_limits_are_accepted() -> None:
    limits = Limits(max_metadata=300, max_payload=1000)
    fixed = m.Launch._struct.size + 4
    launch = m.Launch(0, 1, (1, 1, 1), (1, 1, 1), 0, 0, bytes(range(256))[: 300 - fixed])
    htod = m.MemcpyHtoD(0, 0x1000, 0)
    specs = [
        make_spec(False, Opcode.LAUNCH, 1, launch, b""),
        make_spec(False, Opcode.MEMCPY_HTOD, 2, htod, bytes(1000)),
    ]
    assert len(specs[0].encoded) == HEADER_SIZE + 300
    sink = RecordingSink()
    decoder = FrameDecoder(
        receives_replies=False, limits=limits, payload_sink=sink, buffer_size=324
    )
    decoder.receive_data(specs[0].encoded + specs[1].encoded)
    _check_frames(drain(decoder), specs, "buffers")
    assert sink.sizes == [1000]


def test_decoder_refuses_a_buffer_smaller_than_a_header() -> None:
    with pytest.raises(ValueError, match="header"):
        FrameDecoder(receives_replies=False, limits=SMALL_LIMITS, buffer_size=HEADER_SIZE - 1)


def test_the_buffer_grows_for_large_metadata_and_rests_small_again() -> None:
    launch = m.Launch(0, 1, (1, 1, 1), (1, 1, 1), 0, 0, bytes(range(256)) * 3)
    spec = make_spec(False, Opcode.LAUNCH, 1, launch, b"")
    decoder = FrameDecoder(receives_replies=False, limits=SMALL_LIMITS, buffer_size=64)
    assert len(decoder.get_buffer()) == 64
    decoder.receive_data(spec.encoded * 3)
    _check_frames(drain(decoder), [spec] * 3, "buffers")
    assert len(decoder.get_buffer()) == 64  # back to resting once the big frames are parsed


# -- header fields ---------------------------------------------------------------------------------


def _with_header_field(encoded: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    data = bytearray(encoded)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@directions
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bad_header_fields_are_protocol_errors(is_reply: bool, data: st.DataObject) -> None:
    spec = data.draw(frame_specs(is_reply))
    table = REPLIES if is_reply else REQUESTS
    bad_magic = data.draw(st.binary(min_size=4, max_size=4).filter(lambda b: b != MAGIC))
    bad_version = data.draw(st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION))
    unknown_flag = data.draw(st.integers(0, 0xFFFF).filter(lambda f: f & ~KNOWN_FLAGS != 0))
    unknown_opcode = data.draw(st.integers(0, 255).filter(lambda o: o not in table))
    flags = spec.encoded[6] | (FLAG_REPLY if is_reply else 0)
    cases = {
        "magic": _with_header_field(spec.encoded, 0, "4s", bad_magic),
        "version": _with_header_field(spec.encoded, 4, "B", bad_version),
        "flags": _with_header_field(spec.encoded, 6, "<H", unknown_flag | flags),
        "opcode": _with_header_field(spec.encoded, 5, "B", unknown_opcode),
        # a reply to a server or a request to a client: the direction bit is wrong
        "direction": _with_header_field(spec.encoded, 6, "<H", flags ^ FLAG_REPLY),
    }
    for name, frame in cases.items():
        sink = RecordingSink()
        decoder = decoder_for(is_reply, sink)
        with pytest.raises(ProtocolError):
            decoder.receive_data(frame)
        assert decoder.next_frame() is None, name
        assert sink.calls == [], name


def test_direction_mismatch_messages() -> None:
    request = make_spec(False, Opcode.SYNCHRONIZE, 5, m.Synchronize(0), b"")
    reply = make_spec(True, Opcode.SYNCHRONIZE, 5, m.Done(), b"")
    with pytest.raises(ProtocolError, match="reply sent to a server"):
        decoder_for(False).receive_data(reply.encoded)
    with pytest.raises(ProtocolError, match="request sent to a client"):
        decoder_for(True).receive_data(request.encoded)


@pytest.mark.parametrize("opcode", [Opcode.ERROR, 0x00, 0x03, 0x1A, 0x25, 0x35, 0x3E, 0xFF])
def test_unknown_request_opcodes_are_fatal(opcode: int) -> None:
    """ERROR is a reply-only opcode: a client never sends it."""
    decoder = decoder_for(False)
    with pytest.raises(ProtocolError, match="opcode"):
        decoder.receive_data(pack_header(opcode, 0, 1, 0, 0))


# -- a failed decoder stays failed -------------------------------------------------------------------


@directions
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_decoder_that_raised_stays_broken(is_reply: bool, data: st.DataObject) -> None:
    good = data.draw(streams(frame_specs(is_reply), min_size=1, max_size=3))
    decoder = decoder_for(is_reply)
    decoder.receive_data(good[0].encoded)
    with pytest.raises(ProtocolError) as first:
        decoder.receive_data(b"XXXX")
    # Frames completed before the error are still handed out; nothing after it.
    _check_frames(drain(decoder), good[:1], "default")
    for attempt in range(2):
        with pytest.raises(ProtocolError) as again:
            decoder.receive_data(b"".join(spec.encoded for spec in good))
        assert str(again.value) == str(first.value), attempt
        with pytest.raises(ProtocolError):
            decoder.get_buffer()
        with pytest.raises(ProtocolError):
            decoder.buffer_updated(0)
        assert decoder.next_frame() is None


# -- payload sinks -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    payload=st.binary(min_size=1, max_size=SMALL_LIMITS.max_payload),
    request_id=request_ids,
)
def test_a_sink_returning_none_discards_and_the_next_frame_decodes(
    data: st.DataObject, payload: bytes, request_id: int
) -> None:
    """Payloads larger than the decoder's own buffer are read through it and dropped."""
    first = make_spec(False, Opcode.MEMCPY_HTOD, request_id, m.MemcpyHtoD(3, 0x1000, 7), payload)
    following = data.draw(streams(frame_specs(False), min_size=1, max_size=3))
    stream = first.encoded + b"".join(spec.encoded for spec in following)
    sizes = data.draw(st.lists(st.integers(1, 2 * MIN_BUFFER), min_size=1, max_size=6))
    sink = RecordingSink(discard=True)
    decoder = decoder_for(False, sink, buffer_size=MIN_BUFFER)
    frames: list[Frame] = []
    for piece in chunked(stream, sizes):
        decoder.receive_data(piece)
        frames.extend(drain(decoder))
    _check_frames(frames, [first, *following], "discard")
    assert sink.calls[0] == (Opcode.MEMCPY_HTOD, request_id, first.message, len(payload))
    assert not decoder.in_frame


@pytest.mark.parametrize(
    ("is_reply", "opcode", "message"),
    [
        (False, Opcode.MEMCPY_HTOD, m.MemcpyHtoD(0, 0x2000, 0)),
        (False, Opcode.MODULE_LOAD, m.ModuleLoad(1)),
        (True, Opcode.MEMCPY_DTOH, m.MemcpyDtoHReply()),
    ],
    ids=["memcpy_htod", "module_load", "memcpy_dtoh-reply"],
)
@settings(max_examples=40, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=SMALL_LIMITS.max_payload),
    early=st.integers(0, 64),
    reads=st.lists(st.integers(1, 1500), min_size=1, max_size=8),
    request_id=request_ids,
)
def test_the_sink_buffer_receives_the_payload_directly(
    is_reply: bool,
    opcode: int,
    message: m.Message,
    payload: bytes,
    early: int,
    reads: list[int],
    request_id: int,
) -> None:
    spec = make_spec(is_reply, opcode, request_id, message, payload)
    head = spec.encoded[: len(spec.encoded) - len(payload)]
    destination = bytearray(len(payload))
    calls: list[tuple[int, int, m.Message, int]] = []

    def sink(op: int, rid: int, msg: m.Message, length: int) -> memoryview:
        calls.append((op, rid, msg, length))
        return memoryview(destination)

    decoder = decoder_for(is_reply, sink)
    # Header, metadata and perhaps the first payload bytes arrive in one read (into the decoder's
    # own buffer); those payload bytes are copied into the destination.
    early = min(early, len(payload) - 1)
    decoder.receive_data(head + payload[:early])
    assert calls == [(opcode, request_id, message, len(payload))]
    assert destination[:early] == payload[:early]
    position = early
    index = 0
    while position < len(payload):
        assert decoder.in_frame and decoder.next_frame() is None
        # Nothing is left in the decoder's buffer, so the next read goes straight into the sink's.
        target = decoder.get_buffer()
        assert target.obj is destination
        assert len(target) == len(payload) - position
        count = min(reads[index % len(reads)], len(target))
        target[:count] = payload[position : position + count]
        decoder.buffer_updated(count)
        position += count
        index += 1
    (frame,) = drain(decoder)
    spec.check(frame)
    assert frame.payload is not None and frame.payload.obj is destination
    assert bytes(destination) == payload
    assert not decoder.in_frame
    # After the payload the decoder reads into its own buffer again.
    assert decoder.get_buffer().obj is not destination


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(min_size=1, max_size=200), request_id=request_ids)
def test_a_zero_length_payload_never_asks_the_sink(payload: bytes, request_id: int) -> None:
    sink = RecordingSink()
    decoder = decoder_for(False, sink)
    empty = make_spec(False, Opcode.MEMCPY_HTOD, request_id, m.MemcpyHtoD(0, 1, 0), b"")
    full = make_spec(False, Opcode.MEMCPY_HTOD, request_id, m.MemcpyHtoD(0, 1, 0), payload)
    decoder.receive_data(empty.encoded + full.encoded)
    _check_frames(drain(decoder), [empty, full], "buffers")
    assert sink.sizes == [len(payload)]
