"""A server that stops answering: calls with a ``call_timeout`` fail in time, typed, and the
session is closed cleanly, never left half-used. Keepalive is on for every connection."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from integration_support import ClientApi, cli_server, run

import bitfusion_net as bf
from bitfusion_net.transport.tcp import KEEPALIVE_IDLE_S, tune_socket


def test_a_call_to_a_stopped_server_times_out_and_closes_the_session(api: ClientApi) -> None:
    with cli_server() as server:

        async def main() -> None:
            async with api.connect(server.address, fraction=0.25, call_timeout=0.5) as session:
                device = session.devices[0]
                await device.mem_get_info()  # answered while the server runs
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    with pytest.raises(bf.CallTimeoutError, match="within 0.5 s"):
                        await device.mem_get_info()
                    waited = time.monotonic() - started
                    assert 0.4 <= waited <= 5.0, waited
                    assert session.closed
                    # Every later call says the same, at once: the session is over, not half-used.
                    with pytest.raises(bf.CallTimeoutError):
                        await device.synchronize()
                    with pytest.raises(bf.CallTimeoutError):
                        await device.mem_alloc(64)
                finally:
                    os.kill(server.pid, signal.SIGCONT)

        run(main())


def test_call_timeout_is_checked(api: ClientApi) -> None:
    async def main() -> None:
        with pytest.raises(bf.InvalidValueError, match="call_timeout"):
            await api.connect("tcp://127.0.0.1:9", call_timeout=0)

    run(main())


def test_every_tcp_connection_has_keepalive() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        tune_socket(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
