"""The RDMA ring: the credit protocol over one RC queue pair, with no event loop and no threads.

Both RDMA drivers run on it: ``rdma.RdmaStream`` on the event loop (the server, the async
client) and ``rdma_blocking.RdmaBlockingStream`` in the caller's thread (the blocking client).
It is what they share: the verbs resources, the ring's shape, the credit rules, and the set-up
hello. The protocol:

- Each end registers a ring of ``slots`` x ``slot_size`` bytes the peer writes into, and a send
  staging area of the same shape. Bytes are copied into staging and written into the peer's next
  ring slot with ``RDMA_WRITE_WITH_IMM``, which also consumes one of the receives the peer keeps
  posted: the completion says a slot is full (its length is the completion's ``byte_len``).
- Credits are the peer's posted receives and free ring slots as this end knows them; nothing is
  sent without one, so there is never an RNR. The receiver reposts a slot's receive once the
  slot is delivered to its owner, and reports what it reposted in the immediate data of its
  next message (``kind`` 2 bits, receives 15, slots 15), or in a zero-length CREDIT message once
  ``credit_batch`` are owed. Data never takes the last ``reserve`` credits, so that credit
  returns, CLOSE and ABORT always have one: two ends that both write and both read cannot
  deadlock waiting for each other's credits.
- CLOSE says everything was sent: the peer delivers what came before, then ends. ABORT is a
  reset. A failed completion (``RETRY_EXC_ERR`` for a peer that vanished) is ``RingFailed``;
  ``Ring.explain`` says what it means, looking first for a CLOSE or ABORT that explains it.
- Set-up (``hello``/``read_hello``/``connect_to``): each side sends a JSON line over TCP with
  its QP endpoint, its ring's address and rkey, and the ring's shape; the client ends with
  ``ready``; only then does either write over RDMA. No rdma_cm: its calls block holding the GIL.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .verbs.api import (
    PATH_MTUS,
    Access,
    Provider,
    QpEndpoint,
    QpState,
    VerbsError,
    WcOpcode,
    WcStatus,
    WorkCompletion,
    WrOpcode,
)

DATA, CREDIT, CLOSE, ABORT = 0, 1, 2, 3
PROVIDER_ENV = "BITFUSION_NET_RDMA"  # "simulator": this process's simulated fabric
SETUP_TIMEOUT_S = 10.0  # a set-up is two round trips over TCP and a few verbs calls
# Set-ups a listener carries at once: each holds a registered end (2 MiB by default) until the
# client says ``ready``, so a flood of hellos that never finish must not pin memory unbounded.
MAX_PENDING_SETUPS = 64
LINGER_S = 1.0  # at the end, how long posted writes may take to complete before tear-down
# One send in this many asks for a completion (and CREDIT, CLOSE, ABORT and probes always do):
# a completion frees the send-queue slots of the sends before it, so fewer are polled.
SIGNAL_EVERY = 8
MAX_HELLO = 4096
READY = b"ready\n"
_FIELD = (1 << 15) - 1
DEFAULT_QUEUE_LIMIT = 8 * 2**20


# Bytes to send, and what to call once they are copied (a writer's ``on_sent``).
Piece = tuple[memoryview | bytes, Callable[[], None] | None]


def _imm(kind: int, receives: int, slots: int) -> int:
    return kind << 30 | receives << 15 | slots


@dataclass(frozen=True)
class RingConfig:
    """The shape of one end's buffers and credits."""

    slots: int = 16
    slot_size: int = 64 * 1024
    control: int = 8  # receives beyond the ring's, for CREDIT, CLOSE and ABORT
    credit_batch: int = 4  # owed credits that make a CREDIT message worth sending
    queue_limit: int = DEFAULT_QUEUE_LIMIT  # the event-loop driver's send queue

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


@dataclass(frozen=True)
class DeviceSettings:
    """Which device, port and GID an end uses, and the largest path MTU it asks for (the
    connection uses the smaller of both ends'). ``from_environment`` reads them from
    ``BITFUSION_NET_RDMA_DEVICE``, ``_PORT``, ``_GID_INDEX`` and ``_MTU`` (docs/RDMA.md)."""

    device: str | None = None  # None: the first device
    port: int = 1
    gid_index: int = 0
    path_mtu: int = 1024

    def __post_init__(self) -> None:
        if self.port < 1 or self.gid_index < 0:
            raise ValueError(f"an RDMA port counts from 1 and a GID index from 0: {self}")
        if self.path_mtu not in PATH_MTUS:
            raise ValueError(f"the RDMA path MTU must be one of {PATH_MTUS}, not {self.path_mtu}")

    @classmethod
    def from_environment(cls) -> DeviceSettings:
        """The settings the environment gives; ``ValueError`` names a variable that is wrong."""
        values: dict[str, Any] = {"device": os.environ.get(f"{PROVIDER_ENV}_DEVICE") or None}
        for field_name, variable in (
            ("port", "PORT"),
            ("gid_index", "GID_INDEX"),
            ("path_mtu", "MTU"),
        ):
            text = os.environ.get(f"{PROVIDER_ENV}_{variable}")
            if text:
                try:
                    values[field_name] = int(text)
                except ValueError:
                    raise ValueError(
                        f"{PROVIDER_ENV}_{variable}={text!r} is not a number"
                    ) from None
        return cls(**values)

    def check(self, provider: Provider) -> None:
        """Fail now rather than at each connection (a server, at start): the device, its port
        and the GID must exist. Raises ``ConnectionError`` saying which is wrong."""
        try:
            ctx = provider.open(self.device)
        except VerbsError as exc:
            raise ConnectionError(f"RDMA: {exc} ({PROVIDER_ENV}_DEVICE)") from None
        try:
            gid = ctx.gid(self.port, self.gid_index)
        except VerbsError as exc:
            raise ConnectionError(
                f"RDMA device {ctx.name}: {exc} ({PROVIDER_ENV}_PORT, {PROVIDER_ENV}_GID_INDEX)"
            ) from None
        finally:
            ctx.close()
        if not any(gid):
            raise ConnectionError(
                f"RDMA device {ctx.name}: GID index {self.gid_index} of port {self.port} is "
                f"empty (show_gids lists the table; set {PROVIDER_ENV}_GID_INDEX)"
            )


class RingEnd:
    """One end's verbs resources: context, PD, CQs, ring, staging and QP."""

    def __init__(self, provider: Provider, settings: DeviceSettings, config: RingConfig) -> None:
        self.settings = settings
        self.ctx = provider.open(settings.device)
        self.pd = self.ctx.alloc_pd()
        self.channel = self.ctx.create_comp_channel()
        self.recv_cq = self.ctx.create_cq(config.receives, self.channel)
        # Sends in flight: at most ``receives`` await the peer (each takes a credit), and up to
        # SIGNAL_EVERY - 1 done ones await the next signaled completion to be freed.
        send_depth = config.receives + SIGNAL_EVERY + 4
        self.send_cq = self.ctx.create_cq(send_depth)
        size = config.slots * config.slot_size
        self.ring_memory, self.stage_memory = bytearray(size), bytearray(size)
        self.ring = self.pd.register(self.ring_memory, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
        self.stage = self.pd.register(self.stage_memory, Access.LOCAL_WRITE)
        self.qp = self.pd.create_qp(
            self.send_cq,
            self.recv_cq,
            max_send_wr=send_depth,
            max_recv_wr=config.receives,
            port=settings.port,
            gid_index=settings.gid_index,
        )

    def close(self) -> None:
        """Tear down in verbs' order; what the peer still sends fails at its end. Every event
        taken from the channel was acknowledged at once (both drivers do), so the CQs close."""
        for step in (
            self.qp.close,
            self.ring.deregister,
            self.stage.deregister,
            self.recv_cq.close,
            self.send_cq.close,
            self.channel.close,
            self.pd.close,
            self.ctx.close,
        ):
            try:
                step()
            except VerbsError:
                pass


class RingFailed(Exception):
    """A work request failed, or this end's verbs resources did: ``status`` is the failed
    completion's (None for a verbs error, ``detail`` says which)."""

    def __init__(self, status: WcStatus | None, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Ring:
    """The credit protocol on one ``RingEnd`` (see the module docstring). Its methods raise
    ``RingFailed``; the driver asks ``explain`` what to report."""

    def __init__(self, end: RingEnd, config: RingConfig) -> None:
        self.end, self.config = end, config
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
        self._in_flight = 0  # posted sends not freed yet by a polled completion
        self._unsignaled = 0  # sends posted since the last signaled one
        self._batches: deque[int] = deque()  # per signaled send in flight: the sends it frees
        self.peer_closed = False  # CLOSE received: deliver what came before, then end
        self.aborted = False  # ABORT received

    def join(self, remote_addr: int, remote_rkey: int) -> None:
        """Point at the peer's ring and post every receive (before the peer may write)."""
        self._remote_addr, self._remote_rkey = remote_addr, remote_rkey
        for _ in range(self.config.receives):
            self.end.qp.post_recv(0, None)

    @property
    def connected(self) -> bool:
        try:
            return self.end.qp.state is QpState.RTS
        except VerbsError:  # this end's resources are gone (its device context died)
            return False

    # -- sending --------------------------------------------------------------------------------
    @property
    def can_send_data(self) -> bool:
        """A free slot of the peer's ring, and a credit beyond the control messages' reserve."""
        return self._slots_free > 0 and self._credits > self.config.reserve

    def send_from(self, pieces: deque[Piece]) -> tuple[int, list[Callable[[], None]]]:
        """Copy bytes from the front of ``pieces`` into the next slot's staging, as many as fit,
        and write them into the peer's slot (only when ``can_send_data``). Returns the byte
        count and the callbacks of the pieces now wholly copied (their buffers may be reused)."""
        size = self.config.slot_size
        stage = self.end.stage.view[self._send_slot * size : (self._send_slot + 1) * size]
        filled, handed = 0, []
        while pieces and filled < size:
            data, on_sent = pieces[0]
            count = min(len(data), size - filled)
            stage[filled : filled + count] = data[:count]
            filled += count
            if count == len(data):
                pieces.popleft()
                if on_sent is not None:
                    handed.append(on_sent)
            else:
                pieces[0] = (data[count:], on_sent)
        self._post(DATA, self._send_slot, filled)
        self._slots_free -= 1
        self._send_slot = (self._send_slot + 1) % self.config.slots
        return filled, handed

    @property
    def credit_due(self) -> bool:
        """Enough receives are owed for a CREDIT message, and one credit stays for a CLOSE."""
        return self._owed_receives >= self.config.credit_batch and self._credits >= 2

    def send_control(self, kind: int) -> None:
        """A CREDIT, CLOSE or ABORT, when a credit allows and the peer is still there to hear."""
        if self._credits >= 1 and self.connected and not self.peer_closed:
            self._post(kind, 0, 0)

    @property
    def can_close(self) -> bool:
        return self._credits >= 1

    def _post(self, kind: int, slot: int, length: int) -> None:
        if self._in_flight >= self.config.receives:  # see RingEnd's send_depth
            self.reap_sends()
        receives, slots = min(self._owed_receives, _FIELD), min(self._owed_slots, _FIELD)
        size = self.config.slot_size
        sge = self.end.stage.sge(slot * size, length) if length else None
        signaled = kind != DATA or self._unsignaled + 1 >= SIGNAL_EVERY
        try:
            self.end.qp.post_send(
                0,
                WrOpcode.RDMA_WRITE_WITH_IMM,
                sge,
                remote_addr=self._remote_addr + (slot * size if kind == DATA else 0),
                rkey=self._remote_rkey,
                imm_data=_imm(kind, receives, slots),
                signaled=signaled,
            )
        except VerbsError as exc:
            raise RingFailed(None, str(exc)) from None
        self._posted(signaled)
        self._credits -= 1
        self._owed_receives -= receives
        self._owed_slots -= slots

    def _posted(self, signaled: bool) -> None:
        self._in_flight += 1
        self._unsignaled += 1
        if signaled:  # its completion frees it and the unsignaled sends before it
            self._batches.append(self._unsignaled)
            self._unsignaled = 0

    def reap_sends(self) -> None:
        """Poll send completions, freeing send-queue slots (call before each batch of posts).
        A failed send completes whether signaled or not: the QP is then in error."""
        try:
            completions = self.end.send_cq.poll(64)
            while completions:
                for wc in completions:
                    if not wc.ok:
                        raise RingFailed(wc.status, wc.status.name)
                    self._in_flight -= self._batches.popleft()
                completions = self.end.send_cq.poll(64)
        except VerbsError as exc:
            raise RingFailed(None, str(exc)) from None

    def probe(self) -> None:
        """A zero-length RDMA WRITE, which checks no rkey and consumes no receive: the peer's
        ACK (or its absence, as ``RETRY_EXC_ERR``) says whether it is there."""
        try:
            self.end.qp.post_send(0, WrOpcode.RDMA_WRITE, None, remote_addr=self._remote_addr)
        except VerbsError as exc:
            raise RingFailed(None, str(exc)) from None
        self._posted(signaled=True)
        self.reap_sends()

    @property
    def sending(self) -> bool:
        """A signaled write (a CLOSE or ABORT, say) not completed yet: the device may still be
        reading staging slots, so the end must not be torn down before it completes (or
        fails). Unsignaled writes after the last signaled one are not waited for: they are
        only left when no CLOSE or ABORT went out, because the peer closed or failed first."""
        try:
            self.reap_sends()
        except RingFailed:
            return False  # the QP failed: what it had posted is flushed
        return bool(self._batches) and self.connected

    # -- receiving ------------------------------------------------------------------------------
    def take_receives(self) -> bool:
        """Account for every receive completion waiting (credits, slots written, CLOSE); stops
        at an ABORT (``aborted``). True if there were any."""
        taken = False
        try:
            completions = self.end.recv_cq.poll(64)
            while completions:
                taken = True
                for wc in completions:
                    self._received(wc)
                    if self.aborted:
                        return True
                completions = self.end.recv_cq.poll(64)
        except VerbsError as exc:  # this end's CQ is gone or overran: nothing more will come
            raise RingFailed(None, str(exc)) from None
        return taken

    def _received(self, wc: WorkCompletion) -> None:
        if not wc.ok:
            raise RingFailed(wc.status, wc.status.name)
        assert wc.opcode is WcOpcode.RECV_RDMA_WITH_IMM and wc.imm_data is not None
        kind = wc.imm_data >> 30
        self._credits += (wc.imm_data >> 15) & _FIELD
        self._slots_free += wc.imm_data & _FIELD
        if kind == DATA:
            self._pending.append([self._recv_slot, wc.byte_len, 0])
            self._recv_slot = (self._recv_slot + 1) % self.config.slots
        elif kind == CREDIT:
            self._repost(data=False)
        elif kind == CLOSE:
            self.peer_closed = True
        else:
            self.aborted = True

    @property
    def readable(self) -> bool:
        """Bytes received and not yet delivered."""
        return bool(self._pending)

    @property
    def ended(self) -> bool:
        """The peer closed and everything it sent before was delivered."""
        return self.peer_closed and not self._pending

    def read_into(self, target: memoryview) -> int:
        """Copy received bytes into ``target``, as many as fit; free (repost) each slot once
        delivered. Returns the count (0 when nothing is waiting)."""
        size, ring, filled = self.config.slot_size, self.end.ring.view, 0
        pending = self._pending
        while pending and filled < len(target):
            entry = pending[0]
            slot, length, done = entry
            count = min(len(target) - filled, length - done)
            start = slot * size + done
            target[filled : filled + count] = ring[start : start + count]
            filled += count
            entry[2] = done + count
            if entry[2] == length:
                pending.popleft()
                self._repost(data=True)
        while pending and pending[0][1] == 0:  # nothing to deliver: free it now
            pending.popleft()
            self._repost(data=True)
        return filled

    def _repost(self, data: bool) -> None:
        try:
            self.end.qp.post_recv(0, None)
        except VerbsError:
            return  # the QP is gone: what happens next says why
        self._owed_receives += 1
        self._owed_slots += 1 if data else 0

    # -- ending ---------------------------------------------------------------------------------
    def explain(self, failure: RingFailed) -> ConnectionResetError | None:
        """What ``failure`` means: None when the peer had closed (its tear-down fails what
        follows: the driver ends once it delivered the rest), else the error to report."""
        if (
            not self.peer_closed
            and not self.aborted
            and failure.status is not WcStatus.WR_FLUSH_ERR
        ):
            try:  # a CLOSE or ABORT may be waiting: it says what happened
                self.take_receives()
            except RingFailed:
                pass
        if self.aborted:
            return ConnectionResetError("the peer aborted the connection")
        if self.peer_closed:
            return None
        return ConnectionResetError(
            f"the RDMA connection failed ({failure.detail}): the peer is gone"
        )


# -- set-up ---------------------------------------------------------------------------------------
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


def hello(end: RingEnd, config: RingConfig, psn: int) -> bytes:
    """This end's set-up line: its QP endpoint, its ring, and the ring's shape."""
    endpoint = end.qp.endpoint(psn)
    document = {
        "qpn": endpoint.qpn,
        "psn": endpoint.psn,
        "gid": endpoint.gid.hex(),
        "lid": endpoint.lid,
        "ring": [end.ring.addr, end.ring.rkey],
        "mtu": end.settings.path_mtu,
        "config": asdict(config),
    }
    return json.dumps(document).encode() + b"\n"


def read_hello(line: bytes, config: RingConfig) -> dict[str, Any]:
    """The peer's set-up line, checked. Raises ``ConnectionResetError`` (the peer left, or sent
    garbage) or ``ConnectionRefusedError`` (its ring's shape differs from ours)."""
    if not line.endswith(b"\n") or len(line) > MAX_HELLO:
        raise ConnectionResetError("the peer closed (or sent garbage) during the RDMA set-up")
    try:
        document: dict[str, Any] = json.loads(line)
        if document["config"] != asdict(config):
            raise ConnectionRefusedError(
                f"the peer's RDMA ring {document['config']} differs from this side's "
                f"{asdict(config)}"
            )
        return document
    except (ValueError, KeyError, TypeError) as exc:
        raise ConnectionResetError(f"a malformed RDMA hello: {exc}") from None


def connect_to(end: RingEnd, config: RingConfig, document: dict[str, Any]) -> Ring:
    """Connect ``end``'s QP to the peer's hello, and make the ring on it (receives posted)."""
    try:
        remote = QpEndpoint(
            int(document["qpn"]),
            int(document["psn"]),
            bytes.fromhex(document["gid"]),
            int(document["lid"]),
        )
        ring_addr, ring_rkey = (int(value) for value in document["ring"])
        mtu = min(end.settings.path_mtu, int(document["mtu"]))
        if mtu not in PATH_MTUS:
            raise ValueError(f"path MTU {mtu}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConnectionResetError(f"a malformed RDMA hello: {exc!r}") from None
    end.qp.connect(remote, path_mtu=mtu)
    ring = Ring(end, config)
    ring.join(ring_addr, ring_rkey)
    return ring
