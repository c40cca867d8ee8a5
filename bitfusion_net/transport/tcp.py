"""TCP: addresses, listening and connecting for ``FrameConnection``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .connection import FrameConnection


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(url: str) -> TcpAddress:
    """Parse ``tcp://HOST:PORT`` (IPv6 hosts in brackets). Raises ValueError with the reason."""
    parts = urlsplit(url)
    if parts.scheme != "tcp":
        raise ValueError(f"unsupported address {url!r}: expected tcp://HOST:PORT")
    if not parts.hostname:
        raise ValueError(f"address {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"address {url!r} has an invalid port") from None
    if port is None:
        raise ValueError(f"address {url!r} has no port (use :0 to pick a free one)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"address {url!r} has unexpected parts after the port")
    return TcpAddress(parts.hostname, port)


ConnectionFactory = Callable[[], FrameConnection]


async def listen(address: TcpAddress, factory: ConnectionFactory) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, address.host, address.port, reuse_address=True)


async def connect(address: TcpAddress, factory: ConnectionFactory) -> FrameConnection:
    loop = asyncio.get_running_loop()
    _transport, connection = await loop.create_connection(factory, address.host, address.port)
    return connection
