"""The frame header, flags and size limits (docs/PROTOCOL.md, "Frames").

A frame is a 24-byte little-endian header, then ``metadata_length`` bytes of per-opcode metadata,
then ``payload_length`` bytes of bulk payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"BFNT"
PROTOCOL_VERSION = 3

# magic, version, opcode, flags, request id, metadata length, payload length
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_SIZE = HEADER.size  # 24

FLAG_REPLY = 0x0001  # the frame answers the request with the same request id
KNOWN_FLAGS = FLAG_REPLY

MAX_REQUEST_ID = 2**32 - 1


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver checks before it allocates anything for a frame."""

    max_metadata: int = 64 * 1024
    max_payload: int = 64 * 2**20

    def __post_init__(self) -> None:
        if not 0 < self.max_metadata <= 2**32 - 1:
            raise ValueError("max_metadata must be in 1..2**32-1")
        if self.max_payload <= 0:
            raise ValueError("max_payload must be positive")


DEFAULT_LIMITS = Limits()


def pack_header(
    opcode: int, flags: int, request_id: int, metadata_length: int, payload_length: int
) -> bytes:
    """The header; ValueError for a field out of its wire range (a negative length, say)."""
    try:
        return HEADER.pack(
            MAGIC, PROTOCOL_VERSION, opcode, flags, request_id, metadata_length, payload_length
        )
    except struct.error as exc:  # not a ValueError: callers catch one kind of encoding error
        raise ValueError(f"frame header: {exc}") from None
