"""The queueing disciplines on a fake clock: ``FairScheduler`` (weighted SFQ with caps) and FIFO.

Nothing here sleeps or reads a real clock. ``simulate`` plays the device worker's loop in simulated
time (pop, "run" the job for its chosen length, advance the clock, charge) and returns a trace of
what ran when, so shares, streaks and waits are exact numbers, not measurements.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from executors.scheduler import (
    ANTICIPATE_MAX,
    ANTICIPATE_NEIGHBOUR,
    CAP_BURST,
    Dispatch,
    FairScheduler,
    FifoScheduler,
    Scheduler,
    Usage,
    make_scheduler,
)

MS = 1e-3
EPS = 1e-9  # float slack for sums of many job lengths


# -- the simulated device ---------------------------------------------------------------------------
Job = tuple[str, int, float]  # (tenant, its sequence number, when submitted)


@dataclass
class Load:
    """One tenant's workload. Saturating by default: during each of its ``periods`` it always has
    ``depth`` jobs queued. With ``arrivals`` it is sporadic instead: one job at each of those times."""

    weight: float
    job: float | Callable[[int], float] = MS  # job length, or job length by sequence number
    cap: float | None = None
    periods: Sequence[tuple[float, float]] = ((0.0, math.inf),)  # when it is backlogged
    arrivals: Sequence[float] | None = None
    depth: int = 2
    # Closed loop instead: (k, think): k jobs, the last of them answered to its client, then
    # ``think`` seconds (the round trip and the client's own work) before the next k.
    closed: tuple[int, float] | None = None

    def length(self, seq: int) -> float:
        return self.job(seq) if callable(self.job) else self.job

    def backlogged(self, now: float) -> bool:
        if self.arrivals is not None or self.closed is not None:
            return False
        return any(start <= now < end for start, end in self.periods)


@dataclass(frozen=True)
class Run:
    key: str
    seq: int
    start: float
    end: float
    submitted: float


@dataclass
class Trace:
    scheduler: Scheduler[Job]
    horizon: float
    runs: list[Run] = field(default_factory=list)
    idle: list[tuple[float, float | None]] = field(default_factory=list)  # (now, what pop said)

    def busy(self, key: str, t0: float = 0.0, t1: float | None = None) -> float:
        """Device time ``key`` used inside [t0, t1] (a job straddling an edge counts in part)."""
        t1 = self.horizon if t1 is None else t1
        return sum(
            max(0.0, min(run.end, t1) - max(run.start, t0)) for run in self.runs if run.key == key
        )

    def keys(self) -> list[str]:
        return [run.key for run in self.runs]

    def streak(self, key: str, after: float) -> int:
        """How many jobs of ``key`` ran back to back from its first job starting at or after ``after``."""
        runs = [run for run in self.runs if run.start >= after]
        first = next(i for i, run in enumerate(runs) if run.key == key)
        return sum(1 for _ in itertools.takewhile(lambda run: run.key == key, runs[first:]))


def simulate(
    loads: dict[str, Load], horizon: float, scheduler: Scheduler[Job] | None = None
) -> Trace:
    """Run ``loads`` through ``scheduler`` (a fresh ``FairScheduler`` by default) on one simulated
    synchronous device until ``horizon`` seconds, as ``DeviceWorker`` does in real time."""
    sched: Scheduler[Job] = FairScheduler() if scheduler is None else scheduler
    trace = Trace(sched, horizon)
    # (time, tie-break, tenant): a start, an arrival, or a closed-loop tenant coming back
    events: list[tuple[float, int, str]] = []
    order = itertools.count()
    for key, load in loads.items():
        starts = [start for start, _ in load.periods] if load.arrivals is None else load.arrivals
        for at in starts:
            heappush(events, (at, next(order), key))
    next_seq = dict.fromkeys(loads, 0)

    def submit(key: str, at: float) -> None:
        sched.push(key, (key, next_seq[key], at), at)
        next_seq[key] += 1

    def arrive(until: float) -> None:
        while events and events[0][0] <= until:
            at, _, key = heappop(events)
            load = loads[key]
            if not sched.has(key):
                sched.add(key, load.weight, load.cap, now=at)
            if load.closed is not None:
                burst = load.closed[0]
            else:
                burst = load.depth if load.arrivals is None else 1
            for _ in range(burst):
                submit(key, at)

    now = 0.0
    while now < horizon:
        arrive(now)
        choice = sched.pop(now)
        if isinstance(choice, Dispatch):
            key, seq, submitted = choice.job
            assert choice.key == key
            assert choice.waited == pytest.approx(now - submitted, abs=EPS)
            load = loads[key]
            if load.backlogged(now):
                submit(key, now)  # keep it backlogged
            length = load.length(seq)
            end = now + length
            trace.runs.append(Run(key, seq, now, end, submitted))
            arrive(end)  # what arrives while a job runs finds the scheduler mid-job, as it would
            answered = load.closed is not None and (seq + 1) % load.closed[0] == 0
            sched.charge(key, length, end, replied=answered)
            if answered:
                assert load.closed is not None
                heappush(events, (end + load.closed[1], next(order), key))
            now = end
        else:
            trace.idle.append((now, choice))
            upcoming = events[0][0] if events else math.inf
            if isinstance(choice, float):
                assert choice > 0
                now = min(now + choice, upcoming)
            else:
                now = min(upcoming, horizon)
    return trace


def jain(values: Sequence[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# -- weighted sharing -------------------------------------------------------------------------------
@pytest.mark.parametrize("tenants", [2, 3, 5])
def test_equal_weights_equal_jobs_share_equally_within_one_job(tenants: int) -> None:
    loads = {f"t{i}": Load(1 / tenants, job=2 * MS) for i in range(tenants)}
    trace = simulate(loads, horizon=5.0)
    shares = [trace.busy(key) for key in loads]
    assert max(shares) - min(shares) <= 2 * MS + EPS
    assert sum(shares) == pytest.approx(5.0)
    assert not trace.idle


def test_weights_one_to_nine_get_one_to_nine_of_the_device() -> None:
    horizon = 20.0
    trace = simulate({"light": Load(0.1), "heavy": Load(0.9)}, horizon)
    light, heavy = trace.busy("light"), trace.busy("heavy")
    # Each is within one job of its entitlement, so the ratio is 1:9 to within a job's worth.
    assert abs(light - 0.1 * horizon) <= MS + EPS
    assert abs(heavy - 0.9 * horizon) <= MS + EPS
    assert abs(heavy - 9 * light) <= 10 * MS + EPS
    assert light + heavy == pytest.approx(horizon)


def test_twenty_tenants_at_five_percent_are_served_fairly() -> None:
    horizon = 10.0
    # Different job lengths too (1..5 ms), so fairness is over time, not turns.
    loads = {f"t{i}": Load(0.05, job=(1 + i % 5) * MS) for i in range(20)}
    trace = simulate(loads, horizon)
    ratios = [trace.busy(key) / (0.05 * horizon) for key in loads]
    assert jain(ratios) > 0.9999
    assert all(abs(trace.busy(key) - 0.05 * horizon) <= 2 * 5 * MS for key in loads)


def test_fairness_is_over_device_time_not_job_count() -> None:
    horizon = 10.0
    trace = simulate({"short": Load(0.5, job=1 * MS), "long": Load(0.5, job=5 * MS)}, horizon)
    short, long_ = trace.busy("short"), trace.busy("long")
    assert abs(short - long_) <= 5 * MS + EPS
    assert short + long_ == pytest.approx(horizon)
    # ... which takes five times as many short jobs as long ones.
    counts = {key: trace.keys().count(key) for key in ("short", "long")}
    assert counts["short"] == pytest.approx(5 * counts["long"], rel=0.01)


# -- work conservation ------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.01, 0.5, 1.0])
def test_a_lone_tenant_gets_the_whole_device(weight: float) -> None:
    trace = simulate({"only": Load(weight, job=3 * MS)}, horizon=2.0)
    assert not trace.idle  # pop never said None or "wait" while it had work
    assert trace.busy("only") == pytest.approx(2.0)


def test_idle_capacity_goes_to_the_busy_tenants_by_weight() -> None:
    horizon = 6.0
    loads = {
        "a": Load(0.2),
        "b": Load(0.3, job=2 * MS),
        "c": Load(0.5, periods=[(0.0, 2.0)]),  # busy for a third of the time, then gone
    }
    trace = simulate(loads, horizon)
    assert not trace.idle
    # While c is busy, everyone gets their weight.
    assert trace.busy("a", 0, 2) == pytest.approx(0.4, abs=2 * MS)
    assert trace.busy("b", 0, 2) == pytest.approx(0.6, abs=2 * MS)
    assert trace.busy("c", 0, 2) == pytest.approx(1.0, abs=2 * MS)
    # Afterwards a and b split all of it 2:3.
    assert trace.busy("c", 2.01, horizon) == 0
    assert trace.busy("a", 2.01, horizon) == pytest.approx(0.4 * 3.99, abs=2 * MS)
    assert trace.busy("b", 2.01, horizon) == pytest.approx(0.6 * 3.99, abs=2 * MS)


# -- no banking, prompt service, overruns -----------------------------------------------------------
def test_a_returning_tenant_cannot_spend_credit_saved_while_idle() -> None:
    back_at = 5.0004  # in the middle of one of "busy"'s jobs
    loads = {"busy": Load(0.5), "back": Load(0.5, periods=[(0.0, 1.0), (back_at, math.inf)])}
    trace = simulate(loads, horizon=7.0)
    assert trace.busy("busy", 1.01, 5.0) == pytest.approx(3.99)  # it had the device alone
    # On return it starts at the current virtual time, not at its stale finish tag: one job (or
    # two on a tie), then strict alternation, never a burst to "catch up" on the idle 4 s.
    assert trace.streak("back", back_at) <= 2
    returned = trace.keys()[next(i for i, r in enumerate(trace.runs) if r.start >= back_at) :]
    assert max(len(list(g)) for k, g in itertools.groupby(returned) if k == "back") <= 2
    assert trace.busy("back", back_at, 7.0) == pytest.approx(
        trace.busy("busy", back_at, 7.0), abs=2 * MS
    )


def test_a_returning_heavy_tenant_gets_its_weight_at_once_and_no_more() -> None:
    back_at = 3.0004
    loads = {"light": Load(0.1), "heavy": Load(0.9, periods=[(0.0, 0.5), (back_at, math.inf)])}
    trace = simulate(loads, horizon=4.0)
    # From its return, in every 20 ms the light tenant still gets its 10% (to within a job).
    for k in range(40):
        t0 = back_at + k * 0.02
        assert trace.busy("light", t0, t0 + 0.02) >= 0.1 * 0.02 - MS - EPS


def test_a_newly_arrived_light_tenant_is_served_within_one_job() -> None:
    arrivals = [0.1 + k * 0.0371 for k in range(100)]  # at arbitrary points inside others' jobs
    loads = {
        "h1": Load(0.45, job=4 * MS, depth=50),
        "h2": Load(0.45, job=3 * MS, depth=50),
        "light": Load(0.1, job=0.1 * MS, arrivals=arrivals),
    }
    trace = simulate(loads, horizon=4.0)
    light = [run for run in trace.runs if run.key == "light"]
    assert len(light) == len(arrivals)
    for run in light:
        # It waits for the job that was running when it arrived and, when its start tag ties with
        # another tenant's, for that tenant's one job: never for anyone's queue.
        between = [r.key for r in trace.runs if run.submitted < r.start < run.start]
        assert len(between) == len(set(between)) <= 1
        assert run.start - run.submitted <= (4 + 3) * MS + EPS
    # Mostly it is simply next.
    assert sum(run.start - run.submitted <= 4 * MS + EPS for run in light) >= 90

    # The baseline it is measured against: FIFO makes it wait behind both deep queues.
    fifo = simulate(loads, horizon=4.0, scheduler=FifoScheduler())
    waits = [run.start - run.submitted for run in fifo.runs if run.key == "light"]
    assert min(waits) > 20 * 3 * MS


def test_an_overrun_is_charged_and_the_others_catch_up() -> None:
    def overrunning(seq: int) -> float:
        return 10 * MS if seq == 100 else MS

    trace = simulate({"overrun": Load(0.5, job=overrunning), "steady": Load(0.5)}, horizon=1.0)
    long_run = next(r for r in trace.runs if r.key == "overrun" and r.seq == 100)
    # The 10 ms job could not be pre-empted, so it is paid back: the other runs 10 x 1 ms next.
    assert trace.streak("steady", long_run.end) in (10, 11)
    assert trace.busy("overrun") == pytest.approx(trace.busy("steady"), abs=10 * MS)


# -- caps -------------------------------------------------------------------------------------------
def windows(horizon: float, width: float, step: float) -> list[tuple[float, float]]:
    return [(k * step, k * step + width) for k in range(int((horizon - width) / step) + 1)]


def test_a_capped_tenant_alone_gets_exactly_its_cap() -> None:
    horizon = 10.0
    trace = simulate({"capped": Load(1.0, job=5 * MS, cap=0.25)}, horizon)
    # With nothing else to run, pop says how long to wait (a float), never "nothing" (None).
    assert trace.idle and all(isinstance(wait, float) for _, wait in trace.idle)
    assert abs(trace.busy("capped") / horizon - 0.25) <= CAP_BURST / horizon + 0.001
    for t0, t1 in windows(horizon, 1.0, 0.05):
        assert trace.busy("capped", t0, t1) == pytest.approx(0.25, abs=0.02), (t0, t1)


def test_a_capped_tenant_returning_from_idle_bursts_by_at_most_cap_burst() -> None:
    back_at = 2.0
    loads = {"capped": Load(1.0, job=0.5 * MS, cap=0.25, periods=[(0, 1), (back_at, math.inf)])}
    trace = simulate(loads, 3.0)
    # Over any window from its return it is held to cap + CAP_BURST (+ the job that spends it).
    for width in (0.005, 0.01, 0.1, 1.0):
        assert trace.busy("capped", back_at, back_at + width) <= (
            0.25 * width + CAP_BURST + 0.5 * MS + EPS
        )


def test_two_capped_tenants_each_get_their_cap_and_the_rest_stays_idle() -> None:
    horizon = 10.0
    loads = {"a": Load(0.5, job=2 * MS, cap=0.2), "b": Load(0.5, job=5 * MS, cap=0.3)}
    trace = simulate(loads, horizon)
    assert trace.busy("a") / horizon == pytest.approx(0.2, abs=0.002)
    assert trace.busy("b") / horizon == pytest.approx(0.3, abs=0.002)
    for t0, t1 in windows(horizon, 1.0, 0.25):
        assert trace.busy("a", t0, t1) == pytest.approx(0.2, abs=0.02)
        assert trace.busy("b", t0, t1) == pytest.approx(0.3, abs=0.02)


def test_a_capped_tenant_beside_a_share_tenant() -> None:
    horizon = 10.0
    trace = simulate({"capped": Load(0.5, job=2 * MS, cap=0.25), "share": Load(0.5)}, horizon)
    assert not trace.idle  # the share tenant soaks up what the cap leaves: work-conserving
    assert trace.busy("capped") / horizon == pytest.approx(0.25, abs=0.002)
    assert trace.busy("share") / horizon == pytest.approx(0.75, abs=0.002)


def test_a_cap_above_the_weighted_share_does_not_bind() -> None:
    horizon = 10.0
    trace = simulate({"capped": Load(0.1, cap=0.5), "share": Load(0.9)}, horizon)
    assert not trace.idle
    assert trace.busy("capped") / horizon == pytest.approx(0.1, abs=0.001)
    assert trace.busy("share") / horizon == pytest.approx(0.9, abs=0.001)


@pytest.mark.parametrize("periods", [[(0.5, 0.6)], []], ids=["returning", "new"])
def test_a_tenant_arriving_beside_a_capped_one_cannot_starve_a_backlogged_one(
    periods: list[tuple[float, float]],
) -> None:
    # A capped tenant's start tag falls far behind the virtual time while the cap holds it back;
    # a tenant (re)arriving while its job runs must still start at the current virtual time.
    base = {"capped": Load(0.5, cap=0.1), "share": Load(0.5)}
    probe = simulate({**base, "arriving": Load(0.5, periods=periods)}, 5.0)
    capped_job = next(r for r in probe.runs if r.key == "capped" and r.start > 4.9)
    at = (capped_job.start + capped_job.end) / 2
    loads = {**base, "arriving": Load(0.5, periods=[*periods, (at, math.inf)])}
    trace = simulate(loads, at + 1.0)
    assert capped_job in trace.runs  # same history up to then: it arrives during a capped job
    # "share" and "arriving" have equal weights: they split what the capped tenant leaves.
    assert trace.busy("capped", at, at + 1.0) == pytest.approx(0.1, abs=0.005)
    assert trace.busy("share", at, at + 1.0) == pytest.approx(0.45, abs=0.01)
    assert trace.busy("arriving", at, at + 1.0) == pytest.approx(0.45, abs=0.01)
    assert trace.streak("arriving", at) <= 2


# -- in-flight budget -------------------------------------------------------------------------------
def test_the_default_budget_is_one_job_in_flight_per_tenant() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.add("a", 1.0)
    for job in "xyz":
        sched.push("a", job, 0.0)
    first = sched.pop(0.0)
    assert isinstance(first, Dispatch) and first.job == "x"
    assert sched.pop(0.0) is None  # "y" waits for "x" to be charged, device idle or not
    assert len(sched) == 2
    sched.charge("a", MS, MS)
    second = sched.pop(MS)
    assert isinstance(second, Dispatch) and second.job == "y"


def test_the_budget_lets_other_tenants_through() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.add("a", 0.9)
    sched.add("b", 0.1)
    for i in range(5):
        sched.push("a", f"a{i}", 0.0)
    sched.push("b", "b0", 0.0)
    got = [sched.pop(0.0), sched.pop(0.0), sched.pop(0.0)]
    assert [d.job if isinstance(d, Dispatch) else d for d in got] == ["a0", "b0", None]


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_never_more_than_the_budget_in_flight(budget: int) -> None:
    sched: FairScheduler[int] = FairScheduler(in_flight_budget=budget)
    sched.add("a", 0.5)
    sched.add("b", 0.5)
    for i in range(40):
        sched.push("a", i, 0.0)
    in_flight: list[int] = []
    now, most, done = 0.0, 0, []
    for step in range(200):
        choice = sched.pop(now)
        if isinstance(choice, Dispatch):
            assert choice.key == "a"
            in_flight.append(choice.job)
        if not isinstance(choice, Dispatch) or step % 3 == 2:  # idle, or now and then anyway
            if not in_flight:
                break
            now += MS
            done.append(in_flight.pop(0))
            sched.charge("a", MS, now)
        most = max(most, len(in_flight))
        assert len(in_flight) <= budget
    assert most == budget
    assert done == list(range(40))


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        FairScheduler(in_flight_budget=0)


# -- order, tenants, accounting ---------------------------------------------------------------------
def test_each_tenants_jobs_run_in_submission_order() -> None:
    loads = {
        "a": Load(0.2, job=lambda seq: (1 + seq % 7) * 0.3 * MS),
        "b": Load(0.5, job=2 * MS, cap=0.3, depth=5),
        "c": Load(0.3, job=MS, periods=[(0.0, 0.2), (0.5, 0.7)]),
        "d": Load(0.1, job=0.2 * MS, arrivals=[k * 0.011 for k in range(60)]),
    }
    trace = simulate(loads, 1.0)
    for key in loads:
        seqs = [run.seq for run in trace.runs if run.key == key]
        assert seqs and seqs == list(range(len(seqs)))
    assert [r for r in trace.runs if r.key == "d"][-1].seq == 59  # sporadic jobs all served


def test_remove_returns_the_queued_jobs_and_forgets_the_tenant() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.add("a", 0.5)
    sched.add("b", 0.5)
    for job in ("a0", "a1", "a2"):
        sched.push("a", job, 0.0)
    sched.push("b", "b0", 0.0)
    sched.push("b", "b1", 0.0)
    running = sched.pop(0.0)
    assert isinstance(running, Dispatch) and running.job == "a0"
    assert len(sched) == 4

    assert sched.remove("a") == ["a1", "a2"]
    assert not sched.has("a") and sched.has("b")
    assert len(sched) == 2
    assert sched.remove("a") == []  # already gone
    assert sched.usage("a") == Usage()  # a tenant that is gone has used nothing more
    sched.charge("a", 5 * MS, 5 * MS)  # its last job finishing after the removal is ignored

    got = []
    now = 5 * MS
    while (choice := sched.pop(now)) is not None:
        assert isinstance(choice, Dispatch)
        got.append(choice.job)
        now += MS
        sched.charge(choice.key, MS, now)
    assert got == ["b0", "b1"]
    assert len(sched) == 0


def test_remove_while_ready_rebuilds_the_queue() -> None:
    sched: FairScheduler[str] = FairScheduler()
    for key in "abc":
        sched.add(key, 1 / 3)
        sched.push(key, key + "0", 0.0)
        sched.push(key, key + "1", 0.0)
    assert sched.remove("b") == ["b0", "b1"]
    got = []
    now = 0.0
    while (choice := sched.pop(now)) is not None:
        assert isinstance(choice, Dispatch)
        got.append(choice.job)
        now += MS
        sched.charge(choice.key, MS, now)
    assert sorted(got) == ["a0", "a1", "c0", "c1"]
    assert got.index("a0") < got.index("a1") and got.index("c0") < got.index("c1")


def test_add_validates_its_arguments() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.add("a", 1.0, cap=1.0)
    with pytest.raises(ValueError, match="already"):
        sched.add("a", 0.5)
    for weight in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="weight"):
            sched.add("b", weight)
    for cap in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="cap"):
            sched.add("b", 0.5, cap=cap)
    assert not sched.has("b")
    with pytest.raises(KeyError):
        sched.push("unknown", "job", 0.0)


def test_usage_accumulates_device_time_queue_wait_and_operations() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.add("a", 1.0)
    assert sched.usage("a") == Usage()
    sched.push("a", "j0", 1.0)
    sched.push("a", "j1", 1.5)
    first = sched.pop(3.0)
    assert isinstance(first, Dispatch) and first.waited == pytest.approx(2.0)
    sched.charge("a", 0.25, 3.25)
    second = sched.pop(4.0)
    assert isinstance(second, Dispatch) and second.waited == pytest.approx(2.5)
    sched.charge("a", 0.5, 4.5)
    used = sched.usage("a")
    assert used.device_time == pytest.approx(0.75)
    assert used.queue_wait == pytest.approx(4.5)
    assert used.operations == 2


# -- FIFO -------------------------------------------------------------------------------------------
def test_fifo_runs_strictly_in_arrival_order_whatever_the_weights() -> None:
    sched: FifoScheduler[str] = FifoScheduler()
    sched.add("heavy", 0.99)
    sched.add("light", 0.01, cap=0.01)
    arrivals = [("light", f"l{i}") if i % 3 else ("heavy", f"h{i}") for i in range(30)]
    for t, (key, job) in enumerate(arrivals):
        sched.push(key, job, float(t))
    assert len(sched) == 30
    got = []
    now = 30.0
    while (choice := sched.pop(now)) is not None:
        assert isinstance(choice, Dispatch)
        got.append((choice.key, choice.job))
        sched.charge(choice.key, 0.5, now + 0.5)
        now += 0.5
    assert got == arrivals
    assert sched.usage("heavy").operations == 10 and sched.usage("light").operations == 20
    assert sched.usage("light").device_time == pytest.approx(10.0)


def test_fifo_remove_returns_only_that_tenants_jobs() -> None:
    sched: FifoScheduler[str] = FifoScheduler()
    sched.add("a", 0.5)
    sched.add("b", 0.5)
    for i in range(4):
        sched.push("a", f"a{i}", 0.0)
        sched.push("b", f"b{i}", 0.0)
    assert sched.remove("a") == ["a0", "a1", "a2", "a3"]
    assert sched.remove("a") == []
    assert len(sched) == 4
    sched.charge("a", 1.0, 1.0)  # ignored
    jobs = []
    while isinstance(choice := sched.pop(1.0), Dispatch):
        jobs.append(choice.job)
    assert jobs == ["b0", "b1", "b2", "b3"]
    with pytest.raises(KeyError):
        sched.push("a", "late", 2.0)


# -- the SFQ fairness bound -------------------------------------------------------------------------
tenant_loads = st.lists(
    st.tuples(
        st.floats(0.02, 1.0),  # weight
        st.lists(st.floats(0.05, 5.0), min_size=1, max_size=4),  # job lengths in ms, cycled
    ),
    min_size=2,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(tenant_loads)
def test_backlogged_tenants_stay_within_the_sfq_bound(
    loads: list[tuple[float, list[float]]],
) -> None:
    """Goyal et al.: over any interval in which tenants i and j are both backlogged,
    |W_i / w_i - W_j / w_j| <= l_i_max / w_i + l_j_max / w_j."""

    def cycle(lengths: list[float]) -> Callable[[int], float]:
        return lambda seq: lengths[seq % len(lengths)] * MS

    spec = {f"t{i}": Load(w, job=cycle(lengths)) for i, (w, lengths) in enumerate(loads)}
    trace = simulate(spec, horizon=0.4)
    # Charged device time: whole jobs, all of them finished by the end.
    normalised = {
        key: trace.scheduler.usage(key).device_time / load.weight for key, load in spec.items()
    }
    bound = {key: max(lengths) * MS / w for key, (w, lengths) in zip(spec, loads, strict=True)}
    for i, j in itertools.combinations(spec, 2):
        assert abs(normalised[i] - normalised[j]) <= bound[i] + bound[j] + EPS, (i, j)
    assert not trace.idle


def test_keys_may_be_any_hashable() -> None:
    sched: FairScheduler[int] = FairScheduler()
    keys: list[Hashable] = [("gpu", 0), 7, frozenset({1})]
    for key in keys:
        sched.add(key, 1 / 3)
        sched.push(key, 1, 0.0)
    seen = set()
    while isinstance(choice := sched.pop(0.0), Dispatch):
        seen.add(choice.key)
    assert seen == set(keys)


# -- closed-loop tenants: anticipation ------------------------------------------------------------
US = 1e-6


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_closed_loop_tenants_at_one_to_nine_get_one_to_nine(k: int) -> None:
    """Both tenants wait 100 us for each result after k kernels of 2 ms: without anticipation
    the light one's kernel starts in every gap and the heavy one gets half the device at k=1."""
    loads = {
        "light": Load(0.1, job=2 * MS, closed=(k, 100 * US)),
        "heavy": Load(0.9, job=2 * MS, closed=(k, 100 * US)),
    }
    trace = simulate(loads, horizon=4.0)
    ratio = trace.busy("heavy") / trace.busy("light")
    assert ratio == pytest.approx(9.0, rel=0.05), ratio
    assert trace.scheduler.anticipation_hits > 0


def test_without_anticipation_a_closed_loop_share_collapses() -> None:
    """The same 1:9 loops when the heavy tenant is too slow to wait for (think above the cap):
    the light one's kernel starts in every gap. This is what anticipation is for."""
    loads = {
        "light": Load(0.1, job=2 * MS, closed=(1, 3 * MS)),
        "heavy": Load(0.9, job=2 * MS, closed=(1, 3 * MS)),
    }
    trace = simulate(loads, horizon=2.0)
    assert trace.busy("heavy") / trace.busy("light") < 2.0


def test_an_equal_loop_beside_a_busy_tenant_alternates_with_it() -> None:
    loads = {
        "loop": Load(0.5, job=1 * MS, closed=(1, 150 * US)),
        "busy": Load(0.5, job=1 * MS),
    }
    trace = simulate(loads, horizon=1.0)
    keys = trace.keys()[20:]  # once the think time is learnt
    # Equal weights, equal jobs: strict alternation, the loop never waits a whole job.
    assert all(a != b for a, b in itertools.pairwise(keys)), keys[:20]


def test_a_heavy_loop_back_within_its_window_runs_its_kernels_back_to_back() -> None:
    loads = {
        "loop": Load(0.75, job=1 * MS, closed=(1, 150 * US)),
        "busy": Load(0.25, job=1 * MS),
    }
    trace = simulate(loads, horizon=1.0)
    keys = "".join(key[0] for key in trace.keys()[40:])
    # Three of its kernels to one of the neighbour's, in runs: it is not made to wait a
    # neighbour's kernel after each of its own.
    assert "bb" not in keys and "lll" in keys, keys[:40]
    assert keys.count("l") / keys.count("b") == pytest.approx(3.0, rel=0.05)
    holds = [wait for _, wait in trace.idle if isinstance(wait, float)]
    assert holds and max(holds) <= ANTICIPATE_NEIGHBOUR * MS + EPS
    assert trace.scheduler.anticipation_hits >= len(keys) // 2


def test_a_tenant_that_does_not_come_back_in_time_is_not_waited_for() -> None:
    """A think time longer than the cap: the device is held at most once (the first time, to
    learn it), for at most the cap; after that the neighbour runs in every gap."""
    loads = {
        "slow": Load(0.9, job=2 * MS, closed=(1, 10 * MS)),
        "busy": Load(0.1, job=2 * MS),
    }
    trace = simulate(loads, horizon=1.0)
    holds = [wait for _, wait in trace.idle if isinstance(wait, float)]
    assert len(holds) <= 1 and all(h <= ANTICIPATE_MAX + EPS for h in holds)
    assert trace.scheduler.anticipation_hits == 0
    # The neighbour gets every gap: 10 ms of think after each 2 ms kernel leaves it most of it.
    assert trace.busy("busy") > 0.6


@settings(max_examples=50, deadline=None)
@given(
    think=st.floats(1 * US, 5 * MS),
    jobs=st.lists(st.floats(0.01, 5.0), min_size=2, max_size=4),
    weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4),
)
def test_the_device_is_never_held_longer_than_the_caps(
    think: float, jobs: list[float], weights: list[float]
) -> None:
    loads = {
        f"t{i}": Load(w, job=jobs[i % len(jobs)] * MS, closed=(1 + i % 3, think))
        for i, w in enumerate(weights)
    }
    loads["busy"] = Load(0.1, job=jobs[0] * MS)
    trace = simulate(loads, horizon=0.2)
    for _, wait in trace.idle:
        if isinstance(wait, float):
            assert wait <= ANTICIPATE_MAX + EPS
            assert wait <= ANTICIPATE_NEIGHBOUR * max(jobs) * MS + EPS
    # Idle time is only what anticipation held: every other moment the saturating tenant has
    # work, so nothing else may leave the device idle.
    assert all(isinstance(wait, float) for _, wait in trace.idle), trace.idle[:3]


def test_twenty_closed_loop_tenants_at_five_percent_share_equally() -> None:
    loads = {f"t{i}": Load(0.05, job=2 * MS, closed=(1, 100 * US)) for i in range(20)}
    trace = simulate(loads, horizon=4.0)
    busy = [trace.busy(key) for key in loads]
    assert jain(busy) >= 0.99
    mean = sum(busy) / len(busy)
    assert max(abs(b - mean) / mean for b in busy) <= 0.05
    # Each is entitled to one kernel in twenty: it makes up a missed gap on its next turn, so
    # the device is never held idle for any of them.
    assert not [wait for _, wait in trace.idle if isinstance(wait, float)]


def test_anticipation_never_starves_a_saturating_neighbour() -> None:
    """A heavy closed-loop tenant back within its window each time still leaves the light
    saturating one its weight: it is waited for only while it is behind."""
    loads = {
        "loop": Load(0.9, job=2 * MS, closed=(1, 100 * US)),
        "light": Load(0.1, job=2 * MS),
    }
    trace = simulate(loads, horizon=4.0)
    assert trace.busy("light") / (trace.busy("light") + trace.busy("loop")) == pytest.approx(
        0.1, rel=0.1
    )


closed_loop_loads = st.lists(
    st.tuples(
        st.floats(0.02, 1.0),  # weight
        st.lists(st.floats(1.0, 5.0), min_size=1, max_size=4),  # job lengths in ms, cycled
    ),
    min_size=2,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(closed_loop_loads, st.floats(10 * US, 200 * US), st.integers(1, 8))
def test_closed_loop_tenants_stay_within_the_sfq_bound(
    loads: list[tuple[float, list[float]]], think: float, k: int
) -> None:
    """The bound of the backlogged case, for tenants that wait for a result every k jobs and
    come back within the window the device may be held for them (twice the think time, under
    half a neighbour's job): anticipation makes them as good as backlogged, give or take one
    job of each (the think time is learnt from the first round trips)."""

    def cycle(lengths: list[float]) -> Callable[[int], float]:
        return lambda seq: lengths[seq % len(lengths)] * MS

    spec = {
        f"t{i}": Load(w, job=cycle(lengths), closed=(k, think))
        for i, (w, lengths) in enumerate(loads)
    }
    trace = simulate(spec, horizon=0.4)
    normalised = {key: trace.busy(key) / load.weight for key, load in spec.items()}
    bound = {key: max(lengths) * MS / w for key, (w, lengths) in zip(spec, loads, strict=True)}
    for i, j in itertools.combinations(spec, 2):
        assert abs(normalised[i] - normalised[j]) <= 2 * (bound[i] + bound[j]) + EPS, (i, j)


def test_both_disciplines_are_made_by_name_and_unknown_names_are_refused() -> None:
    assert isinstance(make_scheduler("fair"), FairScheduler)
    assert isinstance(make_scheduler("fifo"), FifoScheduler)
    with pytest.raises(ValueError, match="unknown scheduling"):
        make_scheduler("lottery")


def test_reweighing_a_tenant_changes_its_share_from_then_on() -> None:
    sched: FairScheduler[str] = FairScheduler()
    sched.add("a", 0.5)
    sched.add("b", 0.5)
    served = {"a": 0.0, "b": 0.0}
    now = 0.0
    for key in ("a", "b"):
        for _ in range(2000):
            sched.push(key, key, now)
    for step in range(1600):
        if step == 400:  # equal so far; now "a" shares its lease with a second program
            assert served["a"] == pytest.approx(served["b"], abs=0.002)
            served = {"a": 0.0, "b": 0.0}
            sched.reweigh("a", 0.25, None, now)
        choice = sched.pop(now)
        assert isinstance(choice, Dispatch)
        now += 0.001
        served[choice.key] += 0.001  # type: ignore[index]
        sched.charge(choice.key, 0.001, now)
    assert served["b"] / served["a"] == pytest.approx(2.0, rel=0.02)
