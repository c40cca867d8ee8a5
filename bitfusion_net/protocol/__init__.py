"""The bitfusion-net wire protocol, with no I/O: frames, messages, codec, errors, connections.

docs/PROTOCOL.md is the normative specification; this package implements it.
"""

from .connection import (
    CLIENT_LIMITS,
    ClientConnection,
    ClientState,
    ConnectionFailed,
    ProtocolViolation,
    ReplyReceived,
    RequestFailed,
    RequestReceived,
    ServerConnection,
    ServerState,
)
from .decoder import Frame, FrameDecoder, PayloadSink
from .encoder import encode_reply, encode_request
from .errors import (
    AuthenticationError,
    BitfusionError,
    CallTimeoutError,
    CapacityError,
    ConnectionLostError,
    ErrorCode,
    InternalError,
    InvalidHandleError,
    InvalidValueError,
    KernelError,
    LeaseEndedError,
    OutOfMemoryError,
    ProtocolError,
    QuotaExceededError,
    UnsupportedError,
    error_class,
)
from .frames import DEFAULT_LIMITS, HEADER_SIZE, MAGIC, PROTOCOL_VERSION, Limits
from .messages import (
    ERROR_DEFERRED,
    ERROR_FATAL,
    DeviceGrant,
    ErrorReply,
    Message,
    Opcode,
    Reply,
    Request,
)
from .rules import REPLIES, REQUESTS, RULES, OpcodeRule, Phase

__all__ = [
    "CLIENT_LIMITS", "DEFAULT_LIMITS", "ERROR_DEFERRED", "ERROR_FATAL", "HEADER_SIZE", "MAGIC",
    "PROTOCOL_VERSION", "REPLIES", "REQUESTS", "RULES", "AuthenticationError", "BitfusionError", "CallTimeoutError", "CapacityError",
    "ClientConnection", "ClientState", "ConnectionFailed", "ConnectionLostError", "DeviceGrant",
    "ErrorCode", "ErrorReply", "Frame", "FrameDecoder", "InternalError", "InvalidHandleError",
    "InvalidValueError", "KernelError", "LeaseEndedError", "Limits", "Message", "OpcodeRule", "Opcode",
    "OutOfMemoryError", "PayloadSink", "Phase", "ProtocolError", "ProtocolViolation", "QuotaExceededError", "Reply",
    "ReplyReceived", "Request", "RequestFailed", "RequestReceived", "ServerConnection",
    "ServerState", "UnsupportedError", "encode_reply", "encode_request", "error_class",
]  # fmt: skip
