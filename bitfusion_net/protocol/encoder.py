"""Frame encoding: the header and metadata as one small ``bytes``; payloads travel separately."""

from __future__ import annotations

from .frames import FLAG_REPLY, pack_header
from .messages import Message, Request


def encode_request(message: Request, request_id: int, payload_length: int = 0) -> bytes:
    """Header and metadata of a request; ``payload_length`` bytes of payload must follow."""
    meta = message.encode()
    return pack_header(message.OPCODE, 0, request_id, len(meta), payload_length) + meta


def encode_reply(opcode: int, request_id: int, message: Message, payload_length: int = 0) -> bytes:
    """Header and metadata of the reply to request ``request_id`` with opcode ``opcode``."""
    meta = message.encode()
    return pack_header(opcode, FLAG_REPLY, request_id, len(meta), payload_length) + meta
