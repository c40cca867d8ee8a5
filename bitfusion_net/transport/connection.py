"""The asyncio glue around the sans-io codec: one ``FrameConnection`` per stream connection.

Receiving: ``asyncio.BufferedProtocol`` hands the kernel the decoder's buffer, so small frames are
parsed many per read and bulk payloads are read straight into the buffer their sink chose.

Sending: frames queue here and are written in one coalesced ``writelines`` per loop iteration.
The transport's own buffer is kept empty-or-paused (high and low water marks of 0): we hand it
more only after it has passed everything to the kernel. That gives three things at once: large
payloads go out in bounded slices without being copied into a transport buffer, back-pressure is
real (``drain()`` waits while our queue is over its limit), and we know when a payload's memory
has been consumed and may be reused (``on_sent``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from ..protocol import Frame, FrameDecoder, ProtocolError

log = logging.getLogger(__name__)

SLICE = 4 * 2**20  # the most of one payload handed to the transport at once
DEFAULT_QUEUE_LIMIT = 8 * 2**20  # queued bytes above which drain() waits
_TCP_ESTABLISHED = 1  # tcpi_state in Linux's struct tcp_info


class FrameHandler(Protocol):
    """The owner of a connection (a server session or a client): decodes and handles its frames."""

    decoder: FrameDecoder

    def frame_received(self, frame: Frame) -> None: ...

    def protocol_error(self, error: ProtocolError) -> None:
        """The peer broke the protocol. The connection stops reading; the owner answers and closes."""

    def connection_lost(self, error: BaseException | None) -> None: ...


class FrameConnection(asyncio.BufferedProtocol):
    def __init__(
        self,
        handler_factory: Callable[[FrameConnection], FrameHandler],
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self._handler_factory = handler_factory
        self.handler: FrameHandler | None = None
        self.decoder: FrameDecoder | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: str = "?"
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[memoryview | bytes, Callable[[], None] | None]] = deque()
        self._queued = 0
        self._queue_limit = queue_limit
        self._flush_scheduled = False
        self._transport_paused = False
        self._awaiting_drain: list[
            Callable[[], None]
        ] = []  # on_sent callbacks waiting for the kernel
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self._decode_error: ProtocolError | None = None
        self._closed = False
        self._closed_waiter: asyncio.Future[None] = self._loop.create_future()
        self._broken = False

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        self.transport.set_write_buffer_limits(high=0, low=0)
        self.handler = self._handler_factory(self)
        self.decoder = self.handler.decoder

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.decoder is not None
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._broken:
            return
        decoder = self.decoder
        assert decoder is not None
        try:
            decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            # Frames decoded before the bad one are still delivered; nothing more is read.
            self._decode_error = exc
            if self.transport is not None:
                self.transport.pause_reading()
        self._deliver_frames()

    def _deliver_frames(self) -> None:
        """Hand decoded frames to the handler, unless it paused us (then on resume_reading)."""
        decoder, handler = self.decoder, self.handler
        assert decoder is not None and handler is not None
        while not (self._reading_paused or self._broken or self._closed):
            frame = decoder.next_frame()
            if frame is None:
                if self._decode_error is not None:
                    error, self._decode_error = self._decode_error, None
                    self.stop_receiving()
                    handler.protocol_error(error)
                return
            handler.frame_received(frame)

    def eof_received(self) -> bool:
        return False  # close our side too: a half-open connection has no use here

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        in_frame = self.decoder is not None and self.decoder.in_frame
        if exc is None and in_frame and not self._broken:
            exc = ConnectionResetError("peer closed the connection in the middle of a frame")
        self._queue.clear()
        self._queued = 0
        self._wake_drain_waiters()
        if not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._transport_paused = True

    def resume_writing(self) -> None:
        self._transport_paused = False
        self._payloads_consumed()
        self._flush()

    # -- sending --------------------------------------------------------------------------------
    def send(
        self,
        head: bytes,
        payload: memoryview | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Queue a frame. ``on_sent`` runs once the kernel has taken all of it (payload reusable)."""
        if self._closed:
            return
        if payload is not None and len(payload):
            self._queue.append((head, None))
            self._queue.append((payload, on_sent))
            self._queued += len(head) + len(payload)
        else:
            self._queue.append((head, on_sent))
            self._queued += len(head)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    @property
    def writable(self) -> bool:
        """False while our send queue is over its limit: ``await drain()`` before queueing more."""
        return self._queued <= self._queue_limit

    async def drain(self) -> None:
        """Wait until the send queue is under its limit (or the connection is gone)."""
        while self._queued > self._queue_limit and not self._closed:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or self._closed:
            return
        while self._queue and not self._transport_paused:
            batch: list[memoryview | bytes] = []
            size = 0
            while self._queue and size < SLICE:
                data, on_sent = self._queue[0]
                take = min(len(data), SLICE - size)
                if take == len(data):
                    self._queue.popleft()
                    batch.append(data)
                    if on_sent is not None:
                        self._awaiting_drain.append(on_sent)
                else:  # hand over a slice; the rest of this payload stays at the queue's head
                    view = memoryview(data)
                    batch.append(view[:take])
                    self._queue[0] = (view[take:], on_sent)
                size += take
            self._queued -= size
            transport.writelines(batch)  # pause_writing() runs in here if the kernel is full
        if not self._transport_paused:
            self._payloads_consumed()
        if self._queued <= self._queue_limit:
            self._wake_drain_waiters()

    def _payloads_consumed(self) -> None:
        callbacks, self._awaiting_drain = self._awaiting_drain, []
        for callback in callbacks:
            callback()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- flow control and closing ---------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused or self._closed or self._broken:
            return
        self._reading_paused = False
        if self.transport is not None and self._decode_error is None:
            self.transport.resume_reading()
        # Frames decoded before the pause are waiting in the decoder.
        self._loop.call_soon(self._deliver_frames)

    def stop_receiving(self) -> None:
        """Deliver no more frames and read nothing more (the owner is closing the connection)."""
        self._broken = True
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_alive(self) -> bool:
        """Whether the peer is still connected. A connection that is not reading notices a reset
        or a close only when it reads again; an owner holding one paused for long asks here."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or self._closed:
            return not self._closed
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            if hasattr(socket, "TCP_INFO"):  # Linux: anything but ESTABLISHED means it is gone
                return (
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED
                )
        except OSError:
            return False
        return True

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_waiter)

    def close_after_flush(self) -> None:
        """Close once everything queued has been written."""
        if self._closed or self.transport is None:
            return
        if self._queue or self._transport_paused:
            self._awaiting_drain.append(self.close_after_flush)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()
