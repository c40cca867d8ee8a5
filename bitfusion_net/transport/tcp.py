"""TCP: addresses, listening and connecting, and ``TcpStream``, the event-loop stream over TCP
(``tls_stream.TlsStream`` is the same with TLS in between).

Receiving: ``asyncio.BufferedProtocol`` hands the kernel the owner's buffer, so small frames are
parsed many per read and bulk payloads are read straight into the buffer their sink chose.

Sending: writes queue here and go out in one coalesced ``writelines`` per loop iteration (or at
``flush()``). The transport's own buffer is kept empty-or-paused (high and low water marks of 0;
uvloop's default low mark is 16 bytes): we hand it more only after it has passed everything to
the kernel. That gives three things at once: large payloads go out in bounded slices without
being copied into a transport buffer, back-pressure is real (``drain()`` waits while our queue is
over its limit), and we know when a payload's memory has been consumed (``on_sent``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

from .base import QueuedStream, Stream, StreamOwner
from .tls import ClientTls, ServerTls, client_settings

SLICE = 4 * 2**20  # the most of one payload handed to the transport at once
DEFAULT_QUEUE_LIMIT = 8 * 2**20  # queued bytes above which drain() waits
DEFAULT_BACKLOG = 1024  # pending connections the kernel holds for a server (bursts of clients)
_TCP_ESTABLISHED = 1  # tcpi_state in Linux's struct tcp_info
DEFAULT_HANDSHAKE_TIMEOUT = 30.0  # seconds a TLS connection may take to finish its handshake


@dataclass(frozen=True)
class TcpAddress:
    """Where a server listens: ``tcp://HOST:PORT``, ``tls://HOST:PORT`` for TLS on TCP, or
    ``rdma://HOST:PORT`` for RDMA set up over a TCP connection to that port (``transport.rdma``)."""

    host: str
    port: int
    tls: bool = False
    rdma: bool = False

    def __str__(self) -> str:
        scheme = "rdma" if self.rdma else "tls" if self.tls else "tcp"
        return f"{scheme}://{self.host_port}"

    @property
    def host_port(self) -> str:
        """``HOST:PORT`` (IPv6 hosts in brackets), as logs and messages name a server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(url: str) -> TcpAddress:
    """Parse ``tcp://HOST:PORT``, ``tls://HOST:PORT`` or ``rdma://HOST:PORT`` (IPv6 hosts in
    brackets). Raises ValueError with the reason."""
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "tls", "rdma"):
        raise ValueError(
            f"unsupported address {url!r}: expected tcp://HOST:PORT (or tls://HOST:PORT, "
            "rdma://HOST:PORT)"
        )
    if not parts.hostname:
        raise ValueError(f"address {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"address {url!r} has an invalid port") from None
    if port is None:
        raise ValueError(f"address {url!r} has no port (use :0 to pick a free one)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"address {url!r} has unexpected parts after the port")
    return TcpAddress(parts.hostname, port, tls=parts.scheme == "tls", rdma=parts.scheme == "rdma")


# TCP keepalive: a peer that vanished without a word (a host powered off, a cable pulled) is
# found out after about KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S = 60 s of silence.
KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_COUNT = 3


def tune_socket(sock: socket.socket) -> None:
    """Most frames are small and someone waits for them: no Nagle delay. And keepalive, so that
    a silent connection to a dead peer ends instead of holding its leases forever."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):  # Linux names; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


OwnerFactory = Callable[[Stream], StreamOwner]


class Sink(Protocol):
    """Where ``flush`` hands what is queued: the transport, or what encrypts for it (TLS)."""

    def write(self, data: bytes | memoryview, /) -> None: ...

    def writelines(self, data: list[bytes | memoryview], /) -> None: ...


class TcpStream(asyncio.BufferedProtocol, QueuedStream):
    """``Stream`` over an asyncio (or uvloop) TCP transport; see ``Stream`` for each method."""

    def __init__(self, owner_factory: OwnerFactory, *, queue_limit: int = DEFAULT_QUEUE_LIMIT):
        self._owner_factory = owner_factory
        self.owner: StreamOwner | None = None
        self.transport: asyncio.Transport | None = None
        self._sink: Sink | None = None  # what flush() writes to, once connected
        self._init_queue(asyncio.get_running_loop(), queue_limit)
        self._transport_paused = False
        self._awaiting_drain: list[Callable[[], None]] = []  # on_sent waiting for the kernel
        self._reading_paused = False

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)
        self._sink = self.transport
        self.owner = self._owner_factory(self)

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        self.transport.set_write_buffer_limits(high=0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.owner is not None
        return self.owner.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        assert self.owner is not None
        self.owner.buffer_updated(nbytes)

    def eof_received(self) -> bool:
        return False  # close our side too: a half-open connection has no use here

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.clear()
        self._awaiting_drain.clear()
        self._mark_closed()
        owner, self.owner = self.owner, None  # no cycle left for the garbage collector to find
        if owner is not None:
            owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._transport_paused = True

    def resume_writing(self) -> None:
        self._transport_paused = False
        self._payloads_consumed()
        self.flush()

    # -- sending --------------------------------------------------------------------------------
    def flush(self) -> None:
        transport, sink = self.transport, self._sink
        if sink is None or transport is None or self._closed or transport.is_closing():
            return  # a closing transport drops writes: leave them queued, never "sent"
        queue = self._queue
        while queue and not self._transport_paused:
            if len(queue) == 1 and len(queue[0][0]) <= SLICE:  # the common case: one small frame
                data, on_sent = queue.popleft()
                self._queued -= len(data)
                if on_sent is not None:
                    self._awaiting_drain.append(on_sent)
                sink.write(data)
                break
            batch: list[memoryview | bytes] = []
            size = 0
            while queue and size < SLICE:
                data, on_sent = queue[0]
                take = min(len(data), SLICE - size)
                if take == len(data):
                    queue.popleft()
                    batch.append(data)
                    if on_sent is not None:
                        self._awaiting_drain.append(on_sent)
                else:  # hand over a slice; the rest of this payload stays at the queue's head
                    view = memoryview(data)
                    batch.append(view[:take])
                    queue[0] = (view[take:], on_sent)
                size += take
            self._queued -= size
            sink.writelines(batch)  # pause_writing() runs in here if the kernel is full
        if not self._transport_paused:
            self._payloads_consumed()
        if self._queued <= self._queue_limit:
            self._wake_drain_waiters()

    def _payloads_consumed(self) -> None:
        if self._awaiting_drain:
            callbacks, self._awaiting_drain = self._awaiting_drain, []
            for callback in callbacks:
                callback()

    # -- flow control and closing ---------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self._closed and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def peer_alive(self) -> bool:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or self._closed:
            return not self._closed
        try:
            if hasattr(socket, "TCP_INFO"):  # Linux: anything but ESTABLISHED means it is gone
                return (
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED
                )
            # Elsewhere SO_ERROR, which clears the error: connection_lost then reports None.
            return not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return False

    def close(self) -> None:
        if self._closed or self.transport is None:
            return
        self._closing = True
        if self._queue or self._transport_paused:
            # Closed from a callback of the next loop step, not from inside resume_writing():
            # asyncio's own selector transport loses the connection twice if closed there.
            self._awaiting_drain.append(self._close_soon)
            self._schedule_flush()
            return
        self._close_transport()

    def _close_transport(self) -> None:
        """Everything queued is written: close (the transport writes what it holds first)."""
        assert self.transport is not None
        self.transport.close()

    def _close_soon(self) -> None:
        self._loop.call_soon(self.close)

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self._closing = True
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # linger 0: the kernel sends a reset, not an orderly FIN
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass  # already gone
            self.transport.abort()


async def listen(
    address: TcpAddress,
    owner_factory: OwnerFactory,
    *,
    backlog: int = DEFAULT_BACKLOG,
    tls: ServerTls | None = None,
    plaintext_owner_factory: OwnerFactory | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> asyncio.Server:
    """Accept connections on ``address``; each becomes a ``TcpStream`` with its owner.

    With ``tls`` every connection is a ``TlsStream``: it reaches ``owner_factory`` once its
    handshake is done, which must be within ``handshake_timeout`` seconds. A client that speaks
    plaintext instead reaches ``plaintext_owner_factory`` unencrypted, its first bytes unread,
    so that the owner can tell it (in its own protocol) that TLS is required, and close; without
    one it is closed at once. Raises ``OSError`` when the address cannot be bound, ``ValueError``
    when the TLS files cannot be used.
    """
    if address.rdma:
        if tls is not None:
            raise ValueError("rdma:// does not carry TLS: serve tls:// beside it instead")
        from .rdma import listen_rdma

        return await listen_rdma(address, owner_factory, backlog=backlog)
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.BaseProtocol]
    if tls is None:
        factory = functools.partial(TcpStream, owner_factory)
    else:
        from .tls_stream import TlsStream  # it builds on TcpStream, defined here

        context = tls.context()
        factory = functools.partial(
            TlsStream.server, owner_factory, context, plaintext_owner_factory, handshake_timeout
        )
    return await loop.create_server(
        factory, address.host, address.port, reuse_address=True, backlog=backlog
    )


async def connect(
    address: TcpAddress,
    owner_factory: OwnerFactory,
    *,
    tls: ClientTls | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> TcpStream:
    """Connect to ``address``, with TLS when the address says ``tls://`` or ``tls`` is given
    (``tls.client_settings``), and then once the handshake is done. Raises ``OSError`` when it
    cannot connect: ``tls.TlsError`` (a ``ConnectionError``) saying why when TLS fails,
    ``TimeoutError`` when the handshake takes over ``handshake_timeout`` s; ``ValueError`` when
    the TLS files cannot be used."""
    if address.rdma:
        if tls is not None:
            raise ValueError("rdma:// does not carry TLS: connect to the server's tls://")
        from .rdma import connect_rdma

        return await connect_rdma(address, owner_factory)  # type: ignore[return-value]
    loop = asyncio.get_running_loop()
    settings = client_settings(address.tls, tls)
    if settings is None:
        _transport, stream = await loop.create_connection(
            lambda: TcpStream(owner_factory), address.host, address.port
        )
        return stream
    from .tls_stream import TlsStream  # it builds on TcpStream, defined here

    context = settings.context()  # before connecting: bad files cost no connection
    _transport, tls_stream = await loop.create_connection(
        lambda: TlsStream.client(
            owner_factory,
            context,
            settings.hostname(address.host),
            address.host_port,
            handshake_timeout,
        ),
        address.host,
        address.port,
    )
    try:
        await tls_stream.handshake
    except BaseException:
        tls_stream.abort()
        raise
    return tls_stream
