"""The server: accepts connections, places leases on GPUs, dispatches work to executors."""

from .server import Server

__all__ = ["Server"]
