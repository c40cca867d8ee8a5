"""The blocking driver of a ``ClientConnection``: a plain socket, no loop thread, no Task per call.

No-reply calls go straight to the socket (the kernel's buffer is the pipeline; a full buffer
blocks the caller: that is the back-pressure). A call that wants a reply writes its frame, then
reads frames until its reply arrives, so sticky errors from earlier calls surface exactly there;
a copy back lands in the caller's array (``recv_into``).

Thread safety: one lock per session. Calls from several threads are serialised whole (a
synchronising call holds the lock from its write to its reply), so each thread sees its own
replies and CUDA's ordering holds per call, as on a CUDA context shared by threads.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from ..protocol import (
    BitfusionError,
    CallTimeoutError,
    ClientConnection,
    ClientState,
    ConnectionFailed,
    ConnectionLostError,
    ReplyReceived,
    Request,
    RequestFailed,
)
from ..transport import BlockingStream
from .calls import Call, Plan

T = TypeVar("T")

# After a failed write, how long to read on for the ERROR the server may have sent before closing.
LAST_WORDS_S = 1.0


class BlockingDriver:
    """Drives one ``ClientConnection`` over one ``BlockingStream``; see the module docstring."""

    def __init__(self, stream: BlockingStream) -> None:
        self.stream = stream
        self.connection = ClientConnection(server=f"server {stream.peer}")
        self._lock = threading.Lock()
        self._answers: dict[int, Any] = {}  # request id -> reply message or error
        self._call_timeout: float | None = None

    def set_call_timeout(self, seconds: float | None) -> None:
        """How long a call may block on the socket (a reply to wait for, a full send buffer)
        before the session gives up with ``CallTimeoutError``; None: no bound."""
        self._call_timeout = seconds
        self.stream.settimeout(seconds)

    @property
    def failure(self) -> BitfusionError | None:
        return self.connection.failure

    # -- the calls ------------------------------------------------------------------------------
    def request(
        self, message: Request, payload: memoryview | None = None, into: memoryview | None = None
    ) -> Any:
        """Send ``message`` and return its reply; errors raise their typed exception."""
        with self._lock:
            return self._wait(self._send(message, payload, into))

    def post(self, message: Request, payload: memoryview | None = None) -> int:
        """Send a no-reply ``message``; returns its request id once the kernel has it all."""
        with self._lock:
            return self._send(message, payload, None)

    def run(self, plan: Plan[T]) -> T:
        """Run a plan: each step's calls are written back to back, then their replies read."""
        with self._lock:
            try:
                step = next(plan)
                while True:
                    if isinstance(step, Call):
                        result: Any = self._one(step)
                    else:
                        result = self._pipelined(step)
                    step = plan.send(result)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    def _pipelined(self, calls: tuple[Call, ...]) -> list[Any]:
        ids = [self._send(call.message, call.payload, call.into) for call in calls]
        results: list[Any] = []
        first_error: BitfusionError | None = None
        for request_id, call in zip(ids, calls, strict=True):
            if call.message.RULE.reply is None:
                results.append(request_id)
                continue
            try:  # every reply is read, even after one failed, so none is left behind
                results.append(self._wait(request_id))
            except BitfusionError as exc:
                first_error = first_error or exc
                results.append(None)
        if first_error is not None:
            raise first_error
        return results

    def _one(self, call: Call) -> Any:
        request_id = self._send(call.message, call.payload, call.into)
        return request_id if call.message.RULE.reply is None else self._wait(request_id)

    # -- moving frames --------------------------------------------------------------------------
    def _send(self, message: Request, payload: memoryview | None, into: memoryview | None) -> int:
        size = len(payload) if payload is not None else 0
        request_id, head = self.connection.send_request(message, size, into=into, token=None)
        try:
            if size:
                self.stream.send(head, payload)  # type: ignore[arg-type]
            else:
                self.stream.send(head)
        except TimeoutError:
            self._give_up(f"the server took nothing for {self._call_timeout} s")
            failure = self.connection.failure
            assert failure is not None
            raise failure from None
        except OSError as exc:
            self._hear_last_words(exc)
            failure = self.connection.failure
            assert failure is not None
            raise failure from None
        return request_id

    def _wait(self, request_id: int) -> Any:
        answers, connection = self._answers, self.connection
        while request_id not in answers:
            event = connection.next_event()
            if event is None:
                if connection.state is ClientState.CLOSED:
                    break
                self._receive()
            else:
                self._apply(event)
        answer = answers.pop(request_id, None)
        if answer is None:  # the connection ended without naming this request
            failure = connection.failure
            raise failure if failure is not None else ConnectionLostError("connection closed")
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _apply(self, event: Any) -> None:
        kind = type(event)
        if kind is ReplyReceived:
            self._answers[event.request_id] = event.message
        elif kind is RequestFailed:
            self._answers[event.request_id] = event.error
        else:
            assert isinstance(event, ConnectionFailed)
            self.stream.close()

    def _receive(self) -> None:
        try:
            count = self.stream.receive_into(self.connection)
        except TimeoutError:
            self._give_up(f"no reply from the server within {self._call_timeout} s")
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not count:
            self._lost(None)

    def _give_up(self, reason: str) -> None:
        """A reply is overdue: the session is over (what the server did is unknown)."""
        if self.connection.failure is None:
            self._apply(self.connection.abandon(CallTimeoutError(reason)))
        self.stream.close()

    def _lost(self, error: BaseException | None) -> None:
        event = self.connection.connection_lost(error)
        self.stream.close()
        if event is not None:
            self._apply(event)

    def _hear_last_words(self, error: OSError) -> None:
        """A write failed: the server may have closed after telling us why (a fatal ERROR).
        Read what it sent, briefly, so the caller gets that reason, not just a broken pipe."""
        if not self.stream.closed:
            try:
                self.stream.settimeout(LAST_WORDS_S)
                while self.connection.state is not ClientState.CLOSED:
                    if not self.stream.receive_into(self.connection):
                        break
                    while (event := self.connection.next_event()) is not None:
                        self._apply(event)
            except OSError:
                pass  # nothing more to hear
        if self.connection.state is not ClientState.CLOSED:
            self._lost(error)
        self.stream.close()

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """End the session: the server sees EOF after everything written, releases the leases
        and closes its side, which is waited for up to ``timeout`` seconds."""
        with self._lock:
            if self.stream.closed:
                return
            if self.connection.failure is None:
                self.connection.close()
            self.stream.shutdown_write()
            try:
                self.stream.settimeout(timeout)
                while self.stream.receive_into(_Discard()):
                    pass
            except OSError:
                pass  # reset or timed out: the server frees the leases when it notices
            finally:
                self.stream.close()


class _Discard:
    """A receiver that drops what it is given (the server's last bytes after we closed)."""

    _buffer = memoryview(bytearray(64 * 1024))

    def get_buffer(self) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        pass
