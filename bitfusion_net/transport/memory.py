"""An in-memory ``Stream`` pair on one event loop: the reference transport the others are held to.

Bytes go from one end's queue straight into the buffers the other end's owner chooses, in pieces
of at most ``chunk`` bytes (1 makes every read a 1-byte read), one piece at a time through the
loop, so ordering, partial reads, back-pressure and closing behave as on a socket, with nothing
of TCP in between. Tests and the conformance suite use it; so could an in-process client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .base import QueuedStream, StreamOwner

DEFAULT_CHUNK = 256 * 1024
DEFAULT_QUEUE_LIMIT = 8 * 2**20


class MemoryStream(QueuedStream):
    """One end of an in-memory pair made by ``memory_stream_pair``."""

    def __init__(self, name: str, chunk: int, queue_limit: int) -> None:
        self.peer = name
        self.owner: StreamOwner | None = None
        self.other: MemoryStream | None = None
        self._init_queue(asyncio.get_running_loop(), queue_limit)
        self._chunk = chunk
        self._delivering = False
        self._reading_paused = False  # (``_closing``, from QueuedStream: lose once emptied)

    def start(self, owner: StreamOwner) -> None:
        self.owner = owner

    # -- sending --------------------------------------------------------------------------------
    def write(
        self,
        head: bytes,
        payload: memoryview | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        if self._closed or self._closing:
            return
        self._enqueue(head, payload, on_sent)
        self._schedule()

    def flush(self) -> None:
        self._schedule()  # delivery is one piece per loop step either way

    def _schedule(self) -> None:
        if not self._delivering and not self._closed:
            self._delivering = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """Move one piece into the peer's buffer, then come back for the next."""
        self._delivering = False
        other = self.other
        if self._closed or other is None:
            return
        if not self._queue:
            if self._closing:
                self._lose(None)
            return
        if other._reading_paused or other.owner is None:
            return  # resumed by the peer's resume_reading()
        data, on_sent = self._queue[0]
        target = other.owner.get_buffer()
        count = min(len(target), len(data), self._chunk)
        target[:count] = data[:count]
        if count == len(data):
            self._queue.popleft()
        else:
            self._queue[0] = (data[count:], on_sent)
        self._queued -= count
        if count == len(data) and on_sent is not None:
            on_sent()
        if self._queued <= self._queue_limit:
            self._wake_drain_waiters()
        if count:  # an empty write delivers nothing, as a socket would
            other.owner.buffer_updated(count)
        self._schedule()

    # -- flow control and closing ---------------------------------------------------------------
    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused and not self._closed:
            self._reading_paused = False
            if self.other is not None:
                self.other._schedule()

    def close(self) -> None:
        if not self._closed:
            self._closing = True
            self._schedule()

    def abort(self) -> None:
        if not self._closed:
            self._lose(None, reset=True)

    def _lose(self, error: BaseException | None, reset: bool = False) -> None:
        """Both ends close; the peer sees an orderly close, or a reset after an abort."""
        self._finish(error)
        if self.other is not None and not self.other._closed:
            peer_error = ConnectionResetError("the peer aborted the connection") if reset else None
            self.other._finish(peer_error)

    def _finish(self, error: BaseException | None) -> None:
        self._queue.clear()
        self._mark_closed()
        if self.owner is not None:
            self.owner.connection_lost(error)


def memory_stream_pair(
    chunk: int = DEFAULT_CHUNK, queue_limit: int = DEFAULT_QUEUE_LIMIT
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends (call ``start(owner)`` on each before writing)."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1 byte")
    first = MemoryStream("memory:a", chunk, queue_limit)
    second = MemoryStream("memory:b", chunk, queue_limit)
    first.other, second.other = second, first
    return first, second
