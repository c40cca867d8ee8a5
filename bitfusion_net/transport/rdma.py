"""RDMA streams on the event loop: the transport interface (``base.Stream``) over one RC QP.

The event-loop driver of the RDMA ring (``rdma_ring``: the credit protocol, the set-up hello; the
blocking client's driver is ``rdma_blocking``). ``rdma_stream_pair`` connects two ends in one
process; ``listen_rdma``/``connect_rdma`` (what ``transport.listen``/``connect`` do for an
``rdma://`` address) set a connection up over TCP to the same port. The provider is pyverbs, or,
with ``BITFUSION_NET_RDMA=simulator``, this process's simulated fabric (tests, and trying it out
without hardware).

- Writes queue (``QueuedStream``) and are copied slot by slot into staging as credits allow.
- The completion channel's fd is watched with ``loop.add_reader``: take the event, acknowledge
  it, re-arm, then drain the CQ (so a completion after the drain signals again).
- A paused owner stops deliveries, hence reposts, hence the peer's credits: back-pressure.
  ``close`` sends CLOSE once everything queued is; ``abort`` sends ABORT. A peer that vanished
  shows as a failed send (``RETRY_EXC_ERR``), which ``peer_alive`` provokes with a zero-length
  RDMA WRITE, or as the end of the TCP connection the set-up went over, which stays open for
  that.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import QueuedStream, StreamOwner
from .rdma_ring import (
    ABORT,
    CLOSE,
    CREDIT,
    LINGER_S,
    MAX_PENDING_SETUPS,
    PROVIDER_ENV,
    READY,
    SETUP_TIMEOUT_S,
    DeviceSettings,
    Ring,
    RingConfig,
    RingEnd,
    RingFailed,
    connect_to,
    default_provider,
    hello,
    read_hello,
)
from .verbs.api import Provider, VerbsError

if TYPE_CHECKING:
    from .tcp import TcpAddress  # tcp imports this module (lazily) for rdma:// addresses

log = logging.getLogger(__name__)

__all__ = [
    "PROVIDER_ENV", "RdmaStream", "RingConfig", "connect_rdma", "default_provider",
    "listen_rdma", "rdma_stream_pair",
]  # fmt: skip


class RdmaStream(QueuedStream):
    """One end of an RDMA connection on the event loop (see the module docstring)."""

    def __init__(self, name: str, ring: Ring) -> None:
        self.peer = name
        self.owner: StreamOwner | None = None
        self._ring = ring
        self._init_queue(asyncio.get_running_loop(), ring.config.queue_limit)
        self._paused = False
        self._fd: int | None = None  # the completion channel's, watched by the loop
        self._control: asyncio.StreamWriter | None = None  # the set-up's TCP connection
        self._watcher: asyncio.Task[None] | None = None

    def start(self, owner: StreamOwner) -> None:
        self.owner = owner
        end = self._ring.end
        self._fd = end.channel.fd
        self._loop.add_reader(self._fd, self._on_event)
        end.recv_cq.req_notify()
        self._service()

    # -- Stream (``write`` is QueuedStream's: queued, flushed once a loop iteration) ----------
    def flush(self) -> None:
        self._pump()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused and not self._closed:
            self._paused = False
            self._loop.call_soon(self._service)

    def close(self) -> None:
        if not self._closed and not self._closing:
            self._closing = True
            self._pump()

    def abort(self) -> None:
        if not self._closed:
            self._queue.clear()
            try:
                self._ring.send_control(ABORT)
            except RingFailed:
                pass  # it is gone already: a reset either way
            self._finish(None)

    def peer_alive(self) -> bool:
        if self._closed or not self._take_receives() or self._ring.peer_closed:
            return False
        if not self._ring.connected:
            return False
        try:
            self._ring.probe()
        except RingFailed as failure:
            self._failed(failure)
            return False
        return True

    # -- sending --------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Send what credits allow: queued bytes in slot-sized writes, then a CLOSE once
        everything is out, or a CREDIT message when enough credits are owed."""
        if self._closed:
            return
        ring = self._ring
        try:
            ring.reap_sends()
            while self._queue and ring.can_send_data:
                filled, handed = ring.send_from(self._queue)
                self._queued -= filled
                for on_sent in handed:  # copied into staging: the caller may reuse its buffer
                    on_sent()
                if self._queued <= self._queue_limit:
                    self._wake_drain_waiters()
            if self._closing and not self._queue and not self._closed:
                if ring.can_close:  # else the next credits returned let it go
                    ring.send_control(CLOSE)
                    self._finish(None)
            elif ring.credit_due:
                ring.send_control(CREDIT)
        except RingFailed as failure:
            self._failed(failure)

    # -- receiving ------------------------------------------------------------------------------
    def _on_event(self) -> None:
        end = self._ring.end
        try:
            cq = end.channel.get_event()
        except BlockingIOError:
            return  # a spurious wake-up
        except VerbsError:
            return
        cq.ack_events(1)
        cq.req_notify()  # re-armed before draining: a completion after the drain signals
        self._service()

    def _service(self) -> None:
        if self._closed or not self._take_receives():
            return
        self._deliver()
        self._pump()

    def _take_receives(self) -> bool:
        """Account for what was received; False once the stream is closed."""
        try:
            self._ring.take_receives()
        except RingFailed as failure:
            self._failed(failure)
        if self._ring.aborted:
            self._finish(ConnectionResetError("the peer aborted the connection"))
        return not self._closed

    def _deliver(self) -> None:
        """Copy written slots into the owner's buffers while it reads."""
        ring = self._ring
        while ring.readable and not self._paused and not self._closed and self.owner is not None:
            count = ring.read_into(self.owner.get_buffer())
            if count:
                self.owner.buffer_updated(count)
        if ring.ended and not self._closed:
            self._finish(None)

    # -- ending ---------------------------------------------------------------------------------
    def _failed(self, failure: RingFailed) -> None:
        if self._closed:
            return
        error = self._ring.explain(failure)
        if error is not None:
            self._finish(error)
        # else the peer closed and tore down: the rest is delivered, then the stream ends

    def _peer_gone(self) -> None:
        """The set-up's TCP connection ended: the peer's process is gone, or it closed."""
        if not self._closed:
            self._failed(RingFailed(None, "the set-up connection ended"))
            if not self._closed and self._ring.ended:
                self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._queue.clear()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self._mark_closed()
        self._release(self._loop.time() + LINGER_S)
        if self.owner is not None:
            self.owner.connection_lost(error)

    def _release(self, deadline: float) -> None:
        """Tear the end down once what it posted has completed (a CLOSE must reach the peer
        before the set-up connection's end does), or at ``deadline``."""
        if self._ring.sending and self._loop.time() < deadline:
            self._loop.call_later(0.001, self._release, deadline)
            return
        if self._control is not None:
            self._control.close()  # the peer's watcher sees its end
        self._ring.end.close()


def rdma_stream_pair(
    provider: Provider,
    devices: tuple[str | None, str | None] = (None, None),
    config: RingConfig | None = None,
) -> tuple[RdmaStream, RdmaStream]:
    """Two connected ends in this process (on the simulator: two devices of one fabric). Call
    ``start(owner)`` on each before writing. Must run on the event loop."""
    config = config or RingConfig()
    first = RingEnd(provider, DeviceSettings(devices[0]), config)
    second = RingEnd(provider, DeviceSettings(devices[1]), config)
    a_end, b_end = first.qp.endpoint(psn=0x1234), second.qp.endpoint(psn=0x4321)
    first.qp.connect(b_end)
    second.qp.connect(a_end)
    a_ring, b_ring = Ring(first, config), Ring(second, config)
    a_ring.join(second.ring.addr, second.ring.rkey)
    b_ring.join(first.ring.addr, first.ring.rkey)
    return RdmaStream(f"rdma:{first.ctx.name}", a_ring), RdmaStream(
        f"rdma:{second.ctx.name}", b_ring
    )


# -- set-up over TCP ------------------------------------------------------------------------------
def _watch(stream: RdmaStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep the set-up's TCP connection: its end is a dead peer's surest sign."""
    stream._control = writer

    async def watch() -> None:
        try:
            while await reader.read(4096):
                pass  # nothing is sent on it after the set-up
        except (ConnectionError, OSError):
            pass
        stream._peer_gone()

    stream._watcher = asyncio.get_running_loop().create_task(watch())


async def connect_rdma(
    address: TcpAddress,
    owner_factory: Callable[[RdmaStream], StreamOwner],
    provider: Provider | None = None,
    config: RingConfig | None = None,
) -> RdmaStream:
    """Connect to ``rdma://HOST:PORT``: the set-up over TCP to that port, then the stream.
    Raises ``ConnectionError`` (``RdmaUnavailable`` saying what is missing, a refusal, a
    peer that went away during the set-up), ``OSError``, or ``TimeoutError``."""
    provider = provider or default_provider()
    config = config or RingConfig()
    settings = DeviceSettings.from_environment()
    async with asyncio.timeout(SETUP_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        try:
            end = RingEnd(provider, settings, config)
        except VerbsError as exc:
            writer.close()
            raise ConnectionError(f"the RDMA set-up failed: {exc}") from None
        try:
            writer.write(hello(end, config, secrets.randbelow(1 << 24)))
            await writer.drain()
            ring = connect_to(end, config, read_hello(await reader.readline(), config))
            writer.write(READY)
            await writer.drain()
        except BaseException as exc:
            end.close()
            writer.close()
            if isinstance(exc, VerbsError):
                raise ConnectionError(f"the RDMA set-up failed: {exc}") from None
            raise
    stream = RdmaStream(address.host_port, ring)
    stream.start(owner_factory(stream))
    _watch(stream, reader, writer)
    return stream


async def listen_rdma(
    address: TcpAddress,
    owner_factory: Callable[[RdmaStream], StreamOwner],
    *,
    backlog: int = 1024,
    provider: Provider | None = None,
    config: RingConfig | None = None,
    max_pending: int = MAX_PENDING_SETUPS,
) -> asyncio.Server:
    """Accept ``rdma://`` connections: the TCP listener their set-up goes over (its sockets
    name the port). At most ``max_pending`` set-ups hold a registered end at once (from the
    client's hello to its ``ready``); a hello beyond them is refused (the connection closed).
    Raises
    ``RdmaUnavailable`` at once where RDMA cannot be used."""
    provider = provider or default_provider()
    config = config or RingConfig()
    settings = DeviceSettings.from_environment()
    settings.check(provider)
    holding = 0  # set-ups holding a registered end

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal holding
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if peer else "?"
        end: RingEnd | None = None
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                document = read_hello(await reader.readline(), config)
                if holding >= max_pending:
                    log.warning("refused an RDMA set-up from %s: %d under way", name, holding)
                    raise ConnectionRefusedError("too many RDMA set-ups under way")
                end = RingEnd(provider, settings, config)
                holding += 1
                ring = connect_to(end, config, document)
                writer.write(hello(end, config, secrets.randbelow(1 << 24)))
                await writer.drain()
                if await reader.readline() != READY:
                    raise ConnectionResetError("the client left during the RDMA set-up")
        except BaseException as exc:  # a cancelled accept (the server closing) frees it too
            if end is not None:
                end.close()
            writer.close()
            if isinstance(exc, OSError | TimeoutError | VerbsError | ValueError):
                return
            raise
        finally:
            if end is not None:
                holding -= 1
        stream = RdmaStream(name, ring)
        stream.start(owner_factory(stream))
        _watch(stream, reader, writer)

    return await asyncio.start_server(
        accept, address.host, address.port, backlog=backlog, reuse_address=True
    )
