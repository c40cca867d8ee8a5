"""The management endpoint's ``/metrics`` text from a real server with live tenants, parsed with
``prometheus_client``'s own parser and held to the naming rules of docs/OBSERVABILITY.md and of
Prometheus: every metric is documented with its type and labels (and every documented one is
exported), ``bitfusion_`` or dcgm-exporter names, counters' samples end in ``_total``, no
``_created`` series, base units named by suffix, histogram buckets fitted to microsecond RPCs.

Then the ``tenant`` label's bounds: without users, 15 leases on one GPU give at most 11 label
values (the first ten leases, and ``other``), ``other``'s counters never go back while tenants
come and go, and a lease's own series leave with it; with users (a token store), ``tenant`` is
the user's name and a user's counters go on across their leases.

Each test runs an in-process ``bitfusion_net.Server(manage="http://127.0.0.1:0")`` on its own
event loop and reads ``/metrics`` from a worker thread (urllib, no proxy), on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from integration_support import GiB, MiB, run, serve, wait_until
from prometheus_client.parser import text_string_to_metric_families

import bitfusion_net as bf
from bitfusion_net.server.tokens import TokenStore

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "OBSERVABILITY.md"
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "Hostname"}
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
DCGM_METRICS |= {"DCGM_FI_DEV_FB_TOTAL"}
BASE_UNITS = ("seconds", "bytes", "ratio")  # a name saying one of these ends with it
NOT_BASE_UNITS = {"milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "ms", "us"}
NOT_BASE_UNITS |= {"percent", "pct", "mb", "mib", "kb", "kib", "gb", "gib", "kilobytes"}
NOT_BASE_UNITS |= {"megabytes", "bits"}
MAX_SMALLEST_BUCKET_S = 50e-6  # a LAN round trip is tens of microseconds
NAMED_TENANTS_PER_GPU = 10
OTHER = "other"
TENANT_COUNTERS = (
    "bitfusion_tenant_device_seconds_total",
    "bitfusion_tenant_queue_wait_seconds_total",
    "bitfusion_tenant_operations_total",
)
HTTP_TIMEOUT_S = 5.0

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


# -- reading the endpoint -----------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


def _get(url: str, token: str | None) -> Answer:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as answer:
            headers = {k.lower(): v for k, v in answer.headers.items()}
            return Answer(answer.status, headers, answer.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


async def get(url: str, token: str | None = None) -> Answer:
    """A GET off the event loop (the server under test runs on it)."""
    return await asyncio.to_thread(_get, url, token)


@dataclass(frozen=True)
class Sample:
    name: str  # as written, e.g. ``..._total``, ``..._bucket``
    labels: dict[str, str]
    value: float


@dataclass
class Family:
    name: str  # as the parser names it (``_total`` stripped from counters)
    type: str
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Scrape:
    text: str
    families: dict[str, Family]

    def samples(self, name: str) -> list[Sample]:
        """Every sample written as ``name`` (a raw sample name), from any family."""
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def by_tenant(self, name: str, gpu: int = 0) -> dict[str, float]:
        found: dict[str, float] = {}
        for sample in self.samples(name):
            if sample.labels["gpu"] == str(gpu):
                tenant = sample.labels["tenant"]
                assert tenant not in found, f"two {name} series for tenant {tenant}"
                found[tenant] = sample.value
        return found

    def tenants(self, gpu: int = 0) -> set[str]:
        """Every ``tenant`` value on ``gpu``, in any family."""
        return {
            s.labels["tenant"]
            for f in self.families.values()
            for s in f.samples
            if "tenant" in s.labels and s.labels.get("gpu") == str(gpu)
        }


def parse(text: str) -> Scrape:
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"family {family.name} twice"
        families[family.name] = Family(
            family.name,
            family.type,
            [Sample(s.name, dict(s.labels), float(s.value)) for s in family.samples],
        )
    return Scrape(text, families)


async def scrape(server: bf.Server, token: str | None = None) -> Scrape:
    answer = await get(f"{manage_url(server)}/metrics", token)
    assert answer.status == 200, (answer.status, answer.body[:300])
    return parse(answer.body.decode())


def manage_url(server: bf.Server) -> str:
    address = str(server.manage_address).rstrip("/")
    return address if "://" in address else f"http://{address}"


@contextlib.asynccontextmanager
async def managed(**kwargs: Any) -> AsyncIterator[bf.Server]:
    async with serve(manage="http://127.0.0.1:0", **kwargs) as server:
        yield server


# -- the doc's tables -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Documented:
    type: str
    labels: frozenset[str]


@functools.cache
def documented() -> dict[str, Documented]:
    """OBSERVABILITY.md's metric tables: name -> type and labels (the DCGM table's labels are
    dcgm-exporter's, named in the sentence above it)."""
    metrics: dict[str, Documented] = {}
    header: list[str] = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        if header[0] != "Metric" or set(cells[0]) <= set("-:"):
            continue
        (name,) = re.findall(r"`([^`]+)`", cells[0])
        if "Labels" in header:
            labels = frozenset(re.findall(r"`([^`]+)`", cells[header.index("Labels")]))
        else:
            labels = frozenset(DCGM_LABELS) if name.startswith("DCGM_") else frozenset()
        metrics[name] = Documented(cells[header.index("Type")].split()[0], labels)
    assert DCGM_METRICS <= set(metrics) and len(metrics) > 20, sorted(metrics)
    return metrics


# -- tenants ------------------------------------------------------------------------------------------
async def work(session: bf.Session, kernels: int = 2, busy_us: int = 500) -> None:
    """Device time, queue wait and operations for this tenant: busy kernels and a memset."""
    gpu = session.devices[0]
    busy = await gpu.builtin("busy")
    for _ in range(kernels):
        await busy.launch(1, 1, [busy_us])
    ptr = await gpu.mem_alloc(4096)
    await gpu.memset_d32(ptr, 7, 1024)
    await gpu.mem_free(ptr)
    await gpu.synchronize()


def reservation_ids(server: bf.Server) -> set[int]:
    return {r["id"] for r in server.reservations()}


async def connect(server: bf.Server, token: str | None = None) -> tuple[bf.Session, int]:
    """A tenant on a quarter of a GPU, and the id of the reservation the server made for it."""
    before = reservation_ids(server)
    session = await bf.connect(server.address, fraction=0.25, token=token)
    (reservation,) = reservation_ids(server) - before
    return session, reservation


def operations(server: bf.Server, reservation: int) -> int:
    """The operations a live reservation's lease (one GPU) has run, as the server counts them."""
    (session,) = [s for s in server.sessions() if s["reservation"] == reservation]
    (lease,) = session["leases"]
    return int(lease["usage"]["operations"])


# -- the naming rules ---------------------------------------------------------------------------------
def check_names_types_and_units(scraped: Scrape) -> None:
    docs = documented()
    problems = []
    for name, family in scraped.families.items():
        exported = f"{name}_total" if family.type == "counter" else name
        if not (name.startswith("bitfusion_") or name in DCGM_METRICS):
            problems.append(f"{exported}: neither bitfusion_ nor one of dcgm-exporter's")
        if exported not in docs:
            problems.append(f"{exported}: exported but not in {DOC.name}")
        elif docs[exported].type != family.type:
            problems.append(f"{exported}: a {family.type}, documented as a {docs[exported].type}")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                problems.append(f"{sample.name}: a _created series")
            elif family.type == "counter" and sample.name != f"{name}_total":
                problems.append(f"{sample.name}: a counter's sample not named {name}_total")
            elif family.type == "gauge" and sample.name != name:
                problems.append(f"{sample.name}: a sample of gauge {name} under another name")
            elif family.type == "histogram" and sample.name not in {
                f"{name}_bucket",
                f"{name}_count",
                f"{name}_sum",
            }:
                problems.append(f"{sample.name}: not a _bucket, _count or _sum of {name}")
            if exported in docs:
                labels = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
                if labels != docs[exported].labels:
                    problems.append(
                        f"{sample.name}: labels {sorted(labels)}, documented "
                        f"{sorted(docs[exported].labels)}"
                    )
            if sample.name.endswith("_ratio") and not 0 <= sample.value <= 1:
                problems.append(f"{sample.name}{sample.labels}: a ratio of {sample.value}")
        if name.startswith("bitfusion_"):
            words = name.split("_")
            for unit in set(words) & NOT_BASE_UNITS:
                problems.append(f"{exported}: {unit!r} is not a base unit")
            for unit in BASE_UNITS:
                if unit in words[:-1] and words[-1] != unit:
                    problems.append(f"{exported}: says {unit!r} but does not end with it")
        elif not re.fullmatch(r"DCGM_FI_[A-Z0-9_]+", name):
            problems.append(f"{name}: not a dcgm-exporter name")
    for name in docs.keys() - {
        f"{n}_total" if f.type == "counter" else n for n, f in scraped.families.items()
    }:
        problems.append(f"{name}: documented but not exported")
    assert not problems, "\n".join(problems)


def check_histograms(scraped: Scrape) -> None:
    histograms = [f for f in scraped.families.values() if f.type == "histogram"]
    assert {f.name for f in histograms} >= {
        "bitfusion_request_duration_seconds",
        "bitfusion_gpu_queue_wait_seconds",
    }
    for family in histograms:
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for sample in family.samples:
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            if sample.name.endswith("_bucket"):
                series.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
        assert series, f"{family.name}: no series"
        for key, buckets in series.items():
            bounds = [bound for bound, _ in buckets]
            assert bounds == sorted(bounds) and math.isinf(bounds[-1]), (family.name, bounds)
            assert len(set(bounds)) == len(bounds), (family.name, bounds)
            assert bounds[0] <= MAX_SMALLEST_BUCKET_S, f"{family.name}: smallest le {bounds[0]}"
            cumulative = [count for _, count in buckets]
            assert cumulative == sorted(cumulative), (family.name, key, buckets)
            assert counts[key] == cumulative[-1], (family.name, key, counts[key], buckets)


def test_metrics_follow_the_naming_rules_and_the_doc() -> None:
    async def main() -> None:
        async with managed(gpus=2) as server:
            answer = await get(f"{manage_url(server)}/metrics")
            assert answer.status == 200, answer
            # Prometheus's text format (0.0.4, or 1.0.0 from prometheus-client 0.22 on)
            content_type = answer.headers["content-type"]
            assert re.match(r"text/plain; version=(0\.0\.4|1\.0\.0)", content_type), content_type
            sessions = [await bf.connect(server.address, fraction=0.5) for _ in range(3)]
            try:
                for session in sessions:
                    await work(session)
                with pytest.raises(bf.OutOfMemoryError):  # an error frame
                    await sessions[0].devices[0].mem_alloc(GiB)
                with pytest.raises(bf.CapacityError):  # a greeting refused: no room
                    await bf.connect(server.address, gpus=2, fraction=1.0)
                await sessions.pop().close()  # a reservation ended
                ptr = await sessions[0].devices[0].mem_alloc(3 * MiB)
                scraped = await scrape(server)
            finally:
                for session in sessions:
                    await session.close()

            check_names_types_and_units(scraped)
            check_histograms(scraped)
            for sample in scraped.samples("DCGM_FI_DEV_FB_USED"):
                assert DCGM_LABELS == set(sample.labels), sample
                assert all(sample.labels.values()), sample
            gpu = sessions[0].devices[0].server_gpu
            fb_used = {s.labels["gpu"]: s.value for s in scraped.samples("DCGM_FI_DEV_FB_USED")}
            assert fb_used[str(gpu)] == 3, (fb_used, ptr)  # MiB
            assert sum(s.value for s in scraped.samples("bitfusion_errors_total")) >= 1
            refused = {
                s.labels["reason"]: s.value
                for s in scraped.samples("bitfusion_connections_refused_total")
            }
            assert refused.get("no_room", 0) >= 1, refused
            ended = scraped.samples("bitfusion_reservations_ended_total")
            assert sum(s.value for s in ended) >= 1, ended
            requests = {
                s.labels["opcode"]: s.value for s in scraped.samples("bitfusion_requests_total")
            }
            assert requests and all(re.fullmatch(r"[a-z_0-9]+", op) for op in requests), requests
            latency = scraped.samples("bitfusion_request_duration_seconds_count")
            assert sum(s.value for s in latency) >= 1, latency
            (accepted,) = scraped.samples("bitfusion_connections_accepted_total")
            assert accepted.value >= 4, accepted
            (info,) = scraped.samples("bitfusion_server_info")
            assert info.value == 1 and info.labels["executor"] == "numpy", info
            (started,) = scraped.samples("bitfusion_server_start_time_seconds")
            assert 1.5e9 < started.value < 5e9, started  # Unix seconds, not milliseconds

    run(main())


def test_tenant_labels_stay_bounded_and_other_never_goes_back() -> None:
    """15 leases on one GPU, then leases coming and going: at most ten ``lease-ID`` values and
    ``other``; ``other``'s counters never decrease; a departed lease's series are gone at the
    next scrape; a lease keeps its label for its life."""

    async def main() -> None:
        async with managed(gpus=1) as server:
            live: dict[int, bf.Session] = {}  # reservation id -> its session
            label_of: dict[int, str] = {}
            previous_other = {name: 0.0 for name in TENANT_COUNTERS}
            previous_busy = 0.0

            def check(scraped: Scrape) -> None:
                nonlocal previous_busy
                tenants = scraped.tenants(0)
                named = {t for t in tenants if t != OTHER}
                assert len(tenants) <= NAMED_TENANTS_PER_GPU + 1, sorted(tenants)
                assert all(re.fullmatch(r"lease-\d+", t) for t in named), sorted(tenants)
                assert named <= {f"lease-{r}" for r in live}, (sorted(named), sorted(live))
                for reservation in live:  # each live lease is under its own label or other
                    label = f"lease-{reservation}" if f"lease-{reservation}" in named else OTHER
                    assert label_of.setdefault(reservation, label) == label, (
                        f"lease {reservation} moved from {label_of[reservation]} to {label}"
                    )
                assert len(named) <= NAMED_TENANTS_PER_GPU, sorted(named)
                if len(live) > len(named):  # the leases without a label of their own
                    assert OTHER in tenants, (sorted(tenants), sorted(live))
                for name in TENANT_COUNTERS:  # absent while no lease is in it, never lower
                    value = scraped.by_tenant(name).get(OTHER)
                    if value is not None:
                        assert value >= previous_other[name], (name, previous_other[name], value)
                        previous_other[name] = value
                (busy,) = scraped.samples("bitfusion_gpu_busy_seconds_total")
                assert busy.value >= previous_busy, (previous_busy, busy)
                previous_busy = busy.value

            async def open_tenant() -> int:
                before = reservation_ids(server)
                session = await bf.connect(server.address, fraction=0.05)
                (reservation,) = reservation_ids(server) - before
                live[reservation] = session
                await work(session)
                return reservation

            try:
                first = []
                for _ in range(15):  # one scrape after each: the order they appear is known
                    first.append(await open_tenant())
                    check(await scrape(server))
                scraped = await scrape(server)
                check(scraped)
                assert scraped.tenants(0) == {f"lease-{r}" for r in first[:10]} | {OTHER}
                # other sums the five leases beyond the first ten.
                usage = {s["reservation"]: s["leases"][0]["usage"] for s in server.sessions()}
                others_ops = sum(usage[r]["operations"] for r in first[10:])
                assert scraped.by_tenant("bitfusion_tenant_operations_total")[OTHER] == others_ops
                memory = scraped.by_tenant("bitfusion_tenant_memory_limit_bytes")
                assert memory[OTHER] == sum(live[r].devices[0].memory_limit for r in first[10:]), (
                    memory
                )

                # Leases come and go: two of other's, then two named ones, then two more named
                # ones; each works once more between the last scrape and leaving, so what it
                # did since that scrape must reach the label it shared, too.
                departed_other_ops = 0  # final operations of the leases that left other
                for round_, leaving in enumerate([first[10:12], first[0:2], first[2:4]]):
                    for reservation in leaving:
                        await work(live[reservation])
                        if label_of[reservation] == OTHER:
                            departed_other_ops += operations(server, reservation)
                        await live.pop(reservation).close()
                    await wait_until(
                        lambda leaving=leaving: not set(leaving) & reservation_ids(server),
                        f"reservations {leaving} to end",
                    )
                    scraped = await scrape(server)
                    check(scraped)
                    for reservation in leaving:
                        assert f"lease-{reservation}" not in scraped.tenants(0), (
                            f"lease {reservation} left; its series are still there (round {round_})"
                        )
                    expected = departed_other_ops + sum(
                        operations(server, r) for r in live if label_of[r] == OTHER
                    )
                    got = scraped.by_tenant("bitfusion_tenant_operations_total")[OTHER]
                    assert got == expected, (
                        f"round {round_}: other has {got} operations; its leases, those gone "
                        f"included, ran {expected}"
                    )
                    for reservation in list(live)[:3]:  # the remaining ones keep working
                        await work(live[reservation])
                    await open_tenant()
                    check(await scrape(server))

                while live:  # every lease leaves: no lease-ID series stays
                    await live.popitem()[1].close()
                await wait_until(lambda: not reservation_ids(server), "every reservation to end")
                scraped = await scrape(server)
                check(scraped)
                assert scraped.tenants(0) <= {OTHER}, scraped.tenants(0)
            finally:
                for session in live.values():
                    await session.close()

    run(main(), timeout=60)


def test_with_users_the_tenant_label_is_the_users_name(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    operator, _ = store.create("ops", operator=True)
    alice, _ = store.create("alice")
    bob, _ = store.create("bob")

    async def main() -> None:
        async with managed(gpus=1, state_dir=tmp_path) as server:
            url = f"{manage_url(server)}/metrics"
            refused = await get(url)
            assert refused.status == 401, refused
            assert refused.headers.get("www-authenticate", "").startswith("Bearer"), refused
            assert "error" in json.loads(refused.body), refused
            assert (await get(url, alice)).status == 403
            assert (await get(f"{manage_url(server)}/healthz")).status == 200

            first, first_id = await connect(server, alice)
            second, second_id = await connect(server, alice)
            other, _ = await connect(server, bob)
            try:
                await first.devices[0].mem_alloc(5 * MiB)
                await second.devices[0].mem_alloc(7 * MiB)
                await other.devices[0].mem_alloc(2 * MiB)
                for session in (first, second, other):
                    await work(session)
                scraped = await scrape(server, operator)
                assert scraped.tenants(0) == {"alice", "bob"}, scraped.tenants(0)
                memory = scraped.by_tenant("bitfusion_tenant_memory_used_bytes")
                assert memory == {"alice": 12 * MiB, "bob": 2 * MiB}, memory
                limits = scraped.by_tenant("bitfusion_tenant_memory_limit_bytes")
                assert limits["alice"] == 2 * first.devices[0].memory_limit, limits
                device = scraped.by_tenant("bitfusion_tenant_device_seconds_total")
                ops = scraped.by_tenant("bitfusion_tenant_operations_total")
                assert ops["alice"] == operations(server, first_id) + operations(server, second_id)

                # alice's counters go on across her leases: one works once more and ends,
                # another starts and works; her count is all three leases' operations.
                await work(first)
                first_ops = operations(server, first_id)
                await first.close()
                await wait_until(lambda: first_id not in reservation_ids(server), "alice's end")
                third, third_id = await connect(server, alice)
                try:
                    await work(third)
                    later = await scrape(server, operator)
                    alice_ops = (
                        first_ops + operations(server, second_id) + operations(server, third_id)
                    )
                finally:
                    await third.close()
                assert later.tenants(0) == {"alice", "bob"}, later.tenants(0)
                later_device = later.by_tenant("bitfusion_tenant_device_seconds_total")
                later_ops = later.by_tenant("bitfusion_tenant_operations_total")
                assert later_device["alice"] > device["alice"], (device, later_device)
                assert later_ops["alice"] == alice_ops, (
                    f"alice has {later_ops['alice']} operations; her three leases ran {alice_ops}"
                )
                assert later_ops["bob"] == ops["bob"], (ops, later_ops)
                assert not any(t.startswith("lease-") for t in later.tenants(0))
            finally:
                for session in (first, second, other):
                    await session.close()

    run(main())


def test_the_management_address_is_loopback_and_serves_probes() -> None:
    async def main() -> None:
        async with managed(gpus=1) as server:
            url = manage_url(server)
            host = re.fullmatch(r"http://([^:/]+):(\d+)", url)
            assert host and socket.inet_aton(host.group(1))[0] == 127, url
            assert (await get(f"{url}/healthz")).status == 200
            assert (await get(f"{url}/readyz")).status == 200

    run(main())
