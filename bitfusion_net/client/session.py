"""``connect()``: open a session with a server and lease GPUs (or fractions of one) on it."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Generator
from types import TracebackType
from typing import Any

from ..protocol import DEFAULT_LIMITS, ConnectionLostError, InvalidValueError, Limits
from ..protocol import messages as m
from ..transport import FrameConnection, parse_address
from ..transport import connect as tcp_connect
from ..units import parse_size
from .core import ClientCore
from .device import RemoteDevice

DEFAULT_CONNECT_TIMEOUT = 10.0
# The client only receives payloads it asked for, into buffers it owns; it accepts what it requested.
_CLIENT_LIMITS = Limits(max_metadata=DEFAULT_LIMITS.max_metadata, max_payload=2**63 - 1)


class Session:
    """A connection to one server and the GPUs leased on it (``devices``, numbered from 0).

    Closing the session (or losing the connection) releases the leases and frees their memory.
    """

    def __init__(self, core: ClientCore, reply: m.HelloReply) -> None:
        self._core = core
        self.id = reply.session_id
        self.max_payload = reply.max_payload
        self.devices = [RemoteDevice(core, grant, reply.max_payload) for grant in reply.devices]

    @property
    def closed(self) -> bool:
        return self._core.failure is not None

    async def close(self, timeout: float = 10.0) -> None:
        """Release the session's GPUs. Queued no-reply work is sent first, for up to ``timeout`` s."""
        self._core.close()
        connection = self._core.connection
        try:
            await asyncio.wait_for(connection.wait_closed(), timeout)
        except TimeoutError:  # the server stopped reading; it frees the leases when we vanish
            connection.abort()
            await connection.wait_closed()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _scheduling_request(mode: str, weight: float | None) -> tuple[int, float]:
    if mode not in m.MODES:
        raise InvalidValueError(f"mode must be one of {sorted(m.MODES)}, got {mode!r}")
    if weight is not None and not (math.isfinite(weight) and 0 < weight <= 1000):
        raise InvalidValueError(f"weight must be in (0, 1000], got {weight}")
    return m.MODES[mode], 0.0 if weight is None else float(weight)


def _lease_request(fraction: float | None, memory: str | int | None) -> tuple[float, int]:
    if fraction is not None and memory is not None:
        raise InvalidValueError("give either fraction or memory, not both")
    if memory is not None:
        size = parse_size(memory)
        if size <= 0:
            raise InvalidValueError("memory must be positive")
        return 0.0, size
    value = 1.0 if fraction is None else float(fraction)
    if not 0.0 < value <= 1.0:
        raise InvalidValueError(f"fraction must be in (0, 1], got {value}")
    return value, 0


async def open_session(
    address: str,
    gpus: int = 1,
    fraction: float | None = None,
    memory: str | int | None = None,
    *,
    mode: str = "share",
    weight: float | None = None,
    client_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Session:
    """Connect and lease; see ``connect``."""
    target = parse_address(address)
    if gpus < 1:
        raise InvalidValueError("gpus must be at least 1")
    lease_fraction, lease_memory = _lease_request(fraction, memory)
    mode_code, lease_weight = _scheduling_request(mode, weight)
    name = client_name if client_name is not None else socket.gethostname()

    def factory() -> FrameConnection:
        return FrameConnection(lambda connection: ClientCore(connection, _CLIENT_LIMITS))

    try:
        async with asyncio.timeout(timeout):
            connection = await tcp_connect(target, factory)
            core = connection.handler
            assert isinstance(core, ClientCore)
            try:
                hello = m.Hello(
                    gpus, lease_fraction, lease_memory, name, weight=lease_weight, mode=mode_code
                )
                reply = await core.request(hello)
            except BaseException:
                connection.abort()
                raise
    except TimeoutError:
        raise ConnectionLostError(f"no answer from {target} within {timeout} s") from None
    except OSError as exc:
        raise ConnectionLostError(f"cannot connect to {target}: {exc.strerror or exc}") from None
    return Session(core, reply)


class _SessionOpener:
    """What ``connect`` returns: await it for a Session, or use it with ``async with``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        return open_session(*self._args, **self._kwargs).__await__()

    async def __aenter__(self) -> Session:
        self._session = await open_session(*self._args, **self._kwargs)
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()


def connect(
    address: str,
    gpus: int = 1,
    fraction: float | None = None,
    memory: str | int | None = None,
    *,
    mode: str = "share",
    weight: float | None = None,
    client_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> _SessionOpener:
    """Lease ``gpus`` GPUs on the server at ``address`` (``tcp://HOST:PORT``).

    Each GPU is leased at ``fraction`` of the device (memory limit and compute weight; the default
    is a whole GPU) or with an explicit ``memory`` size such as ``"2GiB"``. ``mode="share"`` (the
    default) is work-conserving: the lease gets at least its share of the GPU's time whenever it
    has work, and more when others are idle; ``mode="cap"`` holds it to its fraction even on an
    idle GPU. ``weight`` sets the compute weight apart from the fraction. Use
    ``session = await connect(...)`` or ``async with connect(...) as session``.
    Raises CapacityError when the server cannot place the lease, ConnectionLostError when it
    cannot be reached within ``timeout`` seconds.
    """
    return _SessionOpener(
        address,
        gpus,
        fraction,
        memory,
        mode=mode,
        weight=weight,
        client_name=client_name,
        timeout=timeout,
    )
