"""``/metrics``: the server's state in Prometheus's text format, read at scrape time.

Per GPU under dcgm-exporter's names, units and labels, so dashboards and alerts written for it
read our GPUs; the rest under ``bitfusion_`` in base units (docs/OBSERVABILITY.md has the
table). Nothing is instrumented twice: gauges are read from the server's state, counters from
the counters it keeps anyway (``ServerStats``, the executors' busy time and queue waits, each
reservation's accounts).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from executors.histogram import HistogramSnapshot

from ..protocol import messages as m
from .history import History

if TYPE_CHECKING:
    from ..server.reservations import Reservation
    from ..server.server import Server

MIB = 2**20
TENANT_SERIES_PER_GPU = 10  # named tenants per GPU without users; the rest are "other"
OTHER = "other"
_DCGM_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]


@dataclass
class _Totals:
    """A tenant's counters on one GPU."""

    device_time: float = 0.0
    queue_wait: float = 0.0
    operations: int = 0

    def add(self, other: _Totals) -> None:
        self.device_time += other.device_time
        self.queue_wait += other.queue_wait
        self.operations += other.operations


class TenantLabels:
    """Which ``tenant`` label each lease's series go under, bounded.

    With users (a server with tokens) a lease counts under its user's name; without, the first
    ``TENANT_SERIES_PER_GPU`` leases on a GPU to be scraped keep a label of their own
    (``lease-ID``) until they end, and the rest count under ``other``. When a lease ends
    (``ended``, with its final totals), a label it shared (a user's, ``other``) keeps its
    counts, so counters never go back; a label of its own goes with it."""

    def __init__(self) -> None:
        self._own: dict[int, set[int]] = {}  # gpu -> lease ids with a label of their own
        self._shared: set[tuple[int, int]] = set()  # (lease, gpu) scraped under "other"
        self._carried: dict[tuple[str, int], _Totals] = {}  # (label, gpu) -> ended leases' totals

    def label(self, lease: int, gpu: int, user: str | None) -> str:
        """The label of ``lease``'s series on ``gpu`` (from its first scrape to its end)."""
        if user is not None:
            return user
        own = self._own.setdefault(gpu, set())
        if lease in own:
            return f"lease-{lease}"
        if (lease, gpu) not in self._shared and len(own) < TENANT_SERIES_PER_GPU:
            own.add(lease)
            return f"lease-{lease}"
        self._shared.add((lease, gpu))
        return OTHER

    def ended(self, lease: int, gpu: int, user: str | None, totals: _Totals) -> None:
        """``lease`` has ended with ``totals`` on ``gpu``: a shared label keeps them (one it
        never was scraped under included: ``other``), a label of its own is freed."""
        own = self._own.get(gpu, set())
        if user is None and lease in own:
            own.discard(lease)
            return
        self._shared.discard((lease, gpu))
        label = user if user is not None else OTHER
        self._carried.setdefault((label, gpu), _Totals()).add(totals)

    def carried(self, label: str, gpu: int) -> _Totals:
        return self._carried.get((label, gpu), _Totals())


class ServerCollector(Collector):
    """Reads a running ``Server`` at each scrape."""

    def __init__(self, server: Server, history: History) -> None:
        self._server = server
        self._history = history
        self._labels = TenantLabels()
        self._hostname = socket.gethostname()
        server.watch_reservations_ending(self._reservation_ended)

    def _reservation_ended(self, reservation: Reservation) -> None:
        user = reservation.user.user if reservation.user is not None else None
        for account in reservation.past:  # final: its programs have all detached
            totals = _Totals(account.device_time, account.queue_wait, account.operations)
            self._labels.ended(reservation.id, account.gpu, user, totals)

    def collect(self) -> Iterable[Metric]:
        gpus = self._server.gpus()  # once per scrape: both GPU sections read it
        yield from self._dcgm(gpus)
        yield from self._server_families()
        yield from self._gpu_families(gpus)
        yield from self._tenant_families()

    # -- dcgm-exporter ---------------------------------------------------------------------------
    def _dcgm(self, gpus: list[dict[str, Any]]) -> Iterator[Metric]:
        families = {
            "DCGM_FI_DEV_GPU_UTIL": GaugeMetricFamily(
                "DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=_DCGM_LABELS
            ),
            "DCGM_FI_DEV_FB_USED": GaugeMetricFamily(
                "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=_DCGM_LABELS
            ),
            "DCGM_FI_DEV_FB_FREE": GaugeMetricFamily(
                "DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=_DCGM_LABELS
            ),
            "DCGM_FI_DEV_FB_TOTAL": GaugeMetricFamily(
                "DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", labels=_DCGM_LABELS
            ),
        }
        utilisation = self._history.gpu_utilisation
        for gpu in gpus:
            index = gpu["gpu"]
            labels = [
                str(index),
                self._server.gpu_uuid(index),
                f"nvidia{index}",
                gpu["name"],
                self._hostname,
            ]
            if index < len(utilisation) and utilisation[index] is not None:
                families["DCGM_FI_DEV_GPU_UTIL"].add_metric(labels, round(utilisation[index] * 100))
            used, total = gpu["memory_used"], gpu["total_memory"]
            families["DCGM_FI_DEV_FB_USED"].add_metric(labels, used // MIB)
            families["DCGM_FI_DEV_FB_FREE"].add_metric(labels, (total - used) // MIB)
            families["DCGM_FI_DEV_FB_TOTAL"].add_metric(labels, total // MIB)
        yield from families.values()

    # -- the server ------------------------------------------------------------------------------
    def _server_families(self) -> Iterator[Metric]:
        server, stats = self._server, self._server.stats
        info = server.info()
        family = GaugeMetricFamily(
            "bitfusion_server_info",
            "The server: version, protocol, executor and scheduling (always 1).",
            labels=["version", "protocol", "executor", "scheduling"],
        )
        family.add_metric(
            [info["version"], str(info["protocol"]), info["executor"], info["scheduling"]], 1
        )
        yield family
        yield GaugeMetricFamily(
            "bitfusion_server_start_time_seconds",
            "Unix time the server started.",
            value=info["started"],
        )
        requests = CounterMetricFamily(
            "bitfusion_requests", "Requests handled, by opcode.", labels=["opcode"]
        )
        latency = HistogramMetricFamily(
            "bitfusion_request_duration_seconds",
            "Seconds from handling a request to writing its reply, by opcode.",
            labels=["opcode"],
        )
        for opcode, count in enumerate(stats.requests):
            if not count:
                continue
            name = _opcode_name(opcode)
            requests.add_metric([name], count)
            histogram = stats.latency[opcode]
            if histogram is not None:
                _add_histogram(latency, [name], histogram.snapshot())
        yield requests
        yield latency
        errors = CounterMetricFamily(
            "bitfusion_errors", "Error frames sent, by error code.", labels=["code"]
        )
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code.name.lower()], count)
        yield errors
        received, sent = server.traffic()
        yield CounterMetricFamily(
            "bitfusion_received_bytes", "Bytes read from clients.", value=received
        )
        yield CounterMetricFamily("bitfusion_sent_bytes", "Bytes written to clients.", value=sent)
        yield GaugeMetricFamily(
            "bitfusion_connections", "Open connections.", value=server.connection_count()
        )
        yield CounterMetricFamily(
            "bitfusion_connections_accepted", "Connections accepted.", value=stats.accepted
        )
        refused = CounterMetricFamily(
            "bitfusion_connections_refused",
            "Greetings refused, by reason (capacity, auth, no_room, quota, protocol).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        reservations = list(server.live_reservations())
        yield GaugeMetricFamily(
            "bitfusion_leases",
            "GPU leases programs hold (one per GPU of each attached program).",
            value=sum(len(leases) for r in reservations for leases in r.attached.values()),
        )
        held = GaugeMetricFamily(
            "bitfusion_reservations", "Live reservations, by what holds them.", labels=["held_by"]
        )
        by_connection = sum(1 for r in reservations if r.holder is not None)
        held.add_metric(["connection"], by_connection)
        held.add_metric(["idle_timeout"], len(reservations) - by_connection)
        yield held
        ended = CounterMetricFamily(
            "bitfusion_reservations_ended", "Reservations ended, by reason.", labels=["reason"]
        )
        for reason, count in sorted(server.reservations_ended().items()):
            ended.add_metric([reason], count)
        yield ended

    # -- GPUs ------------------------------------------------------------------------------------
    def _gpu_families(self, gpus: list[dict[str, Any]]) -> Iterator[Metric]:
        gpu_label = ["gpu"]
        busy = CounterMetricFamily(
            "bitfusion_gpu_busy_seconds",
            "Device time spent on any tenant's work.",
            labels=gpu_label,
        )
        total = GaugeMetricFamily(
            "bitfusion_gpu_memory_total_bytes", "Memory offered to tenants.", labels=gpu_label
        )
        leased = GaugeMetricFamily(
            "bitfusion_gpu_memory_leased_bytes", "Memory promised to leases.", labels=gpu_label
        )
        used = GaugeMetricFamily(
            "bitfusion_gpu_memory_used_bytes", "Memory tenants have allocated.", labels=gpu_label
        )
        fraction = GaugeMetricFamily(
            "bitfusion_gpu_leased_ratio", "Share of the GPU leased.", labels=gpu_label
        )
        tenants = GaugeMetricFamily(
            "bitfusion_gpu_tenants", "Tenants on the GPU.", labels=gpu_label
        )
        waits = HistogramMetricFamily(
            "bitfusion_gpu_queue_wait_seconds",
            "Seconds operations waited between submission and start.",
            labels=gpu_label,
        )
        for gpu in gpus:
            label = [str(gpu["gpu"])]
            busy.add_metric(label, gpu["busy_time"])
            total.add_metric(label, gpu["total_memory"])
            leased.add_metric(label, gpu["leased_memory"])
            used.add_metric(label, gpu["memory_used"])
            fraction.add_metric(label, gpu["leased_fraction"])
            tenants.add_metric(label, gpu["tenants"])
            _add_histogram(waits, label, self._server.queue_waits(gpu["gpu"]))
        yield from (busy, total, leased, used, fraction, tenants, waits)

    # -- tenants ---------------------------------------------------------------------------------
    def _tenant_families(self) -> Iterator[Metric]:
        names = ["gpu", "tenant"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "device": CounterMetricFamily(
                "bitfusion_tenant_device_seconds", "Device time used.", labels=names
            ),
            "entitled": GaugeMetricFamily(
                "bitfusion_tenant_entitled_ratio",
                "Share of the GPU's time the tenant is entitled to.",
                labels=names,
            ),
            "used": GaugeMetricFamily(
                "bitfusion_tenant_used_ratio",
                "Share of the GPU's time the tenant used over the last sample interval.",
                labels=names,
            ),
            "wait": CounterMetricFamily(
                "bitfusion_tenant_queue_wait_seconds",
                "Seconds the tenant's operations waited to start.",
                labels=names,
            ),
            "operations": CounterMetricFamily(
                "bitfusion_tenant_operations", "Operations run.", labels=names
            ),
            "memory": GaugeMetricFamily(
                "bitfusion_tenant_memory_used_bytes", "Memory allocated.", labels=names
            ),
            "limit": GaugeMetricFamily(
                "bitfusion_tenant_memory_limit_bytes", "The tenant's memory limit.", labels=names
            ),
            "high_water": GaugeMetricFamily(
                "bitfusion_tenant_memory_high_water_bytes",
                "The most memory the tenant has held.",
                labels=names,
            ),
        }
        # (label, gpu) -> counters, gauges; summed over the leases that share a label.
        totals: dict[tuple[str, int], _Totals] = {}
        gauges: dict[tuple[str, int], list[float]] = {}
        entitled = self._server.entitlements()
        utilisation = self._history.lease_utilisation
        for reservation in self._server.live_reservations():
            user = reservation.user.user if reservation.user is not None else None
            accounts = reservation.accounts()
            shares = utilisation.get(reservation.id, [0.0] * len(accounts))
            for index, account in enumerate(accounts):
                gpu = account.gpu
                label = self._labels.label(reservation.id, gpu, user)
                mine = _Totals(account.device_time, account.queue_wait, account.operations)
                totals.setdefault((label, gpu), _Totals()).add(mine)
                budget = reservation.budgets[index]
                gauge = gauges.setdefault((label, gpu), [0.0, 0.0, 0.0, 0.0, 0.0])
                gauge[0] += entitled.get((reservation.id, gpu), 0.0)
                gauge[1] += shares[index] if index < len(shares) else 0.0
                gauge[2] += budget.used
                gauge[3] += budget.limit
                gauge[4] = max(gauge[4], account.memory_high_water)
        for (label, gpu), mine in sorted(totals.items()):
            mine.add(self._labels.carried(label, gpu))
            values = [str(gpu), label]
            families["device"].add_metric(values, mine.device_time)
            families["wait"].add_metric(values, mine.queue_wait)
            families["operations"].add_metric(values, mine.operations)
            share, used, memory, limit, high_water = gauges[label, gpu]
            families["entitled"].add_metric(values, share)
            families["used"].add_metric(values, used)
            families["memory"].add_metric(values, memory)
            families["limit"].add_metric(values, limit)
            families["high_water"].add_metric(values, high_water)
        yield from families.values()


def _opcode_name(opcode: int) -> str:
    try:
        return m.Opcode(opcode).name.lower()
    except ValueError:
        return f"0x{opcode:02x}"


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: HistogramSnapshot) -> None:
    buckets = [(_bound(b), c) for b, c in zip(h.bounds, h.cumulative, strict=False)]
    buckets.append(("+Inf", h.count))
    family.add_metric(labels, buckets, h.total)


def _bound(value: float) -> str:
    return repr(float(value))
