"""The bitfusion-net wire protocol, with no I/O: frames, messages, codec, errors.

docs/PROTOCOL.md is the normative specification; this package implements it.
"""

from .decoder import Frame, FrameDecoder, PayloadSink
from .encoder import encode_reply, encode_request
from .errors import (
    BitfusionError,
    CapacityError,
    ConnectionLostError,
    ErrorCode,
    InternalError,
    InvalidHandleError,
    InvalidValueError,
    KernelError,
    OutOfMemoryError,
    ProtocolError,
    UnsupportedError,
    error_class,
)
from .frames import DEFAULT_LIMITS, HEADER_SIZE, MAGIC, PROTOCOL_VERSION, Limits
from .messages import (
    ERROR_DEFERRED,
    ERROR_FATAL,
    REPLIES,
    REQUESTS,
    DeviceGrant,
    ErrorReply,
    Message,
    Opcode,
    Reply,
    Request,
)

__all__ = [
    "DEFAULT_LIMITS", "ERROR_DEFERRED", "ERROR_FATAL", "HEADER_SIZE", "MAGIC", "PROTOCOL_VERSION",
    "REPLIES", "REQUESTS", "BitfusionError", "CapacityError", "ConnectionLostError", "DeviceGrant",
    "ErrorCode", "ErrorReply", "Frame", "FrameDecoder", "InternalError", "InvalidHandleError",
    "InvalidValueError", "KernelError", "Limits", "Message", "Opcode", "OutOfMemoryError",
    "PayloadSink", "ProtocolError", "Reply", "Request", "UnsupportedError", "encode_reply",
    "encode_request", "error_class",
]  # fmt: skip
