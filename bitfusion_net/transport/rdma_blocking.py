"""``RdmaBlockingStream``: the blocking API's transport over RDMA, no event loop and no thread.

The blocking driver of the RDMA ring (``rdma_ring``; the event loop's is ``rdma.RdmaStream``),
with ``BlockingStream``'s contract: ``send`` returns once every byte is in a registered staging
slot written to the peer (so the caller may reuse its buffers), blocking while the peer's ring
has no credit for more; ``receive_into`` copies straight from the ring into the receiver's
buffer. Waiting is on completions, in the caller's thread:

- poll the receive CQ a few times first (``SPIN_POLLS``): a reply that is already on its way
  costs no system call and no interrupt;
- then arm the CQ, poll once more (a completion between the poll and the arming would otherwise
  not signal), and ``select`` on the completion channel's fd and on the TCP connection the
  set-up went over, whose end is a dead peer's surest sign; take and acknowledge the event.

``settimeout`` bounds each wait, as on a socket (``TimeoutError``). A peer that is gone is a
``ConnectionResetError``; an orderly end (its CLOSE, or the end of the set-up connection after
ours) reads as 0 bytes.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .blocking import BlockingStream, Receiver
from .rdma_ring import (
    ABORT,
    CLOSE,
    CREDIT,
    LINGER_S,
    MAX_HELLO,
    READY,
    SETUP_TIMEOUT_S,
    DeviceSettings,
    Piece,
    Ring,
    RingConfig,
    RingEnd,
    RingFailed,
    connect_to,
    default_provider,
    hello,
    read_hello,
)
from .verbs.api import Provider, VerbsError

if TYPE_CHECKING:
    from .tcp import TcpAddress

SPIN_POLLS = 64  # polls of the receive CQ before arming it and sleeping in select


class RdmaBlockingStream(BlockingStream):
    """A client's ``BlockingStream`` over one RC queue pair (see the module docstring); its
    socket is the set-up's TCP connection, kept open as the peer's sign of life."""

    def __init__(self, control: socket.socket, ring: Ring, name: str) -> None:
        super().__init__(control)
        self.peer = name
        self._ring = ring
        self._timeout: float | None = None
        self._closing = False  # our CLOSE is sent: nothing more goes out
        self._control_ended = False

    @classmethod
    def open(
        cls,
        address: TcpAddress,
        timeout: float | None,
        provider: Provider | None = None,
        config: RingConfig | None = None,
    ) -> RdmaBlockingStream:
        """Set up a connection to ``rdma://HOST:PORT`` within ``timeout`` seconds (at most
        ``SETUP_TIMEOUT_S``). Raises ``ConnectionError`` (``RdmaUnavailable`` saying what is
        missing, a refusal, a server that left during the set-up), ``OSError``, or
        ``TimeoutError``."""
        provider = provider or default_provider()
        config = config or RingConfig()
        limit = SETUP_TIMEOUT_S if timeout is None else min(timeout, SETUP_TIMEOUT_S)
        control = socket.create_connection((address.host, address.port), timeout=limit)
        end: RingEnd | None = None
        try:
            end = RingEnd(provider, DeviceSettings.from_environment(), config)
            control.sendall(hello(end, config, secrets.randbelow(1 << 24)))
            ring = connect_to(end, config, read_hello(_read_line(control), config))
            control.sendall(READY)
        except BaseException as exc:
            if end is not None:
                end.close()
            control.close()
            if isinstance(exc, VerbsError):
                raise ConnectionError(f"the RDMA set-up failed: {exc}") from None
            raise
        return cls(control, ring, address.host_port)

    # -- BlockingStream ---------------------------------------------------------------------------
    def send(self, *buffers: bytes | memoryview) -> None:
        if self._closing or self.closed:
            raise BrokenPipeError("the RDMA stream is closed for sending")
        ring = self._ring
        pending: deque[Piece] = deque((memoryview(b).cast("B"), None) for b in buffers if len(b))
        while pending:
            self._wait_for(lambda: ring.can_send_data or ring.peer_closed)
            if ring.peer_closed:  # as a socket's EPIPE: the driver reads what it said first
                raise BrokenPipeError("the server closed the RDMA connection")
            self._checked(ring.send_from, pending)

    def receive_into(self, receiver: Receiver) -> int:
        ring = self._ring
        while True:
            self._wait_for(lambda: ring.readable or ring.ended or self._control_ended)
            if ring.readable:
                count = ring.read_into(receiver.get_buffer())
                if count:
                    receiver.buffer_updated(count)
                    if ring.credit_due and not self._closing:
                        self._checked(ring.send_control, CREDIT)
                    return count
                continue  # only empty slots were waiting
            return 0  # the peer closed (its CLOSE, or its end after ours): EOF

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def shutdown_write(self) -> None:
        """CLOSE: everything sent was already written. The server delivers it, then ends,
        which reads here as EOF (the end of the set-up connection)."""
        if self._closing or self.closed:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            self._wait_for(lambda: self._ring.can_close)
            self._checked(self._ring.send_control, CLOSE)

    def close(self) -> None:
        """As a socket's close: an orderly end (CLOSE), or a reset (ABORT) when received bytes
        are left unread. The end is torn down once what it posted has completed."""
        if self.closed:
            return
        ring = self._ring
        if not self._closing:
            self._closing = True
            with contextlib.suppress(RingFailed):
                ring.take_receives()
                ring.send_control(ABORT if ring.readable else CLOSE)
        deadline = time.monotonic() + LINGER_S
        while ring.sending and time.monotonic() < deadline:
            time.sleep(0.0005)
        super().close()  # the set-up connection: the peer's sign that this end is gone
        ring.end.close()

    # -- waiting ----------------------------------------------------------------------------------
    def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Take completions until ``ready()``; raises ``ConnectionResetError`` when the peer is
        gone, ``TimeoutError`` when the timeout passes first."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        polls = 0
        while True:
            self._take()
            if ready():
                return
            if polls < SPIN_POLLS:
                polls += 1
                continue
            self._sleep(deadline)

    def _take(self) -> None:
        ring = self._ring
        if self.closed:
            raise ConnectionResetError("the RDMA stream is closed")
        self._checked(ring.take_receives)
        if ring.aborted:
            raise ConnectionResetError("the peer aborted the connection")

    def _sleep(self, deadline: float | None) -> None:
        """Arm the CQ and sleep until a completion or the set-up connection's end."""
        end = self._ring.end
        end.recv_cq.req_notify()
        if self._checked(self._ring.take_receives):
            return  # it came between the last poll and the arming
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        channel, control = end.channel.fd, self._sock.fileno()
        watched = [channel] if self._control_ended else [channel, control]
        readable, _, _ = select.select(watched, [], [], wait)
        if not readable:
            raise TimeoutError(f"no RDMA completion within {self._timeout} s")
        if channel in readable:
            try:
                end.channel.get_event().ack_events(1)
            except (BlockingIOError, VerbsError):
                pass  # a spurious wake-up, or this end closed: the next poll says
        if control in readable:
            self._control_readable()

    def _control_readable(self) -> None:
        """The server sends nothing on the set-up connection after it: this is its end."""
        try:
            data = self._sock.recv(4096)
        except OSError:
            data = b""
        if data:
            return
        self._control_ended = True
        self._take()  # a CLOSE or an ABORT that came before says what the end means
        if not self._ring.peer_closed and not self._closing:
            raise ConnectionResetError("the RDMA peer is gone (its set-up connection ended)")

    def _checked(self, step: Callable[..., object], *args: object) -> bool:
        """Run a ring step; a failure becomes the peer's ``ConnectionResetError``, or nothing
        when it closed first (its tear-down fails what follows)."""
        try:
            return bool(step(*args))
        except RingFailed as failure:
            error = self._ring.explain(failure)
            if error is not None:
                raise error from None
            return False


def _read_line(sock: socket.socket) -> bytes:
    """The server's hello line (it sends nothing more until our ``ready``)."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) <= MAX_HELLO:
        chunk = sock.recv(MAX_HELLO + 1 - len(line))
        if not chunk:
            break
        line += chunk
    return bytes(line)
