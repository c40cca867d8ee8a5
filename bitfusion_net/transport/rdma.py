"""RDMA streams: the transport interface (``base.Stream``) over one RC queue pair.

The stream engine, on the verbs interface (issue 16): ``rdma_stream_pair`` connects two ends in
one process; ``listen_rdma``/``connect_rdma`` (what ``transport.listen``/``connect`` do for an
``rdma://`` address) set a connection up over TCP to the same port. Not yet here: the blocking
client's variant (docs/RDMA.md). The provider is pyverbs, or, with ``BITFUSION_NET_RDMA=
simulator``, this process's simulated fabric (tests, and trying it out without hardware). How
it works:

- Each end registers a ring of ``slots`` x ``slot_size`` bytes the peer writes into, and a send
  staging area of the same shape. A frame's bytes are copied into staging and written into the
  peer's next ring slot with ``RDMA_WRITE_WITH_IMM``, which also consumes one of the receives the
  peer keeps posted: the completion says a slot is full (its length is the completion's
  ``byte_len``).
- Credits are the peer's posted receives and free ring slots as this end knows them; nothing is
  sent without one, so there is never an RNR. The receiver reposts a slot's receive once the
  slot is delivered to its owner, and reports what it reposted in the immediate data of its
  next message (``kind`` 2 bits, receives 15, slots 15), or in a zero-length CREDIT message once
  ``credit_batch`` are owed. Data never takes the last ``reserve`` credits, so that credit
  returns, CLOSE and ABORT always have one: two ends that both write and both read cannot
  deadlock waiting for each other's credits.
- A paused owner stops deliveries, hence reposts, hence the peer's credits: back-pressure. CLOSE
  is sent once everything queued is; the peer delivers what came before, then loses the
  connection with None. ABORT is a reset. A peer that vanished shows as a failed send
  (``RETRY_EXC_ERR``), which ``peer_alive`` provokes with a zero-length RDMA WRITE, or as the end
  of the TCP connection the set-up went over, which stays open for that.
- Set-up: the client sends a JSON hello line (its QP endpoint, its ring's address and rkey, the
  ring's shape), the server creates its end, connects, posts its receives and answers with its
  own hello; the client connects, posts its receives and says ``ready``; only then does either
  write over RDMA. No rdma_cm: its calls block holding the GIL.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .base import QueuedStream, StreamOwner
from .verbs.api import (
    Access,
    Provider,
    QpState,
    VerbsError,
    WcOpcode,
    WcStatus,
    WorkCompletion,
    WrOpcode,
)

if TYPE_CHECKING:
    from .tcp import TcpAddress  # tcp imports this module (lazily) for rdma:// addresses

DATA, CREDIT, CLOSE, ABORT = 0, 1, 2, 3
PROVIDER_ENV = "BITFUSION_NET_RDMA"  # "simulator": this process's simulated fabric
SETUP_TIMEOUT_S = 30.0
MAX_HELLO = 4096
_FIELD = (1 << 15) - 1
DEFAULT_QUEUE_LIMIT = 8 * 2**20


def _imm(kind: int, receives: int, slots: int) -> int:
    return kind << 30 | receives << 15 | slots


@dataclass(frozen=True)
class RingConfig:
    """The shape of one end's buffers and credits."""

    slots: int = 16
    slot_size: int = 64 * 1024
    control: int = 8  # receives beyond the ring's, for CREDIT, CLOSE and ABORT
    credit_batch: int = 4  # owed credits that make a CREDIT message worth sending
    queue_limit: int = DEFAULT_QUEUE_LIMIT

    @property
    def receives(self) -> int:
        return self.slots + self.control

    @property
    def reserve(self) -> int:
        """Credits data leaves for control messages."""
        return self.credit_batch + 1

    def __post_init__(self) -> None:
        if not 1 <= self.slots <= _FIELD or self.slot_size < 1:
            raise ValueError(f"a ring has 1..{_FIELD} slots of at least one byte")
        if not 1 <= self.credit_batch <= self.slots:
            # A sender blocked on a full ring is owed ``slots`` credits: at least a batch.
            raise ValueError("the credit batch must be 1..slots, or a full ring is never repaid")
        if self.control <= self.credit_batch + 1:
            raise ValueError("control receives must exceed the credit batch by more than one")


class _End:
    """One end's verbs resources: context, PD, CQs, ring, staging and QP."""

    def __init__(self, provider: Provider, device: str | None, config: RingConfig) -> None:
        self.ctx = provider.open(device)
        self.pd = self.ctx.alloc_pd()
        self.channel = self.ctx.create_comp_channel()
        self.recv_cq = self.ctx.create_cq(config.receives, self.channel)
        self.send_cq = self.ctx.create_cq(config.receives + 4)
        size = config.slots * config.slot_size
        self.ring_memory, self.stage_memory = bytearray(size), bytearray(size)
        self.ring = self.pd.register(self.ring_memory, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        self.stage = self.pd.register(self.stage_memory, Access.LOCAL_WRITE)
        self.qp = self.pd.create_qp(
            self.send_cq, self.recv_cq, max_send_wr=config.receives + 4, max_recv_wr=config.receives
        )

    def close(self) -> None:
        """Tear down in verbs' order; what the peer still sends fails at its end."""
        for step in (
            self.qp.close,
            self.ring.deregister,
            self.stage.deregister,
            self._close_cqs,
            self.channel.close,
            self.pd.close,
            self.ctx.close,
        ):
            try:
                step()
            except VerbsError:
                pass

    def _close_cqs(self) -> None:
        # Every event taken was acknowledged at once (``RdmaStream._on_event``): nothing keeps
        # the CQs from closing.
        self.recv_cq.close()
        self.send_cq.close()


class RdmaStream(QueuedStream):
    """One end of an RDMA connection (made by ``rdma_stream_pair``)."""

    def __init__(self, name: str, end: _End, config: RingConfig) -> None:
        self.peer = name
        self.owner: StreamOwner | None = None
        self._end, self._config = end, config
        self._init_queue(asyncio.get_running_loop(), config.queue_limit)
        self._remote_addr = 0
        self._remote_rkey = 0
        # Sending: the peer's posted receives and free ring slots, as this end knows them.
        self._credits = config.receives
        self._slots_free = config.slots
        self._send_slot = 0
        # Receiving: slots written and not yet delivered [slot, length, delivered so far].
        self._recv_slot = 0
        self._pending: deque[list[int]] = deque()
        self._owed_receives = 0
        self._owed_slots = 0
        self._paused = False
        self._peer_closed = False  # CLOSE received: deliver what came before, then lose
        self._fd: int | None = None  # the completion channel's, watched by the loop
        self._control: asyncio.StreamWriter | None = None  # the set-up's TCP connection
        self._watcher: asyncio.Task[None] | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def _join(self, remote_addr: int, remote_rkey: int) -> None:
        self._remote_addr, self._remote_rkey = remote_addr, remote_rkey
        for _ in range(self._config.receives):
            self._end.qp.post_recv(0, None)

    def start(self, owner: StreamOwner) -> None:
        self.owner = owner
        self._fd = self._end.channel.fd
        self._loop.add_reader(self._fd, self._on_event)
        self._end.recv_cq.req_notify()
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
            self._send_control(ABORT)
            self._finish(None)

    def peer_alive(self) -> bool:
        if self._closed or not self._take_receives() or self._peer_closed:
            return False
        if not self._connected():
            return False
        try:  # a zero-length write checks no rkey and consumes no receive: only an ACK
            self._end.qp.post_send(0, WrOpcode.RDMA_WRITE, None, remote_addr=self._remote_addr)
        except VerbsError:
            return False
        return self._reap_sends()

    # -- sending --------------------------------------------------------------------------------
    def _reap_sends(self) -> bool:
        """Poll send completions (freeing send-queue slots); False if one failed: the peer is
        gone or broke the connection, which is then lost (unless it had closed)."""
        try:
            completions = self._end.send_cq.poll(64)
            while completions:
                for wc in completions:
                    if not wc.ok:
                        self._peer_failed(wc.status)
                        return False
                completions = self._end.send_cq.poll(64)
        except VerbsError:
            self._peer_failed(None)
            return False
        return True

    def _pump(self) -> None:
        """Send what credits allow: queued bytes in slot-sized writes, then a CLOSE once
        everything is out, or a CREDIT message when enough credits are owed."""
        if self._closed or not self._reap_sends():
            return
        size = self._config.slot_size
        while self._queue and self._slots_free and self._credits > self._config.reserve:
            slot = self._send_slot
            stage = self._end.stage.view[slot * size : (slot + 1) * size]
            filled, handed = 0, []
            while self._queue and filled < size:
                data, on_sent = self._queue[0]
                count = min(len(data), size - filled)
                stage[filled : filled + count] = data[:count]
                filled += count
                if count == len(data):
                    self._queue.popleft()
                    if on_sent is not None:
                        handed.append(on_sent)
                else:
                    self._queue[0] = (data[count:], on_sent)
            self._queued -= filled
            if not self._post(DATA, slot, filled):
                return
            self._slots_free -= 1
            self._send_slot = (slot + 1) % self._config.slots
            for on_sent in handed:  # copied into staging: the caller may reuse its buffer
                on_sent()
            if self._queued <= self._queue_limit:
                self._wake_drain_waiters()
        if self._closing and not self._queue and not self._closed:
            if self._credits >= 1:  # else the next credits returned let it go
                self._send_control(CLOSE)
                self._finish(None)
        elif self._owed_receives >= self._config.credit_batch and self._credits >= 2:
            self._send_control(CREDIT)  # one credit always stays for a CLOSE or an ABORT

    def _send_control(self, kind: int) -> None:
        if self._credits >= 1 and self._connected() and not self._peer_closed:
            self._post(kind, 0, 0)

    def _connected(self) -> bool:
        try:
            return self._end.qp.state is QpState.RTS
        except VerbsError:  # this end's resources are gone (its device context died)
            return False

    def _post(self, kind: int, slot: int, length: int) -> bool:
        receives, slots = min(self._owed_receives, _FIELD), min(self._owed_slots, _FIELD)
        size = self._config.slot_size
        sge = self._end.stage.sge(slot * size, length) if length else None
        try:
            self._end.qp.post_send(
                0,
                WrOpcode.RDMA_WRITE_WITH_IMM,
                sge,
                remote_addr=self._remote_addr + (slot * size if kind == DATA else 0),
                rkey=self._remote_rkey,
                imm_data=_imm(kind, receives, slots),
            )
        except VerbsError:
            self._peer_failed(None)
            return False
        self._credits -= 1
        self._owed_receives -= receives
        self._owed_slots -= slots
        return True

    # -- receiving ------------------------------------------------------------------------------
    def _on_event(self) -> None:
        channel = self._end.channel
        try:
            cq = channel.get_event()
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
        """Account for every receive completion waiting (credits, slots written, CLOSE, ABORT);
        False once the stream is closed."""
        try:
            completions = self._end.recv_cq.poll(64)
            while completions:
                for wc in completions:
                    self._received(wc)
                    if self._closed:
                        return False
                completions = self._end.recv_cq.poll(64)
        except VerbsError as exc:  # this end's CQ is gone or overran: nothing more will come
            self._finish(ConnectionResetError(f"the RDMA connection failed: {exc}"))
            return False
        return not self._closed

    def _received(self, wc: WorkCompletion) -> None:
        if not wc.ok:
            self._peer_failed(wc.status)
            return
        assert wc.opcode is WcOpcode.RECV_RDMA_WITH_IMM and wc.imm_data is not None
        kind = wc.imm_data >> 30
        self._credits += (wc.imm_data >> 15) & _FIELD
        self._slots_free += wc.imm_data & _FIELD
        if kind == DATA:
            self._pending.append([self._recv_slot, wc.byte_len, 0])
            self._recv_slot = (self._recv_slot + 1) % self._config.slots
        elif kind == CREDIT:
            self._repost(data=False)
        elif kind == CLOSE:
            self._peer_closed = True
        else:  # ABORT
            self._finish(ConnectionResetError("the peer aborted the connection"))

    def _repost(self, data: bool) -> None:
        try:
            self._end.qp.post_recv(0, None)
        except VerbsError:
            return
        self._owed_receives += 1
        self._owed_slots += 1 if data else 0

    def _deliver(self) -> None:
        """Copy written slots into the owner's buffers while it reads; free each slot once
        delivered."""
        size = self._config.slot_size
        ring = self._end.ring.view
        while self._pending and not self._paused and not self._closed and self.owner is not None:
            entry = self._pending[0]
            slot, length, done = entry
            if done < length:
                target = self.owner.get_buffer()
                count = min(len(target), length - done)
                start = slot * size + done
                target[:count] = ring[start : start + count]
                entry[2] = done + count
                self.owner.buffer_updated(count)
                if entry[2] < length:
                    continue
            self._pending.popleft()
            self._repost(data=True)
        if self._peer_closed and not self._pending and not self._closed:
            self._finish(None)

    # -- ending ---------------------------------------------------------------------------------
    def _peer_failed(self, status: WcStatus | None) -> None:
        if self._closed:
            return
        if not self._peer_closed and status is not WcStatus.WR_FLUSH_ERR:
            self._take_receives()  # a CLOSE or ABORT may be waiting: it says what happened
        if self._closed or self._peer_closed:  # it closed and tore down: failures follow
            return
        what = status.name if status is not None else "a verbs error"
        self._finish(ConnectionResetError(f"the RDMA connection failed ({what}): the peer is gone"))

    def _finish(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._queue.clear()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._control is not None:
            self._control.close()  # the peer's watcher sees its end
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self._mark_closed()
        self._end.close()
        if self.owner is not None:
            self.owner.connection_lost(error)


def rdma_stream_pair(
    provider: Provider,
    devices: tuple[str | None, str | None] = (None, None),
    config: RingConfig | None = None,
) -> tuple[RdmaStream, RdmaStream]:
    """Two connected ends in this process (on the simulator: two devices of one fabric). Call
    ``start(owner)`` on each before writing. Must run on the event loop."""
    config = config or RingConfig()
    first, second = _End(provider, devices[0], config), _End(provider, devices[1], config)
    a_end, b_end = first.qp.endpoint(psn=0x1234), second.qp.endpoint(psn=0x4321)
    first.qp.connect(b_end)
    second.qp.connect(a_end)
    a = RdmaStream(f"rdma:{first.ctx.name}", first, config)
    b = RdmaStream(f"rdma:{second.ctx.name}", second, config)
    a._join(second.ring.addr, second.ring.rkey)
    b._join(first.ring.addr, first.ring.rkey)
    return a, b


# -- set-up over TCP ------------------------------------------------------------------------------
_simulated: Provider | None = None  # this process's simulated fabric, once asked for


def default_provider() -> Provider:
    """pyverbs (``RdmaUnavailable``, a ``ConnectionError``, says what is missing), or this
    process's simulated fabric when ``BITFUSION_NET_RDMA=simulator``."""
    global _simulated
    if os.environ.get(PROVIDER_ENV) == "simulator":
        from .verbs import Fabric, SimulatedProvider

        if _simulated is None:
            _simulated = SimulatedProvider(Fabric(devices=("sim0",)))
        return _simulated
    from .verbs.pyverbs_backend import PyverbsProvider

    return PyverbsProvider()


def _hello(end: _End, config: RingConfig, psn: int) -> bytes:
    endpoint = end.qp.endpoint(psn)
    document = {
        "qpn": endpoint.qpn,
        "psn": endpoint.psn,
        "gid": endpoint.gid.hex(),
        "lid": endpoint.lid,
        "ring": [end.ring.addr, end.ring.rkey],
        "config": asdict(config),
    }
    return json.dumps(document).encode() + b"\n"


async def _read_hello(reader: asyncio.StreamReader, config: RingConfig) -> dict[str, Any]:
    line = await reader.readline()
    if not line.endswith(b"\n") or len(line) > MAX_HELLO:
        raise ConnectionResetError("the peer closed (or sent garbage) during the RDMA set-up")
    try:
        hello: dict[str, Any] = json.loads(line)
        if hello["config"] != asdict(config):
            raise ConnectionRefusedError(
                f"the peer's RDMA ring {hello['config']} differs from this side's {asdict(config)}"
            )
        return hello
    except (ValueError, KeyError, TypeError) as exc:
        raise ConnectionResetError(f"a malformed RDMA hello: {exc}") from None


def _connect_to(end: _End, hello: dict[str, Any]) -> None:
    from .verbs.api import QpEndpoint

    remote = QpEndpoint(hello["qpn"], hello["psn"], bytes.fromhex(hello["gid"]), hello["lid"])
    end.qp.connect(remote)


def _watch(stream: RdmaStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep the set-up's TCP connection: its end is a dead peer's surest sign."""
    stream._control = writer

    async def watch() -> None:
        try:
            while await reader.read(4096):
                pass  # nothing is sent on it after the set-up
        except (ConnectionError, OSError):
            pass
        if not stream.closed:
            stream._peer_failed(None)

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
    async with asyncio.timeout(SETUP_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        end = _End(provider, None, config)
        try:
            writer.write(_hello(end, config, secrets.randbelow(1 << 24)))
            await writer.drain()
            hello = await _read_hello(reader, config)
            _connect_to(end, hello)
            stream = RdmaStream(address.host_port, end, config)
            stream._join(*hello["ring"])
            writer.write(b"ready\n")
            await writer.drain()
        except BaseException:
            end.close()
            writer.close()
            raise
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
) -> asyncio.Server:
    """Accept ``rdma://`` connections: the TCP listener their set-up goes over (its sockets
    name the port). Raises ``RdmaUnavailable`` at once where RDMA cannot be used."""
    provider = provider or default_provider()
    config = config or RingConfig()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if peer else "?"
        end: _End | None = None
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                hello = await _read_hello(reader, config)
                end = _End(provider, None, config)
                _connect_to(end, hello)
                stream = RdmaStream(name, end, config)
                stream._join(*hello["ring"])
                writer.write(_hello(end, config, secrets.randbelow(1 << 24)))
                await writer.drain()
                if await reader.readline() != b"ready\n":
                    raise ConnectionResetError("the client left during the RDMA set-up")
        except (OSError, TimeoutError, VerbsError, ValueError):
            if end is not None:
                end.close()
            writer.close()
            return
        stream.start(owner_factory(stream))
        _watch(stream, reader, writer)

    return await asyncio.start_server(
        accept, address.host, address.port, backlog=backlog, reuse_address=True
    )
