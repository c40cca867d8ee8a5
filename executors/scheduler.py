"""Queueing disciplines for a device's work: weighted fair (the default) and FIFO (the baseline).

``FairScheduler`` is start-time fair queuing (SFQ, Goyal et al. 1996) over **measured** device time:

- Each tenant has a start tag S and a finish tag F in virtual time. The backlogged tenant with the
  smallest S runs next; the virtual clock v becomes that S.
- A job's cost is only known after it ran, so it is charged then: F = S + measured / weight, and the
  tenant's next job starts at max(v, F). Kernels are never pre-empted; an overrun is simply charged.
- A tenant that was idle restarts at max(v, F): it cannot bank credit while idle, and it is served
  within about one job of arriving, whoever else is backlogged.
- ``in_flight_budget`` bounds how many jobs of one tenant may be on the device at once, so a deep
  backlog never delays another tenant by more than about one kernel (1 on a synchronous device).

Work-conserving by default (``share``): idle time goes to the busy tenants in proportion to weight.
A tenant with a ``cap`` (a fraction of device time) is also held to it when the device is otherwise
idle, by a token bucket that refills at ``cap`` device-seconds per second and holds at most
``CAP_BURST`` seconds, so over any window of length W its share is at most
cap + (CAP_BURST + its longest job) / W (a job that started cannot be stopped; its overrun is charged).

Pure logic on an injected clock: no threads, no sleeping. The device worker owns the locking.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

CAP_BURST = 0.002  # seconds of device time a capped tenant may save up


@dataclass
class Usage:
    """What one tenant has used of the device, as measured by the worker."""

    device_time: float = 0.0  # seconds its jobs ran
    queue_wait: float = 0.0  # seconds its jobs waited between submission and start
    operations: int = 0  # jobs run


@dataclass
class _TenantState(Generic[T]):
    weight: float
    cap: float | None
    jobs: deque[tuple[T, float]] = field(default_factory=deque)  # (job, time submitted)
    start: float = 0.0  # S: virtual start tag of its head job
    finish: float = 0.0  # F: virtual finish tag of its last charged job
    in_flight: int = 0
    credit: float = 0.0  # capped tenants: device-seconds they may still use
    credit_time: float = 0.0  # when credit was last refilled
    queued: bool = False  # in the ready heap
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Dispatch(Generic[T]):
    """A job to run now: whose it is, the job, and how long it waited."""

    key: Hashable
    job: T
    waited: float


class FairScheduler(Generic[T]):
    """Weighted start-time fair queuing with optional hard caps (see the module docstring)."""

    def __init__(self, *, in_flight_budget: int = 1) -> None:
        if in_flight_budget < 1:
            raise ValueError("in_flight_budget must be at least 1")
        self._budget = in_flight_budget
        self._tenants: dict[Hashable, _TenantState[T]] = {}
        self._ready: list[tuple[float, int, Hashable]] = []  # (start tag, tie-break, key)
        self._order = itertools.count()
        self._virtual = 0.0
        self._pending = 0

    # -- tenants --------------------------------------------------------------------------------
    def add(self, key: Hashable, weight: float, cap: float | None = None, now: float = 0.0) -> None:
        if key in self._tenants:
            raise ValueError(f"tenant {key!r} is already scheduled")
        if not weight > 0:
            raise ValueError("weight must be positive")
        if cap is not None and not 0 < cap <= 1:
            raise ValueError("cap must be in (0, 1]")
        self._tenants[key] = _TenantState(weight, cap, credit=0.0, credit_time=now)

    def remove(self, key: Hashable) -> list[T]:
        """Forget a tenant; returns the jobs it still had queued (the caller answers them)."""
        state = self._tenants.pop(key, None)
        if state is None:
            return []
        self._pending -= len(state.jobs)
        if state.queued:
            self._ready = [entry for entry in self._ready if entry[2] != key]
            heapq.heapify(self._ready)
        return [job for job, _ in state.jobs]

    def has(self, key: Hashable) -> bool:
        return key in self._tenants

    def usage(self, key: Hashable) -> Usage:
        """The tenant's usage (all zero for a tenant that is not, or no longer, scheduled)."""
        state = self._tenants.get(key)
        return state.usage if state is not None else Usage()

    def __len__(self) -> int:
        """Jobs queued and not yet dispatched."""
        return self._pending

    # -- jobs -----------------------------------------------------------------------------------
    def push(self, key: Hashable, job: T, now: float) -> None:
        state = self._tenants[key]
        state.jobs.append((job, now))
        self._pending += 1
        if len(state.jobs) == 1 and state.in_flight == 0:
            # Newly backlogged: it restarts at the current virtual time, no earlier.
            state.start = max(self._virtual, state.finish)
        self._make_ready(key, state)

    def pop(self, now: float) -> Dispatch[T] | float | None:
        """The next job to run; or, if only capped tenants have work, seconds until one may run;
        or None when nothing is runnable."""
        held: list[tuple[float, int, Hashable]] = []
        wait: float | None = None
        try:
            while self._ready:
                entry = heapq.heappop(self._ready)
                key = entry[2]
                state = self._tenants[key]
                if state.cap is not None:
                    self._refill(state, now)
                    if state.credit <= 0:
                        held.append(entry)
                        until = -state.credit / state.cap + 1e-6
                        wait = until if wait is None else min(wait, until)
                        continue
                state.queued = False
                job, submitted = state.jobs.popleft()
                self._pending -= 1
                state.in_flight += 1
                # max: a capped tenant held back keeps an old start tag; serving it must not
                # turn the clock back, or whoever arrives meanwhile would start in the past.
                self._virtual = max(self._virtual, entry[0])
                waited = now - submitted
                state.usage.queue_wait += waited
                self._make_ready(key, state)
                return Dispatch(key, job, waited)
        finally:
            for entry in held:
                heapq.heappush(self._ready, entry)
        return wait

    def charge(self, key: Hashable, seconds: float, now: float) -> None:
        """A job of ``key`` finished after running ``seconds`` of device time."""
        state = self._tenants.get(key)
        if state is None:  # removed while its last job ran
            return
        state.in_flight -= 1
        state.finish = max(state.finish, state.start) + seconds / state.weight
        state.usage.device_time += seconds
        state.usage.operations += 1
        if state.cap is not None:
            self._refill(state, now)
            state.credit -= seconds
        if state.jobs and not state.queued:
            state.start = max(self._virtual, state.finish)
        elif state.jobs:
            # Its next job was already ready at the old start tag; move it to the new one.
            self._ready = [entry for entry in self._ready if entry[2] != key]
            heapq.heapify(self._ready)
            state.queued = False
            state.start = max(self._virtual, state.finish)
        self._make_ready(key, state)

    def _make_ready(self, key: Hashable, state: _TenantState[T]) -> None:
        if state.jobs and not state.queued and state.in_flight < self._budget:
            state.queued = True
            heapq.heappush(self._ready, (state.start, next(self._order), key))

    @staticmethod
    def _refill(state: _TenantState[T], now: float) -> None:
        assert state.cap is not None
        state.credit = min(CAP_BURST, state.credit + (now - state.credit_time) * state.cap)
        state.credit_time = now


class FifoScheduler(FairScheduler[T]):
    """Arrival order across all tenants, ignoring weights and caps: the baseline to measure against."""

    def __init__(self) -> None:
        super().__init__()
        self._arrivals: deque[tuple[Hashable, T, float]] = deque()

    def push(self, key: Hashable, job: T, now: float) -> None:
        self._tenants[key]  # noqa: B018 - an unknown tenant is an error, as in FairScheduler
        self._arrivals.append((key, job, now))
        self._pending += 1

    def pop(self, now: float) -> Dispatch[T] | float | None:
        if not self._arrivals:
            return None
        key, job, submitted = self._arrivals.popleft()
        self._pending -= 1
        state = self._tenants[key]
        state.usage.queue_wait += now - submitted
        return Dispatch(key, job, now - submitted)

    def charge(self, key: Hashable, seconds: float, now: float) -> None:
        state = self._tenants.get(key)
        if state is not None:
            state.usage.device_time += seconds
            state.usage.operations += 1

    def remove(self, key: Hashable) -> list[T]:
        if self._tenants.pop(key, None) is None:
            return []
        mine = [job for k, job, _ in self._arrivals if k == key]
        self._arrivals = deque(entry for entry in self._arrivals if entry[0] != key)
        self._pending -= len(mine)
        return mine
