"""``BlockingStream``: the transport of the blocking API, a plain blocking socket and no loop.

Sends go straight to the kernel (``sendmsg`` of the header and the payload, never joined): the
kernel's socket buffer is the pipeline, and a full buffer blocks the caller, which is the
back-pressure. Receives read straight into the buffer the receiver chooses (``recv_into``), so a
copy back lands in the caller's array. One thread at a time: the owner serialises callers.
"""

from __future__ import annotations

import socket
from typing import Protocol

from .tcp import TcpAddress, tune_socket

_IOV_MAX = 512  # buffers per sendmsg; Linux allows 1024


class Receiver(Protocol):
    """Where received bytes go (a sans-io connection's receive side)."""

    def get_buffer(self) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...


class BlockingStream:
    """One end of a stream over a connected blocking socket.

    Raises ``OSError`` from the socket (``ConnectionError`` when the peer is gone, ``TimeoutError``
    when a timeout set with ``settimeout`` passes); after one, the stream's state is unknown and
    the owner closes it.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        tune_socket(sock)
        self._sock = sock
        try:
            host, port = sock.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except (OSError, ValueError, TypeError):
            self.peer = "?"
        self.closed = False

    @classmethod
    def connect(cls, address: TcpAddress, timeout: float | None) -> BlockingStream:
        """Connect to ``address`` within ``timeout`` seconds (``OSError`` if it cannot)."""
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        return cls(sock)

    def send(self, *buffers: bytes | memoryview) -> None:
        """Write every buffer, in order, without joining them; returns once the kernel has all of
        it (the buffers may be reused), blocking while the socket's buffer is full."""
        if len(buffers) == 1:
            self._sock.sendall(buffers[0])
            return
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            sent = self._sock.sendmsg(pending[:_IOV_MAX])
            while sent:
                if sent >= len(pending[0]):
                    sent -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][sent:]
                    sent = 0

    def receive_into(self, receiver: Receiver) -> int:
        """Read what is there (blocking until something is) into ``receiver``'s buffer; returns
        the byte count, 0 when the peer closed its side."""
        count = self._sock.recv_into(receiver.get_buffer())
        if count:
            receiver.buffer_updated(count)
        return count

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def shutdown_write(self) -> None:
        """Tell the peer we send nothing more (it sees EOF); receiving still works."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: closing is all that is left

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()
