"""A real Prometheus server scrapes a real bitfusion-net server with live tenants.

``python -m bitfusion_net.server --gpus 2 --manage http://127.0.0.1:0`` runs as a subprocess
(its second stdout line names the management endpoint), and ``/usr/bin/prometheus`` scrapes it
every second with the scrape job the README documents. Two tenants, connected with the blocking
API, hold known allocations and run built-in kernels; the test then asks Prometheus's HTTP API
until what it stored matches what the tenants hold: the dcgm-exporter metrics per GPU (MiB, with
dcgm-exporter's labels) and the per-tenant series. When a tenant disconnects, its series leave
the endpoint's next ``/metrics`` and Prometheus marks them stale (an instant query no longer
returns them). The same again with a token store: Prometheus scrapes with an operator token
(``authorization: credentials_file:``) and the ``tenant`` label is the user's name.

Skipped, with the reason, where the ``prometheus`` binary is missing (.ci/run installs it).
Everything is on loopback; every wait polls against a deadline; every process is killed at the
end by the fixtures that started it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from integration_support import PROCESS_START_S, CliServer, GiB, MiB, cli_server, read_line
from prometheus_client.parser import text_string_to_metric_families

import bitfusion_net as bf
from bitfusion_net.server.tokens import TokenStore

T = TypeVar("T")

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary on PATH (apt-get install prometheus)"
)

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"
MANAGEMENT = re.compile(rb"^management on (http://(\S+):(\d+))\s*$")
JOB = "bitfusion-net"
SCRAPE_INTERVAL_S = 1
PROMETHEUS_START_S = 30.0  # to /-/ready: TSDB set-up on a busy 2-core machine
SCRAPED_S = 30.0  # for a scraped value to reach Prometheus (a scrape a second)
HTTP_TIMEOUT_S = 5.0
POLL_S = 0.2
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "Hostname"}
BUSY_US = 10_000  # each busy kernel holds the device 10 ms
BUSY_LAUNCHES = 3

# Loopback only: never through a proxy the environment may name (urllib reads *_proxy).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- HTTP ---------------------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(url: str, token: str | None = None) -> Response:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as answer:
            return Response(answer.status, dict(answer.headers), answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, dict(error.headers), error.read())


def eventually(fetch: Callable[[], T], check: Callable[[T], bool], what: str, timeout: float) -> T:
    """Call ``fetch`` every 0.2 s until ``check`` holds for what it returns, and return that;
    fail naming ``what`` and the last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value}")
        time.sleep(POLL_S)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the bitfusion-net server ---------------------------------------------------------------------
@dataclass
class Managed:
    process: CliServer
    address: str  # tcp://... for clients
    manage: str  # http://HOST:PORT

    @property
    def target(self) -> str:
        return self.manage.removeprefix("http://")

    def metrics(
        self, token: str | None = None
    ) -> dict[str, list[tuple[str, dict[str, str], float]]]:
        """The endpoint's /metrics now, as {family: [(sample name, labels, value)]}."""
        answer = http_get(f"{self.manage}/metrics", token)
        assert answer.status == 200, (answer.status, answer.body[:500])
        return {
            family.name: [(s.name, dict(s.labels), s.value) for s in family.samples]
            for family in text_string_to_metric_families(answer.body.decode())
        }

    def leases(self, token: str | None = None) -> list[dict[str, Any]]:
        answer = http_get(f"{self.manage}/api/v1/leases", token)
        assert answer.status == 200, (answer.status, answer.body[:500])
        return list(json.loads(answer.body)["leases"])


@contextlib.contextmanager
def managed_server(state_dir: Path) -> Iterator[Managed]:
    """``python -m bitfusion_net.server --gpus 2 --gpu-memory 1GiB --manage http://127.0.0.1:0``
    (NumPy devices; its own state directory, so tokens are those the test made, or none)."""
    args = ("--gpus", "2", "--manage", "http://127.0.0.1:0", "--state-dir", str(state_dir))
    with cli_server(*args) as process:
        assert process.proc.stdout is not None
        line = read_line(process.proc.stdout, time.monotonic() + PROCESS_START_S)
        match = MANAGEMENT.match(line)
        assert match, f"second line {line!r} is not 'management on ...'; {process.stderr_text()}"
        yield Managed(process, process.address, match.group(1).decode())


# -- Prometheus -----------------------------------------------------------------------------------
class Prometheus:
    """``prometheus`` scraping one target every second, on a free loopback port, with its
    TSDB in the test's directory. ``close()`` kills it."""

    def __init__(self, workdir: Path, target: str, credentials_file: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        job = [
            f"  - job_name: {JOB}",
            f"    scrape_interval: {SCRAPE_INTERVAL_S}s",
            f"    scrape_timeout: {SCRAPE_INTERVAL_S}s",
            "    static_configs:",
            f'      - targets: ["{target}"]',
        ]
        if credentials_file is not None:  # as the README's scrape job, with tokens
            job += ["    authorization:", f"      credentials_file: {credentials_file}"]
        config = workdir / "prometheus.yml"
        config.write_text(
            "\n".join(["global:", "  evaluation_interval: 1s", "scrape_configs:", *job, ""])
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        environment = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        """Until ``/-/ready`` answers 200; fails at once if the process exits (a port taken)."""
        deadline = time.monotonic() + PROMETHEUS_START_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                if http_get(f"{self.url}/-/ready").status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"prometheus not ready in {PROMETHEUS_START_S} s: {self.log()}"
                )
            time.sleep(POLL_S)

    def api(self, path: str, **params: str) -> Any:
        answer = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert answer.status == 200, (path, params, answer.status, answer.body[:500])
        document = json.loads(answer.body)
        assert document["status"] == "success", document
        return document["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's vector now: [(labels, value)]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(sample["metric"], float(sample["value"][1])) for sample in data["result"]]

    def target_health(self) -> tuple[str, str]:
        targets = self.api("targets", state="active")["activeTargets"]
        ours = [t for t in targets if t["labels"].get("job") == JOB]
        return (ours[0]["health"], ours[0]["lastError"]) if ours else ("absent", "")

    def wait_scraping(self) -> None:
        health, error = eventually(
            self.target_health, lambda h: h[0] == "up", "the target to be up", SCRAPED_S
        )
        assert not error, error

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def prometheus(
    workdir: Path, target: str, credentials_file: Path | None = None
) -> Iterator[Prometheus]:
    """A ready Prometheus scraping ``target``; a second port is tried if the first was taken
    between choosing it and Prometheus binding it."""
    for attempt in range(3):
        server = Prometheus(workdir / f"prometheus-{attempt}", target, credentials_file)
        try:
            server.wait_ready()
        except AssertionError:
            server.close()
            if attempt == 2 or "address already in use" not in server.log():
                raise
            continue
        try:
            yield server
        finally:
            server.close()
        return


# -- tenants --------------------------------------------------------------------------------------
@dataclass
class Tenant:
    session: bf.SyncSession
    holds: int  # bytes allocated

    @property
    def gpu(self) -> int:
        return int(self.session.devices[0].server_gpu)


def start_tenant(
    address: str, fraction: float, holds: int, name: str, token: str | None = None
) -> Tenant:
    """A blocking client holding ``holds`` bytes and having run kernels (device time accrued)."""
    session = bf.connect_sync(address, gpus=1, fraction=fraction, client_name=name, token=token)
    gpu = session.devices[0]
    ptr = gpu.mem_alloc(holds)
    fill = gpu.builtin("fill")
    fill.launch(256, 256, [holds // 4, 1.0, ptr])
    busy = gpu.builtin("busy")
    for _ in range(BUSY_LAUNCHES):
        busy.launch(1, 1, [BUSY_US])
    gpu.synchronize()
    return Tenant(session, holds)


def by_label(vector: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for labels, value in vector:
        assert labels[label] not in values, f"two series with {label}={labels[label]}: {vector}"
        values[labels[label]] = value
    return values


def check_scraped_tenants(prom: Prometheus, server: Managed, tenants: dict[str, Tenant]) -> None:
    """What Prometheus stored matches what the tenants (by their ``tenant`` label) hold."""
    held = {str(g): 0.0 for g in range(2)}
    for tenant in tenants.values():
        held[str(tenant.gpu)] += tenant.holds / MiB
    fb_used = eventually(
        lambda: by_label(prom.query("DCGM_FI_DEV_FB_USED"), "gpu"),
        lambda values: values == held,
        f"DCGM_FI_DEV_FB_USED (MiB) by gpu to be {held}",
        SCRAPED_S,
    )
    assert fb_used == held
    for labels, _ in prom.query("DCGM_FI_DEV_FB_USED"):
        assert DCGM_LABELS <= set(labels), labels
        assert all(labels[name] for name in DCGM_LABELS), labels
        assert (labels["job"], labels["instance"]) == (JOB, server.target), labels
    total = by_label(prom.query("DCGM_FI_DEV_FB_TOTAL"), "gpu")
    assert total == {"0": GiB / MiB, "1": GiB / MiB}, total
    free = by_label(prom.query("DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE"), "gpu")
    assert free == total, f"FB_USED + FB_FREE {free} != FB_TOTAL {total}"
    for _, utilisation in prom.query("DCGM_FI_DEV_GPU_UTIL"):
        assert 0 <= utilisation <= 100, utilisation

    expected = {(str(t.gpu), name): t for name, t in tenants.items()}
    memory = eventually(
        lambda: {
            (labels["gpu"], labels["tenant"]): value
            for labels, value in prom.query("bitfusion_tenant_memory_used_bytes")
        },
        lambda got: set(got) == set(expected),
        f"one bitfusion_tenant_memory_used_bytes series per tenant: {sorted(expected)}",
        SCRAPED_S,
    )
    for key, tenant in expected.items():
        assert memory[key] == tenant.holds, (key, memory[key], tenant.holds)
    device_seconds = {
        (labels["gpu"], labels["tenant"]): value
        for labels, value in prom.query("bitfusion_tenant_device_seconds_total")
    }
    assert set(device_seconds) == set(expected), device_seconds
    for key, tenant in expected.items():
        measured = tenant.session.devices[0].stats().device_time
        assert device_seconds[key] >= BUSY_LAUNCHES * BUSY_US * 1e-6 * 0.9, (key, device_seconds)
        # TENANT_STATS runs on the device and counts the microseconds it has run itself.
        assert math.isclose(device_seconds[key], measured, rel_tol=1e-6, abs_tol=1e-4), (
            f"{key}: Prometheus has {device_seconds[key]} s of device time, the lease's own "
            f"stats {measured} s"
        )
    limits = {
        (labels["gpu"], labels["tenant"]): value
        for labels, value in prom.query("bitfusion_tenant_memory_limit_bytes")
    }
    for key, tenant in expected.items():
        assert limits[key] == tenant.session.devices[0].memory_limit, (key, limits)


def check_departure(
    prom: Prometheus, server: Managed, gone: str, stays: dict[str, Tenant], token: str | None
) -> None:
    """``gone`` left: its series leave the endpoint's text and go stale in Prometheus."""

    def tenants_in_text() -> set[str]:
        families = server.metrics(token)
        return {
            labels["tenant"]
            for samples in families.values()
            for _, labels, _ in samples
            if "tenant" in labels
        }

    eventually(
        tenants_in_text,
        lambda names: gone not in names and set(stays) <= names,
        f"tenant {gone!r} to leave /metrics while {sorted(stays)} stay",
        SCRAPED_S,
    )
    selector = f'{{tenant="{gone}"}}'
    for family in (
        "bitfusion_tenant_memory_used_bytes",
        "bitfusion_tenant_device_seconds_total",
        "bitfusion_tenant_entitled_ratio",
    ):
        eventually(
            lambda family=family: prom.query(family + selector),
            lambda vector: vector == [],
            f"{family}{selector} to go stale in Prometheus",
            SCRAPED_S,
        )
    # A query over a window still sees the departed tenant's last samples: it was scraped.
    assert prom.query(f"last_over_time(bitfusion_tenant_memory_used_bytes{selector}[5m])")
    check_scraped_tenants(prom, server, stays)
    ended = prom.query("sum(bitfusion_reservations_ended_total)")
    assert ended and ended[0][1] >= 1, ended


def check_dashboard_queries(prom: Prometheus, server: Managed) -> list[str]:
    """examples/grafana-dashboard.json's queries, with every server and GPU chosen, are valid
    PromQL to this Prometheus, and each answers with series once its metrics have samples;
    returns those whose metrics had none (so could not be checked for series)."""
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    instances = prom.api("label/instance/values", **{"match[]": "DCGM_FI_DEV_FB_USED"})
    assert server.target in instances, (variables["instance"]["query"], instances)
    gpus = prom.api("label/gpu/values", **{"match[]": "DCGM_FI_DEV_FB_USED"})
    assert gpus == ["0", "1"], (variables["gpu"]["query"], gpus)
    exported = {name for name, samples in server.metrics(None).items() if samples}
    unchecked = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$instance", ".*").replace("$gpu", ".*")
            names = set(re.findall(r"\b(?:bitfusion|DCGM)_[A-Za-z0-9_]+", expr))
            families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in names}
            if not families <= exported:
                prom.query(expr)  # valid PromQL, even if nothing to show yet
                unchecked.append(expr)
                continue
            eventually(
                lambda expr=expr: prom.query(expr),
                lambda vector: vector != [],
                f"panel {panel['title']!r}: {expr} to answer with series",
                SCRAPED_S,
            )
    return unchecked


# -- the tests ------------------------------------------------------------------------------------
def lease_tenant_labels(
    server: Managed, tenants: dict[str, Tenant], token: str | None = None
) -> dict[str, Tenant]:
    """Without users a tenant is ``lease-ID``: the tenants keyed by their lease's label, each
    lease found in /api/v1/leases by the GPU it holds (one tenant per GPU here)."""
    by_gpu = {tenant.gpu: tenant for tenant in tenants.values()}
    assert len(by_gpu) == len(tenants), "the tenants are on one GPU; expected one each"
    labelled = {}
    for lease in server.leases(token):
        (device,) = lease["devices"]
        labelled[f"lease-{lease['id']}"] = by_gpu[device["gpu"]]
    assert len(labelled) == len(tenants), server.leases(token)
    return labelled


def test_prometheus_scrapes_gpu_and_tenant_metrics_from_a_live_server(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(managed_server(tmp_path / "state"))
        prom = stack.enter_context(prometheus(tmp_path, server.target))
        prom.wait_scraping()
        # 0.5 then 0.75 of a GPU: the second cannot fit beside the first, so one tenant a GPU.
        a = start_tenant(server.address, 0.5, 64 * MiB, "tenant-a")
        stack.callback(a.session.close)
        b = start_tenant(server.address, 0.75, 32 * MiB, "tenant-b")
        stack.callback(b.session.close)
        with pytest.raises(bf.OutOfMemoryError):  # an error frame, for the errors panel
            a.session.devices[0].mem_alloc(GiB)
        with pytest.raises(bf.CapacityError):  # a greeting refused (no room), for its panel
            bf.connect_sync(server.address, gpus=2, fraction=1.0)
        tenants = lease_tenant_labels(server, {"a": a, "b": b})
        check_scraped_tenants(prom, server, tenants)
        entitled = prom.query("bitfusion_tenant_entitled_ratio")
        assert len(entitled) == 2 and all(0 < value <= 1 for _, value in entitled), entitled

        (gone,) = [name for name, tenant in tenants.items() if tenant is b]
        b.session.close()
        check_departure(prom, server, gone, {k: v for k, v in tenants.items() if v is a}, None)
        assert check_dashboard_queries(prom, server) == []  # every panel shows something


def test_prometheus_scrapes_with_an_operator_token_and_tenants_are_users(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = TokenStore(state)
    operator, _ = store.create("ops", operator=True)
    alice, _ = store.create("alice")
    bob, _ = store.create("bob")
    credentials = tmp_path / "bitfusion-net.token"
    credentials.write_text(operator + "\n")
    credentials.chmod(0o600)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(managed_server(state))
        assert http_get(f"{server.manage}/metrics").status == 401
        assert http_get(f"{server.manage}/metrics", alice).status == 403
        prom = stack.enter_context(prometheus(tmp_path, server.target, credentials))
        prom.wait_scraping()
        a = start_tenant(server.address, 0.5, 64 * MiB, "tenant-a", token=alice)
        stack.callback(a.session.close)
        b = start_tenant(server.address, 0.75, 32 * MiB, "tenant-b", token=bob)
        stack.callback(b.session.close)
        check_scraped_tenants(prom, server, {"alice": a, "bob": b})
        b.session.close()
        check_departure(prom, server, "bob", {"alice": a}, operator)
