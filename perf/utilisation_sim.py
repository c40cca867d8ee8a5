"""The simulated cluster of ``perf/utilisation.py``: the project's real reservation tables,
GPU pools, placement and schedulers, on a simulated clock.

Each server is a real ``ReservationTable`` (its ``clock`` is the simulation's) over a real
``GpuPool``; each GPU is a ``SimulatedGpu`` whose work a real ``executors.scheduler`` discipline
orders. A job's program is attached to its reservations as a session with no executor tenants
(``SimulatedProgram``), so the table's idle sweep asks it what it asks a session. Only time is
simulated: a slice of work "runs" for its length on a clock that jumps to the next event.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# perf/ is on sys.path when the benchmark runs as a script, so its sibling modules import by name.
from utilisation_workload import GiB, Job, Task, Training, Workload

from bitfusion_net.cli.placement import Ask, NoRoom, choose, fits
from bitfusion_net.protocol import CapacityError
from bitfusion_net.protocol import messages as m
from bitfusion_net.server.leases import SHARE_UNITS, GpuPool, GpuSlot
from bitfusion_net.server.reservations import EndedBy, Reservation, ReservationTable
from executors.scheduler import Dispatch, FairScheduler, FifoScheduler, Scheduler

POLICIES = ("static", "memory_only", "ours")
WAIT_TARGET_S = 600.0  # the p95 wait for a lease that a cluster size must meet
WAIT_QUANTILE = 0.95
GPUS_PER_SERVER = 8
# Inventory (an assumption, PAI-like: PAI v2020 mixes 16 GiB cards, T4/P100/V100, with 32 GiB
# V100s): of every 5 servers, 2 have 32 GiB GPUs, spread so that any prefix keeps the ratio.
BIG_SERVER_EVERY = (1, 3)  # server index % 5 in this: 32 GiB GPUs
SLICE_S = 60.0  # device work is pushed to a shared GPU's scheduler in slices of this length
PROGRESS_EVERY_S = 3600.0  # simulated seconds between progress reports and early-abort checks
MIN_FRACTION = 0.05


KINDS = ("batch", "notebook", "training")


def kind_of(job: Job) -> str:
    return job.kind if isinstance(job, Task) else "training"


class Slice:
    """A piece of one burst's work on one GPU: the job the GPU's scheduler queues and runs."""

    __slots__ = ("burst", "seconds")

    def __init__(self, burst: Burst, seconds: float) -> None:
        self.burst = burst
        self.seconds = seconds


@dataclass(eq=False)
class Burst:
    run: JobRun
    submitted: float
    slices_left: int = 0  # on all of its GPUs


@dataclass(eq=False)
class JobRun:
    """One job's progress through a simulation."""

    job: Job
    requested: float  # when its current lease request was made
    leases: list[tuple[int, Reservation]] = field(default_factory=list)
    granted: float = -1.0  # when its current lease was granted
    first_granted: float = -1.0
    phase: int = 0  # the next burst (Tasks)
    lease_lost: bool = False  # idle-released, and not yet leased again
    waiting_burst: float | None = None  # a burst submitted while the lease was gone: when
    response: float = 0.0  # seconds its bursts took from submission to the end (Tasks)
    share: float = 0.0  # GPUs' worth of share its current lease holds
    last_call: float = 0.0  # when its program last called the server
    in_burst: bool = False  # work of it is queued or running
    program: SimulatedProgram | None = None


class SimulatedProgram:
    """The job's program as its reservations see it (``reservations.Attachment``): what the
    server's idle sweep asks of an attached session (busy? last request?) and how it tells the
    program its lease has ended. It holds no executor tenants: its GPUs are ``SimulatedGpu``."""

    def __init__(self, sim: Simulation, run: JobRun) -> None:
        self.id = run.job.id
        self._sim = sim
        self._run = run

    def lease_ended(self, reason: str) -> None:
        self._sim.lease_ended(self._run)

    def last_request(self) -> float:
        return self._run.last_call

    def busy(self) -> bool:
        return self._run.in_burst


class SimulatedGpu:
    """One GPU: its slot in the server's real ``GpuPool`` and a real scheduler that orders the
    work of its tenants, driven the way the executor's worker drives it (push, pop, charge)."""

    def __init__(self, sim: Simulation, slot: GpuSlot, scheduler: Scheduler[Slice]) -> None:
        self.sim = sim
        self.slot = slot
        self.scheduler = scheduler
        self.running: Slice | None = None
        self.running_since = 0.0
        self.waking = False
        self.queued_seconds = 0.0
        self.served = 0.0  # device-seconds of slices finished
        self.ledger: dict[int, tuple[int, int]] = {}  # run id -> (share, memory), checked apart

    def open(self, key: int, share: int, memory: int, now: float) -> None:
        """A lease's tenant: its compute weight is its share, as ``ReservationTable.attach``
        gives a tenant (``weight or placement.fraction``; the simulation asks no weight)."""
        self.ledger[key] = (share, memory)
        self.scheduler.add(key, share / SHARE_UNITS, None, now)

    def close(self, key: int) -> None:
        del self.ledger[key]
        left = self.scheduler.remove(key)
        if left:  # only leases with nothing queued end (idle, or done): say so if not
            raise AssertionError(f"tenant {key} left {len(left)} slices queued")

    def submit(self, burst: Burst, seconds: float, now: float) -> None:
        key = burst.run.job.id
        alone = self.slot.leased_share == SHARE_UNITS and self.slot.tenants == 1
        if alone or isinstance(self.scheduler, FifoScheduler):
            # Nobody can be behind it (a whole GPU), or first come keeps it whole anyway: all of
            # its slices would run back to back, so one job is the same thing.
            self.scheduler.push(key, Slice(burst, seconds), now)
        else:
            count = max(1, math.ceil(seconds / self.sim.slice_s - 1e-9))
            for _ in range(count):
                self.scheduler.push(key, Slice(burst, seconds / count), now)
            burst.slices_left += count - 1
        burst.slices_left += 1
        self.queued_seconds += seconds
        self.kick(now)

    def kick(self, now: float) -> None:
        if self.running is not None or self.waking:
            return
        decision = self.scheduler.pop(now)
        if decision is None:
            return
        if isinstance(decision, Dispatch):
            job = decision.job
            self.queued_seconds -= job.seconds
            self.running, self.running_since = job, now
            self.sim.at(now + job.seconds, self.sim.gpu_done, self)
        else:  # seconds until something may run
            self.waking = True
            self.sim.at(now + decision, self.sim.gpu_wake, self)

    def finish(self, now: float) -> Slice:
        job = self.running
        assert job is not None
        self.running = None
        key = job.burst.run.job.id
        # The last slice of a burst answers its program (a synchronising call waits for it).
        self.scheduler.charge(key, job.seconds, now, replied=not self.scheduler.queued(key))
        self.served += job.seconds
        return job


@dataclass
class RunResult:
    """What one simulation of one cluster size measured."""

    policy: str
    gpus: int
    aborted: bool
    wait_p95: float
    waits: int
    late_share: float
    utilisation: float
    allocation_rate: float
    slowdown: dict[str, float]
    slowdown_by_kind: dict[str, dict[str, float]]
    by_kind: dict[str, dict[str, float | None]]  # busy and allocated GPU-seconds per job kind
    idle_released: int
    refused_after_choice: int
    consistency: dict[str, Any]
    wall_s: float

    @property
    def meets(self) -> bool:
        return not self.aborted and self.wait_p95 <= WAIT_TARGET_S


class Simulation:
    """One policy on one cluster size over one workload (see the module docstring)."""

    def __init__(
        self,
        workload: Workload,
        gpus: int,
        policy: str,
        idle_timeout: float,
        progress: Callable[[float], None] = lambda done: None,
        slice_s: float = SLICE_S,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.workload = workload
        self.policy = policy
        self.idle_timeout = idle_timeout if policy == "ours" else 0.0
        self.progress = progress
        self.slice_s = slice_s
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self.tables: list[ReservationTable] = []
        self.gpus: list[list[SimulatedGpu]] = []
        self.infos: list[dict[str, Any]] = []
        self._gpu_infos: list[list[dict[str, Any]]] = []
        self._room: list[tuple[int, int]] = []  # per server: (most free share, most free memory)
        for index in range(math.ceil(gpus / GPUS_PER_SERVER)):
            count = min(GPUS_PER_SERVER, gpus - index * GPUS_PER_SERVER)
            memory = (32 if index % 5 in BIG_SERVER_EVERY else 16) * GiB
            slots = [GpuSlot(i, memory) for i in range(count)]
            pool = GpuPool(slots, min_share=round(MIN_FRACTION * SHARE_UNITS))
            # No executors: the programs attached hold no executor tenants (the GPUs are
            # SimulatedGpu), so the table never opens or closes one.
            table = ReservationTable(pool, [], f"sim-{index}", 0.0, clock=self.clock)
            self.tables.append(table)
            self.gpus.append([SimulatedGpu(self, s, self._scheduler()) for s in slots])
            # What the server's SERVER_INFO says of its GPUs, the shape ``choose`` reads.
            gpu_infos = [
                {"gpu": s.index, "total_memory": s.total_memory, "leased_fraction": 0.0,
                 "leased_memory": 0, "name": "simulated", "executor": "simulated"}
                for s in slots
            ]  # fmt: skip
            self._gpu_infos.append(gpu_infos)
            self.infos.append(
                {
                    "server": {"address": f"server{index}", "min_fraction": MIN_FRACTION},
                    "gpus": list(gpu_infos),
                }
            )
            self._room.append((SHARE_UNITS, memory))
        self.total_gpus = gpus
        self.runs: dict[int, JobRun] = {}  # by job id
        self.pending: list[JobRun] = []
        self.waits: list[float] = []  # lease waits of requests made in the measured window
        self.slowdowns: dict[str, list[float]] = {
            "batch": [],
            "notebook": [],
            "training": [],
            "notebook_cells": [],
        }
        self.completed: dict[int, float] = {}  # job id -> slowdown, of jobs in the window
        # By kind of job, within the window: share-seconds leased, device-seconds busy.
        self.allocated = dict.fromkeys(KINDS, 0.0)
        self.busy = dict.fromkeys(KINDS, 0.0)
        # Device-seconds of tasks run as on dedicated GPUs (``_run_dedicated``), window or not.
        self.dedicated_work = 0.0
        self.submitted = 0.0  # device-seconds of work handed to GPUs
        self.idle_released = 0
        self.refused_after_choice = 0
        self.max_memory_commit = 0.0  # the most of a GPU's memory its leases were promised
        self.max_share_commit = 0.0
        self.ledger_mismatches = 0
        self.aborted = False
        self.late = 0
        # Requests the measured window can make at most: its jobs, and one more for each think gap
        # of a notebook (of the window or before it) long enough to be idle-released. More late
        # requests than 5 % of that can only fail the wait target, so the run stops there.
        self._most_requests = sum(1 for j in workload.jobs if j.arrival >= workload.warmup) + (
            sum(
                int(np.count_nonzero(j.gaps[1:] > self.idle_timeout))
                for j in workload.jobs
                if isinstance(j, Task) and j.kind == "notebook"
            )
            if self.idle_timeout
            else 0
        )

    def clock(self) -> float:
        return self.now

    def _scheduler(self) -> Scheduler[Slice]:
        return FairScheduler() if self.policy == "ours" else FifoScheduler()

    # -- the event loop -------------------------------------------------------------------------
    def at(self, when: float, handler: Callable[[Any], None], arg: Any) -> None:
        heapq.heappush(self._events, (when, next(self._seq), handler, arg))

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(end, self.workload.horizon) - max(start, self.workload.warmup))

    def run(self) -> RunResult:
        began = time.perf_counter()
        for job in self.workload.jobs:
            self.at(job.arrival, self._arrive, job)
        self.at(PROGRESS_EVERY_S, self._tick, None)
        horizon = self.workload.horizon
        events = self._events
        while events and not self.aborted:
            when, _, handler, arg = heapq.heappop(events)
            if when > horizon:
                break
            self.now = when
            handler(arg)
        self.now = horizon
        return self._result(time.perf_counter() - began)

    def _tick(self, _: None) -> None:
        self.progress(self.now / self.workload.horizon)
        if self.now >= self.workload.warmup:
            late = self.late + sum(
                1
                for r in self.pending
                if r.requested >= self.workload.warmup and self.now - r.requested > WAIT_TARGET_S
            )
            if late > (1 - WAIT_QUANTILE) * self._most_requests:
                self.aborted = True
        self.at(self.now + PROGRESS_EVERY_S, self._tick, None)

    # -- leases ---------------------------------------------------------------------------------
    def _arrive(self, job: Job) -> None:
        run = JobRun(job, self.now)
        self.runs[job.id] = run
        self._request(run)

    def _ask(self, job: Job) -> Ask:
        if self.policy == "static" or isinstance(job, Training):
            return Ask(job.gpus, fraction=1.0)
        return Ask(job.gpus, fraction=job.fraction, memory=job.memory)

    def _request(self, run: JobRun) -> None:
        run.requested = self.now
        if not self._place(run):
            self.pending.append(run)

    def _place(self, run: JobRun) -> bool:
        job = run.job
        ask = self._ask(job)
        if ask.fraction:
            needed_share, needed_memory = round(ask.fraction * SHARE_UNITS), 0
        else:
            needed_share, needed_memory = 0, ask.memory
        # Servers with no GPU that could hold one lease of the ask take no part in the choice
        # (they would count zero GPUs with room in ``choose``), so they are left out unread.
        servers = [
            (index, self.infos[index])
            for index, (share, memory) in enumerate(self._room)
            if share >= needed_share and memory >= needed_memory
        ]
        if not servers:
            return False
        try:
            plan = choose(ask, servers, []) if self.policy == "ours" else first_fit(ask, servers)
        except NoRoom:
            return False
        made: list[tuple[int, Reservation]] = []
        timeout = self.idle_timeout if isinstance(job, Task) and job.kind == "notebook" else 0.0
        try:
            for server, count in plan:
                reservation = self.tables[server].reserve(
                    count, ask.fraction, ask.memory, 0.0, m.MODE_SHARE, f"job{job.id}", None,
                    idle_timeout=timeout,
                )  # fmt: skip
                made.append((server, reservation))
        except CapacityError:  # the choice and the server disagreed: count it, try again later
            self.refused_after_choice += 1
            for server, reservation in made:
                self.tables[server].end(reservation, "placement refused", EndedBy.RELEASED)
                self._refresh(server)
            return False
        self._granted(run, made)
        return True

    def _granted(self, run: JobRun, leases: list[tuple[int, Reservation]]) -> None:
        now = self.now
        if run.requested >= self.workload.warmup:
            wait = now - run.requested
            self.waits.append(wait)
            if wait > WAIT_TARGET_S:
                self.late += 1
        run.leases, run.granted, run.lease_lost = leases, now, False
        run.share, run.last_call = 0.0, now
        if run.program is None:
            run.program = SimulatedProgram(self, run)
        for server, reservation in leases:
            # Attached as a session with no tenants: ``attach`` would open executor tenants,
            # and this GPU's tenant is the SimulatedGpu's (below). The sweep then asks the
            # program, as it asks a session, whether it is busy and when it last called.
            reservation.attached[run.program] = []
            self._refresh(server)
            for placement in reservation.placements:
                gpu = self.gpus[server][placement.gpu]
                gpu.open(run.job.id, placement.share, placement.memory_limit, now)
                self.check_commitment(gpu)
                run.share += placement.share / SHARE_UNITS
        job = run.job
        if isinstance(job, Training):
            self.at(now + job.duration, self._training_done, run)
            return
        if run.first_granted < 0:
            run.first_granted = now
            whole = all(p.share == SHARE_UNITS for _, r in leases for p in r.placements)
            if whole and not self._releasable(job):
                self._run_dedicated(run, job)
                return
            self._after_activity(run, float(job.gaps[0]))
        elif run.waiting_burst is not None:  # a notebook leased again: its cell runs now
            self._submit(run, run.waiting_burst)

    def _release(self, run: JobRun) -> None:
        """The job is done with its lease: end its reservations (the tables give the GPUs back)."""
        leases, run.leases = run.leases, []
        self._drop_tenants(run, leases)
        for server, reservation in leases:
            self._end(server, reservation, run)
        self._retry()

    def _end(self, server: int, reservation: Reservation, run: JobRun) -> None:
        """The program detaches and its reservation is released, as a ``run`` that ends does."""
        table = self.tables[server]
        if run.program is not None:
            table.detach(reservation, run.program)
        table.end(reservation, "the job finished", EndedBy.RELEASED)
        self._refresh(server)

    def lease_ended(self, run: JobRun) -> None:
        """A table told the program its lease ended, and the simulation did not end it: its idle
        timeout did. Its tenants close now; the table gives the GPUs back right after this call,
        so what waits is tried once it has."""
        self.idle_released += 1
        leases, run.leases = run.leases, []
        run.lease_lost = True
        self._drop_tenants(run, leases)
        for server, reservation in leases:  # the program lost its GPUs: all of them
            if reservation.ended is None:
                self._end(server, reservation, run)
        self.at(self.now, self._after_idle_release, [server for server, _ in leases])

    def _after_idle_release(self, servers: list[int]) -> None:
        for server in servers:
            self._refresh(server)
        self._retry()

    def _drop_tenants(self, run: JobRun, leases: list[tuple[int, Reservation]]) -> None:
        if not leases:  # idle-released before: accounted then
            return
        self.allocated[kind_of(run.job)] += run.share * self.overlap(run.granted, self.now)
        run.share = 0.0
        for server, reservation in leases:
            for placement in reservation.placements:
                self.gpus[server][placement.gpu].close(run.job.id)

    def _refresh(self, server: int) -> None:
        """Bring the server's ``SERVER_INFO`` GPUs (what ``choose`` reads) up to date."""
        slots = self.tables[server].pool.slots
        for slot, gpu in zip(slots, self._gpu_infos[server], strict=True):
            gpu["leased_fraction"] = slot.leased_share / SHARE_UNITS
            gpu["leased_memory"] = slot.leased_memory
        # A GPU with no free share fits no lease and adds nothing to a server's free share, so
        # the choice is the same without it; leaving it out saves reading it on every request.
        self.infos[server]["gpus"] = [
            gpu for slot, gpu in zip(slots, self._gpu_infos[server], strict=True) if slot.free_share
        ]
        self._room[server] = (
            max(s.free_share for s in slots),
            max(s.total_memory - s.leased_memory for s in slots),
        )

    def _retry(self) -> None:
        """Capacity came back: place what waits, in arrival order (later ones may fill gaps)."""
        if not self.pending:
            return
        kept: list[JobRun] = []
        refused: set[Ask] = set()  # asks that did not fit: nothing frees room during the scan
        for position, run in enumerate(self.pending):
            ask = self._ask(run.job)
            if position >= RETRY_SCAN or ask in refused or not self._place(run):
                refused.add(ask)
                kept.append(run)
        self.pending = kept

    def check_commitment(self, gpu: SimulatedGpu) -> None:
        """What the simulation itself recorded of a GPU's leases, apart from the pool's counts:
        never more than the GPU has (the pool must have refused), and the same as the pool."""
        share = sum(s for s, _ in gpu.ledger.values())
        memory = sum(b for _, b in gpu.ledger.values())
        self.max_share_commit = max(self.max_share_commit, share / SHARE_UNITS)
        self.max_memory_commit = max(self.max_memory_commit, memory / gpu.slot.total_memory)
        if share != gpu.slot.leased_share or memory != gpu.slot.leased_memory:
            self.ledger_mismatches += 1

    # -- device work ----------------------------------------------------------------------------
    def _after_activity(self, run: JobRun, gap: float) -> None:
        """The job's program made its last call for now; it calls again after ``gap``."""
        run.in_burst, run.last_call = False, self.now
        if self.idle_timeout and run.leases and gap > self.idle_timeout:
            for server, _ in run.leases:
                # The server's sweeper would find it idle past its timeout then: sweep at that
                # moment (a sweep at any other moment ends nothing of this lease).
                self.at(self.now + self.idle_timeout + 1e-3, self._sweep, server)
        self.at(self.now + gap, self._gap_over, run)

    def _releasable(self, job: Task) -> bool:
        return bool(self.idle_timeout) and job.kind == "notebook"

    def _run_dedicated(self, run: JobRun, job: Task) -> None:
        """A task that holds its GPUs whole, and cannot lose them, runs as on dedicated GPUs:
        nobody shares them, so nothing its scheduler could do changes its timeline. Its bursts'
        device time is accounted where it falls; it ends after its dedicated time."""
        starts = (
            self.now + np.cumsum(job.gaps[:-1]) + np.concatenate(([0.0], np.cumsum(job.work)[:-1]))
        )
        ends = starts + job.work
        low, high = self.workload.warmup, self.workload.horizon
        inside = np.clip(np.minimum(ends, high) - np.maximum(starts, low), 0.0, None)
        self.busy[job.kind] += float(inside.sum()) * job.gpus
        run.response = float(job.work.sum())  # its bursts take their device time, no more
        self.dedicated_work += float(job.work.sum()) * job.gpus
        self.at(self.now + job.dedicated, self._task_done, run)

    def _sweep(self, server: int) -> None:
        self.tables[server].sweep(self.now)

    def _gap_over(self, run: JobRun) -> None:
        job = run.job
        assert isinstance(job, Task)
        if run.phase >= len(job.work):
            self._task_done(run)
            return
        if run.lease_lost:
            run.waiting_burst = self.now
            self._request(run)
            return
        self._submit(run, self.now)

    def _submit(self, run: JobRun, submitted: float) -> None:
        job = run.job
        assert isinstance(job, Task)
        run.waiting_burst = None
        run.in_burst, run.last_call = True, self.now
        seconds = float(job.work[run.phase])
        placements = [(s, p) for s, r in run.leases for p in r.placements]
        burst = Burst(run, submitted)
        self.submitted += seconds * len(placements)
        for server, placement in placements:
            self.gpus[server][placement.gpu].submit(burst, seconds, self.now)

    def gpu_done(self, gpu: SimulatedGpu) -> None:
        started = gpu.running_since
        burst = gpu.finish(self.now).burst
        self.busy[kind_of(burst.run.job)] += self.overlap(started, self.now)
        burst.slices_left -= 1
        if burst.slices_left == 0:  # its last slice on its last GPU
            run = burst.run
            task = run.job
            assert isinstance(task, Task)
            run.response += self.now - burst.submitted
            run.phase += 1
            self._after_activity(run, float(task.gaps[run.phase]))
        gpu.kick(self.now)

    def gpu_wake(self, gpu: SimulatedGpu) -> None:
        gpu.waking = False
        gpu.kick(self.now)

    def _task_done(self, run: JobRun) -> None:
        job = run.job
        assert isinstance(job, Task)
        self._release(run)
        if job.arrival < self.workload.warmup:
            return
        # The job's completion time against a dedicated GPU's (for a notebook, the session's: a
        # cell that waits for its lease again or shares the device makes it later).
        slowdown = (self.now - run.first_granted) / max(job.dedicated, 1e-9)
        self.slowdowns[job.kind].append(slowdown)
        self.completed[job.id] = slowdown
        if job.kind == "notebook" and len(job.work):
            # What a user at the notebook feels: how much longer its cells took than alone.
            self.slowdowns["notebook_cells"].append(run.response / float(job.work.sum()))

    def _training_done(self, run: JobRun) -> None:
        job = run.job
        assert isinstance(job, Training)
        self.busy["training"] += job.utilisation * job.gpus * self.overlap(run.granted, self.now)
        self._release(run)
        if job.arrival >= self.workload.warmup:
            self.slowdowns["training"].append(1.0)  # whole GPUs alone: as dedicated

    # -- the report -----------------------------------------------------------------------------
    def _result(self, wall: float) -> RunResult:
        now = self.now
        window = self.workload.horizon - self.workload.warmup
        waits = list(self.waits)
        for run in self.pending:  # still waiting: at least this long (censored)
            if run.requested >= self.workload.warmup:
                waits.append(now - run.requested)
        allocated, busy = dict(self.allocated), dict(self.busy)
        for run in self.runs.values():  # leases still held, work still running: up to now
            if run.leases:
                allocated[kind_of(run.job)] += run.share * self.overlap(run.granted, now)
                if isinstance(run.job, Training):
                    busy["training"] += (
                        run.job.utilisation * run.job.gpus * self.overlap(run.granted, now)
                    )
        running = queued = 0.0
        for server in self.gpus:
            for gpu in server:
                queued += gpu.queued_seconds
                if gpu.running is not None:
                    busy[kind_of(gpu.running.burst.run.job)] += self.overlap(gpu.running_since, now)
                    running += gpu.running.seconds
        served = sum(gpu.served for server in self.gpus for gpu in server)
        provisioned = self.total_gpus * window
        all_slowdowns = [
            s for kind in ("batch", "notebook", "training") for s in self.slowdowns[kind]
        ]
        outstanding = served + running + queued
        consistency = {
            "work_submitted_s": self.submitted,
            "work_served_s": served,
            "work_running_s": running,
            "work_queued_s": queued,
            "work_dedicated_s": self.dedicated_work,  # alone on whole GPUs: no scheduler
            "work_conserved": math.isclose(outstanding, self.submitted, rel_tol=1e-9, abs_tol=1e-6),
            "max_memory_commit": self.max_memory_commit,
            "max_share_commit": self.max_share_commit,
            "ledger_mismatches": self.ledger_mismatches,
            "memory_never_overcommitted": self.max_memory_commit <= 1.0 + 1e-12
            and self.max_share_commit <= 1.0 + 1e-12
            and self.ledger_mismatches == 0,
        }
        return RunResult(
            policy=self.policy,
            gpus=self.total_gpus,
            aborted=self.aborted,
            wait_p95=percentile(waits, WAIT_QUANTILE) if waits else 0.0,
            waits=len(waits),
            late_share=sum(1 for w in waits if w > WAIT_TARGET_S) / max(1, len(waits)),
            utilisation=sum(busy.values()) / provisioned,
            allocation_rate=sum(allocated.values()) / provisioned,
            by_kind={
                kind: {
                    "busy_gpu_s": busy[kind],
                    "allocated_gpu_s": allocated[kind],
                    "busy_of_allocated": busy[kind] / allocated[kind] if allocated[kind] else None,
                }
                for kind in KINDS
                if allocated[kind]
            },
            slowdown=slowdown_percentiles(all_slowdowns),
            slowdown_by_kind={k: slowdown_percentiles(v) for k, v in self.slowdowns.items() if v},
            idle_released=self.idle_released,
            refused_after_choice=self.refused_after_choice,
            consistency=consistency,
            wall_s=wall,
        )


RETRY_SCAN = 64  # waiting requests tried per release (the queue's head, then backfill)


def first_fit(ask: Ask, servers: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, int]]:
    """Bitfusion's client: the servers in their listed order, the first that holds the whole
    request, else the request spread over them in that order. Raises ``NoRoom``."""
    room: list[tuple[Any, int]] = []
    for key, info in servers:
        count = sum(1 for g in info["gpus"] if fits(ask, g, MIN_FRACTION))
        if count >= ask.gpus:
            return [(key, ask.gpus)]
        room.append((key, count))
    plan, left = [], ask.gpus
    for key, count in room:
        if count and left:
            take = min(count, left)
            plan.append((key, take))
            left -= take
    if left:
        raise NoRoom(f"no room for {ask.describe()}")
    return plan


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


def slowdown_percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "jobs": 0}
    return {
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "jobs": len(values),
    }
