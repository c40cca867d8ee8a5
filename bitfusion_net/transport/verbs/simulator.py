"""An in-process verbs simulator: one ``Fabric`` of devices whose RC queue pairs move real bytes
between registered buffers and enforce what real verbs enforce.

Theory of operation. Every operation is carried out, completely, inside the ``post_send`` that
starts it, under the fabric's one lock: the bytes are copied, the responder's receive is
consumed and its completion queued, then the requester's. Doing it at post time keeps the
simulator deterministic and orders completions as RC does (per QP, in post order; a
responder's receive completion before the requester's ACK-driven one). What a test, or the
transport, observes is only what it could observe on hardware: completions appear in the CQs
and events on the completion channel's fd, and nothing is visible before it is polled.

The rules, each where it is decided:

- ``SimulatedQueuePair.post_send``: state (RTS, or ERR to flush), send-queue room (``ENOMEM``),
  inline length; then ``_execute``: the local SGE (``LOC_PROT_ERR``), the responder being there
  and connected to this QP with matching PSNs (else ``RETRY_EXC_ERR``: packets nobody
  acknowledges), the rkey/bounds/access of one-sided operations (``REM_ACCESS_ERR``, both QPs to
  ERR), a posted receive (else RNR: ``RNR_RETRY_EXC_ERR`` at once, see below), the receive's
  SGE (responder ``LOC_PROT_ERR`` / requester ``REM_OP_ERR``) and size (responder
  ``LOC_LEN_ERR`` / requester ``REM_INV_REQ_ERR``), both QPs to ERR.
- ``SimulatedCompletionQueue._push``: capacity (overrun: the CQ is in error, its QPs to ERR) and
  arming (one event per arming).
- ``SimulatedQueuePair._to_error``: ERR flushes every posted receive; later posts flush at once.

RNR is decided at once: with no receive posted *now*, none can appear within the retry window
in a simulation that runs nothing concurrently with the post, so the requester fails with
``RNR_RETRY_EXC_ERR`` whatever its ``rnr_retry`` (on hardware 7 retries forever). A transport
with correct credits never meets it; ``Fabric.stats.rnr_events`` counts every one.

A dead peer is a QP that was closed (or a context that ``Fabric.crash`` killed, as a dying
process's kernel would): nothing tells the survivor, whose next send completes with
``RETRY_EXC_ERR`` and errors it, flushing its receives. An idle survivor learns nothing.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from .api import (
    Access,
    CompletionChannel,
    CompletionQueue,
    DeviceContext,
    MemoryRegion,
    ProtectionDomain,
    Provider,
    QpEndpoint,
    QpState,
    QueuePair,
    Sge,
    VerbsError,
    WcOpcode,
    WcStatus,
    WorkCompletion,
    WrOpcode,
    check_connect_attributes,
    check_send_request,
    check_sge,
    check_u,
)

# The simulated devices' limits (``ibv_device_attr``): roomy, as on a ConnectX; PVRDMA's are lower.
MAX_CQE = 1 << 22
MAX_QP_WR = 16384
MAX_INLINE = 256
PORTS = (1,)
GID_TABLE_SIZE = 1  # one GID per port: an IPv4-mapped, RoCE v2-like ::ffff:10.0.0.N

_ARMED_NONE, _ARMED_SOLICITED, _ARMED_ALL = 0, 1, 2


@dataclass
class FabricStats:
    """What happened on a fabric. ``faults`` adds up the ones a correct transport never causes
    (``retry_exceeded`` and ``flushed`` are left out: they are how a dead peer and a teardown
    show)."""

    sends: int = 0  # SEND and SEND_WITH_IMM delivered into a receive
    writes: int = 0  # RDMA WRITE (with or without immediate) carried out
    reads: int = 0  # RDMA READ carried out
    bytes_sent: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    rnr_events: int = 0  # a receive-consuming message found no receive posted
    access_errors: int = 0  # a one-sided operation refused: rkey, bounds, access flags
    local_protection_errors: int = 0  # a bad local SGE, requester's or responder's
    length_errors: int = 0  # a message larger than the receive it landed in
    cq_overruns: int = 0
    retry_exceeded: int = 0  # a send to a peer gone, errored or not connected to the sender
    flushed: int = 0  # WRs completed with WR_FLUSH_ERR

    @property
    def faults(self) -> int:
        return (
            self.rnr_events
            + self.access_errors
            + self.local_protection_errors
            + self.length_errors
            + self.cq_overruns
        )

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Device:
    """One simulated HCA: its GID and the keys of the MRs registered on it (keys are per
    device; an MR is usable only by QPs of its own PD)."""

    def __init__(self, name: str, number: int) -> None:
        self.name = name
        self.gid = bytes(10) + b"\xff\xff" + bytes((10, 0, number >> 8 & 0xFF, number & 0xFF))
        self.by_lkey: dict[int, SimulatedMemoryRegion] = {}
        self.by_rkey: dict[int, SimulatedMemoryRegion] = {}


class Fabric:
    """One in-process RDMA network: its devices (``devices`` names them; none simulates a host
    without RDMA), every QP on it by ``(GID, QPN)``, its counters and a log of its faults.

    Thread-safe: one re-entrant lock guards everything, so a blocking client thread and an
    event loop thread may use QPs of one fabric at once.
    """

    def __init__(self, devices: Sequence[str] = ("sim0",)) -> None:
        if len(set(devices)) != len(devices):
            raise ValueError(f"device names must be unique: {list(devices)}")
        self.lock = threading.RLock()
        self._devices = {name: _Device(name, i + 1) for i, name in enumerate(devices)}
        self._qps: dict[tuple[bytes, int], SimulatedQueuePair] = {}
        self._qpns = itertools.count(0x100)
        self._keys = itertools.count(1)
        self._stats = FabricStats()
        self._log: deque[str] = deque(maxlen=1000)

    @property
    def stats(self) -> FabricStats:
        """A snapshot of the counters."""
        with self.lock:
            return replace(self._stats)

    @property
    def fault_log(self) -> list[str]:
        """Why each QP went to ERR and each fault happened, oldest first (the last 1000)."""
        with self.lock:
            return list(self._log)

    def crash(self, context: DeviceContext) -> None:
        """Kill ``context`` as a process dying would: its QPs vanish without a word to their
        peers, its MRs' keys die, its CQs and channels are gone. Nothing is checked or
        completed. Its objects must not be used afterwards (they raise ``EBADF``); its
        channels' fds are closed, so take them off any event loop first."""
        if not isinstance(context, SimulatedContext) or context._fabric is not self:
            raise ValueError("not a context of this fabric")
        with self.lock:
            context._crash()
            self._note(None, f"context {context.name!r} crashed")

    def _new_key(self) -> int:
        # n * odd + c is a bijection on 32 bits: unique keys that do not look like a counter,
        # so an off-by-one key is unknown rather than another region's.
        while True:
            key = (next(self._keys) * 0x9E3779B1 + 0x5BD1E995) & 0xFFFFFFFF
            if key:
                return key

    def _note(self, counter: str | None, message: str) -> None:
        if counter is not None:
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)
        self._log.append(message)


class SimulatedProvider(Provider):
    """The devices of one ``Fabric``."""

    name = "simulator"

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric

    def devices(self) -> list[str]:
        return list(self.fabric._devices)

    def open(self, device: str | None = None) -> DeviceContext:
        fabric = self.fabric
        with fabric.lock:
            if not fabric._devices:
                raise VerbsError(errno.ENODEV, "no RDMA device on this simulated fabric")
            if device is None:
                device = next(iter(fabric._devices))
            found = fabric._devices.get(device)
            if found is None:
                raise VerbsError(
                    errno.ENODEV, f"no RDMA device {device!r}; there are {self.devices()}"
                )
            return SimulatedContext(fabric, found)


class _Closable:
    _closed = False
    _what = "object"
    _closed_as = "closed"

    def _check_open(self) -> None:
        if self._closed:
            raise VerbsError(errno.EBADF, f"the {self._what} is {self._closed_as}")


class SimulatedContext(_Closable, DeviceContext):
    _what = "device context"

    def __init__(self, fabric: Fabric, device: _Device) -> None:
        self._fabric = fabric
        self._device = device
        self._pds: set[SimulatedProtectionDomain] = set()
        self._cqs: set[SimulatedCompletionQueue] = set()
        self._channels: set[SimulatedCompletionChannel] = set()

    @property
    def name(self) -> str:
        return self._device.name

    def gid(self, port: int = 1, index: int = 0) -> bytes:
        with self._fabric.lock:
            self._check_open()
            _check_port(port, index)
            return self._device.gid

    def alloc_pd(self) -> ProtectionDomain:
        with self._fabric.lock:
            self._check_open()
            pd = SimulatedProtectionDomain(self)
            self._pds.add(pd)
            return pd

    def create_comp_channel(self) -> CompletionChannel:
        with self._fabric.lock:
            self._check_open()
            channel = SimulatedCompletionChannel(self)
            self._channels.add(channel)
            return channel

    def create_cq(self, cqe: int, channel: CompletionChannel | None = None) -> CompletionQueue:
        if isinstance(cqe, bool) or not isinstance(cqe, int) or cqe < 1:
            raise ValueError(f"cqe must be a positive int, not {cqe!r}")
        with self._fabric.lock:
            self._check_open()
            if cqe > MAX_CQE:
                raise VerbsError(errno.EINVAL, f"cqe {cqe} exceeds the device's {MAX_CQE}")
            if channel is not None:
                if not isinstance(channel, SimulatedCompletionChannel) or channel._ctx is not self:
                    raise VerbsError(errno.EINVAL, "the channel is not of this device context")
                channel._check_open()
                if channel._cq is not None:
                    raise VerbsError(
                        errno.EBUSY, "the channel already serves a CQ (one CQ per channel)"
                    )
            cq = SimulatedCompletionQueue(self, cqe, channel)
            if channel is not None:
                channel._cq = cq
            self._cqs.add(cq)
            return cq

    def close(self) -> None:
        with self._fabric.lock:
            if self._closed:
                return
            if self._pds or self._cqs or self._channels:
                raise VerbsError(
                    errno.EBUSY,
                    f"device context {self.name!r} still has {len(self._pds)} PDs, "
                    f"{len(self._cqs)} CQs and {len(self._channels)} channels: close them first",
                )
            self._closed = True

    def _crash(self) -> None:
        for pd in list(self._pds):
            for qp in list(pd._qps):
                qp._destroy()
            for mr in list(pd._mrs):
                mr._drop()
            pd._closed = True
        for cq in self._cqs:
            cq._entries.clear()
            cq._closed = True
        for channel in self._channels:
            channel._close_fds()
        self._pds.clear()
        self._cqs.clear()
        self._channels.clear()
        self._closed = True


def _access_flags(access: int) -> Access:
    every = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ
    if isinstance(access, bool) or not isinstance(access, int) or access & ~every:
        raise ValueError(f"access must be a combination of Access flags, not {access!r}")
    return Access(access)


def _check_port(port: int, gid_index: int) -> None:
    if port not in PORTS:
        raise VerbsError(errno.EINVAL, f"the device has no port {port}; it has {PORTS}")
    if not 0 <= gid_index < GID_TABLE_SIZE:
        raise VerbsError(
            errno.EINVAL, f"port {port} has no GID index {gid_index} ({GID_TABLE_SIZE} GIDs)"
        )


class SimulatedProtectionDomain(_Closable, ProtectionDomain):
    _what = "protection domain"

    def __init__(self, ctx: SimulatedContext) -> None:
        self._ctx = ctx
        self._fabric = ctx._fabric
        self._mrs: set[SimulatedMemoryRegion] = set()
        self._qps: set[SimulatedQueuePair] = set()

    def register(self, buffer: memoryview | bytearray, access: Access) -> MemoryRegion:
        access = _access_flags(access)
        try:
            view = memoryview(buffer).cast("B")
        except TypeError as e:
            raise ValueError(f"cannot register {type(buffer).__name__}: {e}") from e
        if view.readonly:
            raise ValueError(f"cannot register a read-only {type(buffer).__name__}")
        if not view.nbytes:
            raise ValueError("cannot register an empty buffer")
        if access & Access.REMOTE_WRITE and not access & Access.LOCAL_WRITE:
            raise VerbsError(errno.EINVAL, "REMOTE_WRITE requires LOCAL_WRITE (ibv_reg_mr)")
        with self._fabric.lock:
            self._check_open()
            mr = SimulatedMemoryRegion(
                self, view, access, self._fabric._new_key(), self._fabric._new_key()
            )
            self._mrs.add(mr)
            device = self._ctx._device
            device.by_lkey[mr.lkey] = mr
            device.by_rkey[mr.rkey] = mr
            return mr

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
        for name, value, least in (
            ("max_send_wr", max_send_wr, 1),
            ("max_recv_wr", max_recv_wr, 1),
            ("max_inline", max_inline, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, not {value!r}")
        with self._fabric.lock:
            self._check_open()
            if max(max_send_wr, max_recv_wr) > MAX_QP_WR:
                raise VerbsError(errno.EINVAL, f"more than the device's {MAX_QP_WR} WRs per queue")
            if max_inline > MAX_INLINE:
                raise VerbsError(errno.EINVAL, f"max_inline beyond the device's {MAX_INLINE}")
            _check_port(port, gid_index)
            cqs = []
            for cq in (send_cq, recv_cq):
                if not isinstance(cq, SimulatedCompletionQueue) or cq._ctx is not self._ctx:
                    raise VerbsError(errno.EINVAL, "the CQ is not of this PD's device context")
                cq._check_open()
                cqs.append(cq)
            qp = SimulatedQueuePair(self, cqs[0], cqs[1], max_send_wr, max_recv_wr, max_inline)
            self._qps.add(qp)
            for cq in cqs:
                cq._qps.add(qp)
            self._fabric._qps[qp._address] = qp
            return qp

    def close(self) -> None:
        with self._fabric.lock:
            if self._closed:
                return
            if self._mrs or self._qps:
                raise VerbsError(
                    errno.EBUSY,
                    f"the PD still has {len(self._mrs)} MRs and {len(self._qps)} QPs: "
                    "deregister and close them first",
                )
            self._closed = True
            self._ctx._pds.discard(self)


class SimulatedMemoryRegion(_Closable, MemoryRegion):
    _what = "memory region"
    _closed_as = "deregistered"

    def __init__(
        self, pd: SimulatedProtectionDomain, view: memoryview, access: Access, lkey: int, rkey: int
    ) -> None:
        self._pd = pd
        self._fabric = pd._fabric
        self._view: memoryview | None = view
        # from_buffer keeps an export on the buffer (a bytearray can no longer be resized: it is
        # "pinned") and yields its real address.
        self._anchor: ctypes.Array[ctypes.c_char] | None = (
            ctypes.c_char * view.nbytes
        ).from_buffer(view)
        self._addr = ctypes.addressof(self._anchor)
        self._length = view.nbytes
        self._access = access
        self._lkey = lkey
        self._rkey = rkey
        self._posted_receives = 0  # receives targeting it, posted and not yet completed

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def length(self) -> int:
        return self._length

    @property
    def lkey(self) -> int:
        return self._lkey

    @property
    def rkey(self) -> int:
        return self._rkey

    @property
    def access(self) -> Access:
        return self._access

    @property
    def view(self) -> memoryview:
        with self._fabric.lock:
            self._check_open()
            assert self._view is not None
            return self._view

    def deregister(self) -> None:
        with self._fabric.lock:
            if self._closed:
                return
            if self._posted_receives:
                raise VerbsError(
                    errno.EBUSY,
                    f"{self._posted_receives} posted receives still target this MR: "
                    "flush them (QueuePair.to_error) and poll, or close their QP, first",
                )
            self._drop()

    def _drop(self) -> None:
        device = self._pd._ctx._device
        device.by_lkey.pop(self._lkey, None)
        device.by_rkey.pop(self._rkey, None)
        self._pd._mrs.discard(self)
        self._view = None
        self._anchor = None
        self._closed = True

    def _slice(
        self, pd: SimulatedProtectionDomain, addr: int, length: int, need: Access
    ) -> memoryview | str:
        """The registered bytes ``[addr, addr + length)`` for a QP of ``pd`` needing ``need``,
        or why they may not be used."""
        if self._closed or self._view is None:
            return "a deregistered memory region"
        if pd is not self._pd:
            return "a memory region of another protection domain"
        missing = need & ~self._access
        if missing:
            return f"a memory region registered without {missing!r}"
        end = self._addr + self._length
        if addr < self._addr or addr + length > end:
            return f"bytes {addr:#x}+{length} outside the memory region {self._addr:#x}..{end:#x}"
        offset = addr - self._addr
        return self._view[offset : offset + length]


class SimulatedCompletionChannel(_Closable, CompletionChannel):
    """One event per fired arming, counted by an eventfd in semaphore mode (a pipe holding one
    byte per event where there is no eventfd), so the fd is readable exactly while an event
    waits."""

    _what = "completion channel"

    def __init__(self, ctx: SimulatedContext) -> None:
        self._ctx = ctx
        self._fabric = ctx._fabric
        self._cq: SimulatedCompletionQueue | None = None
        self._events: deque[SimulatedCompletionQueue] = deque()
        self._write_fd: int | None
        if hasattr(os, "eventfd"):
            self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
            self._write_fd = None
        else:  # pragma: no cover - not Linux
            self._fd, self._write_fd = os.pipe()
            os.set_blocking(self._fd, False)
            os.set_blocking(self._write_fd, False)

    @property
    def fd(self) -> int:
        self._check_open()
        return self._fd

    def get_event(self) -> CompletionQueue:
        with self._fabric.lock:
            self._check_open()
            if not self._events:
                raise BlockingIOError(errno.EAGAIN, "no completion event is waiting")
            cq = self._events.popleft()
            self._take_token()
            cq._unacked += 1
            return cq

    def close(self) -> None:
        with self._fabric.lock:
            if self._closed:
                return
            if self._cq is not None:
                raise VerbsError(errno.EBUSY, "a CQ still uses this channel: close it first")
            self._close_fds()
            self._ctx._channels.discard(self)

    def _signal(self, cq: SimulatedCompletionQueue) -> None:
        self._events.append(cq)
        if self._write_fd is None:
            os.eventfd_write(self._fd, 1)
        else:  # pragma: no cover - not Linux
            os.write(self._write_fd, b"\0")

    def _take_token(self) -> None:
        if self._write_fd is None:
            os.eventfd_read(self._fd)
        else:  # pragma: no cover - not Linux
            os.read(self._fd, 1)

    def _forget(self, cq: SimulatedCompletionQueue) -> None:
        """Drop ``cq``'s waiting events (the kernel does so when a CQ is destroyed)."""
        kept = deque(c for c in self._events if c is not cq)
        for _ in range(len(self._events) - len(kept)):
            self._take_token()
        self._events = kept

    def _close_fds(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._fd)
        if self._write_fd is not None:  # pragma: no cover - not Linux
            os.close(self._write_fd)
        self._events.clear()
        self._cq = None


@dataclass(slots=True)
class _Entry:
    """A completion in a CQ, with the work-queue slots polling it frees."""

    wc: WorkCompletion
    qp: SimulatedQueuePair
    send_slots: int
    recv_slots: int


class SimulatedCompletionQueue(_Closable, CompletionQueue):
    _what = "completion queue"

    def __init__(
        self, ctx: SimulatedContext, capacity: int, channel: SimulatedCompletionChannel | None
    ) -> None:
        self._ctx = ctx
        self._fabric = ctx._fabric
        self._capacity = capacity
        self._channel = channel
        self._entries: deque[_Entry] = deque()
        self._armed = _ARMED_NONE
        self._unacked = 0
        self._overrun = False
        self._qps: set[SimulatedQueuePair] = set()

    @property
    def capacity(self) -> int:
        return self._capacity

    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, not {max_entries!r}")
        with self._fabric.lock:
            self._check_open()
            if self._overrun:
                raise VerbsError(
                    errno.EOVERFLOW,
                    f"CQ overrun: more than its {self._capacity} completions were unpolled; "
                    "they are lost and its QPs are in ERR (size CQs for every WR at once)",
                )
            out: list[WorkCompletion] = []
            while self._entries and len(out) < max_entries:
                entry = self._entries.popleft()
                entry.qp._free_slots(entry.send_slots, entry.recv_slots)
                out.append(entry.wc)
            return out

    def req_notify(self, solicited_only: bool = False) -> None:
        with self._fabric.lock:
            self._check_open()
            if self._channel is None:
                raise VerbsError(errno.EINVAL, "req_notify on a CQ made without a channel")
            wanted = _ARMED_SOLICITED if solicited_only else _ARMED_ALL
            self._armed = max(self._armed, wanted)

    def ack_events(self, n: int) -> None:
        with self._fabric.lock:
            self._check_open()
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._unacked:
                raise ValueError(f"cannot acknowledge {n!r} events: {self._unacked} are unacked")
            self._unacked -= n

    def close(self) -> None:
        with self._fabric.lock:
            if self._closed:
                return
            if self._qps:
                raise VerbsError(
                    errno.EBUSY, f"{len(self._qps)} QPs still use this CQ: close them first"
                )
            if self._unacked:
                raise VerbsError(
                    errno.EBUSY,
                    f"{self._unacked} events got from the channel are unacknowledged "
                    "(ack_events them; ibv_destroy_cq would wait forever)",
                )
            if self._channel is not None:
                self._channel._forget(self)
                self._channel._cq = None
            self._entries.clear()
            self._closed = True
            self._ctx._cqs.discard(self)

    def _push(self, entry: _Entry, solicited: bool = False) -> None:
        if self._closed or self._overrun:
            return
        if len(self._entries) >= self._capacity:
            self._overrun = True
            self._entries.clear()
            self._fabric._note("cq_overruns", f"CQ of capacity {self._capacity} overran")
            for qp in list(self._qps):
                qp._to_error("its CQ overran")
            # Hardware reports an overrun as an asynchronous CQ_ERR event, which this interface
            # does not expose; waking the channel makes the next poll raise instead of a hang.
            if self._armed and self._channel is not None:
                self._armed = _ARMED_NONE
                self._channel._signal(self)
            return
        self._entries.append(entry)
        if self._armed == _ARMED_ALL or (self._armed and (solicited or not entry.wc.ok)):
            self._armed = _ARMED_NONE
            assert self._channel is not None
            self._channel._signal(self)

    def _purge(self, qp: SimulatedQueuePair) -> None:
        self._entries = deque(e for e in self._entries if e.qp is not qp)


def _error_completion(wr_id: int, status: WcStatus, qpn: int) -> WorkCompletion:
    # On an error completion hardware leaves opcode and byte_len undefined; the pyverbs binding
    # reports SEND and what the device wrote. The simulator reports SEND and 0 for receives and
    # sends alike, so a transport that tells them apart by opcode fails here, not on hardware:
    # say in wr_id what a WR was.
    return WorkCompletion(wr_id, status, WcOpcode.SEND, 0, qpn, None)


@dataclass(slots=True)
class _Receive:
    wr_id: int
    sge: Sge | None
    mr: SimulatedMemoryRegion | None  # what sge.lkey named when posted, if anything


_EMPTY = memoryview(b"")
_REMOTE_NEED = {
    WrOpcode.RDMA_WRITE: Access.REMOTE_WRITE,
    WrOpcode.RDMA_WRITE_WITH_IMM: Access.REMOTE_WRITE,
    WrOpcode.RDMA_READ: Access.REMOTE_READ,
}


class SimulatedQueuePair(_Closable, QueuePair):
    _what = "queue pair"

    def __init__(
        self,
        pd: SimulatedProtectionDomain,
        send_cq: SimulatedCompletionQueue,
        recv_cq: SimulatedCompletionQueue,
        max_send_wr: int,
        max_recv_wr: int,
        max_inline: int,
    ) -> None:
        self._pd = pd
        self._fabric = pd._fabric
        self._device = pd._ctx._device
        self._send_cq = send_cq
        self._recv_cq = recv_cq
        self._max_send_wr = max_send_wr
        self._max_recv_wr = max_recv_wr
        self._max_inline = max_inline
        self._qpn = next(self._fabric._qpns) & 0xFFFFFF
        self._address = (self._device.gid, self._qpn)
        self._state = QpState.RESET
        self.path_mtu: int | None = None  # what ``connect`` was given
        self._sq_psn = 0
        self._rq_psn = 0
        self._remote: tuple[bytes, int] | None = None
        self._access = Access(0)
        self._receives: deque[_Receive] = deque()
        self._send_slots = 0  # posted sends not yet freed by a polled completion
        self._recv_slots = 0  # posted receives whose completion is not yet polled
        self._since_completion = 0  # sends posted since the last one that made a completion

    @property
    def qpn(self) -> int:
        return self._qpn

    @property
    def state(self) -> QpState:
        with self._fabric.lock:
            self._check_open()
            return self._state

    def endpoint(self, psn: int) -> QpEndpoint:
        check_u(psn, 24, "psn")
        with self._fabric.lock:
            self._check_open()
            self._sq_psn = psn
            return QpEndpoint(self._qpn, psn, self._device.gid, 0)

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
        check_connect_attributes(
            remote, path_mtu, rnr_retry, retry_count, min_rnr_timer, ack_timeout
        )
        access = _access_flags(access)
        with self._fabric.lock:
            self._check_open()
            if self._state is not QpState.RESET:
                raise VerbsError(
                    errno.EINVAL,
                    f"connect needs QP {self._qpn:#x} in RESET, not {self._state.name}",
                )
            address = (remote.gid, remote.qpn)
            if address not in self._fabric._qps or remote.lid != 0:
                raise VerbsError(
                    errno.ENOENT,
                    f"no QP {remote.qpn:#x} at GID {remote.gid.hex()} lid {remote.lid} "
                    "on this fabric",
                )
            self._remote = address
            self._rq_psn = remote.psn
            self._access = access
            self.path_mtu = path_mtu  # kept for tests to read; packets are not modelled
            self._state = QpState.RTS

    def post_recv(self, wr_id: int, sge: Sge | None) -> None:
        check_u(wr_id, 64, "wr_id")
        check_sge(sge)
        with self._fabric.lock:
            self._check_open()
            if self._state is QpState.RESET:
                raise VerbsError(errno.EINVAL, f"post_recv on QP {self._qpn:#x} in RESET")
            if self._recv_slots >= self._max_recv_wr:
                raise VerbsError(
                    errno.ENOMEM,
                    f"receive queue of QP {self._qpn:#x} full: {self._max_recv_wr} receives "
                    "posted and not yet polled",
                )
            self._recv_slots += 1
            mr = self._device.by_lkey.get(sge.lkey) if sge is not None and sge.length else None
            receive = _Receive(wr_id, sge, mr)
            if mr is not None:
                mr._posted_receives += 1
            if self._state is QpState.ERR:
                self._flush_receive(receive)
            else:
                self._receives.append(receive)

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
        check_send_request(wr_id, opcode, sge, remote_addr, rkey, imm_data, inline)
        length = sge.length if sge is not None else 0
        with self._fabric.lock:
            self._check_open()
            if self._state in (QpState.RESET, QpState.INIT, QpState.RTR):
                raise VerbsError(
                    errno.EINVAL,
                    f"post_send on QP {self._qpn:#x} in {self._state.name}: sends need RTS",
                )
            if inline and length > self._max_inline:
                raise VerbsError(
                    errno.EINVAL,
                    f"{length} inline bytes exceed the QP's max_inline {self._max_inline}",
                )
            if self._send_slots >= self._max_send_wr:
                raise VerbsError(
                    errno.ENOMEM,
                    f"send queue of QP {self._qpn:#x} full: {self._max_send_wr} WRs outstanding "
                    "(slots are freed by polling a signaled completion; signal at least one "
                    "send in every max_send_wr)",
                )
            self._send_slots += 1
            self._since_completion += 1
            wr = _SendRequest(wr_id, opcode, sge, length, remote_addr, rkey, imm_data, signaled)
            if self._state is QpState.ERR:
                self._fabric._stats.flushed += 1
                self._complete(wr, WcStatus.WR_FLUSH_ERR)
                return
            self._execute(wr, solicited, inline)

    def to_error(self) -> None:
        with self._fabric.lock:
            self._check_open()
            self._to_error("to_error() was called")

    def close(self) -> None:
        with self._fabric.lock:
            if not self._closed:
                self._destroy()

    # -- what the simulated hardware does -----------------------------------------------------

    def _execute(self, wr: _SendRequest, solicited: bool, inline: bool) -> None:
        fabric = self._fabric
        stats = fabric._stats
        opcode = wr.opcode

        # 1. The local side: the bytes to send or write, or the target of a READ.
        local: memoryview | str = _EMPTY
        if wr.length:
            assert wr.sge is not None
            if inline:
                local = memoryview(ctypes.string_at(wr.sge.addr, wr.length))
            else:
                mr = self._device.by_lkey.get(wr.sge.lkey)
                need = Access.LOCAL_WRITE if opcode is WrOpcode.RDMA_READ else Access(0)
                local = (
                    mr._slice(self._pd, wr.sge.addr, wr.length, need)
                    if mr is not None
                    else f"unknown lkey {wr.sge.lkey:#x}"
                )
        if isinstance(local, str):
            self._fail(wr, WcStatus.LOC_PROT_ERR, "local_protection_errors", f"local SGE: {local}")
            return

        # 2. The responder: there, ready, and connected to this QP (else nobody acknowledges).
        peer = fabric._qps.get(self._remote) if self._remote is not None else None
        why = None
        if peer is None:
            why = "the peer QP is gone"
        elif peer._state not in (QpState.RTR, QpState.RTS):
            why = f"the peer QP is in {peer._state.name}"
        elif peer._remote != self._address:
            why = "the peer QP is connected to another QP"
        elif peer._rq_psn != self._sq_psn:
            why = f"PSN mismatch (sent {self._sq_psn:#x}, peer expects {peer._rq_psn:#x})"
        if why is not None or peer is None:
            self._fail(wr, WcStatus.RETRY_EXC_ERR, "retry_exceeded", f"no ACK: {why}")
            return

        # 3. One-sided access at the responder (a zero-length operation checks no rkey).
        target: memoryview | str = _EMPTY
        need_remote = _REMOTE_NEED.get(opcode)
        if need_remote is not None and wr.length:
            if need_remote & ~peer._access:
                target = f"the peer QP does not allow {need_remote!r}"
            else:
                rmr = peer._device.by_rkey.get(wr.rkey)
                target = (
                    rmr._slice(peer._pd, wr.remote_addr, wr.length, need_remote)
                    if rmr is not None
                    else f"unknown rkey {wr.rkey:#x}"
                )
            if isinstance(target, str):
                self._fail(wr, WcStatus.REM_ACCESS_ERR, "access_errors", f"remote access: {target}")
                peer._to_error(f"async QP access error: QP {self._qpn:#x} sent a bad {opcode.name}")
                return

        # 4. A posted receive, for the opcodes that consume one.
        if opcode.consumes_receive:
            if not peer._receives:
                self._fail(
                    wr,
                    WcStatus.RNR_RETRY_EXC_ERR,
                    "rnr_events",
                    f"RNR: peer QP {peer._qpn:#x} had no receive posted for a {opcode.name}",
                )
                return
            receive = peer._receives.popleft()
            if opcode is WrOpcode.RDMA_WRITE_WITH_IMM:
                assert not isinstance(target, str)
                if wr.length:
                    target[:] = local
                stats.writes += 1
                stats.bytes_written += wr.length
                recv_opcode = WcOpcode.RECV_RDMA_WITH_IMM
            else:
                landing = peer._landing(receive, wr.length)
                if isinstance(landing, tuple):
                    status, counter, message = landing
                    peer._complete_receive(receive, status, WcOpcode.RECV, 0, None, False)
                    peer._to_error(f"its receive {receive.wr_id}: {message}")
                    requester_status = (
                        WcStatus.REM_INV_REQ_ERR
                        if status is WcStatus.LOC_LEN_ERR
                        else WcStatus.REM_OP_ERR
                    )
                    self._fail(wr, requester_status, counter, f"peer's receive: {message}")
                    return
                if wr.length:
                    landing[: wr.length] = local
                stats.sends += 1
                stats.bytes_sent += wr.length
                recv_opcode = WcOpcode.RECV
            peer._complete_receive(
                receive, WcStatus.SUCCESS, recv_opcode, wr.length, wr.imm_data, solicited
            )
        elif opcode is WrOpcode.RDMA_WRITE:
            if wr.length:
                assert not isinstance(target, str)
                target[:] = local
            stats.writes += 1
            stats.bytes_written += wr.length
        else:  # RDMA_READ
            if wr.length:
                assert not isinstance(target, str)
                local[:] = target
            stats.reads += 1
            stats.bytes_read += wr.length
        self._complete(wr, WcStatus.SUCCESS)

    def _landing(self, receive: _Receive, length: int) -> memoryview | tuple[WcStatus, str, str]:
        """Where an incoming SEND of ``length`` bytes lands in ``receive``, or (status, stats
        counter, why) when it cannot."""
        if not length:
            return _EMPTY
        room = receive.sge.length if receive.sge is not None else 0
        if receive.sge is not None and room:
            if receive.mr is None:
                why: str = f"unknown lkey {receive.sge.lkey:#x}"
            else:
                sliced = receive.mr._slice(self._pd, receive.sge.addr, room, Access.LOCAL_WRITE)
                if not isinstance(sliced, str):
                    if length > room:
                        return (
                            WcStatus.LOC_LEN_ERR,
                            "length_errors",
                            f"a {length}-byte message into a {room}-byte receive",
                        )
                    return sliced
                why = sliced
            return WcStatus.LOC_PROT_ERR, "local_protection_errors", f"receive SGE: {why}"
        return (
            WcStatus.LOC_LEN_ERR,
            "length_errors",
            f"a {length}-byte message into a 0-byte receive",
        )

    def _fail(self, wr: _SendRequest, status: WcStatus, counter: str, why: str) -> None:
        self._fabric._note(counter, f"QP {self._qpn:#x} {wr.opcode.name} wr_id={wr.wr_id}: {why}")
        self._complete(wr, status)
        self._to_error(f"{status.name} on wr_id={wr.wr_id}")

    def _complete(self, wr: _SendRequest, status: WcStatus) -> None:
        """Queue a send completion (a successful unsignaled WR makes none; its slot waits for
        the next completion, which frees every slot since the last one)."""
        if status is WcStatus.SUCCESS and not wr.signaled:
            return
        slots, self._since_completion = self._since_completion, 0
        if status is WcStatus.SUCCESS:
            wc = WorkCompletion(
                wr.wr_id, status, wr.opcode.completion_opcode, wr.length, self._qpn, None
            )
        else:
            wc = _error_completion(wr.wr_id, status, self._qpn)
        self._send_cq._push(_Entry(wc, self, slots, 0))

    def _complete_receive(
        self,
        receive: _Receive,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: int,
        imm_data: int | None,
        solicited: bool,
    ) -> None:
        if receive.mr is not None:
            receive.mr._posted_receives -= 1
        if status is WcStatus.SUCCESS:
            wc = WorkCompletion(receive.wr_id, status, opcode, byte_len, self._qpn, imm_data)
        else:
            wc = _error_completion(receive.wr_id, status, self._qpn)
        self._recv_cq._push(_Entry(wc, self, 0, 1), solicited)

    def _flush_receive(self, receive: _Receive) -> None:
        self._fabric._stats.flushed += 1
        self._complete_receive(receive, WcStatus.WR_FLUSH_ERR, WcOpcode.RECV, 0, None, False)

    def _to_error(self, reason: str) -> None:
        if self._closed or self._state is QpState.ERR:
            return
        self._state = QpState.ERR
        self._fabric._note(None, f"QP {self._qpn:#x} -> ERR: {reason}")
        while self._receives:
            self._flush_receive(self._receives.popleft())

    def _free_slots(self, send_slots: int, recv_slots: int) -> None:
        self._send_slots -= send_slots
        self._recv_slots -= recv_slots

    def _destroy(self) -> None:
        self._closed = True
        self._fabric._qps.pop(self._address, None)
        for receive in self._receives:
            if receive.mr is not None:
                receive.mr._posted_receives -= 1
        self._receives.clear()
        for cq in (self._send_cq, self._recv_cq):
            cq._purge(self)
            cq._qps.discard(self)
        self._pd._qps.discard(self)


@dataclass(slots=True)
class _SendRequest:
    wr_id: int
    opcode: WrOpcode
    sge: Sge | None
    length: int
    remote_addr: int
    rkey: int
    imm_data: int | None
    signaled: bool
