"""Transports move bytes between peers; they know nothing of CUDA (see ``base`` for the interface)."""

from .base import Stream, StreamOwner
from .blocking import BlockingStream
from .loop import loop_factory, new_event_loop
from .memory import MemoryStream, memory_stream_pair
from .tcp import DEFAULT_BACKLOG, TcpAddress, TcpStream, connect, listen, parse_address
from .tls import ClientTls, ServerTls, TlsError
from .tls_stream import TlsStream

__all__ = [
    "DEFAULT_BACKLOG", "BlockingStream", "ClientTls", "MemoryStream", "ServerTls", "Stream",
    "StreamOwner", "TcpAddress", "TcpStream", "TlsError", "TlsStream", "connect", "listen",
    "loop_factory", "memory_stream_pair", "new_event_loop", "parse_address",
]  # fmt: skip
