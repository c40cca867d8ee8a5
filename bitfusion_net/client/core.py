"""The client side of one connection: request ids, pending replies, payload landing, failure.

``request()`` sends a frame and awaits its reply; ``post()`` sends a no-reply frame and returns as
soon as it is queued (and, for a large payload, once the caller's buffer has been consumed, so the
caller may reuse it). The reply of a ``MEMCPY_DTOH`` lands straight in the caller's buffer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..protocol import (
    ERROR_DEFERRED,
    BitfusionError,
    ConnectionLostError,
    ErrorReply,
    Frame,
    FrameDecoder,
    Limits,
    Message,
    ProtocolError,
    Request,
    encode_request,
    error_class,
)
from ..protocol.frames import MAX_REQUEST_ID
from ..transport import FrameConnection

log = logging.getLogger(__name__)

SNAPSHOT_LIMIT = 64 * 1024  # payloads up to this size are copied so post() returns at once


class ClientCore:
    """``FrameHandler`` of a client connection."""

    def __init__(self, connection: FrameConnection, limits: Limits) -> None:
        self.connection = connection
        self.decoder = FrameDecoder(
            receives_replies=True, limits=limits, payload_sink=self._payload_destination
        )
        self._loop = asyncio.get_running_loop()
        self._next_id = 1
        # request id -> (future of the reply, the request's opcode, buffer its payload lands in)
        self._pending: dict[int, tuple[asyncio.Future[Any], int, memoryview | None]] = {}
        self._failure: BitfusionError | None = None
        # posts waiting for the kernel to take their payload (failed if the connection dies)
        self._consumption_waits: set[asyncio.Future[None]] = set()

    # -- sending --------------------------------------------------------------------------------
    def _new_id(self) -> int:
        request_id = self._next_id
        self._next_id = 1 if request_id == MAX_REQUEST_ID else request_id + 1
        return request_id

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def request(
        self, message: Request, payload: memoryview | None = None, into: memoryview | None = None
    ) -> Any:
        """Send ``message`` and return its reply message; errors raise their typed exception.

        ``into``: the buffer a reply payload lands in (must be exactly the reply's size).
        """
        self._check_open()
        request_id = self._new_id()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[request_id] = (future, message.OPCODE, into)
        self.connection.send(
            encode_request(message, request_id, len(payload) if payload is not None else 0), payload
        )
        if not self.connection.writable:
            await self.connection.drain()
        return await future

    def post_nowait(self, message: Request) -> None:
        """Queue a no-reply ``message`` that has no payload (on the loop thread; never waits).
        If the connection has failed, the next call that waits raises why."""
        if self._failure is None:
            self.connection.send(encode_request(message, self._new_id()))

    async def post(self, message: Request, payload: memoryview | None = None) -> int:
        """Send a no-reply ``message``; returns its request id once the caller's buffer is free."""
        self._check_open()
        request_id = self._new_id()
        if payload is None:
            self.connection.send(encode_request(message, request_id))
        elif len(payload) <= SNAPSHOT_LIMIT:
            self.connection.send(
                encode_request(message, request_id, len(payload)), memoryview(bytes(payload))
            )
        else:
            consumed = self._loop.create_future()

            def on_sent() -> None:
                if not consumed.done():
                    consumed.set_result(None)

            self.connection.send(
                encode_request(message, request_id, len(payload)), payload, on_sent
            )
            self._consumption_waits.add(consumed)
            try:
                await consumed
            finally:
                self._consumption_waits.discard(consumed)
        if not self.connection.writable:
            await self.connection.drain()
        self._check_open()
        return request_id

    # -- FrameHandler ---------------------------------------------------------------------------
    def _payload_destination(
        self, opcode: int, request_id: int, message: Message, length: int
    ) -> memoryview | None:
        entry = self._pending.get(request_id)
        if entry is None or entry[1] != opcode or entry[2] is None:
            raise ProtocolError(f"unexpected payload for request #{request_id}")
        into = entry[2]
        if len(into) != length:
            raise ProtocolError(
                f"reply to request #{request_id} carries {length} bytes, expected {len(into)}"
            )
        return into

    def frame_received(self, frame: Frame) -> None:
        message = frame.message
        entry = self._pending.pop(frame.request_id, None)
        if isinstance(message, ErrorReply):
            error = self._error_from(message)
            if entry is None:  # a connection-level error, or one for a no-reply request
                self._fail(error)
                self.connection.abort()
                return
            future = entry[0]
        elif entry is None:
            self.protocol_error(ProtocolError(f"reply to unknown request #{frame.request_id}"))
            return
        elif entry[1] != frame.opcode:
            self._pending[frame.request_id] = entry  # so that the failure reaches its caller
            self.protocol_error(
                ProtocolError(f"reply to request #{frame.request_id} has the wrong opcode")
            )
            return
        else:
            future, error = entry[0], None
        if future.done():  # the caller was cancelled; the reply has nowhere to go
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(message)

    @staticmethod
    def _error_from(reply: ErrorReply) -> BitfusionError:
        cls = error_class(reply.code)
        if reply.flags & ERROR_DEFERRED:
            return cls(
                reply.message,
                deferred_from=reply.deferred_from,
                later_failures=reply.later_failures,
            )
        return cls(reply.message)

    def protocol_error(self, error: ProtocolError) -> None:
        log.error("server broke the protocol: %s", error)
        self._fail(ProtocolError(f"the server broke the protocol: {error}"))
        self.connection.abort()

    def connection_lost(self, error: BaseException | None) -> None:
        reason = f": {error}" if error else ""
        self._fail(ConnectionLostError(f"connection to the server closed{reason}"))

    def _fail(self, error: BitfusionError) -> None:
        if self._failure is None:
            self._failure = error
        pending, self._pending = self._pending, {}
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(self._failure)
        for future in self._consumption_waits:
            if not future.done():
                future.set_exception(self._failure)

    @property
    def failure(self) -> BitfusionError | None:
        return self._failure

    def close(self) -> None:
        if self._failure is None:
            self._fail(ConnectionLostError("the session was closed"))
        self.connection.close_after_flush()
