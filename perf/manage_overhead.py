"""What watching a server costs its tenants: the management endpoint scraped and polled while a
tenant makes round trips, beside the same server kind without it, in one run.

Two server processes on loopback, each with the same ``--leases`` idle leases (so that scrapes
have tenants to report): server A without a management endpoint, server B with one, scraped by
a thread (``/metrics`` every ``--scrape-interval`` s, and the dashboards' documents every
second). A blocking client makes ``mem_get_info`` round trips to A and to B in interleaved rounds
(this machine is shared and noisy: only ratios from one run mean anything). Also measured: how
long a scrape and a dashboard document take and how big they are, and what the per-request
accounting (``ServerStats``) costs in-process.

Writes ``perf/results/manage_overhead.json``. ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bitfusion_net as bf
from bitfusion_net.protocol import messages as m
from bitfusion_net.server.stats import ServerStats

RESULTS = Path(__file__).resolve().parent / "results" / "manage_overhead.json"
START_S = 30.0
DASHBOARD_DOCUMENTS = ("server", "gpus", "leases", "health", "history")


@contextlib.contextmanager
def server(manage: bool, gpus: int) -> Iterator[tuple[str, str | None]]:
    """A server process: (data address, management address or None)."""
    argv = [sys.executable, "-m", "bitfusion_net.server", "--executor", "numpy", "--gpus",
            str(gpus), "--gpu-memory", "1GiB", "--log-level", "WARNING"]  # fmt: skip
    if manage:
        argv += ["--manage", "http://127.0.0.1:0"]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
        try:
            assert process.stdout is not None
            lines = [_line(process, errors) for _ in range(2 if manage else 1)]
            yield (
                lines[0].removeprefix("listening on "),
                (lines[1].removeprefix("management on ") if manage else None),
            )
        finally:
            process.terminate()
            process.wait(10)


def _line(process: subprocess.Popen[bytes], errors: Any) -> str:
    assert process.stdout is not None
    deadline, data = time.monotonic() + START_S, b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(process.stdout.fileno(), 1) if ready else b""
        if not chunk:
            errors.seek(0)
            raise RuntimeError(f"the server did not start: {errors.read()[-2000:].decode()}")
        data += chunk
    return data.decode().strip()


class Watcher(threading.Thread):
    """Scrapes ``/metrics`` every ``interval`` s and reads the dashboards' documents every
    second, timing each, until stopped."""

    def __init__(self, base: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.base, self.interval = base, interval
        self.stop = threading.Event()
        self.scrapes: list[float] = []
        self.documents: list[float] = []
        self.scrape_bytes = 0

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=10) as answer:
            body: bytes = answer.read()
            return body

    def run(self) -> None:
        next_dashboard = time.monotonic()
        while True:
            started = time.perf_counter()
            self.scrape_bytes = len(self._get("/metrics"))
            self.scrapes.append(time.perf_counter() - started)
            if time.monotonic() >= next_dashboard:
                next_dashboard += 1.0
                for name in DASHBOARD_DOCUMENTS:
                    started = time.perf_counter()
                    self._get(f"/api/v1/{name}")
                    self.documents.append(time.perf_counter() - started)
            if self.stop.wait(self.interval):
                return


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1),
        "samples": len(ordered),
    }


def round_trips(client: Any, count: int) -> list[float]:
    device, out = client.devices[0], []
    for _ in range(count):
        started = time.perf_counter()
        device.mem_get_info()
        out.append(time.perf_counter() - started)
    return out


def accounting_cost_ns() -> float:
    """Nanoseconds ``ServerSession`` spends counting one request with a reply."""
    stats = ServerStats()
    opcode = int(m.Opcode.MEM_GET_INFO)
    number = 200_000

    def count() -> None:
        started = time.perf_counter()
        stats.requests[opcode] += 1
        stats.replied(opcode, time.perf_counter() - started)

    return min(timeit.repeat(count, number=number, repeat=5)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (the smoke test's)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per server")
    parser.add_argument("--calls", type=int, default=2000, help="round trips per round")
    parser.add_argument("--leases", type=int, default=30, help="idle leases on each server")
    parser.add_argument("--scrape-interval", type=float, default=0.1, metavar="SECONDS",
                        help="how often /metrics is scraped (Prometheus's default is 15 s; "
                        "this is a stress, default: %(default)s)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls, args.leases = 2, 100, 4
    gpus = max(1, -(-args.leases // 19))  # 0.05 each; one more for the measuring client
    leases: list[Any] = []
    with server(False, gpus) as (plain, _), server(True, gpus) as (watched, manage):
        assert manage is not None
        for address in (plain, watched):
            leases += [bf.connect_sync(address, fraction=0.05) for _ in range(args.leases)]
        for lease in leases[:: max(1, len(leases) // 10)]:  # some hold memory, as tenants do
            lease.devices[0].mem_alloc(1 << 20)
        watcher = Watcher(manage, args.scrape_interval)
        watcher.start()
        times: dict[str, list[float]] = {"without_management": [], "with_management": []}
        with (
            bf.connect_sync(plain, fraction=0.05) as a,
            bf.connect_sync(watched, fraction=0.05) as b,
        ):
            round_trips(a, 50), round_trips(b, 50)  # warm both
            for i in range(args.rounds):
                order = [("without_management", a), ("with_management", b)]
                for name, client in order if i % 2 == 0 else reversed(order):
                    times[name] += round_trips(client, args.calls)
        watcher.stop.set()
        watcher.join(15)
        for lease in leases:
            lease.close()
    rtt = {name: percentiles(samples) for name, samples in times.items()}
    report = {
        "quick": args.quick,
        "leases_per_server": args.leases,
        "scrape_interval_s": args.scrape_interval,
        "round_trip": rtt,
        "median_ratio": round(
            rtt["with_management"]["median_us"] / rtt["without_management"]["median_us"], 3
        ),
        "p99_ratio": round(
            rtt["with_management"]["p99_us"] / rtt["without_management"]["p99_us"], 3
        ),
        "scrape": {**percentiles(watcher.scrapes), "bytes": watcher.scrape_bytes},
        "dashboard_document": percentiles(watcher.documents),
        "accounting_ns_per_request": round(accounting_cost_ns(), 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
