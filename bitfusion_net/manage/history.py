"""What the server did over the last minutes: one sample a second of every GPU's utilisation
and memory, every lease's share of its GPUs, and the traffic, for the dashboards' charts and the
utilisation gauges of ``/metrics``.

Utilisation over an interval is measured, not estimated: the difference of two readings of the
device time counters (``Executor.busy_time``, each lease's accounts) over the interval's length.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..server.server import Server

SAMPLE_INTERVAL_S = 1.0
KEPT_SAMPLES = 600  # ten minutes


@dataclass(frozen=True)
class Reading:
    """The counters at one moment."""

    time: float  # unix
    clock: float  # monotonic
    busy: list[float]  # per GPU, seconds of device time since start
    memory_used: list[int]  # per GPU
    leases: dict[int, tuple[list[float], list[int]]]  # id -> per device (device time, memory)
    received: int  # bytes since start
    sent: int


class History:
    """Samples the server every ``interval`` seconds on the event loop; keeps the last
    ``kept``. ``lag`` is how late the last sample's timer fired: the event loop's lag."""

    def __init__(
        self, server: Server, interval: float = SAMPLE_INTERVAL_S, kept: int = KEPT_SAMPLES
    ) -> None:
        self._server = server
        self.interval = interval
        self.samples: deque[dict[str, Any]] = deque(maxlen=kept)
        self._last: Reading | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.lag = 0.0
        self.gpu_utilisation: list[float | None] = []  # per GPU, over the last interval
        self.lease_utilisation: dict[int, list[float]] = {}  # id -> per device

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = self._read()
        self.gpu_utilisation = [None] * len(self._last.busy)
        self._due = loop.time() + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def since(self, after: float) -> list[dict[str, Any]]:
        """The samples taken after unix time ``after``, oldest first."""
        return [_expanded(s) for s in self.samples if s["time"] > after]

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.lag = max(0.0, loop.time() - self._due)
        self._sample()
        self._due = max(self._due + self.interval, loop.time())  # no burst after a stall
        self._timer = loop.call_at(self._due, self._tick)

    def _read(self) -> Reading:
        server = self._server
        leases = {
            r.id: ([a.device_time for a in r.accounts()], [b.used for b in r.budgets])
            for r in server.live_reservations()
        }
        gpus = server.gpus()
        received, sent = server.traffic()
        return Reading(
            time.time(),
            time.monotonic(),
            [g["busy_time"] for g in gpus],
            [g["memory_used"] for g in gpus],
            leases,
            received,
            sent,
        )

    def _sample(self) -> None:
        now, last = self._read(), self._last
        assert last is not None
        self._last = now
        span = now.clock - last.clock
        if span <= 0:
            return

        def share(before: float, after: float) -> float:
            return min(1.0, max(0.0, (after - before) / span))

        self.gpu_utilisation = [share(b0, b1) for b0, b1 in zip(last.busy, now.busy, strict=True)]
        self.lease_utilisation = {}
        leases = []
        for lease_id, (times, memory) in now.leases.items():
            before = last.leases.get(lease_id, ([0.0] * len(times), memory))[0]
            used = [share(t0, t1) for t0, t1 in zip(before, times, strict=True)]
            self.lease_utilisation[lease_id] = used
            leases.append((lease_id, tuple(used), tuple(memory)))  # compact: 600 are kept
        self.samples.append(
            {
                "time": round(now.time, 3),
                "gpus": [
                    {"gpu": i, "utilisation": u, "memory_used": m}
                    for i, (u, m) in enumerate(
                        zip(self.gpu_utilisation, now.memory_used, strict=True)
                    )
                ],
                "received_bytes_per_second": (now.received - last.received) / span,
                "sent_bytes_per_second": (now.sent - last.sent) / span,
                "leases": leases,
            }
        )


def _expanded(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample as the API documents it (leases are kept as tuples)."""
    leases = [
        {"id": lease, "utilisation": list(used), "memory_used": list(memory)}
        for lease, used, memory in sample["leases"]
    ]
    return {**sample, "leases": leases}
