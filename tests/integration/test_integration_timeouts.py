"""A server that stops answering: calls with a ``call_timeout`` fail in time, typed, and the
session is closed cleanly, never left half-used. Keepalive is on for every connection."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest
from integration_support import (
    ClientApi,
    RawPeer,
    cli_server,
    run,
    serve,
    wait_released,
    wait_until,
)

import bitfusion_net as bf
from bitfusion_net.protocol import encode_request
from bitfusion_net.protocol import messages as bf_messages
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


def test_a_connection_stalled_mid_frame_is_closed_with_an_error() -> None:
    async def main() -> None:
        async with serve(stall_timeout=0.3) as server:
            peer = await RawPeer.open(server.address)
            await peer.hello()
            peer.send(encode_request(bf_messages.Synchronize(0), peer.next_id())[:10])
            started = time.monotonic()
            frames = await peer.until_closed(timeout=5.0)
            assert time.monotonic() - started < 3.0
            [error] = frames
            assert isinstance(error.message, bf_messages.ErrorReply)
            assert "stalled halfway" in error.message.message
            await wait_released(server)

    run(main())


def test_a_connection_without_hello_is_closed_and_one_that_works_is_not() -> None:
    async def main() -> None:
        async with serve(stall_timeout=0.3) as server:
            silent = await RawPeer.open(server.address)
            async with bf.connect(server.address, fraction=0.25) as session:
                [error] = await silent.until_closed(timeout=5.0)
                assert "no HELLO" in error.message.message
                await asyncio.sleep(0.5)  # idle between whole frames is not a stall
                await session.devices[0].synchronize()

    run(main())


def test_connections_beyond_the_limit_are_refused_with_capacity_error(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(max_connections=2) as server:
            first = await api.connect(server.address, fraction=0.25)
            second = await api.connect(server.address, fraction=0.25)
            with pytest.raises(bf.CapacityError, match="connections, its limit"):
                await api.connect(server.address, fraction=0.25)
            await first.close()
            await wait_until(lambda: len(server.sessions()) == 1, "the first session gone")
            third = await api.connect(server.address, fraction=0.25)  # room again
            await third.close()
            await second.close()

    run(main())
