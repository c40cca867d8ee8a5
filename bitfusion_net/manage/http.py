"""A small HTTP/1.1 server for the management endpoint: h11's sans-io connection driven by
asyncio streams, as the data plane drives its own ``ServerConnection``.

It answers GET, HEAD and OPTIONS from one synchronous handler (everything it serves is built
from the server's state in memory, on the event loop), keeps connections alive, and bounds what
a client can make it hold: the request head's size, the body (read and dropped, never kept), the
time a request may take to arrive and the number of connections.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

import h11

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # bytes of request line and headers
MAX_BODY = 64 * 1024  # bytes of a request body read (and dropped) before the answer is 413
REQUEST_TIMEOUT_S = 30.0  # from a connection's first byte (or its last answer) to a whole request
MAX_CONNECTIONS = 256
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # decoded, without the query
    query: dict[str, str]  # the first value of each parameter
    headers: dict[str, str]  # names in lower case
    peer: str


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0: a free one); ``tls``: HTTPS."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self._tls, limit=READ_SIZE
        )
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return bound_host, bound_port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer_name = writer.get_extra_info("peername")
        peer = f"{peer_name[0]}:{peer_name[1]}" if peer_name else "?"
        if len(self._connections) >= MAX_CONNECTIONS:
            log.warning("management: refused %s: %d connections open", peer, MAX_CONNECTIONS)
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._converse(reader, writer, peer)
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went, or was too slow: nothing to answer
        except h11.ProtocolError as exc:
            log.debug("management: %s broke HTTP: %s", peer, exc)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request, body_size = await self._next_request(connection, reader, writer, peer)
            if request is None:
                return
            if body_size > MAX_BODY:
                response = Response(413, b"request body too large\n")
            else:
                response = self._answer(request)
            writer.write(_encode(connection, request.method, response))
            await writer.drain()
            if connection.our_state is h11.MUST_CLOSE or body_size > MAX_BODY:
                return
            connection.start_next_cycle()

    @staticmethod
    async def _next_request(
        connection: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> tuple[Request | None, int]:
        """The next whole request (its body dropped) and its body's size; None at the end."""
        request: Request | None = None
        body_size = 0
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                writer.write(_bare(status, f"bad request: {exc}\n"))
                await writer.drain()
                return None, 0
            if event is h11.NEED_DATA:
                data = await reader.read(READ_SIZE)
                connection.receive_data(data)  # b"": the client closed its side
                continue
            if isinstance(event, h11.Request):
                target = urlsplit(event.target.decode("latin-1"))
                request = Request(
                    event.method.decode("ascii", "replace").upper(),
                    unquote(target.path) or "/",
                    {k: v[0] for k, v in parse_qs(target.query).items()},
                    {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers},
                    peer,
                )
            elif isinstance(event, h11.Data):
                body_size += len(event.data)
                if body_size > MAX_BODY:
                    return request, body_size
            elif isinstance(event, h11.EndOfMessage):
                return request, body_size
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None, 0

    def _answer(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            return Response(405, b"only GET, HEAD and OPTIONS\n", headers={"Allow": "GET, HEAD"})
        try:
            return self._handler(request)
        except Exception:  # noqa: BLE001 - a bug must cost one answer, not the endpoint
            log.exception("management: answering %s %s failed", request.method, request.path)
            return Response(500, b"internal error (see the server's log)\n")


def _encode(connection: h11.Connection, method: str, response: Response) -> bytes:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        *response.headers.items(),
    ]
    head = h11.Response(
        status_code=response.status, headers=headers, reason=HTTPStatus(response.status).phrase
    )
    data = connection.send(head) or b""
    if method != "HEAD":
        data += connection.send(h11.Data(data=response.body)) or b""
    return data + (connection.send(h11.EndOfMessage()) or b"")


def _bare(status: int, text: str) -> bytes:
    """An answer to a request too broken for h11 to answer (it is then closed)."""
    body = text.encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
