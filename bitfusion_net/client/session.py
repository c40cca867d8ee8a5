"""``connect()``: open a session with a server and lease GPUs (or fractions of one) on it, or
attach to a reservation's GPUs, which may be on several servers (a pool)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import socket
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from ..protocol import BitfusionError, ConnectionLostError, InvalidValueError
from ..protocol import messages as m
from ..transport import ClientTls, Stream, TcpAddress, TlsError, parse_address
from ..transport import connect as tcp_connect
from ..units import parse_size
from .async_driver import AsyncDriver
from .calls import Call, Plan
from .device import RemoteDevice
from .lease import ServerReservation, lease_from_environment

TOKEN_ENV = "BITFUSION_NET_TOKEN"  # the token connect() sends when given none

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class LeaseRequest:
    """What ``connect`` asks the server for, checked before anything is sent."""

    address: TcpAddress
    greeting: m.Hello | m.Attach
    timeout: float
    call_timeout: float | None = None
    tls: ClientTls | None = None  # TLS settings; TLS is used with them or when address says tls://
    token: str | None = None  # sent first (AUTHENTICATE), for servers that use tokens

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
        tls: ClientTls | None = None,
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
        return cls(target, hello, timeout, call_timeout, _check_tls(tls))

    @classmethod
    def attach(
        cls,
        server: ServerReservation,
        client_name: str | None,
        timeout: float,
        call_timeout: float | None,
        tls: ClientTls | None = None,
    ) -> LeaseRequest:
        """Use the part of a reservation on one server (ATTACH instead of HELLO)."""
        try:
            target = parse_address(server.address)
        except ValueError as exc:
            raise InvalidValueError(f"the reservation file names a bad address: {exc}") from None
        name = client_name if client_name is not None else program_name()
        greeting = m.Attach(server.reservation, server.secret, server.server_id, name)
        return cls(target, greeting, timeout, call_timeout, _check_tls(tls))

    def greet(self) -> Plan[m.HelloReply]:
        if self.token is None:
            reply = yield Call(self.greeting)
            return reply  # type: ignore[no-any-return]
        # The greeting goes right behind the token: one round trip, not two.
        _, reply = yield (Call(m.Authenticate(self.token)), Call(self.greeting))
        return reply  # type: ignore[no-any-return]

    def unreachable(self, error: BaseException) -> ConnectionLostError:
        """What connecting failing with ``error`` (raised by the transport) means to the user."""
        if isinstance(error, TimeoutError):
            return ConnectionLostError(f"no answer from {self.address} within {self.timeout} s")
        if isinstance(error, TlsError):  # its message names the server and what to do
            return ConnectionLostError(str(error))
        reason = getattr(error, "strerror", None) or error
        return ConnectionLostError(f"cannot connect to {self.address}: {reason}")


def _check_tls(tls: ClientTls | None) -> ClientTls | None:
    if tls is not None and not isinstance(tls, ClientTls):
        raise InvalidValueError(f"tls must be a ClientTls or None, got {tls!r}")
    return tls


def program_name(command: str | None = None) -> str:
    """How a program attached to a reservation is named in listings: host, pid, command."""
    if command is None:
        path = sys.argv[0] if sys.argv and sys.argv[0] else "python"
        command = os.path.basename(path)
        if command == "__main__.py":  # python -m PACKAGE
            command = os.path.basename(os.path.dirname(path))
    return f"{socket.gethostname()} pid {os.getpid()} {command}"


def lease_requests(
    address: str | None,
    gpus: int,
    fraction: float | None,
    memory: str | int | None,
    mode: str,
    weight: float | None,
    client_name: str | None,
    timeout: float,
    call_timeout: float | None,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> list[LeaseRequest]:
    """What ``connect`` opens: one HELLO to ``address``, or without one an ATTACH to each server
    of the reservation in ``BITFUSION_NET_LEASE``. The token is ``token``, else the
    reservation's, else ``$BITFUSION_NET_TOKEN``; none: the server must not need one."""
    if token is not None and not isinstance(token, str):
        raise InvalidValueError(f"token must be a string, got {type(token).__name__}")
    token = token or os.environ.get(TOKEN_ENV) or None
    if address is not None:
        return [
            _with_token(
                LeaseRequest.make(
                    address,
                    gpus,
                    fraction,
                    memory,
                    mode,
                    weight,
                    client_name,
                    timeout,
                    call_timeout,
                    tls,
                ),
                token,
            )
        ]
    if gpus != 1 or fraction is not None or memory is not None or weight is not None:
        raise InvalidValueError(
            "gpus, fraction, memory and weight are the reservation's when connect() is given "
            "no address; give an address to lease GPUs directly"
        )
    if not timeout > 0:
        raise InvalidValueError(f"timeout must be positive, got {timeout}")
    _, lease = lease_from_environment()
    if tls is None and lease.tls_files:
        files = lease.tls_files
        tls = ClientTls(
            ca_file=files.get("ca"), cert_file=files.get("cert"), key_file=files.get("key")
        )
    return [
        _with_token(
            LeaseRequest.attach(server, client_name, timeout, call_timeout, tls),
            lease.token or token,
        )
        for server in lease.servers
    ]


def _with_token(request: LeaseRequest, token: str | None) -> LeaseRequest:
    return dataclasses.replace(request, token=token) if token else request


class Session:
    """Connections to one server or several (a pool) and the GPUs leased on them (``devices``,
    numbered from 0 across all of them, whatever their numbers on their servers).

    Closing the session (or losing a connection) releases the leases and frees their memory; a
    reservation's GPUs stay reserved for the next program. When one server of a pool fails,
    only its devices fail; the others go on.
    """

    def __init__(self, parts: list[tuple[LeaseRequest, AsyncDriver, m.HelloReply]]) -> None:
        self._drivers = [driver for _, driver, _ in parts]
        self._driver = self._drivers[0]
        self.id = parts[0][2].session_id
        self.max_payload = min(reply.max_payload for _, _, reply in parts)
        self.devices: list[RemoteDevice] = number_devices(parts, RemoteDevice)

    @property
    def closed(self) -> bool:
        """Whether every connection of the session is over."""
        return all(driver.failure is not None for driver in self._drivers)

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Release the session's GPUs. Queued no-reply work is sent first, for up to ``timeout`` s."""
        await asyncio.gather(*(_close_driver(driver, timeout) for driver in self._drivers))

    async def memcpy_peer(
        self, dst_device: int, dst: int, src_device: int, src: int, nbytes: int
    ) -> None:
        """Copy ``nbytes`` from ``src`` on device ``src_device`` to ``dst`` on ``dst_device``.
        Within one device this is ``memcpy_dtod``. Between devices (on one server or on two)
        the bytes come to this client and go out again, in chunks of up to ``max_payload``
        (8 MiB at most), each read while the one before is sent: it costs two network
        transfers of the data, not a device-to-device copy."""
        source, target = self.devices[src_device], self.devices[dst_device]
        if source is target:
            await source.memcpy_dtod(dst, src, nbytes)
            return
        # Two host buffers, so that chunk i goes out while chunk i + 1 comes in.
        sending: asyncio.Task[None] | None = None
        try:
            for offset, view in peer_chunks(nbytes, self.max_payload, buffers=2):
                await source.memcpy_dtoh(view, src + offset)  # this buffer's last send is done
                if sending is not None:
                    await sending
                sending = asyncio.ensure_future(target.memcpy_htod(dst + offset, view))
            if sending is not None:
                await sending
        finally:
            if sending is not None and not sending.done():
                # A read failed: the error raised is the read's; the send ends on its own.
                sending.add_done_callback(lambda task: task.cancelled() or task.exception())
                await asyncio.wait([sending])

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


PEER_CHUNK = 8 * 2**20  # host bytes a cross-device copy holds at a time
D = TypeVar("D")


def number_devices(
    parts: Sequence[tuple[LeaseRequest, Any, m.HelloReply]], make: Callable[..., D]
) -> list[D]:
    """The devices of every connection of a session, numbered 0..N-1 across all of them (both
    APIs: ``make`` is ``RemoteDevice`` or ``SyncRemoteDevice``)."""
    devices: list[D] = []
    for request, driver, reply in parts:
        for grant in reply.devices:
            devices.append(
                make(driver, grant, reply.max_payload, len(devices), str(request.address))
            )
    return devices


def peer_chunks(
    nbytes: int, max_payload: int, buffers: int = 1
) -> Iterator[tuple[int, memoryview]]:
    """(offset, host buffer) of each chunk of a copy between devices through this client, the
    chunks taking ``buffers`` buffers in turn (one: each chunk is sent before the next is read;
    two: a chunk may be read while the one before it is sent)."""
    size = min(max(nbytes, 0), max_payload, PEER_CHUNK)
    pool = [bytearray(size) for _ in range(buffers if nbytes > size else 1)]
    for number, offset in enumerate(range(0, nbytes, size or 1)):
        yield offset, memoryview(pool[number % len(pool)])[: min(size, nbytes - offset)]


async def _close_driver(driver: AsyncDriver, timeout: float) -> None:
    driver.close()
    stream = driver.stream
    try:
        await asyncio.wait_for(stream.wait_closed(), timeout)
    except TimeoutError:  # the server stopped reading; it frees the leases when we vanish
        stream.abort()
        await stream.wait_closed()


async def open_session(requests: list[LeaseRequest]) -> Session:
    """Connect and lease on every server at once; see ``connect``. If one fails, those that
    succeeded are closed again and its error is raised."""
    results = await asyncio.gather(*(_greet(r) for r in requests), return_exceptions=True)
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for result in results:
            if not isinstance(result, BaseException):
                result[0].stream.abort()
        raise failure
    return Session([(request, *result) for request, result in zip(requests, results, strict=True)])  # type: ignore[misc]


async def _greet(request: LeaseRequest) -> tuple[AsyncDriver, m.HelloReply]:
    stream: Stream | None = None
    try:
        async with asyncio.timeout(request.timeout):
            try:
                stream = await tcp_connect(request.address, AsyncDriver, tls=request.tls)
            except ValueError as exc:  # the TLS settings' files cannot be used
                raise InvalidValueError(str(exc)) from None
            driver = stream.owner
            assert isinstance(driver, AsyncDriver)
            reply = await driver.run(request.greet())
            driver.call_timeout = request.call_timeout
    except BaseException as exc:
        if stream is not None:
            stream.abort()
        if isinstance(exc, OSError | TimeoutError) and not isinstance(exc, BitfusionError):
            raise request.unreachable(exc) from None
        raise
    return driver, reply


class _SessionOpener:
    """What ``connect`` returns: await it for a Session, or use it with ``async with``."""

    def __init__(self, requests: list[LeaseRequest]) -> None:
        self._requests = requests
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        return open_session(self._requests).__await__()

    async def __aenter__(self) -> Session:
        self._session = await open_session(self._requests)
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
    address: str | None = None,
    gpus: int = 1,
    fraction: float | None = None,
    memory: str | int | None = None,
    *,
    mode: str = "share",
    weight: float | None = None,
    client_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    call_timeout: float | None = None,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> _SessionOpener:
    """Lease ``gpus`` GPUs on the server at ``address`` (``tcp://HOST:PORT``); with no address,
    use the reservation named by ``BITFUSION_NET_LEASE`` (set by ``bitfusion-net run``, or by
    ``request_gpus --shell``), whose GPUs may be on several servers.

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
    ``tls`` (``ClientTls``: CA file, client certificate and key, server name) connects with TLS;
    an address ``tls://HOST:PORT`` does too, with the system's CAs when ``tls`` is None. A TLS
    failure (a server without TLS, an untrusted certificate, a client certificate refused)
    raises ConnectionLostError saying which; TLS files that cannot be used, InvalidValueError.
    ``token`` (default ``$BITFUSION_NET_TOKEN``, or the reservation's) is presented first, for a
    server that uses tokens: one that refuses it, or needs one and got none, raises
    ``AuthenticationError`` saying why; a request past the user's quota, ``QuotaExceededError``.
    """
    return _SessionOpener(
        lease_requests(
            address,
            gpus,
            fraction,
            memory,
            mode,
            weight,
            client_name,
            timeout,
            call_timeout,
            tls,
            token,
        )
    )
