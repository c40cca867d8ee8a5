"""The synthetic workload of ``perf/utilisation.py``: jobs drawn from the published statistics
in ``utilisation_stats``, the same jobs for every policy and cluster size."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# perf/ is on sys.path when the benchmark runs as a script, so its sibling modules import by name.
import utilisation_stats as stats

GiB = 2**30
DAY = 86_400.0


@dataclass
class Task:
    """A job whose device use is simulated: a batch task or a notebook session. On a dedicated
    GPU it is ``gaps[0], work[0], gaps[1], work[1], ..., gaps[n]`` (seconds); under sharing a
    burst of work may take longer, the gaps (host time, user think time) do not change."""

    id: int
    kind: str  # "batch" or "notebook"
    arrival: float
    gpus: int
    fraction: float  # the ask: a fraction of a GPU, or 0 with ``memory``
    memory: int  # the ask in bytes (notebooks), or 0 with ``fraction``
    gaps: np.ndarray
    work: np.ndarray  # device seconds per GPU of each burst

    @property
    def dedicated(self) -> float:
        return float(self.gaps.sum() + self.work.sum())


@dataclass
class Training:
    """An exclusive training job: whole GPUs for its duration, busy per its per-minute use."""

    id: int
    arrival: float
    gpus: int
    duration: float
    utilisation: float  # mean of its per-minute utilisations (device-seconds per second per GPU)


Job = Task | Training


@dataclass
class Workload:
    jobs: list[Job]
    horizon: float  # seconds simulated
    warmup: float  # seconds before measuring starts
    notebook_share: float  # of static-reserved GPU-time, as generated (the mix's target)
    reserved_rate: float  # mean static-reserved GPUs it offers

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"batch": 0, "notebook": 0, "training": 0}
        for job in self.jobs:
            out[job.kind if isinstance(job, Task) else "training"] += 1
        return out


def static_gpus(job: Job) -> int:
    """Whole GPUs the job holds under static allocation (a fraction or a memory ask is one)."""
    return job.gpus


def reserved_time(job: Job) -> float:
    """Static-reserved GPU-seconds on a dedicated run: the unit of ``--mix``."""
    duration = job.duration if isinstance(job, Training) else job.dedicated
    return static_gpus(job) * duration


def make_workload(
    gpus: int,
    mix: float,
    days: float,
    warmup_days: float,
    load: float,
    seed: int,
) -> Workload:
    """Jobs arriving over ``warmup_days + days`` whose static-reserved GPU-time is on average
    ``load * gpus``, notebooks holding ``mix`` of it and the rest split batch/training as in
    ``stats.NON_NOTEBOOK_SPLIT``. Arrivals follow PAI's diurnal profile."""
    rng = np.random.default_rng([seed, round(mix * 1000)])
    horizon = (days + warmup_days) * DAY
    reserved_rate = load * gpus
    shares = {
        "notebook": mix,
        "batch": (1 - mix) * stats.NON_NOTEBOOK_SPLIT["batch"],
        "training": (1 - mix) * stats.NON_NOTEBOOK_SPLIT["training"],
    }
    makers: dict[str, Callable[[np.random.Generator, int, float], Job]] = {
        "batch": _batch_task,
        "notebook": _notebook,
        "training": _training,
    }
    ids = itertools.count()
    jobs: list[Job] = []
    for kind, share in shares.items():
        if share <= 0:
            continue
        # The mean reserved GPU-time of a job of this kind, from a large sample of its own.
        sample_rng = np.random.default_rng([seed, 7, len(kind)])
        mean = float(
            np.mean([reserved_time(makers[kind](sample_rng, 0, 0.0)) for _ in range(4000)])
        )
        rate = share * reserved_rate / mean  # jobs per second, on average over a day
        for arrival in _arrivals(rng, rate, horizon):
            jobs.append(makers[kind](rng, next(ids), float(arrival)))
    jobs.sort(key=lambda j: j.arrival)
    return Workload(jobs, horizon, warmup_days * DAY, mix, reserved_rate)


def _arrivals(rng: np.random.Generator, rate: float, horizon: float) -> np.ndarray:
    """A Poisson process of mean ``rate`` modulated by the hourly profile (thinning)."""
    profile = np.asarray(stats.PAI_HOURLY_MULTIPLIER)
    peak = rate * float(profile.max())
    count = rng.poisson(peak * horizon)
    times = np.sort(rng.uniform(0.0, horizon, count))
    hours = ((times // 3600) % 24).astype(int)
    keep = rng.uniform(0.0, 1.0, count) < profile[hours] / profile.max()
    return times[keep]


def _inverse(points: tuple[tuple[float, float], ...], u: np.ndarray | float) -> np.ndarray:
    """Inverse CDF by linear interpolation: ``points`` are (value, cumulative %)."""
    values = np.array([p[0] for p in points])
    cdf = np.array([p[1] for p in points]) / 100.0
    return np.asarray(np.interp(u, cdf, values))


def _duration(rng: np.random.Generator, quantiles: tuple[tuple[float, float], ...]) -> float:
    """A duration from published quantiles, log-linear between them (see ``stats``)."""
    log_points = tuple((math.log(v), q) for v, q in quantiles)
    return float(math.exp(float(_inverse(log_points, rng.uniform()))))


def _on_off(
    rng: np.random.Generator, dedicated: float, device_share: float, burst_mean: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaps and bursts of device work filling ``dedicated`` seconds with ``device_share`` of them
    on the device: bursts of about ``burst_mean`` device-seconds, gaps spread at random."""
    busy = dedicated * device_share
    if busy <= 0:
        return np.array([dedicated]), np.zeros(0)
    count = max(1, round(busy / burst_mean))
    weights = rng.exponential(1.0, count)
    work = busy * weights / weights.sum()
    gap_weights = rng.exponential(1.0, count + 1)
    gaps = (dedicated - busy) * gap_weights / gap_weights.sum()
    return gaps, work


def _batch_task(rng: np.random.Generator, ident: int, arrival: float) -> Task:
    u = rng.uniform() * 100
    if u < stats.PAI_FRACTIONAL_TASKS_PCT:
        gpus, fraction = 1, float(rng.choice(stats.PAI_FRACTIONS))
    else:
        gpus, fraction = _pick(stats.PAI_WHOLE_GPU_COUNT_CDF, u), 1.0
    duration = _duration(rng, stats.PAI_DURATION_QUANTILES_S)
    utilisation = float(_inverse(stats.PAI_UTIL_CDF, rng.uniform())) / 100
    gaps, work = _on_off(rng, duration, utilisation, stats.BATCH_BURST_MEAN_S)
    return Task(ident, "batch", arrival, gpus, fraction, 0, gaps, work)


def _pick(cdf: tuple[tuple[int, float], ...], u: float) -> int:
    """The smallest value whose cumulative % reaches ``u``."""
    for value, cumulative in cdf:
        if u <= cumulative:
            return value
    return cdf[-1][0]


def _notebook(rng: np.random.Generator, ident: int, arrival: float) -> Task:
    length = min(
        float(
            rng.lognormal(math.log(stats.NOTEBOOK_SESSION_MEDIAN_S), stats.NOTEBOOK_SESSION_SIGMA)
        ),
        stats.NOTEBOOK_SESSION_MAX_S,
    )
    cells: list[float] = []
    gaps: list[float] = [float(rng.lognormal(stats.NOTEBOOK_GAP_MU, stats.NOTEBOOK_GAP_SIGMA))]
    spent = gaps[0]
    while spent < length:
        cell = float(
            rng.lognormal(math.log(stats.NOTEBOOK_CELL_MEDIAN_S), stats.NOTEBOOK_CELL_SIGMA)
        )
        gap = float(rng.lognormal(stats.NOTEBOOK_GAP_MU, stats.NOTEBOOK_GAP_SIGMA))
        cells.append(cell)
        gaps.append(gap)
        spent += cell + gap
    memory = int(rng.choice(stats.NOTEBOOK_MEMORY_GIB)) * GiB
    return Task(ident, "notebook", arrival, 1, 0.0, memory, np.array(gaps), np.array(cells))


def _training(rng: np.random.Generator, ident: int, arrival: float) -> Training:
    gpus = _pick(stats.PHILLY_GPU_COUNT_CDF, rng.uniform() * 100)
    duration = _duration(rng, stats.PHILLY_DURATION_QUANTILES_S)
    minutes = max(1, min(240, round(duration / 60)))  # enough draws for a stable mean
    utilisation = float(np.mean(_inverse(stats.PHILLY_UTIL_CDF, rng.uniform(size=minutes)))) / 100
    return Training(ident, arrival, gpus, duration, utilisation)
