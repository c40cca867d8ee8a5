"""The dashboards (``bitfusion_net/manage/static``) in headless Chromium, on live data.

A pool of two real servers (``python -m bitfusion_net.server --manage http://127.0.0.1:0``,
the second started with ``--pool`` naming the first and a port where nothing listens) with live
tenants: blocking clients that hold device memory and keep the devices busy from threads of this
process. Chromium loads each view from the second server, runs its scripts for a few seconds of
virtual time (``--virtual-time-budget``; virtual time stands still while a fetch is under way, so
every refresh completes) and dumps the DOM, which is checked against what the servers' own
``/api/v1/`` says, read here with urllib: the cluster view lists every server (the dead one as
unreachable) with each GPU's memory, the server view each GPU, health check, lease and tenant,
the lease view its GPUs and fraction, and every chart has points. The views are screenshotted too
(into the test's directory), and a server needing tokens shows the token form until the page is
given one in its URL.

Skipped where there is no ``chromium`` (the Debian package; ``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from integration_support import PROCESS_START_S, CliServer, MiB, poll_until, read_line

import bitfusion_net as bf
from bitfusion_net.server.tokens import TokenStore

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs headless Chromium: no 'chromium' on PATH (Debian: chromium)"
)

CHROMIUM_S = 60.0  # the most one Chromium run may take (a noisy 2-core machine)
VIRTUAL_MS = 4000  # virtual time the page runs for: the first load and about three refreshes
HISTORY_S = 20.0  # the most the servers may take to record the samples the charts need
BUSY_US = 30_000  # each tenant's kernel: 30 ms busy, then 30 ms idle, over and over


# -- the pool ---------------------------------------------------------------------------------------
@dataclass
class PoolServer:
    process: CliServer
    manage: str  # http://127.0.0.1:PORT

    def api(self, path: str, token: str | None = None) -> Any:
        return get_json(f"{self.manage}/api/v1/{path}", token)


def get_json(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@contextlib.contextmanager
def pool_server(state_dir: Path, *args: str) -> Iterator[PoolServer]:
    """A CLI server with two 1 GiB NumPy GPUs and a management endpoint on a free port."""
    state_dir.mkdir(exist_ok=True)
    process = CliServer(
        "--listen", "tcp://127.0.0.1:0", "--manage", "http://127.0.0.1:0",
        "--executor", "numpy", "--gpus", "2", "--gpu-memory", "1GiB",
        "--state-dir", str(state_dir), "--log-level", "WARNING", *args,
    )  # fmt: skip
    try:
        process.wait_listening()
        assert process.proc.stdout is not None
        line = read_line(process.proc.stdout, time.monotonic() + PROCESS_START_S).decode()
        assert line.startswith("management on http://"), (line, process.stderr_text())
        yield PoolServer(process, line.split()[-1])
    finally:
        try:
            process.terminate()
        finally:
            process.close()


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- live tenants -----------------------------------------------------------------------------------
@dataclass
class Tenant:
    """A blocking client holding ``memory`` bytes on each of its devices and keeping them busy
    from a thread until ``stop``."""

    address: str
    name: str
    gpus: int
    fraction: float
    memory: list[int]
    session: bf.SyncSession | None = None
    lease: int = -1  # its reservation's id on its server, from /api/v1/leases
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> None:
        self.session = bf.connect_sync(
            self.address, gpus=self.gpus, fraction=self.fraction, client_name=self.name
        )
        for device, nbytes in zip(self.session.devices, self.memory, strict=True):
            device.mem_alloc(nbytes)
        self.thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        assert self.session is not None
        try:
            kernels = [device.builtin("busy") for device in self.session.devices]
            while not self.stopping.is_set():
                for kernel in kernels:
                    kernel.launch(1, 1, [BUSY_US])
                for device in self.session.devices:
                    device.synchronize()
                self.stopping.wait(BUSY_US * 1e-6)
        except (bf.BitfusionError, OSError) as exc:  # reported by stop(), in the test's thread
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.session is not None:
            self.session.close()
        if self.error is not None:
            raise AssertionError(f"tenant {self.name} failed: {self.error!r}") from self.error


@dataclass
class Pool:
    a: PoolServer
    b: PoolServer  # started with --pool A --pool DEAD: the views are loaded from it
    dead: str  # a management URL where nothing answers
    tenants: dict[str, Tenant]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("dashboard-pool")
    dead = f"http://127.0.0.1:{free_port()}"
    with (
        pool_server(root / "a") as a,
        pool_server(root / "b", "--pool", a.manage, "--pool", dead) as b,
    ):
        tenants = {
            # one lease on both of B's GPUs, one more on B's first GPU, one on A
            "train-both": Tenant(b.process.address, "train-both", 2, 0.25, [96 * MiB, 160 * MiB]),
            "train-one": Tenant(b.process.address, "train-one", 1, 0.25, [48 * MiB]),
            "infer-a": Tenant(a.process.address, "infer-a", 1, 0.5, [200 * MiB]),
        }
        try:
            for tenant in tenants.values():
                tenant.start()
            for server in (a, b):
                leases = server.api("leases")["leases"]
                for lease in leases:
                    tenants[lease["client"]].lease = lease["id"]
            assert all(t.lease >= 0 for t in tenants.values()), tenants
            # The charts need samples holding the tenants' memory and leases (one a second).
            for server in (a, b):
                wait_for_history(
                    server,
                    {t.lease for t in tenants.values() if t.address == server.process.address},
                )
            yield Pool(a, b, dead, tenants)
        finally:
            errors = []
            for tenant in tenants.values():
                try:
                    tenant.stop()
                except AssertionError as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]


def wait_for_history(server: PoolServer, leases: set[int], samples: int = 3) -> None:
    def enough() -> bool:
        recent = server.api("history")["samples"][-samples:]
        return len(recent) == samples and all(
            leases <= {lease["id"] for lease in s["leases"]} for s in recent
        )

    poll_until(enough, f"{samples} samples with leases {leases} at {server.manage}", HISTORY_S)


# -- Chromium ---------------------------------------------------------------------------------------
def chromium(
    tmp_path: Path, url: str, *, screenshot: Path | None = None, height: int = 1000
) -> str:
    """Load ``url`` headless, let its scripts run VIRTUAL_MS of virtual time, and return the DOM
    (or write a screenshot)."""
    assert CHROMIUM is not None
    profile = tmp_path / f"profile-{time.monotonic_ns()}"  # fresh: no sessionStorage carried over
    argv = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", "--disable-background-networking",
        f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_MS}",
        f"--window-size=1280,{height}",
    ]  # fmt: skip
    argv += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run(
        [*argv, url], capture_output=True, timeout=CHROMIUM_S, text=True, check=False
    )
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


@dataclass(eq=False)
class Element:
    tag: str
    attrs: dict[str, str]
    ancestors: tuple[Element, ...]
    text: str = ""  # every text inside it, its children's included

    def __getitem__(self, name: str) -> str:
        return self.attrs[name]


class Dom(HTMLParser):
    """The elements of a dumped DOM, in document order, each with the text inside it."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}  # fmt: skip

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, tuple(self._open))
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}, tuple(self._open)))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].tag == tag:
                del self._open[i:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def all(
        self, tag: str | None = None, inside: Element | None = None, **attrs: str | None
    ) -> list[Element]:
        """Elements with that tag (None: any), within ``inside``, with those attributes
        (``data_gpu="0"``: data-gpu is "0"; None: present, with any value)."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            e
            for e in self.elements
            if (tag is None or e.tag == tag)
            and (inside is None or inside in e.ancestors)
            and all(k in e.attrs and (v is None or e.attrs[k] == v) for k, v in wanted.items())
        ]

    def one(
        self, tag: str | None = None, inside: Element | None = None, **attrs: str | None
    ) -> Element:
        found = self.all(tag, inside, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag or '*'} {attrs}>, wanted one"
        return found[0]


def load(tmp_path: Path, url: str, state: str = "ok") -> Dom:
    """The DOM of ``url`` after its scripts ran, which must say it loaded its data."""
    dom = Dom(chromium(tmp_path, url))
    status = dom.one(id="status")
    assert status["data-state"] == state, f"the page says {status.text!r}"
    return dom


def mib(nbytes: int) -> str:
    """A size of 0 or of whole MiB under 1 GiB, as the page writes it."""
    value = nbytes / MiB
    assert value == int(value) and value < 1024, nbytes
    return "0 B" if value == 0 else f"{value:.0f} MiB" if value >= 100 else f"{value:.1f} MiB"


def assert_lines(dom: Dom, chart: str, series: int = 1, points: int = 2) -> None:
    """The chart has ``series`` lines, each through at least ``points`` points."""
    lines = dom.all("polyline", inside=dom.one("figure", data_chart=chart))
    assert len(lines) == series, f"chart {chart}: {len(lines)} lines, wanted {series}"
    for line in lines:
        assert int(line["data-points"]) >= points, f"chart {chart}: {line.attrs}"
        assert len(line["points"].split()) == int(line["data-points"]), line.attrs


# -- the views --------------------------------------------------------------------------------------
def test_the_cluster_view_shows_every_server_of_the_pool_live(pool: Pool, tmp_path: Path) -> None:
    urls = pool.b.api("pool")["servers"]
    assert urls[0] == pool.b.manage and set(urls[1:]) == {pool.a.manage, pool.dead}, urls
    dom = load(tmp_path, f"{pool.b.manage}/#/cluster")

    for server in (pool.b, pool.a):  # A's data crossed origins (CORS)
        card = dom.one("section", data_server=server.manage)
        assert card["data-state"] == "up", card.text
        assert server.api("server")["server"]["address"] in card.text
        gpus = server.api("gpus")["gpus"]
        assert len(gpus) == 2
        for gpu in gpus:
            row = dom.one("tr", inside=card, data_gpu=str(gpu["gpu"]))
            assert row["data-memory-used"] == str(gpu["memory_used"]), (row.attrs, gpu)
            assert f"{mib(gpu['memory_used'])} / 1.00 GiB" in row.text, row.text
    held = sum(t.memory[0] for t in pool.tenants.values() if t.address == pool.a.process.address)
    assert dom.one("tr", inside=dom.one(data_server=pool.a.manage), data_gpu="0")[
        "data-memory-used"
    ] == str(held)
    dead = dom.one("section", data_server=pool.dead)
    assert dead["data-state"] == "unreachable" and "unreachable" in dead.text, dead.text
    for chart in ("cluster-utilisation", "cluster-memory"):
        assert_lines(dom, chart, series=2)


def test_the_server_view_shows_each_gpu_check_lease_and_tenant(pool: Pool, tmp_path: Path) -> None:
    dom = load(tmp_path, f"{pool.b.manage}/#/server")
    server = pool.b.api("server")["server"]
    assert server["hostname"] in dom.one("h1").text and server["address"] in dom.one("h1").text

    # What the tenants hold on each GPU, by where the server placed their leases.
    leases = {lease["id"]: lease for lease in pool.b.api("leases")["leases"]}
    held = [0, 0]
    for tenant in pool.tenants.values():
        if tenant.address == pool.b.process.address:  # lease ids are each server's own
            for device, nbytes in zip(leases[tenant.lease]["devices"], tenant.memory, strict=True):
                held[device["gpu"]] += nbytes
    for gpu in pool.b.api("gpus")["gpus"]:
        card = dom.one("section", data_gpu=str(gpu["gpu"]))
        assert card["data-memory-used"] == str(gpu["memory_used"]) == str(held[gpu["gpu"]])
        assert f"{mib(held[gpu['gpu']])} / 1.00 GiB" in card.text, card.text
        assert_lines(dom, f"gpu{gpu['gpu']}-utilisation")
        assert_lines(dom, f"gpu{gpu['gpu']}-memory")
    assert_lines(dom, "network", series=2)

    # Each check, coloured by its status (which may change under load: not compared).
    checks = pool.b.api("health")["checks"]
    assert checks
    for check in checks:
        row = dom.one("tr", data_check=check["name"])
        assert row["data-status"] in ("pass", "warn", "fail"), row.attrs
        assert (
            dom.one("span", inside=row, data_status=row["data-status"]).text == row["data-status"]
        )

    for tenant in pool.tenants.values():
        if tenant.address == pool.b.process.address:
            row = dom.one("tr", data_lease=str(tenant.lease))
            assert tenant.name in row.text
            assert dom.one("a", inside=row)["href"] == f"#/lease/{tenant.lease}"
            assert f"{tenant.fraction:g}" in row.text
    sessions = {str(t["session"]) for t in pool.b.api("tenants")["tenants"]}
    assert len(sessions) == 2
    assert {row["data-session"] for row in dom.all("tr", data_session=None)} == sessions


def test_the_lease_view_shows_its_gpus_sessions_and_charts(pool: Pool, tmp_path: Path) -> None:
    tenant = pool.tenants["train-both"]
    dom = load(tmp_path, f"{pool.b.manage}/#/lease/{tenant.lease}")
    view = dom.one(data_lease=str(tenant.lease))
    assert view["data-lease-state"] == "live" and tenant.name in dom.one("h1").text
    rows = dom.all("tr", inside=view, data_fraction=None)
    assert [(r["data-fraction"], r["data-memory-used"]) for r in rows] == [
        ("0.25", str(nbytes)) for nbytes in tenant.memory
    ]
    assert len(dom.all("tr", inside=view, data_session=None)) == 1
    for device in range(2):
        assert_lines(dom, f"lease-device{device}-utilisation")
        assert_lines(dom, f"lease-device{device}-memory")

    ended = load(tmp_path, f"{pool.b.manage}/#/lease/999999")
    assert ended.one(data_lease="999999")["data-lease-state"] == "ended"


def test_screenshots_of_the_three_views(pool: Pool, tmp_path: Path) -> None:
    lease = pool.tenants["train-both"].lease
    for name, route, height in (
        ("cluster", "#/cluster", 1000),
        ("server", "#/server", 1500),
        ("lease", f"#/lease/{lease}", 1000),
    ):
        png = tmp_path / f"dashboard-{name}.png"
        chromium(tmp_path, f"{pool.b.manage}/{route}", screenshot=png, height=height)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        size = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        assert size == (1280, height), size


def test_with_tokens_the_page_asks_for_one_and_takes_it_from_its_url(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "a")
    ops, _ = store.create("ops", operator=True)
    alice, _ = store.create("alice")
    (tmp_path / "b").mkdir()
    shutil.copy(store.path, tmp_path / "b" / store.path.name)  # one store for the pool
    with (
        pool_server(tmp_path / "a") as a,
        pool_server(tmp_path / "b", "--pool", a.manage) as b,
    ):
        dom = load(tmp_path, f"{b.manage}/#/server", state="auth")
        assert "hidden" not in dom.one("form", id="token-form").attrs
        assert dom.all(data_gpu=None) == []

        dom = load(tmp_path, f"{b.manage}/?token={alice}#/server", state="auth")
        assert "not an operator" in dom.one(id="token-reason").text

        dom = load(tmp_path, f"{b.manage}/?token={ops}#/cluster")
        assert "hidden" in dom.one("form", id="token-form").attrs
        for server in (b, a):  # the token went to A too, across origins (a preflight)
            assert dom.one("section", data_server=server.manage)["data-state"] == "up"
        # A's dashboard link takes the token along (the pool shares one token store).
        link = dom.one("a", inside=dom.one("section", data_server=a.manage))
        assert link["href"] == f"{a.manage}/?token={urllib.parse.quote(ops, safe='')}#/server"
