"""TLS end to end: a real server with a certificate from a CA made in the test, both client APIs.

A session over TLS (lease, alloc, copies both ways, a built-in kernel) and over mutual TLS; then
every way a TLS connection goes wrong, each a typed error that says what to do, well within the
connect timeout: a client certificate missing or from another CA, a plaintext client on a TLS
server and a TLS client on a plaintext server, a CA that did not sign the server's certificate,
a name the certificate does not carry; and control connections over TLS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from integration_support import ClientApi, MiB, pool_is_empty, run, serve, wait_released
from tls_support import Pki, make_pki

import bitfusion_net as bf
from bitfusion_net.cli.config import Server as ServerEntry
from bitfusion_net.cli.control import ControlConnection, query_servers
from bitfusion_net.transport import ClientTls, ServerTls

F32 = np.float32
CONNECT_TIMEOUT_S = 10.0  # what the clients are given
FAILURE_S = 3.0  # what a refusal may take at most: far less than the connect timeout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@asynccontextmanager
async def tls_serve(pki: Pki, mutual: bool = False, **kwargs: Any) -> AsyncIterator[bf.Server]:
    """An in-process TLS server on 127.0.0.1:0 (mutual TLS: clients need ``pki.ca``'s)."""
    tls = ServerTls(pki.server_cert, pki.server_key, pki.ca if mutual else None)
    async with serve(tls=tls, **kwargs) as server:
        yield server


def trusting(pki: Pki, certificate: bool = False) -> ClientTls:
    if certificate:
        return ClientTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    return ClientTls(ca_file=pki.ca)


async def saxpy_round_trip(session: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """alloc, htod, the built-in saxpy, dtoh: what came back and what NumPy says it should be."""
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal(n, dtype=F32), rng.standard_normal(n, dtype=F32)
    device = session.devices[0]
    x_ptr, y_ptr = await device.mem_alloc(x.nbytes), await device.mem_alloc(y.nbytes)
    await device.memcpy_htod(x_ptr, x)
    await device.memcpy_htod(y_ptr, y)
    saxpy = await device.builtin("saxpy")
    await saxpy.launch((n + 255) // 256, 256, [n, 2.5, x_ptr, y_ptr])
    out = np.empty(n, F32)
    await device.memcpy_dtoh(out, y_ptr)
    return out, F32(2.5) * x + y


async def fails_soon(api: ClientApi, address: str, tls: ClientTls | None) -> bf.BitfusionError:
    """Connecting to ``address`` fails with a BitfusionError, well within the connect timeout."""
    started = time.monotonic()
    with pytest.raises(bf.BitfusionError) as caught:
        async with api.connect(address, fraction=0.1, tls=tls, timeout=CONNECT_TIMEOUT_S):
            pass
    assert time.monotonic() - started < FAILURE_S
    return caught.value


# -- sessions ---------------------------------------------------------------------------------
def test_a_session_over_tls(api: ClientApi, pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki) as server:
            assert server.address.startswith("tls://127.0.0.1:")
            async with api.connect(server.address, fraction=0.25, tls=trusting(pki)) as session:
                out, want = await saxpy_round_trip(session, 3 * MiB // 4)  # 3 MiB each way
                np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
                big = np.arange(16 * MiB // 4, dtype=np.uint32)  # several TLS records' worth
                device = session.devices[0]
                ptr = await device.mem_alloc(big.nbytes)
                await device.memcpy_htod(ptr, big)
                back = np.empty_like(big)
                await device.memcpy_dtoh(back, ptr)
                np.testing.assert_array_equal(back, big)
            await wait_released(server)

    run(main())


def test_the_address_alone_asks_for_tls_with_the_systems_cas(api: ClientApi, pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki) as server:
            # tls:// and no settings: the system's CAs, which do not know this test's CA
            error = await fails_soon(api, server.address, None)
            assert isinstance(error, bf.ConnectionLostError)
            assert "is not accepted: unable to get local issuer certificate" in str(error)
            # settings and a tcp:// address: TLS all the same
            plain_scheme = server.address.replace("tls://", "tcp://")
            async with api.connect(plain_scheme, fraction=0.1, tls=trusting(pki)) as session:
                assert await session.devices[0].mem_get_info()

    run(main())


def test_mutual_tls_with_a_good_client_certificate(api: ClientApi, pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki, mutual=True) as server:
            tls = trusting(pki, certificate=True)
            async with api.connect(server.address, fraction=0.25, tls=tls) as session:
                out, want = await saxpy_round_trip(session, 10_000)
                np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)

    run(main())


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("certificate", ["none", "another CA's"])
def test_mutual_tls_refuses_a_missing_or_foreign_client_certificate(
    api: ClientApi, pki: Pki, certificate: str, caplog: pytest.LogCaptureFixture
) -> None:
    if certificate == "none":
        tls, says, logged = trusting(pki), "requires a client certificate", "PEER_DID_NOT_RETURN"
    else:
        tls = ClientTls(
            ca_file=pki.ca, cert_file=pki.other_client_cert, key_file=pki.other_client_key
        )
        says, logged = "refused this client's certificate (unknown ca)", "CERTIFICATE_VERIFY"

    async def main() -> None:
        async with tls_serve(pki, mutual=True) as server:
            error = await fails_soon(api, server.address, tls)
            assert isinstance(error, bf.ConnectionLostError) and says in str(error), error
            assert pool_is_empty(server) and not server.sessions()

    with caplog.at_level(logging.INFO, logger="bitfusion_net.transport"):
        run(main())
    assert any("TLS connection from 127.0.0.1:" in r.message and logged in r.message
               for r in caplog.records), [r.message for r in caplog.records]  # fmt: skip


def test_a_plaintext_client_is_told_in_plaintext_that_the_server_requires_tls(
    api: ClientApi, pki: Pki
) -> None:
    async def main() -> None:
        async with tls_serve(pki) as server:
            plaintext = server.address.replace("tls://", "tcp://")
            error = await fails_soon(api, plaintext, None)
            assert isinstance(error, bf.ProtocolError)
            assert f"this server requires TLS: connect to {server.address}" in str(error)
            await wait_released(server)

    run(main())


def test_a_tls_client_is_told_that_the_server_does_not_speak_tls(
    api: ClientApi, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serve() as server:  # plaintext
            error = await fails_soon(api, server.address, trusting(pki))
            assert isinstance(error, bf.ConnectionLostError)
            assert "does not speak TLS (connect with tcp://" in str(error), error
            assert pool_is_empty(server)

    with caplog.at_level(logging.WARNING, logger="bitfusion_net.server"):
        run(main())
    assert any("bad magic" in r.message for r in caplog.records)  # the server saw a ClientHello


def test_a_server_certificate_from_another_ca_is_refused(api: ClientApi, pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki) as server:
            error = await fails_soon(api, server.address, ClientTls(ca_file=pki.other_ca))
            assert isinstance(error, bf.ConnectionLostError)
            assert "the certificate of the server at 127.0.0.1:" in str(error)
            assert "is not accepted: unable to get local issuer certificate" in str(error)

    run(main())


def test_a_certificate_without_the_name_connected_to_is_refused(api: ClientApi, pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki) as server:
            port = server.address.rpartition(":")[2]
            wrong_name = ClientTls(ca_file=pki.ca, server_hostname="gpu.example.com")
            error = await fails_soon(api, server.address, wrong_name)
            assert "Hostname mismatch" in str(error)
            # the certificate names localhost too: connecting by that name verifies
            async with api.connect(f"tls://localhost:{port}", tls=trusting(pki)) as session:
                assert await session.devices[0].mem_get_info()

    run(main())


def test_tls_files_that_cannot_be_used_are_named(api: ClientApi, pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"

    async def main() -> None:
        async with tls_serve(pki) as server:
            error = await fails_soon(api, server.address, ClientTls(ca_file=missing))
            assert isinstance(error, bf.InvalidValueError) and "nowhere.pem" in str(error)
        with pytest.raises(ValueError, match="nowhere.pem"):
            async with serve(tls=ServerTls(missing, pki.server_key)):
                pass

    run(main())


def test_a_tls_address_needs_the_servers_tls_settings() -> None:
    with pytest.raises(ValueError, match="needs a certificate"):
        bf.Server("tls://127.0.0.1:0")


def test_a_stalled_tls_handshake_is_closed_after_the_stall_timeout(pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki, stall_timeout=0.3) as server:
            host, port = server.address.removeprefix("tls://").rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(bytes([0x16, 0x03, 0x01]))  # a ClientHello begun, never finished
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), FAILURE_S) == b""
            assert time.monotonic() - started < FAILURE_S
            writer.close()

    run(main())


# -- control connections ------------------------------------------------------------------------
def test_control_connections_over_tls(pki: Pki) -> None:
    async def main() -> None:
        async with tls_serve(pki, mutual=True) as server:
            tls = trusting(pki, certificate=True)

            def ask() -> None:
                connection = ControlConnection(server.address, CONNECT_TIMEOUT_S, tls)
                try:
                    assert connection.info()["server"]["address"] == server.address
                finally:
                    connection.close()
                entry = ServerEntry((server.address,))
                [view] = query_servers([entry], CONNECT_TIMEOUT_S, tls=tls)
                assert view.ok, view.error
                [refused] = query_servers([entry], CONNECT_TIMEOUT_S, tls=trusting(pki))
                assert "requires a client certificate" in refused.error, refused.error
                plaintext = ServerEntry((server.address.replace("tls://", "tcp://"),))
                [told] = query_servers([plaintext], CONNECT_TIMEOUT_S)
                assert "this server requires TLS" in told.error, told.error

            await asyncio.to_thread(ask)

    run(main())


def test_no_tls_bytes_reach_a_plaintext_server_session(pki: Pki) -> None:
    """A raw ClientHello on a plaintext server: refused as bad magic, the connection closed."""

    async def main() -> None:
        async with serve() as server:
            host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=FAILURE_S) as sock:
                sock.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + bytes(512))
                answer = await asyncio.to_thread(sock.recv, 4096)
            assert answer.startswith(b"BFNT")  # an ERROR frame, in plaintext

    run(main())
