"""A fixed-bucket histogram cheap enough to record every operation of every tenant.

Observations only count (no lock: each histogram is written by one thread, the device worker's
or the event loop's, and read by others for metrics, where a count off by one in flight does no
harm). Buckets are upper bounds in seconds, as Prometheus's ``le``.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

# Upper bounds fitted to microsecond RPCs over a LAN (a round trip is tens of microseconds) up to
# long kernels and queues: 10 us .. 10 s, about three a decade.
MICROSECOND_BUCKETS: tuple[float, ...] = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class HistogramSnapshot:
    """What a histogram held at one moment: cumulative counts per bound (the last is +Inf)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]  # len(bounds) + 1
    total: float  # sum of the observations

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Histogram:
    """Counts of observations per bucket, and their sum."""

    __slots__ = ("bounds", "_counts", "_total")

    def __init__(self, bounds: tuple[float, ...] = MICROSECOND_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be increasing")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self._total += value

    def snapshot(self) -> HistogramSnapshot:
        counts, running, cumulative = list(self._counts), 0, []
        for count in counts:
            running += count
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), self._total)
