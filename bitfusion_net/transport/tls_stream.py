"""``TlsStream``: ``TcpStream`` with TLS in between, an ``ssl.SSLObject`` on two memory BIOs.

Why not asyncio's own TLS transport (``create_connection(ssl=...)``)? Its habits break what a
``Stream`` promises, or what TLS should tell a peer:

- its ``close()`` waits for the peer's close_notify (up to 30 s), so a peer that does not read
  (one paused by back-pressure, a blocking client) holds the connection open, and the paused
  peer cannot see the close either; here, as on TCP, close sends close_notify, then the FIN;
- its write-buffer limits pause at ``size >= high``, so the empty-or-paused rule (high=0) that
  gives ``on_sent`` its meaning would pause an idle stream for good;
- a failed handshake is closed without its alert, so a client whose certificate the server
  refused (which under TLS 1.3 happens after the client's side of the handshake is done) only
  sees the connection end; here the alert goes out, and the client reads why;
- a TLS server must look at a connection's first bytes before TLS takes them, to answer a
  plaintext client in plaintext (``tls`` explains), which a TLS transport cannot give back.

Receiving: ciphertext lands in this stream's buffer (``BufferedProtocol``), goes to the incoming
BIO, and is decrypted straight into the owner's buffer, so a payload still lands where its sink
chose. Sending: ``TcpStream``'s queue and coalescing, with the sink encrypting each piece (in
``RECORD_BATCH`` steps) and handing the ciphertext to the transport; the transport's own
empty-or-paused flow control is unchanged, so ``on_sent`` still means the payload may be reused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from enum import Enum

from .tcp import OwnerFactory, TcpStream
from .tls import TLS_HANDSHAKE_RECORD, client_failure, peer_certificate_name

log = logging.getLogger(__name__)

RECEIVE_BUFFER = 256 * 1024  # ciphertext read from the socket at once
RECORD_BATCH = 256 * 1024  # plaintext encrypted per step (larger steps were measured slower)
JOIN_BELOW = 16 * 1024  # small pieces of one flush are joined into one record (a record: 16 KiB)


class Phase(Enum):
    SNIFFING = "sniffing"  # a server's connection, before its first byte: TLS or plaintext?
    HANDSHAKE = "handshake"
    OPEN = "open"  # the handshake is done; the owner exists
    PLAINTEXT = "plaintext"  # a plaintext client on a TLS server, handed to its owner as is
    FAILED = "failed"  # no handshake (or no owner for a plaintext client): closing, no owner


class _Encrypting:
    """The sink of an open ``TlsStream``: encrypts what ``flush`` hands it, writes the result."""

    def __init__(self, stream: TlsStream) -> None:
        self._stream = stream
        self._tls = stream._tls
        self._outgoing = stream._outgoing

    def write(self, data: bytes | memoryview, /) -> None:
        self._encrypt(data)

    def writelines(self, pieces: list[bytes | memoryview], /) -> None:
        if len(pieces) > 1 and sum(map(len, pieces)) <= JOIN_BELOW:
            self._encrypt(b"".join(pieces))
            return
        for piece in pieces:
            self._encrypt(piece)

    def _encrypt(self, data: bytes | memoryview) -> None:
        stream, tls, outgoing = self._stream, self._tls, self._outgoing
        transport = stream.transport
        assert tls is not None and transport is not None
        if transport.is_closing():
            return  # the session failed during this flush: what is left is dropped
        try:
            if len(data) <= RECORD_BATCH:  # most frames: one step
                tls.write(data)
                transport.write(outgoing.read())
                return
            view = memoryview(data).cast("B")
            while view:  # an SSLObject on a memory BIO takes all it is given at once
                step = view[:RECORD_BATCH]
                tls.write(step)
                view = view[len(step) :]
                transport.write(outgoing.read())
        except ssl.SSLError as exc:  # the session is broken (an alert arrived meanwhile)
            stream._fail(exc)


class TlsStream(TcpStream):
    """A ``TcpStream`` whose bytes travel in TLS; see the module docstring. Made by
    ``tcp.listen`` (``server``) and ``tcp.connect`` (``client``), never directly.

    ``encrypted`` and ``peer_certificate_name`` are set before the owner is made. A client's
    stream fails ``handshake`` with a ``TlsError`` saying why (or ``TimeoutError``) when the
    handshake does not succeed, and reports a TLS alert that ends it later as what it means
    (``tls.client_failure``). A server's stream logs why a handshake failed, and closes.
    """

    def __init__(
        self,
        owner_factory: OwnerFactory,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        handshake_timeout: float,
        server_hostname: str | None = None,
        server: str = "",
        plaintext_owner_factory: OwnerFactory | None = None,
    ) -> None:
        super().__init__(owner_factory)
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname  # a client's: the name to verify
        self._server = server  # a client's: HOST:PORT of the server, for messages
        self._plaintext_owner_factory = plaintext_owner_factory
        self._handshake_timeout = handshake_timeout
        self._phase = Phase.SNIFFING if server_side else Phase.HANDSHAKE
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._received = memoryview(bytearray(RECEIVE_BUFFER))  # ciphertext lands here
        self._unread_plaintext = memoryview(b"")  # a plaintext client's bytes not yet delivered
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False  # the peer's close (TCP EOF or close_notify) has arrived
        self._decrypt_scheduled = False
        self._failure: BaseException | None = None  # what connection_lost reports
        # A client's connect() waits for this; a server's is never awaited, so never failed.
        self.handshake: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    def server(
        cls,
        owner_factory: OwnerFactory,
        context: ssl.SSLContext,
        plaintext_owner_factory: OwnerFactory | None,
        handshake_timeout: float,
    ) -> TlsStream:
        return cls(
            owner_factory,
            context,
            server_side=True,
            handshake_timeout=handshake_timeout,
            plaintext_owner_factory=plaintext_owner_factory,
        )

    @classmethod
    def client(
        cls,
        owner_factory: OwnerFactory,
        context: ssl.SSLContext,
        server_hostname: str,
        server: str,
        handshake_timeout: float,
    ) -> TlsStream:
        """``server_hostname``: what the server's certificate must name; ``server``: its
        ``HOST:PORT``, for messages."""
        return cls(
            owner_factory,
            context,
            server_side=False,
            handshake_timeout=handshake_timeout,
            server_hostname=server_hostname,
            server=server,
        )

    # -- asyncio.BufferedProtocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)
        if not self._server_side:
            self._start_tls()
            self._step_handshake()  # the ClientHello

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._phase is Phase.PLAINTEXT:
            assert self.owner is not None
            return self.owner.get_buffer()
        return self._received

    def buffer_updated(self, nbytes: int) -> None:
        phase = self._phase
        if phase is Phase.OPEN:
            self._incoming.write(self._received[:nbytes])
            self._decrypt()
        elif phase is Phase.PLAINTEXT:
            assert self.owner is not None
            self.owner.buffer_updated(nbytes)
        elif phase is Phase.SNIFFING and self._received[0] != TLS_HANDSHAKE_RECORD:
            self._become_plaintext(self._received[:nbytes])
        elif phase is not Phase.FAILED:
            if phase is Phase.SNIFFING:
                self._start_tls()
            self._incoming.write(self._received[:nbytes])
            self._step_handshake()
            if self._phase is Phase.OPEN:  # application data may come with the last flight
                self._decrypt()

    def eof_received(self) -> bool:
        if self._phase is Phase.OPEN:
            self._eof = True
            self._decrypt()  # deliver what is left; then close, as TCP does (below)
            return True  # the transport stays until then
        if self._phase in (Phase.SNIFFING, Phase.HANDSHAKE):
            self._handshake_failed(ConnectionResetError("the peer closed during the handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if exc is None and self._failure is not None:
            exc = self._failure  # type: ignore[assignment]
        if self._phase in (Phase.SNIFFING, Phase.HANDSHAKE):
            self._handshake_failed(exc or ConnectionResetError("the connection closed"))
        elif not self._server_side and isinstance(exc, ssl.SSLError):
            exc = client_failure(exc, self._server, handshake=False)
        super().connection_lost(exc)

    # -- the handshake --------------------------------------------------------------------------
    def _start_tls(self) -> None:
        self._tls = self._context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=self._server_side,
            server_hostname=self._server_hostname,
        )
        self._phase = Phase.HANDSHAKE

    def _step_handshake(self) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_handshake()
            return
        except ssl.SSLError as exc:
            self._send_handshake()  # the alert that tells the peer why
            self._handshake_failed(exc)
            return
        self._send_handshake()  # the last flight
        self._cancel_timer()
        self._phase = Phase.OPEN
        self.encrypted = True
        self.peer_certificate_name = peer_certificate_name(tls.getpeercert())  # type: ignore[arg-type]
        self._sink = _Encrypting(self)
        self.owner = self._owner_factory(self)
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _send_handshake(self) -> None:
        data = self._outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _handshake_failed(self, error: BaseException) -> None:
        """Log (a server) or report (a client) why, and close (after the alert, if any)."""
        if self._phase not in (Phase.SNIFFING, Phase.HANDSHAKE):
            return
        self._phase = Phase.FAILED
        self._cancel_timer()
        if self._server_side:
            if self._tls is not None:  # a bare connect and close is a probe, not worth a line
                log.info("TLS connection from %s refused: %s", self.peer, _reason(error))
        elif not self.handshake.done():
            failure: BaseException = error
            if not isinstance(error, TimeoutError):
                failure = client_failure(error, self._server, handshake=True)
            self.handshake.set_exception(failure)
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        error = TimeoutError(f"no TLS handshake within {self._handshake_timeout:g} s")
        self._handshake_failed(error)
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- a plaintext client on a TLS server -----------------------------------------------------
    def _become_plaintext(self, first: memoryview) -> None:
        """Hand the connection over unencrypted, its first bytes as if unread."""
        self._cancel_timer()
        factory = self._plaintext_owner_factory
        if factory is None:
            log.info("connection from %s closed: it does not speak TLS", self.peer)
            self._phase = Phase.FAILED
            self._closing = True
            assert self.transport is not None
            self.transport.close()
            return
        self._phase = Phase.PLAINTEXT
        self._sink = self.transport
        self.owner = factory(self)
        self._unread_plaintext = memoryview(bytes(first))  # the receive buffer is reused
        self._deliver_plaintext()

    def _deliver_plaintext(self) -> None:
        while self._unread_plaintext and not self._reading_paused and not self._closing:
            owner = self.owner
            if owner is None:
                return
            target = owner.get_buffer()
            count = min(len(target), len(self._unread_plaintext))
            target[:count] = self._unread_plaintext[:count]
            self._unread_plaintext = self._unread_plaintext[count:]
            owner.buffer_updated(count)

    # -- receiving ------------------------------------------------------------------------------
    def _decrypt(self) -> None:
        """Decrypt into the owner's buffers until nothing is left, the owner pauses reading, or
        the stream closes; after the peer's close, close too."""
        tls, incoming = self._tls, self._incoming
        assert tls is not None
        while True:
            owner = self.owner
            if self._reading_paused or self._closing or owner is None:
                return  # the rest waits in the BIO (or goes with the stream)
            target = owner.get_buffer()
            try:
                count: int = tls.read(len(target), target)  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                break  # all that arrived is delivered
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                self._eof = True
                break
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if not count:  # how an SSLObject reports the peer's close_notify
                self._eof = True
                break
            owner.buffer_updated(count)
            if not incoming.pending and not tls.pending():
                break  # all delivered, without the exception one more read would cost
        if self._eof:
            self._close_after_peer()

    def _close_after_peer(self) -> None:
        """The peer closed (close_notify or EOF) and everything before it was delivered: close
        our side too, as ``TcpStream`` does at EOF (a half-open connection has no use here)."""
        if self._closing or self._closed:
            return
        self._queue.clear()  # as a TCP transport closed at EOF drops what was still queued
        self._closing = True
        self._close_transport()

    def resume_reading(self) -> None:
        was_paused = self._reading_paused
        super().resume_reading()
        if was_paused and not self._reading_paused and not self._decrypt_scheduled:
            self._decrypt_scheduled = True  # not from inside the owner's call: next step
            self._loop.call_soon(self._resume_delivery)

    def _resume_delivery(self) -> None:
        self._decrypt_scheduled = False
        if self._closed:
            return
        if self._phase is Phase.OPEN:
            self._decrypt()
        elif self._phase is Phase.PLAINTEXT:
            self._deliver_plaintext()

    # -- closing --------------------------------------------------------------------------------
    def _close_transport(self) -> None:
        """close_notify, then the transport's own close (it writes what it holds, then the FIN);
        the peer's close_notify is not waited for (RFC 8446, 6.1 allows it)."""
        tls = self._tls
        if self._phase is Phase.OPEN and tls is not None:
            try:
                tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: ours is written, the peer's not yet read; or broken
            self._send_handshake()
        super()._close_transport()

    def _fail(self, error: BaseException) -> None:
        """The TLS session is broken (an alert, a bad record): end it with ``error``."""
        if self._closed:
            return
        self._failure = error
        self._closing = True
        if self.transport is not None:
            self.transport.abort()


def _reason(error: BaseException) -> str:
    """OpenSSL's reason (PEER_DID_NOT_RETURN_A_CERTIFICATE, ...) or what else it was."""
    if isinstance(error, TimeoutError):
        return str(error)
    if isinstance(error, ConnectionError | ssl.SSLEOFError):
        return "the client ended the handshake (does it trust this server's certificate?)"
    return str(getattr(error, "reason", None) or error or type(error).__name__)
