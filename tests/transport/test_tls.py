"""TLS on TCP: the conformance suite again over TLS, then what is TLS's own.

1. Every case of ``test_stream_conformance`` runs here once more with TLS ends: the event-loop
   cases through this module's ``open_pairs`` (``TlsStream`` ends of ``listen(tls=...)`` and
   ``connect(tls=...)`` on uvloop, with and without mutual TLS), the ``BlockingStream`` cases
   with ``TlsBlockingStream`` clients through this module's ``open_blocking``.
2. Addresses (``tls://``), settings (files that cannot be used are named) and what a stream
   says of its peer: encrypted, and the verified certificate's commonName under mutual TLS.
3. A TLS server's connections: a plaintext client reaches the plaintext owner with its bytes
   unread (or is closed), a silent or stalled client is closed after the handshake timeout, a
   failed handshake leaks no descriptor, and all of it works on asyncio's own loop as on uvloop.
4. Failures on the client's side are ``TlsError`` saying what they mean, within bounded time:
   an untrusted certificate, a wrong name, a server without TLS, a client certificate refused.

Certificates are made per module by ``tls_support`` (beside the integration tests).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import test_stream_conformance as conformance
from test_stream_conformance import (
    READ_SIZE,
    THREAD_TIMEOUT_S,
    Blocking,
    OpenBlocking,
    OpenPairs,
    RecordingOwner,
    abort_all,
    check_contract,
    on_uvloop,
    poll_until,
    tcp_pairs,
)

from bitfusion_net.transport import (
    BlockingStream,
    ClientTls,
    ServerTls,
    Stream,
    TcpAddress,
    TlsError,
    TlsStream,
    connect,
    listen,
    parse_address,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tls_support import CLIENT_NAME, Pki, make_pki  # noqa: E402

LOOPBACK = TcpAddress("127.0.0.1", 0)
FAILURE_S = 5.0  # the most a refused or failed TLS connection may take to say so


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: Pki, mutual: bool = False) -> ServerTls:
    return ServerTls(pki.server_cert, pki.server_key, pki.ca if mutual else None)


def client_tls(pki: Pki, certificate: bool = False, **kwargs: Any) -> ClientTls:
    if certificate:
        kwargs.update(cert_file=pki.client_cert, key_file=pki.client_key)
    return ClientTls(ca_file=pki.ca, **kwargs)


def port_of(server: Any) -> int:
    return int(server.sockets[0].getsockname()[1])


# == 1. the conformance suite over TLS ==========================================================
def tls_pairs(pki: Pki, mutual: bool = False) -> OpenPairs:
    """The suite's ``tcp_pairs`` with a TLS listener and TLS clients (on uvloop)."""
    return cast(
        OpenPairs,
        functools.partial(
            tcp_pairs,
            server_tls=server_tls(pki, mutual),
            client_tls=client_tls(pki, certificate=mutual),
        ),
    )


def tls_blocking_clients(pki: Pki) -> Callable[..., Any]:
    """Like the suite's ``blocking_clients``, with TLS clients of a TLS listener."""

    @asynccontextmanager
    async def blocking_clients(
        count: int = 1, read_size: int = READ_SIZE
    ) -> AsyncIterator[list[Blocking]]:
        made: list[RecordingOwner] = []
        accepted: asyncio.Queue[RecordingOwner] = asyncio.Queue()

        def server_owner(stream: Stream) -> RecordingOwner:
            made.append(RecordingOwner(stream, read_size))
            accepted.put_nowait(made[-1])
            return made[-1]

        server = await listen(LOOPBACK, server_owner, tls=server_tls(pki))
        clients: list[BlockingStream] = []
        try:
            address = TcpAddress("127.0.0.1", port_of(server), tls=True)
            tls = client_tls(pki)
            pairs: list[Blocking] = []
            for _ in range(count):
                clients.append(
                    await asyncio.to_thread(BlockingStream.connect, address, THREAD_TIMEOUT_S, tls)
                )
                clients[-1].settimeout(THREAD_TIMEOUT_S)
                assert clients[-1].encrypted and clients[-1].peer == f"127.0.0.1:{address.port}"
                pairs.append((clients[-1], await accepted.get()))
            yield pairs
        finally:
            for client in clients:
                client.close()
            await abort_all(made)
            server.close()
            await server.wait_closed()
        check_contract(made)

    return blocking_clients


@pytest.fixture(params=["tls", "mutual-tls"])
def open_pairs(request: pytest.FixtureRequest, pki: Pki) -> OpenPairs:
    """This module's ends for the suite's ``Stream`` cases: TLS, and mutual TLS."""
    return tls_pairs(pki, mutual=request.param == "mutual-tls")


@pytest.fixture
def open_blocking(pki: Pki) -> OpenBlocking:
    """This module's ends for the suite's blocking cases: TLS clients of a TLS listener."""
    return cast(OpenBlocking, tls_blocking_clients(pki))


CONFORMANCE_CASES = [name for name in dir(conformance) if name.startswith("test_")]
assert len(CONFORMANCE_CASES) >= 20, CONFORMANCE_CASES
for _name in CONFORMANCE_CASES:  # collected here again, with this module's fixtures
    globals()[_name] = getattr(conformance, _name)


# == 2. addresses, settings, what a stream says of its peer =====================================
def test_tls_addresses_parse_and_print_with_their_scheme() -> None:
    address = parse_address("tls://gpu-host:7000")
    assert (
        address == TcpAddress("gpu-host", 7000, tls=True) and str(address) == "tls://gpu-host:7000"
    )
    assert parse_address("tcp://gpu-host:7000").tls is False
    v6 = parse_address("tls://[::1]:7000")
    assert (v6.host, v6.tls, str(v6), v6.host_port) == (
        "::1",
        True,
        "tls://[::1]:7000",
        "[::1]:7000",
    )
    with pytest.raises(ValueError, match="tls://HOST:PORT"):
        parse_address("https://gpu-host:7000")


def test_settings_name_the_file_that_cannot_be_used(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="missing.pem"):
        ServerTls(missing, pki.server_key).context()
    with pytest.raises(ValueError, match="garbage.pem"):
        ServerTls(pki.server_cert, pki.server_key, client_ca_file=garbage).context()
    with pytest.raises(ValueError, match="key"):  # a key that is not the certificate's
        ServerTls(pki.server_cert, pki.client_key).context()
    with pytest.raises(ValueError, match="missing.pem"):
        ClientTls(ca_file=missing).context()
    with pytest.raises(ValueError, match="client.pem"):
        ClientTls(cert_file=pki.client_cert, key_file=pki.server_key).context()
    with pytest.raises(ValueError, match="without cert_file"):
        ClientTls(key_file=pki.client_key)
    context = server_tls(pki, mutual=True).context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    client = client_tls(pki).context()
    assert client.check_hostname and client.verify_mode is ssl.CERT_REQUIRED


class Greeter:
    """A server owner that records its stream and answers ``hello``."""

    streams: list[Stream]

    def __init__(self) -> None:
        self.streams = []

    def __call__(self, stream: Stream) -> RecordingOwner:
        self.streams.append(stream)
        stream.write(b"hello")
        return RecordingOwner(stream)


@on_uvloop
async def test_mutual_tls_names_the_client_certificate_on_the_server_stream(pki: Pki) -> None:
    greeter = Greeter()
    server = await listen(LOOPBACK, greeter, tls=server_tls(pki, mutual=True))
    try:
        address = TcpAddress("127.0.0.1", port_of(server), tls=True)
        client = await connect(address, RecordingOwner, tls=client_tls(pki, certificate=True))
        owner = cast(RecordingOwner, client.owner)
        await owner.wait_for_bytes(5)
        assert owner.received == b"hello"
        [stream] = greeter.streams
        assert stream.encrypted and stream.peer_certificate_name == CLIENT_NAME
        assert client.encrypted and client.peer_certificate_name == "localhost"  # the server's
        blocking = await asyncio.to_thread(
            BlockingStream.connect, address, FAILURE_S, client_tls(pki, certificate=True)
        )
        assert blocking.encrypted and blocking.peer_certificate_name == "localhost"
        await poll_until(lambda: len(greeter.streams) == 2, "the second connection")
        assert greeter.streams[1].peer_certificate_name == CLIENT_NAME
        blocking.close()
        client.abort()
    finally:
        for stream in greeter.streams:
            stream.abort()
        server.close()
        await server.wait_closed()


@on_uvloop
async def test_without_mutual_tls_no_client_certificate_is_named(pki: Pki) -> None:
    greeter = Greeter()
    server = await listen(LOOPBACK, greeter, tls=server_tls(pki))
    try:
        address = TcpAddress("127.0.0.1", port_of(server), tls=True)
        # a certificate the server did not ask for is not sent, and not named
        client = await connect(address, RecordingOwner, tls=client_tls(pki, certificate=True))
        await poll_until(lambda: greeter.streams, "the connection")
        assert greeter.streams[0].encrypted and greeter.streams[0].peer_certificate_name is None
        client.abort()
    finally:
        for stream in greeter.streams:
            stream.abort()
        server.close()
        await server.wait_closed()


# == 3. a TLS server's connections ==============================================================
def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@on_uvloop
async def test_a_plaintext_client_reaches_the_plaintext_owner_with_its_bytes_unread(
    pki: Pki,
) -> None:
    plaintext: list[RecordingOwner] = []

    def plaintext_owner(stream: Stream) -> RecordingOwner:
        assert not stream.encrypted
        owner = RecordingOwner(stream)
        plaintext.append(owner)
        stream.write(b"use TLS")
        owner.after_update = lambda: owner.count >= 4 and stream.close()  # type: ignore[func-returns-value]
        return owner

    server = await listen(
        LOOPBACK, Greeter(), tls=server_tls(pki), plaintext_owner_factory=plaintext_owner
    )
    try:
        address = TcpAddress("127.0.0.1", port_of(server))  # tcp://: no TLS
        client = await connect(address, RecordingOwner)
        client.write(b"BFNT and the rest of a HELLO")
        owner = cast(RecordingOwner, client.owner)
        await client.wait_closed()
        assert owner.received == b"use TLS" and owner.lost == [None]
        [server_end] = plaintext
        await server_end.stream.wait_closed()
        assert server_end.received.startswith(b"BFNT")  # nothing was read before it was handed over
    finally:
        server.close()
        await server.wait_closed()


@on_uvloop
async def test_without_a_plaintext_owner_a_plaintext_client_is_closed(pki: Pki) -> None:
    greeter = Greeter()
    server = await listen(LOOPBACK, greeter, tls=server_tls(pki))
    try:
        client = await connect(TcpAddress("127.0.0.1", port_of(server)), RecordingOwner)
        client.write(b"BFNT")
        await asyncio.wait_for(client.wait_closed(), FAILURE_S)
        assert not greeter.streams
    finally:
        server.close()
        await server.wait_closed()


@on_uvloop
async def test_a_silent_or_stalled_client_is_closed_after_the_handshake_timeout(pki: Pki) -> None:
    greeter = Greeter()
    server = await listen(LOOPBACK, greeter, tls=server_tls(pki), handshake_timeout=0.3)
    try:
        port = port_of(server)
        silent = socket.create_connection(("127.0.0.1", port), timeout=FAILURE_S)
        stalled = socket.create_connection(("127.0.0.1", port), timeout=FAILURE_S)
        stalled.sendall(bytes([0x16, 0x03, 0x01]))  # a handshake record begun, never finished
        started = time.monotonic()
        for sock in (silent, stalled):
            assert await asyncio.to_thread(drain_until_closed, sock) == b""
            sock.close()
        assert time.monotonic() - started < FAILURE_S and not greeter.streams
    finally:
        server.close()
        await server.wait_closed()


def drain_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@on_uvloop
async def test_failed_handshakes_leave_no_descriptor_behind(pki: Pki) -> None:
    greeter = Greeter()
    server = await listen(LOOPBACK, greeter, tls=server_tls(pki, mutual=True))
    try:
        address = TcpAddress("127.0.0.1", port_of(server), tls=True)
        before = open_descriptors()
        for round_ in range(40):
            if round_ % 2:  # no client certificate: refused under mutual TLS
                client = await connect(address, RecordingOwner, tls=client_tls(pki))
                await asyncio.wait_for(client.wait_closed(), FAILURE_S)
            else:  # the client does not trust the server
                with pytest.raises(TlsError):
                    await connect(address, RecordingOwner, tls=ClientTls(ca_file=pki.other_ca))
        await poll_until(lambda: open_descriptors() <= before, "descriptors to be closed")
        assert not greeter.streams
    finally:
        server.close()
        await server.wait_closed()


def test_tls_works_on_asyncios_own_loop_too(pki: Pki) -> None:
    async def main() -> None:
        greeter = Greeter()
        server = await listen(LOOPBACK, greeter, tls=server_tls(pki, mutual=True))
        try:
            address = TcpAddress("127.0.0.1", port_of(server), tls=True)
            client = await connect(address, RecordingOwner, tls=client_tls(pki, certificate=True))
            assert isinstance(client, TlsStream) and client.encrypted
            await cast(RecordingOwner, client.owner).wait_for_bytes(5)
            assert greeter.streams[0].peer_certificate_name == CLIENT_NAME
            client.close()
            await client.wait_closed()
        finally:
            for stream in greeter.streams:
                stream.abort()
            server.close()
            await server.wait_closed()
        assert not server.is_serving()

    asyncio.run(asyncio.wait_for(main(), 20))


# == 4. failures on the client's side ===========================================================
@asynccontextmanager
async def tls_server(pki: Pki, mutual: bool = False) -> AsyncIterator[TcpAddress]:
    greeter = Greeter()
    server = await listen(LOOPBACK, greeter, tls=server_tls(pki, mutual))
    try:
        yield TcpAddress("127.0.0.1", port_of(server), tls=True)
    finally:
        for stream in greeter.streams:
            stream.abort()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def plaintext_server() -> AsyncIterator[TcpAddress]:
    """A plaintext server that answers garbage as ours does bad magic: a frame, then a close."""

    def answer_and_close(stream: Stream) -> RecordingOwner:
        stream.write(b"BFNT\x03\x02\x01\x00" + bytes(16))
        stream.close()
        return RecordingOwner(stream)

    server = await listen(LOOPBACK, answer_and_close)
    try:
        yield TcpAddress("127.0.0.1", port_of(server), tls=True)
    finally:
        server.close()
        await server.wait_closed()


def blocking_connect(address: TcpAddress, tls: ClientTls | None) -> BlockingStream:
    return BlockingStream.connect(address, FAILURE_S, tls)


async def both_fail(address: TcpAddress, tls: ClientTls | None, match: str) -> None:
    """Connecting fails with a TlsError matching ``match``, soon, from both kinds of client."""
    started = time.monotonic()
    with pytest.raises(TlsError, match=match):
        await connect(address, RecordingOwner, tls=tls)
    with pytest.raises(TlsError, match=match):
        await asyncio.to_thread(blocking_connect, address, tls)
    assert time.monotonic() - started < FAILURE_S


@on_uvloop
async def test_an_untrusted_server_certificate_is_refused(pki: Pki) -> None:
    async with tls_server(pki) as address:
        await both_fail(address, ClientTls(ca_file=pki.other_ca), "not accepted: unable to get")
        await both_fail(address, None, "not accepted")  # the system's CAs do not know ours


@on_uvloop
async def test_a_certificate_for_another_name_is_refused(pki: Pki) -> None:
    async with tls_server(pki) as address:
        wrong_name = client_tls(pki, server_hostname="gpu.example.com")
        await both_fail(address, wrong_name, "not accepted: Hostname mismatch")
        by_name = TcpAddress("localhost", address.port, tls=True)  # the certificate's DNS name
        stream = await asyncio.to_thread(blocking_connect, by_name, client_tls(pki))
        stream.close()


@on_uvloop
async def test_a_server_without_tls_is_named_as_such(pki: Pki) -> None:
    async with plaintext_server() as address:
        await both_fail(address, client_tls(pki), "does not speak TLS")


@pytest.mark.parametrize("certificate", ["none", "another CA's"])
@on_uvloop
async def test_a_refused_client_certificate_ends_the_connection_saying_so(
    pki: Pki, certificate: str
) -> None:
    if certificate == "none":
        tls, match = client_tls(pki), "requires a client certificate"
    else:
        tls = ClientTls(
            ca_file=pki.ca, cert_file=pki.other_client_cert, key_file=pki.other_client_key
        )
        match = "refused this client's certificate"
    async with tls_server(pki, mutual=True) as address:
        started = time.monotonic()
        # Under TLS 1.3 the client's handshake is done before the server refuses: the refusal
        # ends the connection that seemed up, at the client's first read.
        owners: list[RecordingOwner] = []

        def recorded(stream: Stream) -> RecordingOwner:  # kept: the stream forgets its owner
            owners.append(RecordingOwner(stream))
            return owners[-1]

        client = await connect(address, recorded, tls=tls)
        await asyncio.wait_for(client.wait_closed(), FAILURE_S)
        [error] = owners[0].lost
        assert isinstance(error, TlsError) and match in str(error), error

        def read_once() -> None:
            stream = blocking_connect(address, tls)
            try:
                stream.receive_into(RecordingOwner(None))
            finally:
                stream.close()

        with pytest.raises(TlsError, match=match):
            await asyncio.to_thread(read_once)
        assert time.monotonic() - started < FAILURE_S
