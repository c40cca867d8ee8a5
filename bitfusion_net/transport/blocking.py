"""``BlockingStream``: the transport of the blocking API, a plain blocking socket and no loop.

Sends go straight to the kernel (``sendmsg`` of the header and the payload, never joined): the
kernel's socket buffer is the pipeline, and a full buffer blocks the caller, which is the
back-pressure. Receives read straight into the buffer the receiver chooses (``recv_into``), so a
copy back lands in the caller's array. One thread at a time: the owner serialises callers.

Over TLS (``TlsBlockingStream``) the same holds, with encryption in between: a small frame goes
out as one TLS record, and records are decrypted straight into the receiver's buffer.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from typing import Protocol

from .tcp import TcpAddress, tune_socket
from .tls import ClientTls, client_failure, client_settings, peer_certificate_name

_IOV_MAX = 512  # buffers per sendmsg; Linux allows 1024
# Over TLS, buffers up to this size in all are joined and sent as one record (a TLS record holds
# 16 KiB): one write and one record's overhead for a header and its metadata, not one each.
_TLS_JOIN = 16 * 1024
RECEIVE_BUFFER = 256 * 1024  # over TLS: ciphertext read from the socket at once
RECORD_BATCH = 256 * 1024  # over TLS: plaintext of a large payload encrypted per step


class Receiver(Protocol):
    """Where received bytes go (a sans-io connection's receive side)."""

    def get_buffer(self) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...


class BlockingStream:
    """One end of a stream over a connected blocking socket (``TlsBlockingStream`` over TLS).

    Raises ``OSError`` from the socket (``ConnectionError`` when the peer is gone, ``TimeoutError``
    when a timeout set with ``settimeout`` passes); after one, the stream's state is unknown and
    the owner closes it.

    ``encrypted``: the stream is TLS; ``peer_certificate_name`` is then the commonName of the
    server's verified certificate (else None).
    """

    encrypted = False
    peer_certificate_name: str | None = None

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
    def connect(
        cls, address: TcpAddress, timeout: float | None, tls: ClientTls | None = None
    ) -> BlockingStream:
        """Connect to ``address`` within ``timeout`` seconds (the TLS handshake included): with
        TLS when the address says ``tls://`` or ``tls`` is given (``tls.client_settings``);
        over RDMA for ``rdma://`` (``rdma_blocking``).
        Raises ``OSError`` if it cannot connect (``tls.TlsError``, a ``ConnectionError``, saying
        why when the TLS handshake fails), ``ValueError`` when the TLS files cannot be used."""
        if address.rdma:
            if tls is not None:
                raise ValueError("rdma:// does not carry TLS: connect to the server's tls://")
            from .rdma_blocking import RdmaBlockingStream

            return RdmaBlockingStream.open(address, timeout)
        settings = client_settings(address.tls, tls)
        context = settings.context() if settings is not None else None  # before connecting
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        if settings is None or context is None:
            return BlockingStream(sock)
        try:  # the handshake, bounded by the socket's timeout
            return TlsBlockingStream.handshake(
                sock, context, settings.hostname(address.host), address.host_port
            )
        except (ssl.SSLError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            sock.close()
            raise client_failure(exc, address.host_port, handshake=True) from exc
        except BaseException:
            sock.close()
            raise

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


class TlsBlockingStream(BlockingStream):
    """A client's ``BlockingStream`` over TLS: an ``ssl.SSLObject`` on memory BIOs over the
    plain blocking socket, as ``TlsStream`` does on the event loop.

    Not an ``ssl.SSLSocket``: that reads each TLS record with two system calls (its header, then
    its body) where this reads up to ``RECEIVE_BUFFER`` of ciphertext in one; it has no
    ``sendmsg``; its ``shutdown`` drops the TLS session; and it reports a reset as the same EOF
    error as an orderly end. Here a header and its metadata go out as one TLS record, a large
    payload in ``RECORD_BATCH`` steps, and received records are decrypted straight into the
    receiver's buffer. A TLS alert from ``server`` raises ``tls.TlsError`` saying what it means
    (``tls.client_failure``); an end without close_notify reads as EOF, as on TCP (frames carry
    their lengths, so a truncation still shows).
    """

    encrypted = True

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server: str,
    ) -> None:
        super().__init__(sock)
        self._tls, self._incoming, self._outgoing = tls, incoming, outgoing
        self._server = server
        self._received = memoryview(bytearray(RECEIVE_BUFFER))  # ciphertext lands here
        self.peer_certificate_name = peer_certificate_name(tls.getpeercert())  # type: ignore[arg-type]

    @classmethod
    def handshake(
        cls, sock: socket.socket, context: ssl.SSLContext, server_hostname: str, server: str
    ) -> TlsBlockingStream:
        """Run the client's handshake on connected ``sock`` (bounded by its timeout). Raises
        ``OSError``: ``ssl.SSLError`` from OpenSSL (its alert, if any, sent first),
        ``ConnectionResetError`` when the server closes during it, ``TimeoutError``."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        received = bytearray(RECEIVE_BUFFER)
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                with contextlib.suppress(OSError):  # tell the server why, if it still listens
                    sock.sendall(outgoing.read())
                raise
            else:
                sock.sendall(outgoing.read())  # the client's Finished
                return cls(sock, tls, incoming, outgoing, server)
            if outgoing.pending:
                sock.sendall(outgoing.read())
            count = sock.recv_into(received)
            if not count:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            incoming.write(memoryview(received)[:count])

    def send(self, *buffers: bytes | memoryview) -> None:
        tls, outgoing, sock = self._tls, self._outgoing, self._sock
        try:
            if sum(map(len, buffers)) <= _TLS_JOIN:
                tls.write(b"".join(buffers) if len(buffers) > 1 else buffers[0])
                sock.sendall(outgoing.read())
                return
            for buffer in buffers:  # encrypting copies them anyway: joining would copy twice
                view = memoryview(buffer).cast("B")
                for start in range(0, len(view), RECORD_BATCH):
                    tls.write(view[start : start + RECORD_BATCH])
                    sock.sendall(outgoing.read())
        except ssl.SSLError as exc:
            raise client_failure(exc, self._server, handshake=False) from exc

    def receive_into(self, receiver: Receiver) -> int:
        tls, incoming, target = self._tls, self._incoming, receiver.get_buffer()
        while True:
            # Decrypt what is here; with nothing here, read first (an SSLWantReadError, which
            # says the same, costs a microsecond per reply).
            if incoming.pending or tls.pending():
                try:
                    count: int = tls.read(len(target), target)  # type: ignore[assignment]
                except ssl.SSLWantReadError:
                    pass  # a part of a record: read the rest
                except ssl.SSLZeroReturnError:
                    return 0  # the server's close_notify
                except ssl.SSLError as exc:
                    raise client_failure(exc, self._server, handshake=False) from exc
                else:
                    if not count:  # how an SSLObject reports the server's close_notify
                        return 0
                    receiver.buffer_updated(count)
                    return count
            received = self._sock.recv_into(self._received)
            if not received:
                return 0  # EOF without close_notify
            incoming.write(self._received[:received])

    def shutdown_write(self) -> None:
        """close_notify, then the TCP half-close; the server's close_notify is not waited for
        (RFC 8446, 6.1 allows it), and receiving still works."""
        with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: ours is written
            self._tls.unwrap()
        try:
            if self._outgoing.pending:
                self._sock.sendall(self._outgoing.read())
        except OSError:
            pass  # already gone: closing is all that is left
        super().shutdown_write()
