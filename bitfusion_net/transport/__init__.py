"""Transports move frames between peers; they know nothing of CUDA."""

from .connection import FrameConnection, FrameHandler
from .loop import loop_factory, new_event_loop
from .tcp import TcpAddress, connect, listen, parse_address

__all__ = [
    "FrameConnection", "FrameHandler", "TcpAddress", "connect", "listen", "loop_factory",
    "new_event_loop", "parse_address",
]  # fmt: skip
