"""The codec: every request and reply round-trips, and the bytes are the ones docs/PROTOCOL.md says.

Round trips go through the public path (``encode_request``/``encode_reply`` and ``FrameDecoder``),
not just ``Message.encode``/``decode``, so the header, the direction check and the payload hand-off
are covered for every message class.
"""

from __future__ import annotations

import struct
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_strategies import (
    REPLY_ENTRIES,
    REQUEST_CLASSES,
    SMALL_LIMITS,
    U32,
    all_message_classes,
    decoder_for,
    device_grants,
    drain,
    fixed_values,
    make_spec,
    messages,
    reply_spec,
    request_ids,
    request_spec,
    reservation_secrets,
    server_ids,
    texts,
    tokens,
    users,
)

from bitfusion_net.protocol import (
    ERROR_DEFERRED,
    ERROR_FATAL,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    REPLIES,
    REQUESTS,
    RULES,
    AuthenticationError,
    CapacityError,
    ConnectionLostError,
    DeviceGrant,
    ErrorCode,
    ErrorReply,
    InvalidValueError,
    LeaseEndedError,
    Opcode,
    Phase,
    ProtocolError,
    QuotaExceededError,
    encode_reply,
    encode_request,
    error_class,
)
from bitfusion_net.protocol import messages as m
from bitfusion_net.protocol.frames import FLAG_REPLY, HEADER, pack_header

ROUND_TRIP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_message_class_is_registered() -> None:
    """'Every class' below means every class: none is defined without being on the wire tables."""
    registered = set(REQUESTS.values()) | set(REPLIES.values())
    assert all_message_classes() == registered
    assert {cls.OPCODE for cls in REQUESTS.values()} == set(REQUESTS)
    # ERROR and KEEPALIVE are the replies without a request; every other answers a request opcode.
    assert set(REPLIES) - set(REQUESTS) == {Opcode.ERROR, Opcode.KEEPALIVE}
    # A no-reply request has no reply layout, every other request has one; its rule says which.
    for opcode, cls in REQUESTS.items():
        assert cls.RULE is RULES[opcode] and cls.RULE.request is cls
        assert (opcode in REPLIES) != cls.RULE.no_reply, cls.__name__


def test_flat_messages_decode_their_fields_in_declaration_order() -> None:
    """A message of scalar fields is decoded by position: its wire order must be its field order."""
    for cls in all_message_classes():
        if cls._flat:
            assert [name for name, _ in cls.FIXED] == [f.name for f in fields(cls)], cls.__name__


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda cls: cls.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_request_round_trip(cls: type[m.Request], data: st.DataObject) -> None:
    spec = data.draw(request_spec(cls))
    decoder = decoder_for(False)
    decoder.receive_data(spec.encoded)
    frames = drain(decoder)
    assert len(frames) == 1
    spec.check(frames[0])
    assert not decoder.in_frame
    # The message alone round-trips too, and re-encodes to the same bytes.
    assert type(spec.message).decode(spec.message.encode()) == spec.message
    assert frames[0].message.encode() == spec.message.encode()


@pytest.mark.parametrize(
    ("opcode", "cls"),
    REPLY_ENTRIES,
    ids=[f"{Opcode(o).name}-{c.__name__}" for o, c in REPLY_ENTRIES],
)
@ROUND_TRIP
@given(data=st.data())
def test_reply_round_trip(opcode: int, cls: type[m.Reply], data: st.DataObject) -> None:
    spec = data.draw(reply_spec(opcode, cls))
    decoder = decoder_for(True)
    decoder.receive_data(spec.encoded)
    frames = drain(decoder)
    assert len(frames) == 1
    spec.check(frames[0])
    assert not decoder.in_frame
    assert frames[0].message.encode() == spec.message.encode()


@settings(max_examples=60, deadline=None)
@given(
    session_id=fixed_values("Q"),
    max_payload=fixed_values("Q"),
    max_metadata=fixed_values("I"),
    devices=st.lists(device_grants, max_size=6),
    request_id=request_ids,
)
def test_hello_reply_device_list_round_trip(
    session_id: int,
    max_payload: int,
    max_metadata: int,
    devices: list[DeviceGrant],
    request_id: int,
) -> None:
    reply = m.HelloReply.with_devices(session_id, max_payload, max_metadata, devices)
    decoder = decoder_for(True)
    decoder.receive_data(encode_reply(Opcode.HELLO, request_id, reply))
    (frame,) = drain(decoder)
    decoded = frame.message
    assert isinstance(decoded, m.HelloReply)
    assert (decoded.session_id, decoded.max_payload, decoded.max_metadata) == (
        session_id,
        max_payload,
        max_metadata,
    )
    assert decoded.devices == devices


@settings(max_examples=60, deadline=None)
@given(device=device_grants)
def test_device_grant_record_layout(device: DeviceGrant) -> None:
    """PROTOCOL.md: u16 index, u16 server_gpu, u64 total, u64 limit, f64 fraction, f64 weight,
    u8 mode, str, str."""
    name, executor = device.name.encode(), device.executor.encode()
    expected = (
        struct.pack(
            "<HHQQddB",
            device.index,
            device.server_gpu,
            device.total_memory,
            device.memory_limit,
            device.fraction,
            device.weight,
            device.mode,
        )
        + struct.pack("<I", len(name))
        + name
        + struct.pack("<I", len(executor))
        + executor
    )
    assert m.HelloReply.with_devices(1, 2, 3, [device]).grants == expected
    assert m.HelloReply.with_devices(1, 2, 3, [device, device]).grants == expected * 2


@settings(max_examples=200, deadline=None)
@given(grants=st.binary(max_size=200))
def test_malformed_device_records_raise_protocol_error(grants: bytes) -> None:
    reply = m.HelloReply(1, 2, 3, grants)
    try:
        devices = reply.devices
    except ProtocolError:
        return
    assert m.HelloReply.with_devices(1, 2, 3, devices).grants == grants


@settings(max_examples=60, deadline=None)
@given(
    devices=st.lists(device_grants, max_size=6), secret=reservation_secrets, server_id=server_ids
)
def test_a_reserve_reply_carries_the_same_grant_records_as_a_hello_reply(
    devices: list[DeviceGrant], secret: bytes, server_id: str
) -> None:
    grants = m.encode_grants(devices)
    assert grants == m.HelloReply.with_devices(1, 2, 3, devices).grants
    reply = m.ReserveReply(7, 60.0, secret, server_id, grants)
    decoder = decoder_for(True)
    decoder.receive_data(encode_reply(Opcode.RESERVE, 1, reply))
    (frame,) = drain(decoder)
    assert frame.message == reply
    assert isinstance(frame.message, m.ReserveReply) and frame.message.devices == devices
    assert m.decode_grants(grants) == devices


@settings(max_examples=200, deadline=None)
@given(grants=st.binary(max_size=200))
def test_malformed_grants_of_a_reserve_reply_raise_protocol_error(grants: bytes) -> None:
    reply = m.ReserveReply(1, 0.0, b"", "", grants)
    try:
        devices = reply.devices
    except ProtocolError:
        return
    assert m.encode_grants(devices) == grants


@settings(max_examples=60, deadline=None)
@given(
    reserve=messages(m.Reserve),
    attach=messages(m.Attach),
    release=messages(m.Release),
    info=messages(m.ServerInfo),
    reply=messages(m.ReserveReply),
)
def test_control_plane_layouts(
    reserve: m.Reserve,
    attach: m.Attach,
    release: m.Release,
    info: m.ServerInfo,
    reply: m.ReserveReply,
) -> None:
    """PROTOCOL.md 5.5 and 5.6, field by field: fixed fields packed back to back, then each
    variable field as a u32 length and its bytes."""

    def var(*values: str | bytes) -> bytes:
        out = b""
        for value in values:
            raw = value.encode() if isinstance(value, str) else value
            out += struct.pack("<I", len(raw)) + raw
        return out

    r = reserve
    assert reserve.encode() == struct.pack(
        "<HdQdBBd", r.gpus, r.fraction, r.memory, r.weight, r.mode, r.hold, r.idle_timeout
    ) + var(r.client_name, r.only_gpus)
    assert attach.encode() == struct.pack("<Q", attach.reservation) + var(
        attach.secret, attach.server_id, attach.client_name
    )
    assert release.encode() == struct.pack("<Q", release.reservation) + var(release.secret)
    assert info.encode() == struct.pack("<B", info.detail)
    assert reply.encode() == struct.pack("<Qd", reply.reservation, reply.idle_timeout) + var(
        reply.secret, reply.server_id, reply.grants
    )
    text = '{"server":{"id":"x"}}'
    assert m.ServerInfoReply(text).encode() == var(text)


@settings(max_examples=60, deadline=None)
@given(token=tokens, user=users, request_id=st.integers(1, U32))
def test_authenticate_layouts(token: str, user: str, request_id: int) -> None:
    """PROTOCOL.md 5.7: AUTHENTICATE is opcode 0x08 and carries one str, the token, and its reply
    one str, the user; neither has a payload."""
    request, reply = m.Authenticate(token), m.AuthenticateReply(user)
    raw, name = token.encode(), user.encode()
    assert request.encode() == struct.pack("<I", len(raw)) + raw
    assert reply.encode() == struct.pack("<I", len(name)) + name
    assert not m.Authenticate.HAS_PAYLOAD and not m.AuthenticateReply.HAS_PAYLOAD
    head = encode_request(request, request_id)
    assert head[5] == Opcode.AUTHENTICATE == 0x08 and len(head) == HEADER_SIZE + 4 + len(raw)
    decoder = decoder_for(False)
    decoder.receive_data(head)
    (frame,) = drain(decoder)
    assert frame.message == request and frame.request_id == request_id
    decoder = decoder_for(True)
    decoder.receive_data(encode_reply(Opcode.AUTHENTICATE, request_id, reply))
    (frame,) = drain(decoder)
    assert frame.message == reply and frame.opcode == Opcode.AUTHENTICATE


def test_authenticate_is_answered_by_its_own_reply_and_belongs_to_the_auth_phase() -> None:
    assert REPLIES[Opcode.AUTHENTICATE] is m.AuthenticateReply
    rule = RULES[Opcode.AUTHENTICATE]
    assert rule.request is m.Authenticate and rule.phase is Phase.AUTH and not rule.no_reply
    # An empty user is the answer of a server that does not use tokens: it still decodes.
    assert m.AuthenticateReply.decode(m.AuthenticateReply("").encode()) == m.AuthenticateReply("")


@settings(max_examples=60, deadline=None)
@given(indices=st.lists(fixed_values("H"), max_size=8), odd=st.binary(max_size=15))
def test_only_gpus_is_a_list_of_u16_gpu_numbers(indices: list[int], odd: bytes) -> None:
    """PROTOCOL.md 5.5.1: ``only_gpus`` is u16 server GPU numbers back to back; empty: any."""
    only = m.Reserve.gpu_list(indices)
    assert only == b"".join(struct.pack("<H", index) for index in indices)
    reserve = m.Reserve(1, 0.5, 0, only_gpus=only)
    decoded = m.Reserve.decode(reserve.encode())
    assert isinstance(decoded, m.Reserve)
    assert decoded.allowed_gpus() == (set(indices) if indices else None)
    assert m.Reserve(1, 0.5, 0).allowed_gpus() is None
    if len(odd) % 2:
        with pytest.raises(InvalidValueError, match="only_gpus"):  # refused, not fatal
            m.Reserve(1, 0.5, 0, only_gpus=odd).allowed_gpus()


def test_the_control_plane_constants_are_the_documented_values() -> None:
    assert (m.HOLD_BY_IDLE_TIMEOUT, m.HOLD_BY_CONNECTION) == (0, 1)
    assert (m.INFO_BRIEF, m.INFO_FULL) == (0, 1)
    assert [
        int(op) for op in (Opcode.RESERVE, Opcode.ATTACH, Opcode.RELEASE, Opcode.SERVER_INFO)
    ] == [
        4,
        5,
        6,
        7,
    ]
    # ATTACH is answered like HELLO; RELEASE with the empty Done.
    assert REPLIES[Opcode.ATTACH] is m.HelloReply and REPLIES[Opcode.RELEASE] is m.Done
    assert m.Reserve(1, 0.5, 0).hold == m.HOLD_BY_CONNECTION  # the default holds by connection
    assert m.ServerInfo().detail == m.INFO_FULL


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(allow_nan=True), bits=st.integers(0, 2**52 - 1))
def test_float_fields_travel_bit_exact(fraction: float, bits: int) -> None:
    """f64 fields are IEEE 754 binary64, NaN payloads included."""
    nan = struct.unpack("<d", struct.pack("<Q", 0x7FF0_0000_0000_0000 | bits | 1))[0]
    for value in (fraction, nan, -0.0):
        hello = m.Hello(1, value, 0, "")
        decoded = m.Hello.decode(hello.encode())
        assert isinstance(decoded, m.Hello)
        assert struct.pack("<d", decoded.fraction) == struct.pack("<d", value)


# -- the bytes on the wire ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_header_layout(data: st.DataObject) -> None:
    """Offsets 0-3 magic, 4 version, 5 opcode, 6-7 flags, 8-11 request id, 12-15 metadata
    length, 16-23 payload length; all little-endian."""
    cls = data.draw(st.sampled_from(REQUEST_CLASSES))
    message = data.draw(messages(cls))
    request_id = data.draw(request_ids)
    payload_length = data.draw(st.integers(0, 2**64 - 1)) if cls.HAS_PAYLOAD else 0
    for encoded, flags, opcode in (
        (encode_request(message, request_id, payload_length), 0, cls.OPCODE),
        (encode_reply(cls.OPCODE, request_id, m.Done(), payload_length), FLAG_REPLY, cls.OPCODE),
    ):
        meta = encoded[HEADER_SIZE:]
        assert HEADER_SIZE == 24
        assert encoded[0:4] == MAGIC == b"BFNT"
        assert encoded[4] == PROTOCOL_VERSION == 3
        assert encoded[5] == opcode
        assert int.from_bytes(encoded[6:8], "little") == flags
        assert int.from_bytes(encoded[8:12], "little") == request_id
        assert int.from_bytes(encoded[12:16], "little") == len(meta)
        assert int.from_bytes(encoded[16:24], "little") == payload_length
        assert encoded[:HEADER_SIZE] == pack_header(
            opcode, flags, request_id, len(meta), payload_length
        )
    assert encode_request(message, request_id, payload_length)[HEADER_SIZE:] == message.encode()


@pytest.mark.parametrize(
    "cls",
    sorted(all_message_classes(), key=lambda cls: cls.__name__),
    ids=lambda cls: cls.__name__,
)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_metadata_is_fixed_fields_then_length_prefixed_fields(
    cls: type[m.Message], data: st.DataObject
) -> None:
    """The metadata encoding rule, written out independently of ``Message.encode``."""
    message = data.draw(messages(cls))
    expected = b""
    for name, code in cls.FIXED:
        value = getattr(message, name)
        expected += struct.pack("<" + code, *(value if isinstance(value, tuple) else (value,)))
    for name, kind in cls.VARIABLE:
        value = getattr(message, name)
        raw = value.encode("utf-8") if kind == "str" else bytes(value)
        expected += struct.pack("<I", len(raw)) + raw
    assert message.encode() == expected


def test_no_padding_between_fixed_fields() -> None:
    # u16 device then u8 itemsize then u32 value: 2 + 1 + 4, packed back to back.
    meta = m.Memset(0x0102, 4, 0x0A0B0C0D, 0x1122334455667788, 9, 0).encode()
    assert meta[:7] == bytes([0x02, 0x01, 0x04, 0x0D, 0x0C, 0x0B, 0x0A])
    assert len(meta) == 2 + 1 + 4 + 8 + 8 + 8


# -- metadata that breaks the rules ------------------------------------------------------------


def _request_frame(opcode: int, meta: bytes, request_id: int = 1) -> bytes:
    return pack_header(opcode, 0, request_id, len(meta), 0) + meta


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda cls: cls.__name__)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_stray_or_missing_metadata_bytes_are_protocol_errors(
    cls: type[m.Request], data: st.DataObject
) -> None:
    meta = data.draw(messages(cls)).encode()
    extra = data.draw(st.binary(min_size=1, max_size=8))
    decoder = decoder_for(False)
    with pytest.raises(ProtocolError):
        decoder.receive_data(_request_frame(cls.OPCODE, meta + extra))
    if meta:
        cut = data.draw(st.integers(0, len(meta) - 1))
        decoder = decoder_for(False)
        with pytest.raises(ProtocolError):
            decoder.receive_data(_request_frame(cls.OPCODE, meta[:cut]))


@pytest.mark.parametrize(
    ("message", "field_offset"),
    [
        (m.Hello(1, 1.0, 0, ""), 27),
        (m.GetFunction(0, 0, "", ""), 10),
        (m.GetFunction(0, 0, "", ""), 14),
    ],
)
@settings(max_examples=30, deadline=None)
@given(junk=st.binary(min_size=1, max_size=16))
def test_text_fields_must_be_utf8(message: m.Request, field_offset: int, junk: bytes) -> None:
    try:
        junk.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        junk = b"\xff" + junk  # 0xFF never occurs in UTF-8
    meta = bytearray(message.encode())
    meta[field_offset : field_offset + 4] = struct.pack("<I", len(junk)) + junk
    decoder = decoder_for(False)
    with pytest.raises(ProtocolError, match="UTF-8"):
        decoder.receive_data(_request_frame(message.OPCODE, bytes(meta)))


@settings(max_examples=50, deadline=None)
@given(name=texts, claimed=st.integers(0, U32))
def test_length_prefix_overrunning_the_metadata_is_a_protocol_error(
    name: str, claimed: int
) -> None:
    raw = name.encode()
    meta = m.GetFunction(0, 0, name, "").encode()
    if claimed == len(raw):
        claimed += 1
    bad = meta[:10] + struct.pack("<I", claimed) + meta[14:]
    decoder = decoder_for(False)
    with pytest.raises(ProtocolError):
        decoder.receive_data(_request_frame(Opcode.GET_FUNCTION, bad))


# -- encoder input checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        m.MemAlloc(2**16, 1),
        m.MemAlloc(0, 2**64),
        m.MemAlloc(-1, 1),
        m.Memset(0, 256, 0, 0, 0),
        m.Memset(0, 4, 2**32, 0, 0),
        m.Launch(0, 0, (1, 1, 2**32), (1, 1, 1), 0, 0),
        m.Launch(0, 0, (1, 1), (1, 1, 1), 0, 0),  # type: ignore[arg-type]
        ErrorReply(1, 0, -1, 0, ""),
    ],
)
def test_out_of_range_fields_are_refused_when_encoding(message: m.Message) -> None:
    with pytest.raises(ValueError):
        message.encode()


# -- kernel arguments -----------------------------------------------------------------------------

_ARG_SIZES = {
    "b": 1,
    "B": 1,
    "h": 2,
    "H": 2,
    "i": 4,
    "I": 4,
    "q": 8,
    "Q": 8,
    "f": 4,
    "d": 8,
    "P": 8,
}
_SIGNED = {"b", "h", "i", "q"}


def _arg_value(code: str) -> st.SearchStrategy[object]:
    if code in "fd":
        width = 32 if code == "f" else 64
        return st.floats(allow_nan=False, width=width)
    bits = 8 * _ARG_SIZES[code]
    if code in _SIGNED:
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), arg_types=st.text(alphabet="bBhHiIqQfdP", max_size=12))
def test_kernel_args_are_little_endian_unpadded_pointers_u64(
    data: st.DataObject, arg_types: str
) -> None:
    fmt = m.kernel_args_format(arg_types)
    assert struct.calcsize(fmt) == sum(_ARG_SIZES[code] for code in arg_types)
    values = [data.draw(_arg_value(code)) for code in arg_types]
    packed = struct.pack(fmt, *values)
    # Byte by byte, independent of struct's format string: each value at its running offset.
    offset = 0
    for code, value in zip(arg_types, values, strict=True):
        size = _ARG_SIZES[code]
        chunk = packed[offset : offset + size]
        if code in "fd":
            assert chunk == struct.pack("<f" if code == "f" else "<d", value)
        else:
            assert chunk == int(value).to_bytes(size, "little", signed=code in _SIGNED)  # type: ignore[call-overload]
        offset += size
    assert offset == len(packed)
    launch = m.Launch(0, 1, (1, 1, 1), (1, 1, 1), 0, 0, packed)
    decoded = m.Launch.decode(launch.encode())
    assert isinstance(decoded, m.Launch)
    assert decoded.args == packed
    assert struct.unpack(fmt, decoded.args) == struct.unpack(fmt, packed)


# -- errors --------------------------------------------------------------------------------------


def test_error_codes_and_flags_are_the_documented_values() -> None:
    assert {code.name: int(code) for code in ErrorCode} == {
        "PROTOCOL": 1,
        "OUT_OF_MEMORY": 2,
        "CAPACITY": 3,
        "INVALID_HANDLE": 4,
        "INVALID_VALUE": 5,
        "KERNEL": 6,
        "UNSUPPORTED": 7,
        "INTERNAL": 8,
        "LEASE_ENDED": 9,
        "AUTH": 10,
        "QUOTA": 11,
    }
    assert (ERROR_DEFERRED, ERROR_FATAL) == (0x1, 0x2)
    for code in ErrorCode:
        assert error_class(code).code == code
    # The end of a reservation is the end of the session's GPUs: a lost connection, with a reason.
    assert issubclass(error_class(ErrorCode.LEASE_ENDED), ConnectionLostError)
    assert error_class(ErrorCode.LEASE_ENDED) is LeaseEndedError
    # A refused or revoked token is a refusal of permission; a quota, a lack of room (for this
    # user): callers that catch PermissionError or CapacityError catch them (PROTOCOL.md 9.2).
    assert error_class(ErrorCode.AUTH) is AuthenticationError
    assert issubclass(AuthenticationError, PermissionError)
    assert not issubclass(AuthenticationError, ConnectionLostError)
    assert error_class(ErrorCode.QUOTA) is QuotaExceededError
    assert issubclass(QuotaExceededError, CapacityError)
    assert error_class(999).__name__ == "BitfusionError"  # a newer server's code still raises


@settings(max_examples=50, deadline=None)
@given(
    code=st.sampled_from(list(ErrorCode)),
    failed=st.integers(1, U32),
    later=fixed_values("I"),
    text=texts,
    request_id=request_ids,
)
def test_deferred_error_frame_round_trip(
    code: ErrorCode, failed: int, later: int, text: str, request_id: int
) -> None:
    spec = make_spec(
        True, Opcode.ERROR, request_id, ErrorReply(code, ERROR_DEFERRED, failed, later, text), b""
    )
    decoder = decoder_for(True)
    decoder.receive_data(spec.encoded)
    (frame,) = drain(decoder)
    spec.check(frame)
    assert spec.encoded[HEADER_SIZE:] == (
        struct.pack("<HHII", code, ERROR_DEFERRED, failed, later)
        + struct.pack("<I", len(text.encode()))
        + text.encode()
    )


def test_the_header_struct_is_24_bytes_little_endian() -> None:
    assert HEADER.format == "<4sBBHIIQ"
    assert HEADER.size == HEADER_SIZE == 24
    assert SMALL_LIMITS.max_payload < 2**64  # the test limits are representable on the wire


# -- the CUDA calls of section 6: attributes, globals, queries, waits ---------------------------


@settings(max_examples=60, deadline=None)
@given(
    attributes=st.dictionaries(st.integers(0, U32), st.integers(-(2**31), 2**31 - 1), max_size=40)
)
def test_device_attributes_are_u32_i32_records_in_ascending_order(
    attributes: dict[int, int],
) -> None:
    """PROTOCOL.md 6.1: DEVICE_ATTRIBUTES' reply is one bytes field of (u32 attribute, i32 value)
    records, ascending by attribute, each attribute once."""
    reply = m.DeviceAttributesReply.from_dict(attributes)
    assert reply.attributes == b"".join(
        struct.pack("<Ii", key, attributes[key]) for key in sorted(attributes)
    )
    assert reply.encode() == struct.pack("<I", len(reply.attributes)) + reply.attributes
    decoded = m.DeviceAttributesReply.decode(reply.encode())
    assert isinstance(decoded, m.DeviceAttributesReply)
    assert decoded.as_dict() == attributes
    assert m.DeviceAttributes(3).encode() == struct.pack("<H", 3)


@pytest.mark.parametrize(
    "records",
    [b"\x01\x00\x00\x00", struct.pack("<Ii", 1, 2) + b"\x00", struct.pack("<IiIi", 7, 1, 7, 2)],
    ids=["half-a-record", "a-stray-byte", "an-attribute-twice"],
)
def test_malformed_device_attributes_are_protocol_errors(records: bytes) -> None:
    """The codec carries any bytes; reading them as attributes refuses what the spec forbids."""
    reply = m.DeviceAttributesReply.decode(m.DeviceAttributesReply(records).encode())
    assert isinstance(reply, m.DeviceAttributesReply)
    with pytest.raises(ProtocolError, match="attribute"):
        reply.as_dict()


@pytest.mark.parametrize("attributes", [{-1: 0}, {2**32: 0}, {1: 2**31}, {1: -(2**31) - 1}])
def test_device_attributes_that_do_not_fit_are_refused_when_encoding(
    attributes: dict[int, int],
) -> None:
    with pytest.raises(ValueError, match="DeviceAttributesReply"):
        m.DeviceAttributesReply.from_dict(attributes)


@settings(max_examples=40, deadline=None)
@given(
    device=fixed_values("H"),
    handles=st.tuples(fixed_values("Q"), fixed_values("Q")),
    name=texts,
    done=st.integers(0, 1),
)
def test_the_layouts_of_queries_waits_and_globals(
    device: int, handles: tuple[int, int], name: str, done: int
) -> None:
    """PROTOCOL.md 6.2 and 6.3, field by field."""
    first, second = handles
    raw = name.encode()
    assert m.StreamQuery(device, first).encode() == struct.pack("<HQ", device, first)
    assert m.EventQuery(device, first).encode() == struct.pack("<HQ", device, first)
    assert m.StreamWaitEvent(device, first, second).encode() == struct.pack(
        "<HQQ", device, first, second
    )
    assert (
        m.ModuleGetGlobal(device, first, name).encode()
        == struct.pack("<HQI", device, first, len(raw)) + raw
    )
    assert m.ModuleGetGlobalReply(first, second).encode() == struct.pack("<QQ", first, second)
    assert m.QueryReply(done).encode() == bytes([done])


def test_the_new_cuda_calls_have_their_documented_opcodes_and_rules() -> None:
    """PROTOCOL.md section 6: the values, which have a reply, and which the server may answer
    on its event loop while the lease is idle (they only read the lease's state)."""
    expected = {
        Opcode.DEVICE_ATTRIBUTES: (0x19, m.DeviceAttributesReply, True),
        Opcode.MODULE_GET_GLOBAL: (0x24, m.ModuleGetGlobalReply, False),
        Opcode.STREAM_QUERY: (0x33, m.QueryReply, True),
        Opcode.STREAM_WAIT_EVENT: (0x34, None, False),
        Opcode.EVENT_QUERY: (0x3D, m.QueryReply, True),
    }
    for opcode, (value, reply, query) in expected.items():
        rule = RULES[opcode]
        assert int(opcode) == value
        assert rule.reply is reply and rule.query is query and rule.phase is Phase.DEVICE
        assert not rule.request.HAS_PAYLOAD
    assert RULES[Opcode.MEMSET].no_reply  # memset_d16 is MEMSET with itemsize 2, no new opcode
    assert m.Memset(0, 2, 0xFFFF, 2, 1).encode()[2] == 2
