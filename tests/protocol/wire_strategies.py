"""Hypothesis strategies and helpers shared by the protocol tests (valid values for every field).

A message strategy is derived from the class's own ``FIXED``/``VARIABLE`` declarations, so a new
message class is covered as soon as it is registered in ``REQUESTS`` or ``REPLIES``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from bitfusion_net.protocol import (
    REPLIES,
    REQUESTS,
    DeviceGrant,
    Frame,
    FrameDecoder,
    Limits,
    Message,
    encode_reply,
    encode_request,
)
from bitfusion_net.protocol import messages as m

U32 = 2**32 - 1
U64 = 2**64 - 1

# Small limits keep the tests fast; frames built by ``frame_specs`` always fit in them.
SMALL_LIMITS = Limits(max_metadata=2048, max_payload=4096)
MIN_BUFFER = 24 + SMALL_LIMITS.max_metadata  # the smallest buffer a decoder accepts

_UNSIGNED_BITS = {"B": 8, "H": 16, "I": 32, "Q": 64}

request_ids = st.one_of(st.sampled_from([0, 1, U32]), st.integers(0, U32))
texts = st.text(max_size=24)  # at most 96 bytes of UTF-8; text() never yields lone surrogates


def fixed_values(code: str, *, allow_nan: bool = False) -> st.SearchStrategy[Any]:
    """Every value a fixed field of ``struct`` code ``code`` can carry (``3I``: a 3-tuple)."""
    if code[:-1]:
        return st.tuples(*[fixed_values(code[-1])] * int(code[:-1]))
    if code == "d":
        return st.floats(allow_nan=allow_nan)
    bits = _UNSIGNED_BITS[code]
    return st.one_of(st.sampled_from([0, 2**bits - 1]), st.integers(0, 2**bits - 1))


def variable_values(kind: str) -> st.SearchStrategy[Any]:
    return texts if kind == "str" else st.binary(max_size=96)


device_grants = st.builds(
    DeviceGrant,
    index=fixed_values("H"),
    server_gpu=fixed_values("H"),
    total_memory=fixed_values("Q"),
    memory_limit=fixed_values("Q"),
    fraction=fixed_values("d"),
    weight=fixed_values("d"),
    mode=fixed_values("B"),
    name=texts,
    executor=texts,
)


# A reservation's secret is 32 bytes; the codec carries any length (the server refuses others).
reservation_secrets = st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=96))
server_ids = st.one_of(st.uuids().map(str), texts)  # a server instance's id is a UUID
_short_texts = st.text(max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _short_texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_short_texts, inner, max_size=3),
    max_leaves=12,
)
# SERVER_INFO's text is a JSON object (PROTOCOL.md 5.6), but to the codec it is any text: both.
server_infos = st.one_of(
    st.dictionaries(_short_texts, json_values, max_size=4).map(
        lambda obj: json.dumps(obj, ensure_ascii=False)
    ),
    texts,
)
# AUTHENTICATE's token is opaque to the protocol (PROTOCOL.md 5.7): tokens as the reference
# server issues them (bfnet_<16 hex>_<43 urlsafe base64>), and any text, which it refuses.
tokens = st.one_of(
    st.builds(
        lambda token_id, secret: "bfnet_{}_{}".format(
            token_id.hex(), base64.urlsafe_b64encode(secret).decode().rstrip("=")
        ),
        st.binary(min_size=8, max_size=8),
        st.binary(min_size=32, max_size=32),
    ),
    texts,
)
# The user a token names; empty from a server that does not use tokens.
users = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._@-]{1,64}", fullmatch=True), texts)
# Variable fields that mean something more than "any text" or "any bytes", by name: a HELLO or
# RESERVE reply carries real DeviceGrant records.
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "grants": st.lists(device_grants, max_size=4).map(m.encode_grants),
    "secret": reservation_secrets,
    "server_id": server_ids,
    "info": server_infos,
    "token": tokens,
    "user": users,
    # DEVICE_ATTRIBUTES' (u32 attribute, i32 value) records; to the codec any bytes (the client
    # refuses what is not whole records, PROTOCOL.md 6.1).
    "attributes": st.one_of(
        st.dictionaries(st.integers(0, U32), st.integers(-(2**31), 2**31 - 1), max_size=12).map(
            lambda attributes: m.DeviceAttributesReply.from_dict(attributes).attributes
        ),
        st.binary(max_size=17),
    ),
    # RESERVE's u16 GPU numbers; to the codec any bytes (an odd length is the server's to refuse).
    "only_gpus": st.one_of(
        st.lists(fixed_values("H"), max_size=8).map(m.Reserve.gpu_list), st.binary(max_size=17)
    ),
}


def messages(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Valid instances of ``cls``; fields named in ``_FIELD_VALUES`` get their own values."""
    kwargs = {name: fixed_values(code) for name, code in cls.FIXED}
    kwargs.update(
        {name: _FIELD_VALUES.get(name, variable_values(kind)) for name, kind in cls.VARIABLE}
    )
    return st.builds(cls, **kwargs)


def all_message_classes() -> set[type[Message]]:
    """Every concrete message class defined in ``messages``."""
    return {
        value
        for value in vars(m).values()
        if isinstance(value, type)
        and issubclass(value, Message)
        and value not in (Message, m.Request, m.Reply)
    }


@dataclass(frozen=True)
class FrameSpec:
    """One frame as a test means it: decoded, it must give back exactly these parts."""

    is_reply: bool
    opcode: int
    request_id: int
    message: Message
    payload: bytes = b""
    encoded: bytes = field(default=b"", repr=False)

    def check(self, frame: Frame) -> None:
        assert frame.opcode == self.opcode
        assert frame.request_id == self.request_id
        assert frame.is_reply == self.is_reply
        assert type(frame.message) is type(self.message)
        assert frame.message == self.message
        if self.payload:
            assert frame.payload is not None and bytes(frame.payload) == self.payload
        else:
            assert frame.payload is None  # a zero-length payload is no payload


def make_spec(
    is_reply: bool, opcode: int, request_id: int, message: Message, payload: bytes
) -> FrameSpec:
    if is_reply:
        head = encode_reply(opcode, request_id, message, len(payload))
    else:
        assert isinstance(message, m.Request)
        head = encode_request(message, request_id, len(payload))
    return FrameSpec(is_reply, opcode, request_id, message, payload, head + payload)


REQUEST_CLASSES = sorted(REQUESTS.values(), key=lambda cls: cls.OPCODE)
REPLY_ENTRIES = sorted(REPLIES.items())  # (opcode, reply class)


def payloads(cls: type[Message], max_size: int = 64) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=max_size) if cls.HAS_PAYLOAD else st.just(b"")


def request_spec(cls: type[m.Request], max_payload: int = 64) -> st.SearchStrategy[FrameSpec]:
    return st.builds(
        make_spec,
        st.just(False),
        st.just(int(cls.OPCODE)),
        request_ids,
        messages(cls),
        payloads(cls, max_payload),
    )


def reply_spec(
    opcode: int, cls: type[m.Reply], max_payload: int = 64
) -> st.SearchStrategy[FrameSpec]:
    return st.builds(
        make_spec,
        st.just(True),
        st.just(opcode),
        request_ids,
        messages(cls),
        payloads(cls, max_payload),
    )


def frame_specs(is_reply: bool, max_payload: int = 64) -> st.SearchStrategy[FrameSpec]:
    """A valid frame of any opcode for a client (``is_reply``) or a server decoder."""
    if is_reply:
        return st.sampled_from(REPLY_ENTRIES).flatmap(lambda e: reply_spec(*e, max_payload))
    return st.sampled_from(REQUEST_CLASSES).flatmap(lambda c: request_spec(c, max_payload))


class RecordingSink:
    """A payload sink that records every call; hands out fresh buffers, or None to discard."""

    def __init__(self, discard: bool = False) -> None:
        self.discard = discard
        self.calls: list[tuple[int, int, Message, int]] = []
        self.buffers: list[bytearray] = []

    def __call__(
        self, opcode: int, request_id: int, message: Message, length: int
    ) -> memoryview | None:
        self.calls.append((opcode, request_id, message, length))
        if self.discard:
            return None
        buffer = bytearray(length)
        self.buffers.append(buffer)
        return memoryview(buffer)

    @property
    def sizes(self) -> list[int]:
        return [call[3] for call in self.calls]


def decoder_for(
    is_reply: bool,
    sink: Any = None,
    limits: Limits = SMALL_LIMITS,
    buffer_size: int | None = None,
) -> FrameDecoder:
    return FrameDecoder(
        receives_replies=is_reply,
        limits=limits,
        payload_sink=sink,
        buffer_size=buffer_size if buffer_size is not None else 256 * 1024,
    )


def drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes, cycling through them (every size >= 1)."""
    out, offset, index = [], 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        out.append(data[offset : offset + size])
        offset += size
        index += 1
    return out
