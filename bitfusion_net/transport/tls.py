"""TLS on TCP: a server's and a client's settings, the ``ssl`` contexts made from them, and what
a failed TLS connection means, in words that say what to do (the stream is ``tls_stream``).

A TLS server tells a plaintext client why it is turned away. Every TLS connection opens with a
handshake record (content type ``0x16``); a bitfusion-net frame opens with its magic, ``B``. So a
TLS server's stream looks at the first byte it receives: anything else goes, with the bytes
unread, to an owner that answers in plaintext that TLS is required. The other way round, a
plaintext server reads a TLS client's ClientHello as a frame with bad magic and answers with an
ERROR frame: the client's handshake fails on it and ``client_failure`` says that the server does
not speak TLS.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

TLS_HANDSHAKE_RECORD = 0x16  # the content type of the record every TLS connection opens with
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

FilePath = str | os.PathLike[str]


@dataclass(frozen=True)
class ServerTls:
    """A server's TLS settings.

    ``cert_file``: the server's certificate chain (PEM, its own certificate first); ``key_file``:
    its private key (PEM, unencrypted). With ``client_ca_file`` (PEM CA certificates) the server
    asks for **mutual TLS**: every client must present a certificate that chains to one of those
    CAs, or its handshake fails; the session's stream then names the client's certificate
    (``Stream.peer_certificate_name``, its subject's commonName).
    """

    cert_file: FilePath
    key_file: FilePath
    client_ca_file: FilePath | None = None

    def context(self) -> ssl.SSLContext:
        """A server context: TLS 1.2 or later, this certificate and key, and the client CA when
        given. Raises ``ValueError`` naming the file that cannot be read or used."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = MINIMUM_VERSION
        # No TLS 1.3 session tickets: clients make a context per connection and never resume,
        # and a ticket a blocking client never reads would turn its close into a reset.
        context.num_tickets = 0
        _load(
            lambda: context.load_cert_chain(self.cert_file, self.key_file),
            f"the server certificate {os.fspath(self.cert_file)!r} with the key "
            f"{os.fspath(self.key_file)!r}",
        )
        if self.client_ca_file is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            _load(
                lambda: context.load_verify_locations(cafile=self.client_ca_file),
                f"the client CA certificates {os.fspath(self.client_ca_file)!r}",
            )
        return context


@dataclass(frozen=True)
class ClientTls:
    """A client's TLS settings. The server's certificate and its name are always verified.

    ``ca_file``: the CA certificates (PEM) the server's certificate must chain to; None: the
    system's trusted CAs. ``cert_file`` and ``key_file``: this client's certificate and key, for a
    server that asks for mutual TLS (``key_file`` may be left out when ``cert_file`` holds the
    key too). ``server_hostname``: the name (or IP address) the server's certificate must carry;
    None: the host of the address connected to.
    """

    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    server_hostname: str | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("ClientTls: key_file was given without cert_file")
        if self.server_hostname == "":
            raise ValueError("ClientTls: server_hostname is empty (None: the address's host)")

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.2 or later, the server's certificate and hostname verified
        against ``ca_file`` (or the system's CAs), this client's certificate when given. Raises
        ``ValueError`` naming the file that cannot be read or used."""
        if self.ca_file is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and name
            _load(
                lambda: context.load_verify_locations(cafile=self.ca_file),
                f"the CA certificates {os.fspath(self.ca_file)!r}",
            )
        context.minimum_version = MINIMUM_VERSION
        if self.cert_file is not None:
            _load(
                lambda: context.load_cert_chain(self.cert_file, self.key_file),  # type: ignore[arg-type]
                f"the client certificate {os.fspath(self.cert_file)!r}"
                + (f" with the key {os.fspath(self.key_file)!r}" if self.key_file else ""),
            )
        return context

    def hostname(self, host: str) -> str:
        """The name the server's certificate must carry when connecting to ``host``."""
        return self.server_hostname or host


def client_settings(address_says_tls: bool, tls: ClientTls | None) -> ClientTls | None:
    """The TLS a client connection uses: ``tls`` when given (whatever the address's scheme);
    the defaults (system CAs) when only the address says ``tls://``; None: plaintext."""
    if tls is not None:
        return tls
    return ClientTls() if address_says_tls else None


def _load(load: Callable[[], object], what: str) -> None:
    try:
        load()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot use {what}: {reason}") from None


def peer_certificate_name(certificate: dict[str, object] | None) -> str | None:
    """The commonName of a verified peer certificate's subject (``SSLSocket.getpeercert()``);
    None without a certificate or a commonName."""
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


# -- what a failure means -------------------------------------------------------------------------
class TlsError(ConnectionError):
    """A TLS connection failed: its handshake, or an alert from the peer later (under TLS 1.3 a
    server refuses a client's certificate after the client's side of the handshake is done, so
    the client learns of it at its first read). The message says why and what to do."""


# OpenSSL's reasons when what came back is not TLS at all: a plaintext server's ERROR frame.
_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "WRONG_SSL_VERSION",
        "HTTP_REQUEST",
        "UNEXPECTED_RECORD",
    }
)
_CERTIFICATE_REQUIRED = frozenset(
    {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"}
)
_CERTIFICATE_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)


def client_failure(error: BaseException, server: str, *, handshake: bool) -> TlsError:
    """What a TLS client connection to ``server`` (``HOST:PORT``) failing with ``error`` means.
    ``handshake``: it failed during the handshake (an EOF or a reset then means the server did
    not answer in TLS); otherwise later, on a connection that was up (the message then leaves
    the server unnamed: the connection's own error names it)."""
    reason = getattr(error, "reason", None)
    who = f"the server at {server}" if handshake else "the server"
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = error.verify_message or reason or error
        text = (
            f"the certificate of {who} is not accepted: {detail} (give the CA that signed it, "
            "ClientTls(ca_file=...), and connect with the name it carries)"
        )
    elif reason in _NOT_TLS:  # what came back was not TLS: a plaintext server's ERROR frame
        text = f"{who} does not speak TLS (connect with tcp://, without TLS)"
    elif handshake and _is_eof(error):
        text = (
            f"{who} closed the connection during the TLS handshake: it does not speak TLS "
            "(then connect with tcp://), or it refused this client's certificate (mutual TLS: "
            "give one its client CA signed)"
        )
    elif reason in _CERTIFICATE_REQUIRED:
        text = (
            f"{who} requires a client certificate: give one its client CA signed "
            "(ClientTls(cert_file=..., key_file=...))"
        )
    elif reason in _CERTIFICATE_REFUSED:
        alert = str(reason).split("ALERT_", 1)[-1].lower().replace("_", " ")
        text = f"{who} refused this client's certificate ({alert}): give one its client CA signed"
    else:
        what = "the TLS handshake with" if handshake else "TLS with"
        text = f"{what} {who} failed: {reason or error}"
    failure = TlsError(text)
    failure.__cause__ = error
    return failure


def _is_eof(error: BaseException) -> bool:
    """The connection ended without a TLS answer: an EOF, a reset or a broken pipe."""
    return isinstance(
        error,
        ssl.SSLEOFError | ConnectionResetError | ConnectionAbortedError | BrokenPipeError,
    ) or (
        isinstance(error, ssl.SSLError)
        and getattr(error, "reason", None) == "UNEXPECTED_EOF_WHILE_READING"
    )
