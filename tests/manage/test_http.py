"""The management endpoint's HTTP server against what clients really send: keep-alive, HEAD,
broken requests, oversized heads and bodies, clients too slow to finish a request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from bitfusion_net.manage import http
from bitfusion_net.manage.http import HttpServer, Request, Response


def _echo(request: Request) -> Response:
    return Response(200, f"{request.method} {request.path} {request.query}".encode())


async def _raw(port: int, data: bytes, read_for: float = 2.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``read_for`` s pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


def _serving(test: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        server = HttpServer(_echo)
        _, port = await server.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(20):
                await test(port)
        finally:
            await server.close()

    asyncio.run(main())


def test_a_kept_alive_connection_answers_request_after_request() -> None:
    async def test(port: int) -> None:
        requests = b"".join(
            f"GET /a/{i}?x={i}&x=9 HTTP/1.1\r\nHost: h\r\n\r\n".encode() for i in range(3)
        )
        answer = await _raw(
            port, requests + b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 4
        for i in range(3):
            assert f"GET /a/{i} {{'x': '{i}'}}".encode() in answer  # the first of repeated values
        assert answer.endswith(b"GET /last {}")

    _serving(test)


def test_head_answers_the_headers_without_the_body() -> None:
    async def test(port: int) -> None:
        answer = await _raw(port, b"HEAD /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 10" in head.lower()
        assert body == b""

    _serving(test)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        # a head still growing past the limit (h11 bounds what it buffers unparsed)
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * (http.MAX_HEAD + 10), b"431"),
        (b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc", b"405"),
    ],
    ids=["garbage", "no-host", "huge-head", "post"],
)
def test_broken_or_unwanted_requests_get_a_clear_status(
    request_bytes: bytes, status: bytes
) -> None:
    async def test(port: int) -> None:
        answer = await _raw(port, request_bytes)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]

    _serving(test)


def test_a_body_past_the_limit_is_refused_and_the_connection_closed() -> None:
    async def test(port: int) -> None:
        size = http.MAX_BODY + 1
        head = f"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: {size}\r\n\r\n".encode()
        answer = await _raw(port, head + b"z" * size)
        assert answer.startswith(b"HTTP/1.1 413")

    _serving(test)


def test_a_client_that_never_finishes_its_request_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 0.3)

    async def test(port: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await _raw(port, b"GET / HTTP/1.1\r\nHost:", read_for=10)
        assert answer == b""  # closed, without an answer
        assert loop.time() - started < 5

    _serving(test)


def test_a_handler_that_fails_costs_one_answer_not_the_server() -> None:
    def broken(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return Response(200, b"fine")

    async def main() -> None:
        server = HttpServer(broken)
        _, port = await server.start("127.0.0.1", 0)
        try:
            answer = await _raw(
                port,
                b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            )
        finally:
            await server.close()
        assert answer.startswith(b"HTTP/1.1 500") and answer.endswith(b"fine")

    asyncio.run(main())
