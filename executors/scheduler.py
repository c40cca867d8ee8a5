"""Queueing disciplines for a device's work: weighted fair (the default) and FIFO (the baseline).

``FairScheduler`` is weighted fair queuing on **measured** device time, in the WF2Q+ family
(Bennett and Zhang 1997) with start-time tags as in SFQ (Goyal et al. 1996):

- Each tenant has a start tag S and a finish tag F in virtual time; the system virtual time v grows
  by (device time served) / (sum of the weights of the tenants with work). A job's cost is only
  known after it ran, so it is charged then: F = S + measured / weight, and a tenant that stays
  backlogged starts its next job at F. Kernels are never pre-empted; an overrun is simply charged.
- A tenant is *eligible* when S <= v, i.e. when it is not ahead of its share. Among the eligible
  the one whose next job would finish first (S + its usual job length / weight) runs next. That is
  what lets a light tenant that has just woken up run right after the job in service, instead of
  waiting for a whole round of heavy tenants that happen to hold the same start tag.
- A tenant that was idle restarts at max(v, F): it cannot bank credit while idle.
- ``in_flight_budget`` bounds how many jobs of one tenant may be on the device at once, so a deep
  backlog never delays another tenant by more than about one kernel (1 on a synchronous device).

Closed-loop tenants (a few kernels, then a wait for a result) empty their queue every round trip.
A kernel cannot be pre-empted, so if a neighbour's kernel started in that gap the returning tenant
waits a whole kernel each time, and a 0.9 tenant beside a 0.1 one gets half the device. So the
scheduler *anticipates* (BFQ's idling for synchronous queues): when a job that answers its tenant
(a reply is on its way) leaves that tenant's queue empty, and that tenant would be served next
if it had work, the device is held for it for a short window learned from its own recent think
time (twice its typical gap between reply and next job), never more than ``ANTICIPATE_MAX`` nor
``ANTICIPATE_NEIGHBOUR`` of the usual job of the tenant that would run instead, and only if its
share entitles it to the device again sooner than it would get it after that job (otherwise it
makes its lag up on its next turn, and holding would only idle the device). While it is expected
back its weight stays counted and its start tag goes on, as if it had stayed backlogged. A tenant that
returns in time keeps its turn; one that does not loses it when the window ends, and one whose
think time is longer than the cap is not waited for at all. Idle time nobody claims still goes to
whoever has work: share mode stays work-conserving over any window longer than the cap.

Work-conserving by default (``share``): idle time goes to the busy tenants in proportion to weight.
A tenant with a ``cap`` (a fraction of device time) is also held to it when the device is otherwise
idle, by a token bucket that refills at ``cap`` device-seconds per second and holds at most
``CAP_BURST`` seconds, so over any window of length W its share is at most
cap + (CAP_BURST + its longest job) / W (a job that started cannot be stopped; its overrun is charged).

Pure logic on an injected clock: no threads, no sleeping. The device worker owns the locking.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")

CAP_BURST = 0.002  # seconds of device time a capped tenant may save up
# A tenant's usual job length is a decaying peak of its measured jobs: it follows a longer job at
# once and forgets it by this factor per job, so the cheap synchronising calls between kernels do
# not make a tenant of long kernels look light.
ESTIMATE_DECAY = 0.99
MEAN_SMOOTHING = 0.1  # weight of the newest job in a tenant's mean job length
# Finish tags closer than this fraction of a job are treated as equal, and the tenant that has
# waited longer goes first: a few microseconds of noise in measured kernel times would otherwise
# reshuffle equal tenants every round, and a tenant served first in one round and last in the next
# gets two jobs in one second and none in another.
STABLE_ORDER = 0.5
_SLACK = 1e-12  # float tolerance of the eligibility test
ANTICIPATE_MAX = 0.002  # the longest the device is held for a tenant expected back (seconds)
ANTICIPATE_NEIGHBOUR = 0.5  # ... and at most this fraction of a waiting neighbour's usual job
ANTICIPATE_MIN = 50e-6  # the shortest window worth holding the device for
THINK_SMOOTHING = 0.3  # weight of the newest think time in a tenant's running estimate


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
    typical: float = 0.0  # its usual job length (a decaying peak of measured device time)
    mean: float = 0.0  # its mean job length (a moving average), for what holding is worth
    in_flight: int = 0
    order: int = 0  # tie-break: when it became ready
    credit: float = 0.0  # capped tenants: device-seconds they may still use
    credit_time: float = 0.0  # when credit was last refilled
    replied_at: float | None = None  # when its queue emptied with a reply on the way to it
    think: float | None = None  # its usual gap between that reply and its next job (seconds)
    expected_until: float | None = None  # counted as backlogged until then: it is coming back
    usage: Usage = field(default_factory=Usage)

    @property
    def active(self) -> bool:
        return bool(self.jobs) or self.in_flight > 0

    @property
    def counted(self) -> bool:
        """Its weight is in the active weight: it has work, or is expected back with some."""
        return self.active or self.expected_until is not None


@dataclass(frozen=True)
class Dispatch(Generic[T]):
    """A job to run now: whose it is, the job, and how long it waited."""

    key: Hashable
    job: T
    waited: float


class FairScheduler(Generic[T]):
    """Weighted fair queuing with optional hard caps (see the module docstring)."""

    def __init__(self, *, in_flight_budget: int = 1) -> None:
        if in_flight_budget < 1:
            raise ValueError("in_flight_budget must be at least 1")
        self._budget = in_flight_budget
        self._tenants: dict[Hashable, _TenantState[T]] = {}
        self._ready: dict[Hashable, _TenantState[T]] = {}  # tenants with a job they may start
        self._order = itertools.count()
        self._virtual = 0.0
        self._active_weight = 0.0  # sum of the weights of tenants with work queued or running
        self._pending = 0
        # The tenant the device is held for, and until when (before the neighbours' cap).
        self._anticipated: tuple[Hashable, float, float] | None = None  # (key, since, until)
        self._expected: dict[Hashable, _TenantState[T]] = {}  # tenants expected back
        self.anticipations = 0  # times the device was held, for measurements
        self.anticipation_hits = 0  # ... and the tenant came back in time

    # -- tenants --------------------------------------------------------------------------------
    def add(self, key: Hashable, weight: float, cap: float | None = None, now: float = 0.0) -> None:
        if key in self._tenants:
            raise ValueError(f"tenant {key!r} is already scheduled")
        if not weight > 0:
            raise ValueError("weight must be positive")
        if cap is not None and not 0 < cap <= 1:
            raise ValueError("cap must be in (0, 1]")
        self._tenants[key] = _TenantState(weight, cap, credit=0.0, credit_time=now)

    def reweigh(self, key: Hashable, weight: float, cap: float | None, now: float) -> None:
        """Change a tenant's weight and cap from now on (several programs came to share one
        lease, or one left); tags already given keep the old terms."""
        if not weight > 0:
            raise ValueError("weight must be positive")
        state = self._tenants[key]
        if state.cap is not None:
            self._refill(state, now)  # credit earned so far, at the old rate
        if state.counted:
            self._active_weight += weight - state.weight
        state.weight, state.cap = weight, cap
        if cap is not None:
            state.credit_time = now

    def remove(self, key: Hashable) -> list[T]:
        """Forget a tenant; returns the jobs it still had queued (the caller answers them)."""
        state = self._tenants.pop(key, None)
        if state is None:
            return []
        if state.counted:
            self._active_weight -= state.weight
        self._pending -= len(state.jobs)
        self._ready.pop(key, None)
        self._expected.pop(key, None)
        if self._anticipated is not None and self._anticipated[0] == key:
            self._anticipated = None
        return [job for job, _ in state.jobs]

    def has(self, key: Hashable) -> bool:
        return key in self._tenants

    def clear(self, key: Hashable) -> list[T]:
        """Take back the jobs ``key`` has queued (not the one running); it stays scheduled."""
        state = self._tenants.get(key)
        if state is None:
            return []
        jobs = [job for job, _ in state.jobs]
        was_counted = state.counted
        self._pending -= len(jobs)
        state.jobs.clear()
        self._ready.pop(key, None)
        state.replied_at = None  # its client is gone: nobody is coming back
        state.expected_until = None
        self._expected.pop(key, None)
        if self._anticipated is not None and self._anticipated[0] == key:
            self._anticipated = None
        if was_counted and not state.active:
            self._active_weight -= state.weight
        return jobs

    def usage(self, key: Hashable) -> Usage:
        """The tenant's usage (all zero for a tenant that is not, or no longer, scheduled)."""
        state = self._tenants.get(key)
        return state.usage if state is not None else Usage()

    def __len__(self) -> int:
        """Jobs queued and not yet dispatched."""
        return self._pending

    def queued(self, key: Hashable) -> int:
        """Jobs of ``key`` queued and not yet dispatched."""
        state = self._tenants.get(key)
        return len(state.jobs) if state is not None else 0

    # -- jobs -----------------------------------------------------------------------------------
    def push(self, key: Hashable, job: T, now: float) -> None:
        state = self._tenants[key]
        if state.replied_at is not None:  # back from a reply: learn how long that takes it
            gap = now - state.replied_at
            state.think = (
                gap if state.think is None else state.think + THINK_SMOOTHING * (gap - state.think)
            )
            state.replied_at = None
            if self._anticipated is not None and self._anticipated[0] == key:
                self._anticipated = None
                self.anticipation_hits += 1
        if state.expected_until is not None:
            # Back in time: as if it had stayed backlogged (its weight is counted, its start
            # tag goes on from its last job).
            state.expected_until = None
            self._expected.pop(key, None)
        elif not state.active:
            # Newly backlogged: it restarts at the current virtual time, no earlier.
            self._active_weight += state.weight
            state.start = max(self._virtual, state.finish)
        state.jobs.append((job, now))
        self._pending += 1
        self._make_ready(key, state)

    def pop(self, now: float) -> Dispatch[T] | float | None:
        """The next job to run; or seconds until one may run (only capped tenants have work, or
        the device is held for a tenant expected back); or None when nothing is runnable."""
        if self._expected:
            self._forget_late(now)
        candidates: list[tuple[float, int, Hashable, float]] = []  # (finish, order, key, span)
        earliest: tuple[float, int, Hashable] | None = None  # (start, order, key)
        wait: float | None = None
        virtual = self._virtual + _SLACK
        for key, state in self._ready.items():
            if state.cap is not None:
                self._refill(state, now)
                if state.credit <= 0:
                    until = -state.credit / state.cap + 1e-6
                    wait = until if wait is None else min(wait, until)
                    continue
            if earliest is None or (state.start, state.order) < earliest[:2]:
                earliest = (state.start, state.order, key)
            if state.start <= virtual:
                span = state.typical / state.weight
                candidates.append((state.start + span, state.order, key, span))
        if candidates:
            # The earliest finisher runs, but tenants whose tags differ by less than the jitter of
            # measured time keep their turn order, so equals take turns in a stable round.
            first = min(candidates)
            tolerance = first[0] + STABLE_ORDER * first[3]
            best = min((c for c in candidates if c[0] <= tolerance), key=lambda c: c[1])[:3]
            best_finish = first[0]
        else:
            if earliest is None:
                return wait
            best = earliest
            chosen = self._ready[earliest[2]]
            best_finish = earliest[0] + chosen.typical / chosen.weight
        if self._anticipated is not None:
            hold = self._hold(now, best_finish, best[2])
            if hold is not None:
                return hold if wait is None else min(hold, wait)
        if not candidates:
            # Everyone with work is ahead of v: v moves up to the earliest of them.
            self._virtual = max(self._virtual, best[0])
        key = best[2]
        state = self._ready.pop(key)
        job, submitted = state.jobs.popleft()
        self._pending -= 1
        state.in_flight += 1
        waited = now - submitted
        state.usage.queue_wait += waited
        self._make_ready(key, state)
        return Dispatch(key, job, waited)

    def _hold(self, now: float, best_finish: float, best_key: Hashable) -> float | None:
        """Seconds to keep the device idle for the anticipated tenant, or None to go on (its
        window is over, or it would not be served next anyway, so holding gains it nothing)."""
        assert self._anticipated is not None
        key, since, until = self._anticipated
        state = self._tenants.get(key)
        neighbour = self._tenants.get(best_key)
        if state is None or neighbour is None:
            self._anticipated = None
            return None
        until = min(until, since + ANTICIPATE_NEIGHBOUR * neighbour.typical)
        # Where its next job would finish: expected back, its start tag goes on from its last job
        # (as ``push`` will have it), so a tenant that lags keeps its lag here too.
        start = (
            state.finish if state.expected_until is not None else max(self._virtual, state.finish)
        )
        mine = start + state.typical / state.weight
        # Holding pays only for a tenant whose share wants it back on the device sooner than it
        # would get there after a neighbour's job: then the neighbour's job is time it loses for
        # good (it has one round of work at a time). A tenant entitled to less (twenty equal
        # loops, say) makes its lag up on its next turn: nobody waits for it.
        # Mean job lengths, not the peaks: a tenant whose jobs vary (1 ms, 2 ms, ...) would seem
        # to need holding less than it does, and lose a share it is owed on every round.
        share = state.weight / max(self._active_weight, state.weight)
        think = state.think or 0.0
        entitled_interval = state.mean / share
        worth_it = entitled_interval < state.mean + think + neighbour.mean
        if now >= until or mine > best_finish or not worth_it:
            self._anticipated = None
            return None
        return until - now

    def _forget_late(self, now: float) -> None:
        """Tenants expected back whose window has passed are idle after all."""
        for key, state in list(self._expected.items()):
            assert state.expected_until is not None
            if state.expected_until <= now:
                state.expected_until = None
                del self._expected[key]
                self._active_weight -= state.weight
                if self._active_weight < 1e-9:
                    self._active_weight = 0.0

    def replied(self, key: Hashable, now: float) -> None:
        """A reply to ``key`` left just now without the worker (the server answered a query on
        its own) and it has nothing queued: it may be a closed loop about to send its next job
        (see the module docstring). A job the worker ran says so through ``charge``."""
        state = self._tenants.get(key)
        if state is None or state.active or state.expected_until is not None:
            return
        if self._expect(key, state, now):  # it was idle until now: count it again
            self._active_weight += state.weight
            state.start = max(self._virtual, state.finish)

    def _expect(self, key: Hashable, state: _TenantState[T], now: float) -> bool:
        """Expect ``key`` back soon, if it comes back fast enough to be worth it; says whether."""
        if state.cap is not None:
            return False
        state.replied_at = now
        window = ANTICIPATE_MAX if state.think is None else 2 * state.think
        if window > ANTICIPATE_MAX:
            return False  # too slow to be worth waiting for: it is idle between its rounds
        window = max(window, ANTICIPATE_MIN)
        state.expected_until = now + window
        self._expected[key] = state
        self._anticipated = (key, now, now + window)
        self.anticipations += 1
        return True

    def charge(self, key: Hashable, seconds: float, now: float, replied: bool = False) -> None:
        """A job of ``key`` finished after running ``seconds`` of device time; ``replied``: its
        result goes back to a client that waits for it."""
        state = self._tenants.get(key)
        if state is None:  # removed while its last job ran
            return
        self._virtual += seconds / max(self._active_weight, state.weight)
        state.in_flight -= 1
        state.finish = state.start + seconds / state.weight
        state.start = state.finish  # a tenant that stays backlogged goes on from here
        # A job much shorter than usual (a synchronising call between kernels) does not use up
        # the tenant's turn: it keeps its place in line.
        keep_turn = seconds < STABLE_ORDER * state.typical
        state.typical = max(seconds, state.typical * ESTIMATE_DECAY)
        state.mean = (
            seconds if not state.mean else state.mean + MEAN_SMOOTHING * (seconds - state.mean)
        )
        state.usage.device_time += seconds
        state.usage.operations += 1
        if state.cap is not None:
            self._refill(state, now)
            state.credit -= seconds
        if not state.active:
            expected = state.expected_until is not None or (
                replied and self._expect(key, state, now)
            )
            if not expected:  # idle now: its weight leaves the active weight
                self._active_weight -= state.weight
                if self._active_weight < 1e-9:  # nobody is active: drop the float residue
                    self._active_weight = 0.0
        self._make_ready(key, state, keep_turn)

    def _make_ready(self, key: Hashable, state: _TenantState[T], keep_turn: bool = False) -> None:
        if state.jobs and key not in self._ready and state.in_flight < self._budget:
            if not keep_turn:
                state.order = next(self._order)
            self._ready[key] = state

    @staticmethod
    def _refill(state: _TenantState[T], now: float) -> None:
        assert state.cap is not None
        state.credit = min(CAP_BURST, state.credit + (now - state.credit_time) * state.cap)
        state.credit_time = now


class FifoScheduler(Generic[T]):
    """Arrival order across all tenants, ignoring weights and caps: the baseline to measure against."""

    def __init__(self) -> None:
        self._arrivals: deque[tuple[Hashable, T, float]] = deque()
        self._usage: dict[Hashable, Usage] = {}  # the scheduled tenants
        self._counts: dict[Hashable, int] = {}

    def add(self, key: Hashable, weight: float, cap: float | None = None, now: float = 0.0) -> None:
        if key in self._usage:
            raise ValueError(f"tenant {key!r} is already scheduled")
        self._usage[key] = Usage()

    def reweigh(self, key: Hashable, weight: float, cap: float | None, now: float) -> None:
        """Arrival order has no weights."""

    def remove(self, key: Hashable) -> list[T]:
        if self._usage.pop(key, None) is None:
            return []
        return self._take(key)

    def has(self, key: Hashable) -> bool:
        return key in self._usage

    def clear(self, key: Hashable) -> list[T]:
        return self._take(key) if key in self._usage else []

    def usage(self, key: Hashable) -> Usage:
        return self._usage.get(key) or Usage()

    def __len__(self) -> int:
        return len(self._arrivals)

    def queued(self, key: Hashable) -> int:
        return self._counts.get(key, 0)

    def push(self, key: Hashable, job: T, now: float) -> None:
        if key not in self._usage:
            raise KeyError(key)  # as in FairScheduler: an unknown tenant is a caller's bug
        self._arrivals.append((key, job, now))
        self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self, now: float) -> Dispatch[T] | float | None:
        if not self._arrivals:
            return None
        key, job, submitted = self._arrivals.popleft()
        self._counts[key] -= 1
        self._usage[key].queue_wait += now - submitted
        return Dispatch(key, job, now - submitted)

    def charge(self, key: Hashable, seconds: float, now: float, replied: bool = False) -> None:
        usage = self._usage.get(key)
        if usage is not None:
            usage.device_time += seconds
            usage.operations += 1

    def replied(self, key: Hashable, now: float) -> None:
        """Arrival order never waits for anyone."""

    def _take(self, key: Hashable) -> list[T]:
        self._counts.pop(key, None)
        mine = [job for k, job, _ in self._arrivals if k == key]
        self._arrivals = deque(entry for entry in self._arrivals if entry[0] != key)
        return mine


class Scheduler(Protocol[T]):
    """What the device worker asks of a queueing discipline (all calls under its lock).

    Tenants are any hashable keys; jobs are opaque. ``pop`` returns the next job to run, seconds
    to wait before asking again (nothing may run yet), or None (nothing queued); ``charge`` says
    how long a dispatched job occupied the device, and whether its result goes back to a waiting
    client; ``replied`` says a reply left without a job (a query answered on its own).
    """

    def add(self, key: Hashable, weight: float, cap: float | None = None, now: float = 0.0) -> None:
        """Schedule a new tenant; ``ValueError`` if it is scheduled or its terms are invalid."""
        ...

    def reweigh(self, key: Hashable, weight: float, cap: float | None, now: float) -> None:
        """Change a scheduled tenant's weight and cap from ``now`` on."""
        ...

    def remove(self, key: Hashable) -> list[T]:
        """Forget a tenant; returns the jobs it still had queued (the caller answers them)."""
        ...

    def has(self, key: Hashable) -> bool: ...

    def clear(self, key: Hashable) -> list[T]:
        """Take back the jobs ``key`` has queued (not the one running); it stays scheduled."""
        ...

    def usage(self, key: Hashable) -> Usage: ...

    def __len__(self) -> int:
        """Jobs queued and not yet dispatched."""
        ...

    def queued(self, key: Hashable) -> int: ...

    def push(self, key: Hashable, job: T, now: float) -> None:
        """Queue a job of a scheduled tenant (``KeyError`` for an unknown one)."""
        ...

    def pop(self, now: float) -> Dispatch[T] | float | None: ...

    def charge(self, key: Hashable, seconds: float, now: float, replied: bool = False) -> None: ...

    def replied(self, key: Hashable, now: float) -> None: ...


def make_scheduler(kind: str) -> Scheduler[T]:
    """``"fair"`` (the default everywhere) or ``"fifo"`` (the baseline)."""
    if kind == "fair":
        return FairScheduler()
    if kind == "fifo":
        return FifoScheduler()
    raise ValueError(f"unknown scheduling {kind!r}; choose 'fair' or 'fifo'")
