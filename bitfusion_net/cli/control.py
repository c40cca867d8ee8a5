"""Control connections: ask servers what they hold, reserve GPUs on them, release them.

A control connection holds no GPUs (docs/PROTOCOL.md, section 5). It is blocking: the CLI waits
for each answer anyway, and several servers are asked at once from a few threads, each server
given ``timeout`` seconds before it is skipped with a warning naming it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..client.blocking_driver import BlockingDriver
from ..protocol import BitfusionError, ConnectionLostError, ProtocolError
from ..protocol import messages as m
from ..transport import BlockingStream, ClientTls, TlsError, parse_address
from .config import Server

CLOSE_TIMEOUT = 2.0


class ControlConnection:
    """One control connection to one server. Reservations made on it with
    ``HOLD_BY_CONNECTION`` last as long as it (and the programs attached to them).

    ``tls``: TLS settings (``ClientTls``); TLS is used with them, or when ``address`` says
    ``tls://`` (with the system's CAs). Raises ``OSError`` when it cannot connect (``TlsError``
    saying why when TLS fails), ``ValueError`` when the address or the TLS files are bad.
    ``token``: presented first (AUTHENTICATE) for servers that use tokens; a refusal raises
    ``AuthenticationError``."""

    def __init__(
        self,
        address: str,
        timeout: float,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        stream = BlockingStream.connect(parse_address(address), timeout, tls)
        stream.settimeout(timeout)
        self._driver = BlockingDriver(stream)
        self._driver.set_call_timeout(timeout)
        if token:
            try:
                self._driver.request(m.Authenticate(token))
            except BaseException:
                stream.close()
                raise

    @classmethod
    def open(
        cls,
        server: Server,
        timeout: float,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> ControlConnection:
        """Connect to the first of the server's addresses that answers."""
        failure: BaseException | None = None
        for address in server.addresses:
            try:
                return cls(address, timeout, tls, token)
            except OSError as exc:
                failure = exc
        if isinstance(failure, TlsError):  # its message names the address and what to do
            raise ConnectionLostError(f"{server.name}: {failure}")
        reason = getattr(failure, "strerror", None) or failure or "no address"
        raise ConnectionLostError(f"cannot connect to {server.name}: {reason}")

    def info(self, detail: int = m.INFO_FULL) -> dict[str, Any]:
        reply = self._driver.request(m.ServerInfo(detail))
        try:
            info = json.loads(reply.info)
        except ValueError as exc:
            raise ProtocolError(
                f"{self.address} answered SERVER_INFO with bad JSON: {exc}"
            ) from None
        if not isinstance(info, dict) or "server" not in info:
            raise ProtocolError(f"{self.address} answered SERVER_INFO without a 'server' object")
        return info

    def reserve(self, request: m.Reserve) -> m.ReserveReply:
        reply = self._driver.request(request)
        assert isinstance(reply, m.ReserveReply)
        return reply

    def release(self, reservation: int, secret: bytes) -> None:
        self._driver.request(m.Release(reservation, secret))

    @property
    def alive(self) -> bool:
        return self._driver.failure is None

    def close(self) -> None:
        self._driver.close(CLOSE_TIMEOUT)


def configured_credentials() -> tuple[ClientTls | None, str | None]:
    from .config import ConfigError, load_client_config

    try:
        config = load_client_config()
    except ConfigError:
        return None, None  # the caller's own use of the configuration reports it
    return config.tls, config.token or None


@dataclass
class ServerView:
    """What one server answered (or why it did not)."""

    server: Server
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # why it did not answer
    round_trip: float = 0.0  # seconds the query took
    connection: ControlConnection | None = None  # kept open when asked to

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def gpus(self) -> list[dict[str, Any]]:
        return list(self.info.get("gpus", []))

    @property
    def address(self) -> str:
        if self.connection is not None:
            return self.connection.address
        return str(self.info.get("server", {}).get("address") or self.server.addresses[0])


def query_servers(
    servers: tuple[Server, ...] | list[Server],
    timeout: float,
    *,
    detail: int = m.INFO_FULL,
    keep_open: bool = False,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> list[ServerView]:
    """Ask every server at once; each answers within ``timeout`` s or is marked with why not.
    With ``keep_open`` the control connections of those that answered stay open. ``tls`` and
    ``token``: the credentials of every connection (see ``ControlConnection``); by default the
    client configuration's (``config.load_client_config``)."""
    if tls is None and token is None:
        tls, token = configured_credentials()

    def ask(server: Server) -> ServerView:
        started = time.perf_counter()
        try:
            connection = ControlConnection.open(server, timeout, tls, token)
        except BitfusionError as exc:
            return ServerView(server, error=exc.message)
        try:
            info = connection.info(detail)
        except BitfusionError as exc:
            connection.close()
            return ServerView(server, error=f"{connection.address}: {exc.message}")
        info["server"]["reached_at"] = connection.address  # for --filter server.addr
        view = ServerView(server, info, round_trip=time.perf_counter() - started)
        if keep_open:
            view.connection = connection
        else:
            connection.close()
        return view

    if not servers:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(servers))) as pool:
        return list(pool.map(ask, servers))
