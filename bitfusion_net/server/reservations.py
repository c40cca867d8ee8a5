"""Reservations: GPUs held apart from any one connection, and the programs attached to them.

A reservation is a placement on the server's GPUs (``leases.GpuPool``) with a memory budget per
GPU. Programs *attach* to it with its secret (ATTACH): each attached session gets its own tenant
on every GPU of the reservation (its own context, allocations and sticky errors), and the
tenants of one GPU share the reservation's memory budget there. A HELLO is an implicit
reservation held by its own connection, with that connection attached.

A reservation ends when it is released (RELEASE); when its holder (the control connection that
made it with ``HOLD_BY_CONNECTION``) has gone and no program is attached; or when it has been
idle, no request on any of its connections and nothing of it queued, for its idle timeout.
Attached programs are then told why (a fatal LEASE_ENDED error) and their tenants are closed;
the GPUs go back to the pool once the tenants' memory is free. Used on the event loop only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import math
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from executors import Executor, MemoryBudget, Tenant, TenantUsage
from executors.errors import DeviceError

from ..protocol import (
    CapacityError,
    DeviceGrant,
    InvalidValueError,
    LeaseEndedError,
    QuotaExceededError,
)
from ..protocol import messages as m
from .leases import SHARE_UNITS, GpuPool, Placement
from .tokens import TokenRecord

log = logging.getLogger(__name__)

SECRET_BYTES = 32
ENDED_REMEMBERED = 4096  # ended reservations whose reason an ATTACH is still told


class EndedBy(Enum):
    """Why reservations end, as operators count them (``bitfusion_reservations_ended_total``)."""

    RELEASED = "released"  # RELEASE, or release_gpus
    IDLE_TIMEOUT = "idle_timeout"
    HOLDER_CLOSED = "holder_closed"  # its holding connection (and last program) went
    TOKEN_ENDED = "token_ended"  # its user's token was revoked or expired
    SHUTDOWN = "shutdown"


class Attachment(Protocol):
    """What a reservation needs of a session attached to it (``ServerSession``)."""

    id: int

    def lease_ended(self, reason: str) -> None:
        """End the session: its reservation is gone (tell the client why, then close)."""

    def last_request(self) -> float:
        """When the last request was received, on the table's clock (``time.monotonic()``)."""

    def busy(self) -> bool:
        """Whether work of the session is queued, running or owed a reply."""


@dataclass
class Lease:
    """One GPU of an attached session: where it is placed and its tenant on the executor."""

    placement: Placement
    executor: Executor
    tenant: Tenant


@dataclass
class DeviceAccount:
    """What a reservation's programs have used of one of its GPUs, those gone included."""

    gpu: int
    device_time: float = 0.0  # seconds
    queue_wait: float = 0.0  # seconds its operations waited to start
    operations: int = 0
    memory_high_water: int = 0  # the most one program held

    def add(self, usage: TenantUsage) -> None:
        self.device_time += usage.device_time
        self.queue_wait += usage.queue_wait
        self.operations += usage.operations
        self.memory_high_water = max(self.memory_high_water, usage.memory_high_water)


@dataclass(eq=False)
class Reservation:
    id: int
    secret: bytes
    client_name: str
    placements: list[Placement]
    budgets: list[MemoryBudget]
    weight: float  # 0: each GPU's fraction
    mode: int
    idle_timeout: float  # seconds; 0: never idle-released
    holder: object | None  # the connection holding it, or None (lives until released or idle)
    implicit: bool = False  # made by a HELLO for its own connection: it is that session's lease
    user: TokenRecord | None = None  # whose it is, on a server with tokens
    created: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    attached: dict[Attachment, list[Lease]] = field(default_factory=dict)
    ended: str | None = None  # why it ended
    closing: int = 0  # tenants of it still being closed (their memory is not yet free)
    settle_waiters: list[Callable[[], None]] = field(default_factory=list)  # until closing is 0
    returned: bool = False  # its placements are back in the pool
    past: list[DeviceAccount] = field(default_factory=list)  # per GPU, programs that detached

    def accounts(self) -> list[DeviceAccount]:
        """Per GPU, what its programs have used so far, those attached now and those gone."""
        totals = [
            DeviceAccount(p.gpu, a.device_time, a.queue_wait, a.operations, a.memory_high_water)
            for p, a in zip(self.placements, self.past, strict=True)
        ]
        for leases in self.attached.values():
            for total, lease in zip(totals, leases, strict=True):
                total.add(lease.executor.usage(lease.tenant))
        return totals

    def grants(self, executors: list[Executor]) -> list[DeviceGrant]:
        return [
            DeviceGrant(
                index=i,
                server_gpu=placement.gpu,
                total_memory=executors[placement.gpu].properties.total_memory,
                memory_limit=placement.memory_limit,
                fraction=placement.fraction,
                weight=self.weight or placement.fraction,
                mode=self.mode,
                name=executors[placement.gpu].properties.name,
                executor=executors[placement.gpu].properties.executor,
            )
            for i, placement in enumerate(self.placements)
        ]

    def idle_for(self, now: float) -> float:
        """Seconds since the last request on any of its connections (0 while work is pending)."""
        if any(session.busy() for session in self.attached):
            self.last_active = now
        last = max([self.last_active, *(s.last_request() for s in self.attached)])
        return max(0.0, now - last)

    def describe(self) -> str:
        return ", ".join(
            f"gpu{p.gpu}@{p.fraction:g} ({'cap' if self.mode == m.MODE_CAP else 'share'})"
            for p in self.placements
        )


class ReservationTable:
    """Every reservation of one server; see the module docstring."""

    def __init__(
        self,
        pool: GpuPool,
        executors: list[Executor],
        server_id: str,
        max_idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` stamps when reservations are made and last active; a simulation passes its
        own (``perf/utilisation.py`` runs a week of a cluster on it). ``sweep`` takes ``now`` on
        the same clock."""
        self.pool = pool
        self.clock = clock
        self.executors = executors
        self.server_id = server_id
        self.max_idle_timeout = max_idle_timeout  # 0: no bound
        self._by_id: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        # Ended reservations: id -> (a hash of the secret, why it ended). Only a caller with the
        # secret hears why; anyone else learns nothing, not even that the id existed.
        self._ended: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self.ended_by: Counter[str] = Counter()  # reservations ended, by ``EndedBy`` kind
        # Told of each reservation once it has ended and its programs' accounts are final.
        self.end_listeners: list[Callable[[Reservation], None]] = []

    def __iter__(self) -> Iterator[Reservation]:
        """A snapshot: ending reservations while iterating is fine."""
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    # -- making and finding ---------------------------------------------------------------------
    def reserve(
        self,
        gpus: int,
        fraction: float,
        memory: int,
        weight: float,
        mode: int,
        client_name: str,
        holder: object | None,
        idle_timeout: float = 0.0,
        implicit: bool = False,
        allowed: set[int] | None = None,
        user: TokenRecord | None = None,
    ) -> Reservation:
        """Place a reservation, or raise ``InvalidValueError`` / ``CapacityError`` with
        nothing placed. ``idle_timeout`` is bounded by the server's maximum (0 asks for it)."""
        if mode not in (m.MODE_SHARE, m.MODE_CAP):
            raise InvalidValueError(f"unknown scheduling mode {mode} (0 share, 1 cap)")
        if not (weight == 0 or (math.isfinite(weight) and 0 < weight <= 1000)):
            raise InvalidValueError(f"weight must be in (0, 1000], got {weight}")
        if not (math.isfinite(idle_timeout) and idle_timeout >= 0):
            raise InvalidValueError(f"idle timeout must be >= 0 seconds, got {idle_timeout}")
        if self.max_idle_timeout and (not idle_timeout or idle_timeout > self.max_idle_timeout):
            idle_timeout = self.max_idle_timeout
        placements = self.pool.request(gpus, fraction, memory, allowed)
        if user is not None:
            try:
                self._check_quota(user, placements)
            except QuotaExceededError:
                for placement in placements:
                    self.pool.release(placement)
                raise
        now = self.clock()
        reservation = Reservation(
            next(self._ids),
            secrets.token_bytes(SECRET_BYTES),
            client_name,
            placements,
            [MemoryBudget(p.memory_limit) for p in placements],
            weight,
            mode,
            idle_timeout,
            holder,
            implicit,
            user,
            created=now,
            last_active=now,
            past=[DeviceAccount(p.gpu) for p in placements],
        )
        self._by_id[reservation.id] = reservation
        return reservation

    def _check_quota(self, user: TokenRecord, placements: list[Placement]) -> None:
        """``QuotaExceededError`` if ``placements`` would take ``user`` past a limit of their
        token, counting every live reservation of theirs (HELLO leases included)."""
        held = [
            p
            for r in self._by_id.values()
            if r.user and r.user.user == user.user
            for p in r.placements
        ]
        wanted = held + placements
        gpus = len(wanted)
        share = sum(p.share for p in wanted)
        memory = sum(p.memory_limit for p in wanted)
        if user.max_gpus is not None and gpus > user.max_gpus:
            raise QuotaExceededError(
                f"{user.user} may hold {user.max_gpus} GPU(s); {len(held)} held, "
                f"{len(placements)} more asked"
            )
        if user.max_fraction is not None and share > round(user.max_fraction * SHARE_UNITS):
            raise QuotaExceededError(
                f"{user.user} may hold {user.max_fraction:g} of a GPU in all; "
                f"{sum(p.share for p in held) / SHARE_UNITS:g} held, "
                f"{sum(p.share for p in placements) / SHARE_UNITS:g} more asked"
            )
        if user.max_memory is not None and memory > user.max_memory:
            raise QuotaExceededError(
                f"{user.user} may hold {user.max_memory} bytes of GPU memory; "
                f"{sum(p.memory_limit for p in held)} held, "
                f"{sum(p.memory_limit for p in placements)} more asked"
            )

    def of_tokens(self, token_ids: set[str]) -> list[Reservation]:
        """The live reservations made with these tokens."""
        return [r for r in self if r.user is not None and r.user.id in token_ids]

    def find(self, reservation_id: int, secret: bytes, server_id: str) -> Reservation:
        """The live reservation with this id and secret; raises ``LeaseEndedError`` for one
        that ended (or was made before the server restarted), ``InvalidValueError`` for an id
        or secret that is wrong (the same text either way: ids cannot be probed)."""
        if server_id and server_id != self.server_id:
            raise LeaseEndedError(
                "the server restarted since this reservation was made (it is now instance "
                f"{self.server_id}); its GPUs were released: reserve again"
            )
        reservation = self._by_id.get(reservation_id)
        if reservation is not None and hmac.compare_digest(reservation.secret, secret):
            return reservation
        ended = self._ended.get(reservation_id) if reservation is None else None
        if ended is not None and hmac.compare_digest(ended[0], _digest(secret)):
            raise LeaseEndedError(f"reservation {reservation_id} has ended: {ended[1]}")
        raise InvalidValueError(f"no reservation {reservation_id} with that secret on this server")

    # -- programs -------------------------------------------------------------------------------
    def when_settled(self, reservation: Reservation, then: Callable[[], None]) -> None:
        """Call ``then`` once no tenant of the reservation is still being closed: a program that
        attaches right after another detached finds the memory that one held free again."""
        if reservation.closing:
            reservation.settle_waiters.append(then)
        else:
            then()

    def attach(self, reservation: Reservation, session: Attachment) -> list[Lease]:
        """Open the session's tenants on the reservation's GPUs (raises ``CapacityError``,
        with nothing left open, if an executor refuses)."""
        leases: list[Lease] = []
        try:
            for placement, budget in zip(reservation.placements, reservation.budgets, strict=True):
                executor = self.executors[placement.gpu]
                tenant = executor.open_tenant(
                    placement.memory_limit,
                    weight=reservation.weight or placement.fraction,
                    cap=placement.fraction if reservation.mode == m.MODE_CAP else None,
                    budget=budget,
                )
                leases.append(Lease(placement, executor, tenant))
        except DeviceError as exc:
            for lease in leases:
                lease.executor.close_tenant(lease.tenant)
            raise CapacityError(f"the executor refused the lease: {exc}") from None
        reservation.attached[session] = leases
        self._share_compute(reservation)
        return leases

    def _share_compute(self, reservation: Reservation) -> None:
        """Programs attached at once split the reservation's compute weight (and cap) on each
        GPU evenly, so that attaching more programs never gets a reservation more GPU time."""
        count = len(reservation.attached)
        if not count:
            return
        for session_leases in reservation.attached.values():
            for lease in session_leases:
                placement = lease.placement
                weight = (reservation.weight or placement.fraction) / count
                cap = placement.fraction / count if reservation.mode == m.MODE_CAP else None
                lease.executor.reweigh(lease.tenant, weight, cap)

    def detach(self, reservation: Reservation, session: Attachment) -> None:
        """The session has gone: close its tenants; a reservation whose holder has gone ends
        with its last program."""
        leases = reservation.attached.pop(session, None)
        if leases is None:
            return
        reservation.last_active = self.clock()
        self._close_tenants(reservation, leases)
        self._share_compute(reservation)
        if reservation.holder is _GONE and not reservation.attached:
            self.end(
                reservation,
                "the connection holding it closed, then its last program",
                EndedBy.HOLDER_CLOSED,
            )

    def holder_gone(self, reservation: Reservation) -> None:
        """The connection holding ``reservation`` has gone: it ends now if no program is
        attached, else when the last one detaches."""
        reservation.holder = _GONE
        if not reservation.attached:
            self.end(reservation, "the connection holding it closed", EndedBy.HOLDER_CLOSED)

    # -- ending ---------------------------------------------------------------------------------
    def end(self, reservation: Reservation, reason: str, kind: EndedBy) -> None:
        """End it: attached programs are told ``reason`` and closed, its GPUs go back to the
        pool once their tenants' memory is free. ``kind`` is what operators count it as."""
        if reservation.ended is not None:
            return
        reservation.ended = reason
        self.ended_by[kind.value] += 1
        del self._by_id[reservation.id]
        self._ended[reservation.id] = (_digest(reservation.secret), reason)
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)
        log.log(
            logging.DEBUG if reservation.implicit else logging.INFO,
            "reservation %d (%s, %s) ended: %s",
            reservation.id,
            reservation.client_name or "unnamed",
            reservation.describe(),
            reason,
        )
        attached, reservation.attached = reservation.attached, {}
        for session in attached:
            session.lease_ended(f"reservation {reservation.id} has ended: {reason}")
        leases = [lease for session_leases in attached.values() for lease in session_leases]
        self._close_tenants(reservation, leases)
        self._give_back(reservation)
        for listener in self.end_listeners:
            listener(reservation)

    def _close_tenants(self, reservation: Reservation, leases: list[Lease]) -> None:
        """Close the tenants (their queued work is dropped); an ended reservation's GPUs go
        back to the pool once every one's memory is free (else the executor could refuse the
        next lease placed there). With no tenant to close (a reservation no program attached
        to) nothing waits on a device, so no event loop is needed."""
        if not leases:
            return
        loop = asyncio.get_running_loop()

        def freed() -> None:
            reservation.closing -= 1
            if not reservation.closing:
                waiters, reservation.settle_waiters = reservation.settle_waiters, []
                for waiter in waiters:
                    waiter()
            self._give_back(reservation)

        def on_done() -> None:  # on the device's worker thread
            loop.call_soon_threadsafe(freed)

        past = {account.gpu: account for account in reservation.past}
        for lease in leases:
            past[lease.placement.gpu].add(lease.executor.usage(lease.tenant))  # queued: dropped
            reservation.closing += 1
            lease.executor.close_tenant(lease.tenant, on_done=on_done)

    def _give_back(self, reservation: Reservation) -> None:
        if reservation.ended is not None and not reservation.closing and not reservation.returned:
            reservation.returned = True
            for placement in reservation.placements:
                self.pool.release(placement)

    def sweep(self, now: float) -> None:
        """End reservations idle past their idle timeout."""
        for reservation in self:
            timeout = reservation.idle_timeout
            if timeout and (idle := reservation.idle_for(now)) > timeout:
                self.end(
                    reservation,
                    f"idle for {idle:.1f} s, past its idle timeout of {timeout:g} s "
                    "(no call on any of its connections)",
                    EndedBy.IDLE_TIMEOUT,
                )

    def close(self) -> None:
        for reservation in self:
            self.end(reservation, "the server shut down", EndedBy.SHUTDOWN)


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


_GONE = object()  # the holder of a reservation whose holding connection has gone
