"""The verbs interface the RDMA transport is written against: the few ibverbs objects an RC
connection needs, with ibverbs' own numbers and rules.

Two implementations exist: ``simulator`` (in-process, enforces the rules below, used by every
test) and ``pyverbs_backend`` (a real device through rdma-core's pyverbs). Everything here is
what both promise; where the simulator is stricter than hardware, its docstring says so.

How an RC connection is made (nothing here talks to the peer: the caller carries a
``QpEndpoint`` and the buffers' ``(addr, rkey)`` over its TCP control connection)::

    ctx = provider.open(None)
    pd = ctx.alloc_pd()
    channel = ctx.create_comp_channel()
    cq = ctx.create_cq(cqe=send_wr + recv_wr, channel=channel)   # one CQ per channel
    mr = pd.register(buffer, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
    qp = pd.create_qp(cq, cq, max_send_wr=send_wr, max_recv_wr=recv_wr)
    local = qp.endpoint(psn=random_24_bit)       # -> peer, over TCP
    qp.connect(remote)                            # remote: the peer's endpoint, over TCP
    qp.post_recv(...)                             # before telling the peer it may send
    # tell the peer "ready" over TCP; only then post_send

Rules every implementation holds (they are ibverbs' rules):

- Work requests on one QP complete in the order they were posted, on the send CQ (sends) or
  the receive CQ (receives). A WR that fails always completes, signaled or not; a successful
  unsignaled send does not. A send-queue slot is freed only when a later signaled completion
  of that QP is polled, so at least one send in every ``max_send_wr`` must be signaled.
- A fault moves the QP to ``QpState.ERR``: the failed WR completes with its error status, then
  every outstanding and every later-posted WR completes with ``WR_FLUSH_ERR``. An errored QP
  stays errored; make a new one.
- On an error completion only ``wr_id``, ``status`` and ``qp_num`` mean anything.
- Argument values outside what this interface accepts raise ``ValueError`` before anything is
  done. A device refusing a call raises ``VerbsError``. After ``close()`` (or
  ``deregister()``), every call on that object except ``close()`` raises ``VerbsError``
  (``EBADF``); ``close()`` twice does nothing.
"""

from __future__ import annotations

import enum
import errno
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

PSN_MASK = 0xFFFFFF  # packet sequence numbers are 24 bits
MAX_MESSAGE_BYTES = 2**31  # one WR moves at most 2 GiB (ibv_port_attr.max_msg_sz on most HCAs)
PATH_MTUS = (256, 512, 1024, 2048, 4096)


class Access(enum.IntFlag):
    """``ibv_access_flags``: what a memory region (or a QP, as responder) allows.

    Reading local memory for a SEND or an RDMA WRITE source needs no flag; receiving into it
    (RECV, the target of an RDMA READ) needs ``LOCAL_WRITE``. ``REMOTE_WRITE`` requires
    ``LOCAL_WRITE``.
    """

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4


class WrOpcode(enum.IntEnum):
    """``ibv_wr_opcode``: what a send work request does."""

    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1
    SEND = 2
    SEND_WITH_IMM = 3
    RDMA_READ = 4

    @property
    def has_imm(self) -> bool:
        """Carries 32 bits of immediate data to the responder's receive completion."""
        return self in (WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.SEND_WITH_IMM)

    @property
    def consumes_receive(self) -> bool:
        """Takes one posted receive at the responder (with none posted: RNR)."""
        return self in (WrOpcode.SEND, WrOpcode.SEND_WITH_IMM, WrOpcode.RDMA_WRITE_WITH_IMM)

    @property
    def one_sided(self) -> bool:
        """Addresses the responder's memory by ``remote_addr``/``rkey``."""
        return self in (WrOpcode.RDMA_WRITE, WrOpcode.RDMA_WRITE_WITH_IMM, WrOpcode.RDMA_READ)

    @property
    def completion_opcode(self) -> WcOpcode:
        """The opcode of this WR's completion on the requester's send CQ."""
        if self in (WrOpcode.SEND, WrOpcode.SEND_WITH_IMM):
            return WcOpcode.SEND
        if self is WrOpcode.RDMA_READ:
            return WcOpcode.RDMA_READ
        return WcOpcode.RDMA_WRITE


class WcOpcode(enum.IntEnum):
    """``ibv_wc_opcode``: what a completion is for."""

    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    RECV = 128  # a SEND or SEND_WITH_IMM arrived in a posted receive
    RECV_RDMA_WITH_IMM = 129  # an RDMA_WRITE_WITH_IMM consumed a posted receive


class WcStatus(enum.IntEnum):
    """``ibv_wc_status``. The ones a transport meets, and what they mean on RC:

    - ``LOC_LEN_ERR``: a message larger than the receive buffer it landed in (responder side;
      the requester then sees ``REM_INV_REQ_ERR``).
    - ``LOC_PROT_ERR``: a local SGE with an unknown lkey, outside its MR, of another PD, or a
      receive target without ``LOCAL_WRITE``.
    - ``WR_FLUSH_ERR``: not executed because the QP is in ERR.
    - ``REM_ACCESS_ERR``: an RDMA WRITE/READ refused by the responder (rkey, bounds, access).
    - ``REM_OP_ERR``: the responder failed on its side (e.g. its receive's SGE was bad).
    - ``RETRY_EXC_ERR``: no acknowledgement: the peer QP is gone, errored or not connected to
      this one. This is how a dead peer shows.
    - ``RNR_RETRY_EXC_ERR``: the responder had no receive posted (receiver not ready).
    """

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


class QpState(enum.IntEnum):
    """``ibv_qp_state``. An RC QP goes RESET -> INIT -> RTR -> RTS (``connect`` does all three)
    and to ERR on any fault; SQD and SQE are listed for completeness, never entered here."""

    RESET = 0
    INIT = 1
    RTR = 2  # ready to receive
    RTS = 3  # ready to send
    SQD = 4
    SQE = 5
    ERR = 6


@dataclass(frozen=True, slots=True)
class Sge:
    """One scatter/gather element: ``length`` bytes at address ``addr`` of the memory region
    whose local key is ``lkey`` (see ``MemoryRegion.sge``)."""

    addr: int
    length: int
    lkey: int


@dataclass(frozen=True, slots=True)
class WorkCompletion:
    """One completion polled from a CQ (``ibv_wc``).

    ``byte_len``: on a receive, the bytes that arrived (for ``RECV_RDMA_WITH_IMM``, the bytes
    the RDMA WRITE wrote); on a send-side completion, the WR's length. ``imm_data``: the
    immediate data of a ``*_WITH_IMM`` message on the receive completion, else None. On an
    error completion only ``wr_id``, ``status`` and ``qp_num`` are meaningful (a flushed
    receive does not say RECV): let ``wr_id`` say what the WR was.
    """

    wr_id: int
    status: WcStatus
    opcode: WcOpcode
    byte_len: int
    qp_num: int
    imm_data: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is WcStatus.SUCCESS


@dataclass(frozen=True, slots=True)
class QpEndpoint:
    """What one side of an RC connection tells the other, out of band, so the other can
    ``connect`` to it: its QP number, the PSN its first packet will carry, and its port's GID
    (16 bytes) and LID (0 on RoCE, where the GID routes)."""

    qpn: int
    psn: int
    gid: bytes
    lid: int = 0


class VerbsError(Exception):
    """A verbs call that failed synchronously: nothing was posted, created or changed.

    ``errno`` is the errno the call failed with (``ENOMEM``: a work queue is full; ``EINVAL``:
    a state or a device limit forbids it; ``EBUSY``: something still uses the object;
    ``EBADF``: the object is closed; ``ENODEV``, ``ENOENT``, ``EOVERFLOW`` as documented).
    """

    def __init__(self, code: int, what: str) -> None:
        self.errno = code
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"{what} [{name}: {os.strerror(code)}]")


# -- argument checks every implementation makes (ValueError, before anything is done) -----------


def check_u(value: int, bits: int, name: str) -> None:
    """ValueError unless ``value`` is an int in ``[0, 2**bits)``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be an unsigned {bits}-bit integer, not {value!r}")


def check_sge(sge: Sge | None) -> None:
    if sge is None:
        return
    if not isinstance(sge, Sge):
        raise ValueError(f"expected an Sge or None, not {type(sge).__name__}")
    check_u(sge.addr, 64, "Sge.addr")
    check_u(sge.lkey, 32, "Sge.lkey")
    if not 0 <= sge.length <= MAX_MESSAGE_BYTES:
        raise ValueError(f"Sge.length must be 0..{MAX_MESSAGE_BYTES}, not {sge.length}")


def check_send_request(
    wr_id: int,
    opcode: WrOpcode,
    sge: Sge | None,
    remote_addr: int,
    rkey: int,
    imm_data: int | None,
    inline: bool,
) -> None:
    """The checks of ``QueuePair.post_send``'s arguments."""
    check_u(wr_id, 64, "wr_id")
    if not isinstance(opcode, WrOpcode):
        raise ValueError(f"opcode must be a WrOpcode, not {opcode!r}")
    check_sge(sge)
    check_u(remote_addr, 64, "remote_addr")
    check_u(rkey, 32, "rkey")
    if opcode.has_imm:
        if imm_data is None:
            raise ValueError(f"{opcode.name} needs imm_data")
        check_u(imm_data, 32, "imm_data")
    elif imm_data is not None:
        raise ValueError(f"{opcode.name} carries no imm_data")
    if inline and opcode is WrOpcode.RDMA_READ:
        raise ValueError("an RDMA_READ cannot be inline: it writes into local memory")


def check_connect_attributes(
    remote: QpEndpoint,
    path_mtu: int,
    rnr_retry: int,
    retry_count: int,
    min_rnr_timer: int,
    ack_timeout: int,
) -> None:
    """The checks of ``QueuePair.connect``'s arguments."""
    if not isinstance(remote, QpEndpoint):
        raise ValueError(f"remote must be a QpEndpoint, not {type(remote).__name__}")
    check_u(remote.qpn, 24, "QpEndpoint.qpn")
    check_u(remote.psn, 24, "QpEndpoint.psn")
    check_u(remote.lid, 16, "QpEndpoint.lid")
    if not isinstance(remote.gid, bytes) or len(remote.gid) != 16:
        raise ValueError(f"QpEndpoint.gid must be 16 bytes, not {remote.gid!r}")
    if path_mtu not in PATH_MTUS:
        raise ValueError(f"path_mtu must be one of {PATH_MTUS}, not {path_mtu}")
    check_u(rnr_retry, 3, "rnr_retry")
    check_u(retry_count, 3, "retry_count")
    check_u(min_rnr_timer, 5, "min_rnr_timer")
    check_u(ack_timeout, 5, "ack_timeout")


# -- the objects ---------------------------------------------------------------------------------


class Provider(ABC):
    """Where devices come from: ``SimulatedProvider(fabric)`` or the pyverbs provider."""

    name: str = "?"

    @abstractmethod
    def devices(self) -> list[str]:
        """The names of the RDMA devices present (``ibv_get_device_list``), maybe none."""

    @abstractmethod
    def open(self, device: str | None = None) -> DeviceContext:
        """Open ``device`` (by name), or the first one when None (``ibv_open_device``).

        Raises ``VerbsError`` (``ENODEV``) when no such device exists, or none at all; the
        message says which.
        """


class DeviceContext(ABC):
    """An open device (``ibv_context``). Everything else is made from it or from its PDs.

    ``close()`` raises ``VerbsError`` (``EBUSY``) while PDs, CQs or completion channels made
    from it are open in the simulator (pyverbs closes them for you): close them first.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The device's name (``mlx5_0``, ``vmw_pvrdma0``, ``sim0``)."""

    @abstractmethod
    def gid(self, port: int = 1, index: int = 0) -> bytes:
        """The 16-byte GID at ``index`` of ``port``'s GID table. Raises ``VerbsError``
        (``EINVAL``) for a port or index the device does not have."""

    @abstractmethod
    def alloc_pd(self) -> ProtectionDomain:
        """A new protection domain. Raises ``VerbsError`` when the device refuses."""

    @abstractmethod
    def create_comp_channel(self) -> CompletionChannel:
        """A new completion channel. Raises ``VerbsError`` when the device refuses."""

    @abstractmethod
    def create_cq(self, cqe: int, channel: CompletionChannel | None = None) -> CompletionQueue:
        """A CQ that holds at least ``cqe`` unpolled completions, notifying through
        ``channel`` when armed. A channel serves at most one CQ (pyverbs' ``get_cq_event``
        must be told the CQ it expects, so a binding could not tell several apart).

        Raises ``ValueError`` if ``cqe`` < 1; ``VerbsError`` (``EINVAL``) if it exceeds the
        device's limit or ``channel`` is of another context, (``EBUSY``) if ``channel``
        already serves a CQ.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the device context. See the class docstring for what it raises."""


class ProtectionDomain(ABC):
    """A protection domain: memory regions and QPs in one PD can use each other, never across
    PDs (an lkey or rkey of another PD is as good as unknown)."""

    @abstractmethod
    def register(self, buffer: memoryview | bytearray, access: Access) -> MemoryRegion:
        """Register ``buffer`` (``ibv_reg_mr`` on its memory, in place: no copy, the buffer
        must stay alive and unmoved until ``deregister``). Registration is slow (it pins
        pages): register a pool once, never per message.

        Raises ``ValueError`` unless ``buffer`` is a writable, C-contiguous buffer of at least
        one byte; ``VerbsError`` (``EINVAL``) for ``REMOTE_WRITE`` without ``LOCAL_WRITE``,
        or when the device refuses (``ENOMEM``: too much pinned memory).
        """

    @abstractmethod
    def create_qp(
        self,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        max_send_wr: int,
        max_recv_wr: int,
        max_inline: int = 0,
        *,
        port: int = 1,
        gid_index: int = 0,
    ) -> QueuePair:
        """A new RC QP in state RESET, reporting to ``send_cq`` and ``recv_cq`` (the same CQ
        is fine and usual), with room for ``max_send_wr`` outstanding sends and
        ``max_recv_wr`` posted receives, and sends of up to ``max_inline`` bytes inline
        (PVRDMA supports none). ``port`` and ``gid_index`` choose the local port and the GID
        (on RoCE, the index of the RoCE v2 GID) the QP uses; ``endpoint`` reports that GID.

        Size each CQ for every WR that can complete on it at once (its QPs' ``max_send_wr``
        plus ``max_recv_wr``): an overrun errors every QP on it.

        Raises ``ValueError`` if a count is < 1 (``max_inline`` < 0); ``VerbsError``
        (``EINVAL``) if a count exceeds the device's limits, a CQ is closed or of another
        context, or the port or GID index does not exist.
        """

    @abstractmethod
    def close(self) -> None:
        """Free the PD. Raises ``VerbsError`` (``EBUSY``) while its MRs or QPs exist in the
        simulator (pyverbs closes them for you)."""


class MemoryRegion(ABC):
    """Registered memory. ``addr`` is the buffer's real address: SGEs and the peer's
    ``remote_addr`` use it, with ``lkey`` locally and ``rkey`` remotely. ``view`` is a
    zero-copy, 1-D unsigned-byte view of the registered memory."""

    @property
    @abstractmethod
    def addr(self) -> int:
        """The registered buffer's address."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Its size in bytes."""

    @property
    @abstractmethod
    def lkey(self) -> int:
        """The key local SGEs name it by."""

    @property
    @abstractmethod
    def rkey(self) -> int:
        """The key the peer's one-sided operations name it by (send it with ``addr``)."""

    @property
    @abstractmethod
    def access(self) -> Access:
        """What it was registered to allow."""

    @property
    @abstractmethod
    def view(self) -> memoryview:
        """The registered bytes, without a copy. Raises ``VerbsError`` (``EBADF``) once
        deregistered."""

    def sge(self, offset: int = 0, length: int | None = None) -> Sge:
        """The SGE for ``length`` bytes (default: to the end) from ``offset`` in this region.
        Raises ``ValueError`` if that range is not inside the region."""
        if length is None:
            length = self.length - offset
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"bytes {offset}..{offset + length} are outside this {self.length}-byte region"
            )
        return Sge(self.addr + offset, length, self.lkey)

    @abstractmethod
    def deregister(self) -> None:
        """Deregister (``ibv_dereg_mr``); the buffer is the caller's again. Idempotent.

        Raises ``VerbsError`` (``EBUSY``) while a posted receive still targets it (the
        simulator's check; hardware would let it, and fail that receive later with
        ``LOC_PROT_ERR``). The peer's rkey is dead at once: make sure it knows.
        """


class CompletionChannel(ABC):
    """Completion events of an armed CQ, through a file descriptor (``ibv_comp_channel``).

    The event-loop pattern (race-free; poll briefly before arming to keep the interrupt off
    the fast path)::

        loop.add_reader(channel.fd, on_readable)
        cq.req_notify()                       # arm, then poll once: nothing is missed
        def on_readable():
            cq = channel.get_event()          # BlockingIOError: spurious wake-up, return
            cq.ack_events(1)
            cq.req_notify()                   # re-arm BEFORE draining ...
            while wcs := cq.poll(32): ...     # ... so a completion after the drain signals
    """

    @property
    @abstractmethod
    def fd(self) -> int:
        """A non-blocking fd, readable while an event is waiting for ``get_event``, for
        ``loop.add_reader``. Never read it yourself."""

    @abstractmethod
    def get_event(self) -> CompletionQueue:
        """Take one event (``ibv_get_cq_event``): the CQ that was armed and got a completion.
        Never blocks. Each event must later be acknowledged with ``cq.ack_events``.

        Raises ``BlockingIOError`` (``EAGAIN``) when no event is waiting; ``VerbsError``
        (``EBADF``) once closed.
        """

    @abstractmethod
    def close(self) -> None:
        """Destroy the channel and its fd. Raises ``VerbsError`` (``EBUSY``) while a CQ uses
        it: close the CQ first."""


class CompletionQueue(ABC):
    """A completion queue (``ibv_cq``)."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many unpolled completions it holds (at least the ``cqe`` asked for; the
        simulator gives exactly that). One more is an overrun."""

    @abstractmethod
    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        """Take up to ``max_entries`` completions, oldest first (``ibv_poll_cq``); maybe none.
        Polling a send completion frees its QP's send-queue slots (that WR's and the
        unsignaled ones posted before it); polling a receive completion frees its slot.

        Raises ``ValueError`` if ``max_entries`` < 1; ``VerbsError`` (``EOVERFLOW``) once
        the CQ has overrun: its completions are lost and every QP using it is in ERR.
        """

    @abstractmethod
    def req_notify(self, solicited_only: bool = False) -> None:
        """Arm the CQ (``ibv_req_notify_cq``): the *next* completion added (only a solicited
        or failed one, with ``solicited_only``) puts one event on the channel and disarms it.
        Completions already queued do not signal: poll after arming. Raises ``VerbsError``
        (``EINVAL``) when the CQ has no channel."""

    @abstractmethod
    def ack_events(self, n: int) -> None:
        """Acknowledge ``n`` events taken with ``get_event`` (``ibv_ack_cq_events``). Raises
        ``ValueError`` if ``n`` < 0 or more than are unacknowledged."""

    @abstractmethod
    def close(self) -> None:
        """Destroy the CQ. Raises ``VerbsError`` (``EBUSY``) while a QP uses it, or while
        events taken from its channel are unacknowledged (``ibv_destroy_cq`` would wait for
        them forever; pyverbs acknowledges them for you, the simulator refuses)."""


class QueuePair(ABC):
    """A reliable-connected queue pair (``ibv_qp`` of type RC)."""

    @property
    @abstractmethod
    def qpn(self) -> int:
        """The QP number (24 bits)."""

    @property
    @abstractmethod
    def state(self) -> QpState:
        """The current state: the simulator's is exact; hardware's may lag a fault until its
        error completion is polled."""

    @abstractmethod
    def endpoint(self, psn: int) -> QpEndpoint:
        """What the peer needs to ``connect`` to this QP, and the PSN this QP's first send
        will carry (choose it at random; ``connect`` uses the last one given here, or 0).
        Raises ``ValueError`` unless ``psn`` is 24 bits."""

    @abstractmethod
    def connect(
        self,
        remote: QpEndpoint,
        *,
        access: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ,
        path_mtu: int = 1024,
        rnr_retry: int = 7,
        retry_count: int = 7,
        min_rnr_timer: int = 12,
        ack_timeout: int = 14,
    ) -> None:
        """Connect to ``remote`` (the peer's ``endpoint``): RESET -> INIT -> RTR -> RTS.

        ``access``: what the peer's one-sided operations may do through this QP (as
        responder), on top of each MR's own flags. ``path_mtu`` in bytes. ``rnr_retry``: how
        often a SEND is retried while the responder has no receive posted (7 = forever on
        hardware; the simulator fails the first RNR, see its docs). ``retry_count``: how
        often a packet is resent without an acknowledgement before ``RETRY_EXC_ERR``.
        ``min_rnr_timer`` and ``ack_timeout``: ibverbs' 5-bit encodings (12 = 0.64 ms;
        14 = 4.096 us * 2**14 = 67 ms).

        The peer must reach RTR before this side's first send, and must have posted the
        receives that send consumes: confirm both over the control connection.

        Raises ``ValueError`` for an argument out of range; ``VerbsError`` (``EINVAL``) unless
        the QP is in RESET; (``ENOENT``) in the simulator when no QP ``remote`` names exists
        (hardware would connect, then fail the first send with ``RETRY_EXC_ERR``).
        """

    @abstractmethod
    def post_recv(self, wr_id: int, sge: Sge | None) -> None:
        """Post a receive for one incoming SEND (landing in ``sge``) or RDMA WRITE with
        immediate (``sge`` unused; None is fine). Its completion, on the receive CQ, carries
        ``wr_id``. The SGE is checked when a message lands, not here.

        In ERR the receive is posted and flushed at once (``WR_FLUSH_ERR``).

        Raises ``ValueError`` for a bad ``wr_id`` or SGE; ``VerbsError`` (``EINVAL``) in
        RESET, (``ENOMEM``) when ``max_recv_wr`` receives are posted and not yet polled.
        """

    @abstractmethod
    def post_send(
        self,
        wr_id: int,
        opcode: WrOpcode,
        sge: Sge | None,
        *,
        remote_addr: int = 0,
        rkey: int = 0,
        imm_data: int | None = None,
        signaled: bool = True,
        solicited: bool = False,
        inline: bool = False,
    ) -> None:
        """Post one send work request; its completion (if ``signaled``, or if it fails) carries
        ``wr_id``. ``sge`` is the data sent or written, or the local target of an RDMA READ;
        None moves zero bytes. ``remote_addr``/``rkey``: the responder's memory, for one-sided
        opcodes. ``imm_data`` (32 bits) is required by and only allowed with ``*_WITH_IMM``.
        ``solicited`` sets the solicited-event bit (see ``req_notify``). ``inline`` copies the
        data during the call (no lkey needed; the buffer is free at once), up to
        ``max_inline`` bytes.

        The SGE's memory must not change until the WR completes. A zero-length one-sided
        operation checks no rkey (as the IB spec says).

        In ERR the WR is posted and flushed at once (``WR_FLUSH_ERR``).

        Raises ``ValueError`` for an argument out of range, a missing or stray ``imm_data``,
        an inline READ; ``VerbsError`` (``EINVAL``) in RESET, INIT or RTR, or for inline
        data longer than ``max_inline``, (``ENOMEM``) when ``max_send_wr`` sends are
        outstanding (posted and not freed by polling a signaled completion).
        """

    @abstractmethod
    def to_error(self) -> None:
        """Move to ERR now: every posted receive completes with ``WR_FLUSH_ERR``. The peer is
        not told; its next send fails with ``RETRY_EXC_ERR``. The start of an orderly
        teardown: flush, poll the flushes, close."""

    @abstractmethod
    def close(self) -> None:
        """Destroy the QP (``ibv_destroy_qp``). Its unpolled completions are removed from its
        CQs; the peer is not told and its next send fails with ``RETRY_EXC_ERR``."""
