"""``connect()``: open a session with a server and lease GPUs (or fractions of one) on it."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..protocol import ConnectionLostError, InvalidValueError
from ..protocol import messages as m
from ..transport import Stream, TcpAddress, parse_address
from ..transport import connect as tcp_connect
from ..units import parse_size
from .async_driver import AsyncDriver
from .calls import Call, Plan
from .device import RemoteDevice

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class LeaseRequest:
    """What ``connect`` asks the server for, checked before anything is sent."""

    address: TcpAddress
    hello: m.Hello
    timeout: float
    call_timeout: float | None = None

    @classmethod
    def make(
        cls,
        address: str,
        gpus: int,
        fraction: float | None,
        memory: str | int | None,
        mode: str,
        weight: float | None,
        client_name: str | None,
        timeout: float,
        call_timeout: float | None = None,
    ) -> LeaseRequest:
        try:
            target = parse_address(address)
        except ValueError as exc:
            raise InvalidValueError(str(exc)) from None
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= 0xFFFF:
            raise InvalidValueError(f"gpus must be an integer in 1..65535, got {gpus!r}")
        if fraction is not None and memory is not None:
            raise InvalidValueError("give either fraction or memory, not both")
        lease_fraction, lease_memory = 0.0, 0
        if memory is not None:
            try:
                lease_memory = parse_size(memory)
            except ValueError as exc:
                raise InvalidValueError(str(exc)) from None
            if not 0 < lease_memory <= 2**64 - 1:
                raise InvalidValueError(f"memory must be positive and fit in u64, got {memory!r}")
        else:
            lease_fraction = 1.0 if fraction is None else float(fraction)
            if not 0.0 < lease_fraction <= 1.0:
                raise InvalidValueError(f"fraction must be in (0, 1], got {lease_fraction}")
        if mode not in m.MODES:
            raise InvalidValueError(f"mode must be one of {sorted(m.MODES)}, got {mode!r}")
        if weight is not None and not (math.isfinite(weight) and 0 < weight <= 1000):
            raise InvalidValueError(f"weight must be in (0, 1000], got {weight}")
        if not timeout > 0:
            raise InvalidValueError(f"timeout must be positive, got {timeout}")
        if call_timeout is not None and not call_timeout > 0:
            raise InvalidValueError(f"call_timeout must be positive or None, got {call_timeout}")
        name = client_name if client_name is not None else socket.gethostname()
        hello = m.Hello(
            gpus,
            lease_fraction,
            lease_memory,
            name,
            weight=0.0 if weight is None else float(weight),
            mode=m.MODES[mode],
        )
        return cls(target, hello, timeout, call_timeout)

    def greet(self) -> Plan[m.HelloReply]:
        reply = yield Call(self.hello)
        return reply  # type: ignore[no-any-return]

    def unreachable(self, error: BaseException) -> ConnectionLostError:
        if isinstance(error, TimeoutError):
            return ConnectionLostError(f"no answer from {self.address} within {self.timeout} s")
        reason = getattr(error, "strerror", None) or error
        return ConnectionLostError(f"cannot connect to {self.address}: {reason}")


class Session:
    """A connection to one server and the GPUs leased on it (``devices``, numbered from 0).

    Closing the session (or losing the connection) releases the leases and frees their memory.
    """

    def __init__(self, driver: AsyncDriver, reply: m.HelloReply) -> None:
        self._driver = driver
        self.id = reply.session_id
        self.max_payload = reply.max_payload
        self.devices = [RemoteDevice(driver, grant, reply.max_payload) for grant in reply.devices]

    @property
    def closed(self) -> bool:
        return self._driver.failure is not None

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Release the session's GPUs. Queued no-reply work is sent first, for up to ``timeout`` s."""
        self._driver.close()
        stream = self._driver.stream
        try:
            await asyncio.wait_for(stream.wait_closed(), timeout)
        except TimeoutError:  # the server stopped reading; it frees the leases when we vanish
            stream.abort()
            await stream.wait_closed()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def open_session(request: LeaseRequest) -> Session:
    """Connect and lease; see ``connect``."""
    stream: Stream | None = None
    try:
        async with asyncio.timeout(request.timeout):
            stream = await tcp_connect(request.address, AsyncDriver)
            driver = stream.owner
            assert isinstance(driver, AsyncDriver)
            reply = await driver.run(request.greet())
            driver.call_timeout = request.call_timeout
    except BaseException as exc:
        if stream is not None:
            stream.abort()
        if isinstance(exc, OSError | TimeoutError):
            raise request.unreachable(exc) from None
        raise
    return Session(driver, reply)


class _SessionOpener:
    """What ``connect`` returns: await it for a Session, or use it with ``async with``."""

    def __init__(self, request: LeaseRequest) -> None:
        self._request = request
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        return open_session(self._request).__await__()

    async def __aenter__(self) -> Session:
        self._session = await open_session(self._request)
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
    call_timeout: float | None = None,
) -> _SessionOpener:
    """Lease ``gpus`` GPUs on the server at ``address`` (``tcp://HOST:PORT``).

    Each GPU is leased at ``fraction`` of the device (memory limit and compute weight; the default
    is a whole GPU) or with an explicit ``memory`` size such as ``"2GiB"``. ``mode="share"`` (the
    default) is work-conserving: the lease gets at least its share of the GPU's time whenever it
    has work, and more when others are idle; ``mode="cap"`` holds it to its fraction even on an
    idle GPU. ``weight`` sets the compute weight apart from the fraction. Use
    ``session = await connect(...)`` or ``async with connect(...) as session``.
    Raises InvalidValueError for a request that cannot be valid, CapacityError when the server
    cannot place the lease, ConnectionLostError when it cannot be reached within ``timeout`` s.
    ``call_timeout`` (seconds, default none) bounds how long any later call waits for its reply:
    past it the call raises ``CallTimeoutError`` and the session is closed. Without it a call
    to a server that stopped answering waits until TCP keepalive finds the connection dead.
    """
    return _SessionOpener(
        LeaseRequest.make(
            address, gpus, fraction, memory, mode, weight, client_name, timeout, call_timeout
        )
    )
