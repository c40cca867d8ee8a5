"""The transport interface: a reliable, ordered byte stream between two peers, nothing of CUDA.

A transport moves bytes; the sans-io connections in ``protocol`` give them meaning. There are two
flavours, because the blocking API must never hop threads:

- ``Stream``, driven by an event loop. Received bytes are written straight into buffers the
  *owner* chooses (``StreamOwner.get_buffer``, as ``asyncio.BufferedProtocol``), so a payload
  lands where it belongs without a copy. Sends queue and are written coalesced.
- ``BlockingStream`` (``transport.blocking``): plain calls on a blocking socket, for one thread.

Every implementation passes one conformance suite (``tests/transport``): ordering, 1-byte reads,
payloads from 0 B to 256 MiB, back-pressure, a peer closing mid-frame, send-completion timing and
many connections at once.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Protocol


class StreamOwner(Protocol):
    """What a ``Stream`` hands its received bytes and its end to (a client or server driver)."""

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        ...

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``. The owner may call
        ``pause_reading`` or ``close`` on its stream from here."""
        ...

    def connection_lost(self, error: BaseException | None) -> None:
        """The stream is closed: by the peer (``error`` None for an orderly close), by a reset,
        or by this side. Called exactly once; nothing is received after it."""
        ...


class Stream(ABC):
    """One end of an event-loop byte stream. All methods run on the loop's thread.

    ``peer`` names the other end for logs (``HOST:PORT``). ``encrypted``: the stream is TLS (its
    handshake done before the owner was made). ``peer_certificate_name``: the commonName of the
    peer's certificate that the handshake verified (a client's stream: the server's; a server's:
    the client's, under mutual TLS); else None.
    """

    peer: str = "?"
    encrypted: bool = False
    peer_certificate_name: str | None = None

    @abstractmethod
    def write(
        self,
        head: bytes,
        payload: memoryview | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``head`` then ``payload`` (neither is copied). ``on_sent`` runs once the stream
        has handed all of it to the kernel (or to the peer), so ``payload`` may be reused; it
        never runs for a write that was dropped because the stream closed. Queued bytes go out
        in one coalesced write at the end of this loop iteration, or at ``flush()``. Never
        blocks and never raises: a write after ``close()`` or ``abort()`` is dropped."""

    @abstractmethod
    def flush(self) -> None:
        """Write what is queued now (a request or reply someone waits for), not a loop iteration
        later. What the kernel cannot take stays queued and goes out when it can."""

    @property
    @abstractmethod
    def writable(self) -> bool:
        """False while the send queue is over its limit: ``await drain()`` before queueing more."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until the send queue is under its limit, or the stream is closed."""

    @abstractmethod
    def pause_reading(self) -> None:
        """Receive nothing more until ``resume_reading()``: the peer's writes then block on the
        transport's flow control (back-pressure). Idempotent."""

    @abstractmethod
    def resume_reading(self) -> None:
        """Undo ``pause_reading()``. Idempotent; does nothing once closed."""

    @abstractmethod
    def close(self) -> None:
        """Close after everything queued has been written. ``connection_lost`` follows."""

    @abstractmethod
    def abort(self) -> None:
        """Close now, dropping what is queued; the peer sees a reset."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once ``connection_lost`` has been called."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the stream is closed (returns at once if it is)."""

    def peer_alive(self) -> bool:
        """Whether the peer is still there, asked without reading (a stream paused for long does
        not see a close or a reset until it reads). Transports that cannot tell say True."""
        return not self.closed


class QueuedStream(Stream):
    """What every event-loop stream keeps the same way: the count of queued bytes against its
    limit, the tasks waiting in ``drain()``, and being closed."""

    def _init_queue(self, loop: asyncio.AbstractEventLoop, queue_limit: int) -> None:
        self._loop = loop
        # What is still to be written: pieces, each with what to call once it is handed over.
        self._queue: deque[tuple[memoryview | bytes, Callable[[], None] | None]] = deque()
        self._queued = 0
        self._queue_limit = queue_limit
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._closed_waiter: asyncio.Future[None] = loop.create_future()
        self._closing = False  # close() or abort() was called: later writes are dropped
        self._flush_scheduled = False

    def write(
        self,
        head: bytes,
        payload: memoryview | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """``Stream.write``: queue it, and ``flush()`` once at the end of this loop iteration,
        so that the writes of one iteration go out together."""
        if self._closed or self._closing:
            return
        self._enqueue(head, payload, on_sent)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def _enqueue(
        self, head: bytes, payload: memoryview | None, on_sent: Callable[[], None] | None
    ) -> None:
        """Queue a write (see ``write``); the subclass then schedules sending it."""
        if payload is not None and len(payload):
            self._queue.append((head, None))
            self._queue.append((memoryview(payload).cast("B"), on_sent))
            self._queued += len(head) + len(payload)
        else:
            self._queue.append((head, on_sent))
            self._queued += len(head)

    @property
    def writable(self) -> bool:
        return self._queued <= self._queue_limit

    async def drain(self) -> None:
        while self._queued > self._queue_limit and not self._closed:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drain_waiters(self) -> None:
        if self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _mark_closed(self) -> None:
        """Closed for good: nothing is queued any more and every waiter wakes."""
        self._closed = True
        self._queued = 0
        self._wake_drain_waiters()
        if not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_waiter)
