"""The asyncio driver of a ``ClientConnection``: futures for replies, a ``Stream`` for bytes.

``request()`` writes a frame and awaits its reply; ``post()`` writes a no-reply frame and returns as
soon as it is queued (for a large payload, once the stream has consumed the caller's buffer, so
the caller may reuse it). The reply of a ``MEMCPY_DTOH`` lands straight in the caller's buffer.
The rules (ids, matching, what an ERROR means) are the connection's; this only moves bytes and
wakes waiters.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from ..protocol import (
    BitfusionError,
    CallTimeoutError,
    ClientConnection,
    ConnectionFailed,
    ReplyReceived,
    Request,
    RequestFailed,
)
from ..transport import Stream
from .calls import Call, Plan

log = logging.getLogger(__name__)
T = TypeVar("T")

SNAPSHOT_LIMIT = 64 * 1024  # payloads up to this size are copied so post() returns at once


class AsyncDriver:
    """The ``StreamOwner`` of a client connection on an event loop."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.connection = ClientConnection(server=f"server {stream.peer}")
        self.get_buffer = self.connection.get_buffer
        self._loop = asyncio.get_running_loop()
        self.call_timeout: float | None = None  # seconds a reply may take; None: no bound
        # posts waiting for the stream to take their payload (failed if the connection dies)
        self._consumption_waits: set[asyncio.Future[None]] = set()

    @property
    def failure(self) -> BitfusionError | None:
        return self.connection.failure

    # -- sending --------------------------------------------------------------------------------
    async def request(
        self, message: Request, payload: memoryview | None = None, into: memoryview | None = None
    ) -> Any:
        """Send ``message`` and return its reply; errors raise their typed exception."""
        future: asyncio.Future[Any] = self._loop.create_future()
        _, head = self.connection.send_request(
            message, len(payload) if payload is not None else 0, into=into, token=future
        )
        stream = self.stream
        stream.write(head, payload)
        stream.flush()  # someone waits for this: do not wait for the end of the loop iteration
        if not stream.writable:
            await stream.drain()
        if self.call_timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, self.call_timeout)
        except TimeoutError:
            self._give_up(f"no reply from the server within {self.call_timeout} s")
            raise self.connection.failure from None  # type: ignore[misc]

    def post_nowait(self, message: Request) -> int:
        """Queue a no-reply ``message`` without a payload; never waits. Returns its id."""
        request_id, head = self.connection.send_request(message)
        self.stream.write(head)
        return request_id

    async def post(self, message: Request, payload: memoryview | None = None) -> int:
        """Send a no-reply ``message``; returns its request id once the caller's buffer is free."""
        if payload is None or not len(payload):
            request_id = self.post_nowait(message)
        elif len(payload) <= SNAPSHOT_LIMIT:
            request_id, head = self.connection.send_request(message, len(payload))
            self.stream.write(head, memoryview(bytes(payload)))
        else:
            request_id, head = self.connection.send_request(message, len(payload))
            consumed = self._loop.create_future()

            def on_sent() -> None:
                if not consumed.done():
                    consumed.set_result(None)

            self.stream.write(head, payload, on_sent)
            self._consumption_waits.add(consumed)
            try:
                await consumed
            finally:
                self._consumption_waits.discard(consumed)
        if not self.stream.writable:
            await self.stream.drain()
        if self.connection.failure is not None:
            raise self.connection.failure
        return request_id

    async def run(self, plan: Plan[T]) -> T:
        """Run a plan of ``calls``: each step's calls are sent back to back, then awaited."""
        try:
            step = next(plan)
            while True:
                if isinstance(step, Call):
                    result: Any = await self._call(step)
                else:
                    result = await asyncio.gather(*(self._call(call) for call in step))
                step = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _call(self, call: Call) -> Any:
        if call.message.RULE.reply is None:
            return self.post(call.message, call.payload)
        return self.request(call.message, call.payload, call.into)

    # -- StreamOwner ----------------------------------------------------------------------------
    def buffer_updated(self, nbytes: int) -> None:
        connection = self.connection
        connection.buffer_updated(nbytes)
        while (event := connection.next_event()) is not None:
            kind = type(event)
            if kind is ReplyReceived:
                future = event.token  # type: ignore[union-attr]
                if not future.done():  # its caller may have been cancelled
                    future.set_result(event.message)  # type: ignore[union-attr]
            elif kind is RequestFailed:
                future = event.token  # type: ignore[union-attr]
                if not future.done():
                    future.set_exception(event.error)  # type: ignore[union-attr]
            else:
                assert isinstance(event, ConnectionFailed)
                log.debug("connection failed: %s", event.error)
                self._fail_waiters(event)
                self.stream.abort()
                return

    def connection_lost(self, error: BaseException | None) -> None:
        event = self.connection.connection_lost(error)
        if event is not None:
            self._fail_waiters(event)
        elif self._consumption_waits:
            failure = self.connection.failure
            assert failure is not None
            self._fail_waiters(ConnectionFailed(failure, ()))

    def _fail_waiters(self, event: ConnectionFailed) -> None:
        for future in (*event.orphans, *self._consumption_waits):
            if not future.done():
                future.set_exception(event.error)

    def _give_up(self, reason: str) -> None:
        """A reply is overdue: the session is over (what the server did is unknown)."""
        if self.connection.failure is None:
            self._fail_waiters(self.connection.abandon(CallTimeoutError(reason)))
        self.stream.abort()

    def close(self) -> None:
        """End the session: what is queued is written, then the stream closes."""
        if self.connection.failure is None:
            self._fail_waiters(self.connection.close())
        self.stream.close()
