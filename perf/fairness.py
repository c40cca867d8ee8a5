"""Fairness benchmark: is each tenant's share of a GPU's time what it was promised?

Starts a bitfusion-net server in this process (its event loop on a thread of its own) and drives it
from a separate client process through the public API with the ``busy`` kernel. Every 100 ms it
samples each tenant's device time **as the server measured it** (the worker's clock), so the shares
below are measured, not assumed. Scenarios (targets from the fractional-GPU issue):

  fair20      20 saturating tenants at 0.05 for --duration s: Jain's index of achieved/entitled
              share per 1 s window >= 0.99, largest share deviation <= 5 %.
  ratio       two saturating tenants at 0.1 and 0.9: achieved ratio within 5 % of 1:9.
  alone       one tenant at 0.05 in share mode gets >= 95 % of the device; at 0.25 in cap mode,
              25 % +- 2 %.
  light       a light tenant (a 1 ms kernel every 10 ms, waiting for each) beside 19 saturating
              tenants with 5 ms kernels: its p99 latency <= its solo p99 + one longest kernel + 1 ms.
  overhead    one tenant issuing 100 us kernels back to back, fair scheduler vs FIFO: >= 98 %.
  closed      two closed-loop tenants at 0.1 and 0.9 (k ``busy`` kernels of 2 ms, then
              ``synchronize()``, in a loop) for k = 1, 4, 16, through the async and the blocking
              API, under fair and FIFO scheduling: achieved ratio within 5 % of 9 (fair).
  closed20    20 closed-loop tenants at 0.05 (k = 1): Jain >= 0.99 per 1 s window, max
              deviation <= 5 %.
  closed_cost one closed-loop tenant alone, fair vs FIFO: >= 98 % of the device time; and the
              device's total use with a light saturating tenant beside a heavy closed-loop one.

The server runs the NumPy reference device by default; ``--executor pycuda`` runs it on this
host's NVIDIA GPU instead, where ``busy`` spins on the GPU's clock, so every scenario means the
same. Each tenant then has a CUDA context of its own, so the scenarios wait until every tenant has
made its context (a first ``busy`` kernel) before measuring.

Writes perf/results/fairness.json and fairness.png (achieved vs entitled share over time, per
tenant; needs matplotlib) and prints a table; with another executor than NumPy,
fairness-KIND.json and fairness-KIND.png, so the committed NumPy results stay. It never fails on a
missed target: it reports. A scenario that cannot run (its client fails) is reported as such, the
others still run, and the exit status is 1.

    python perf/fairness.py                  # everything, about 2 minutes
    python perf/fairness.py --quick          # short windows, for a smoke test
    python perf/fairness.py --scenario ratio --duration 20
    python perf/fairness.py --executor pycuda --duration 5   # on this host's GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# perf/ is on sys.path when this file runs as a script, so its sibling modules import by name.
import mlp_workload as workload

import bitfusion_net as bf
from bitfusion_net.transport import new_event_loop
from bitfusion_net.units import parse_size
from executors import GpuUnavailable
from executors.pycuda_device import load_driver

SAMPLE_S = 0.1
WINDOW_S = 1.0
WARM_UP_S = 1.0  # the first second of every scenario is not measured
HEAVY_US = 5000  # the saturating tenants' kernel
RESULTS = Path(__file__).resolve().parent / "results"
READY = "ready"  # the client's first line: every tenant is connected and has run a kernel
# Device memory per executor kind. A PyCUDA tenant's lease also pays for its own CUDA context
# (hundreds of MiB): 32 GiB leaves the smallest lease used here, 0.05, 1.6 GiB.
DEFAULT_GPU_MEMORY = {"numpy": "8GiB", "pycuda": "32GiB"}


@dataclass(frozen=True)
class ServerOptions:
    """What every server a scenario starts runs: the executor kind and its memory."""

    executor: str = "numpy"
    gpu_memory: str = DEFAULT_GPU_MEMORY["numpy"]


# ----------------------------------------------------------------------------------------------
# Tenants (they run in the client process)


@dataclass
class TenantSpec:
    name: str
    fraction: float
    kernel_us: int
    mode: str = "share"
    weight: float | None = None
    light: bool = False  # one kernel per period, waiting for each; else saturating
    period_s: float = 0.010
    closed_k: int = 0  # closed loop: this many kernels, then synchronize(), again and again
    api: str = "async"  # closed loops only: "blocking" runs the tenant on the blocking API


async def saturate(gpu: Any, kernel_us: int, stop_at: float) -> int:
    """Keep the tenant's queue non-empty without flooding it.

    Two lanes each launch a few kernels and wait for them. A tenant's work runs in order, so while
    one lane waits for its reply (and sends its next batch) the other lane's batch is still queued:
    the tenant always has work on the server, and never more than two batches.
    """
    busy = await gpu.builtin("busy")

    async def lane() -> int:
        kernels = 0
        while time.monotonic() < stop_at:
            for _ in range(4):
                await busy.launch(1, 1, [kernel_us])
            await gpu.synchronize()
            kernels += 4
        return kernels

    return sum(await asyncio.gather(lane(), lane()))


async def tick(gpu: Any, kernel_us: int, period_s: float, stop_at: float) -> list[float]:
    """One kernel per period, waiting for each: the latency of each, in seconds, after the first
    second (while every tenant starts up the scheduler knows nothing of their job lengths)."""
    busy = await gpu.builtin("busy")
    latencies = []
    next_start = time.monotonic()
    warm_until = next_start + WARM_UP_S
    while next_start < stop_at:
        started = time.monotonic()
        await busy.launch(1, 1, [kernel_us])
        await gpu.synchronize()
        if started >= warm_until:
            latencies.append(time.monotonic() - started)
        next_start += period_s
        await asyncio.sleep(max(0.0, next_start - time.monotonic()))
    return latencies


async def closed_loop(gpu: Any, kernel_us: int, k: int, stop_at: float) -> int:
    """k kernels, then wait for them: a training step's shape (launches, then ``loss.item()``)."""
    busy = await gpu.builtin("busy")
    rounds = 0
    while time.monotonic() < stop_at:
        for _ in range(k):
            await busy.launch(1, 1, [kernel_us])
        await gpu.synchronize()
        rounds += 1
    return rounds


def closed_loop_blocking(
    address: str, spec: TenantSpec, started: threading.Barrier, stop: list[float]
) -> int:
    """``closed_loop`` through the blocking API, on a thread of its own."""
    with bf.connect_sync(address, fraction=spec.fraction, client_name=spec.name) as session:
        gpu = session.devices[0]
        busy = gpu.builtin("busy")
        busy.launch(1, 1, [1])
        gpu.synchronize()
        started.wait()
        rounds = 0
        while time.monotonic() < stop[0]:
            for _ in range(spec.closed_k):
                busy.launch(1, 1, [spec.kernel_us])
            gpu.synchronize()
            rounds += 1
        return rounds


async def warm_up(gpu: Any) -> None:
    """A first kernel: the server makes the tenant's context (a CUDA context on a GPU) and loads
    the built-in kernels, which takes a while on a GPU and must not count as a share."""
    busy = await gpu.builtin("busy")
    await busy.launch(1, 1, [1])
    await gpu.synchronize()


async def run_tenants(
    address: str,
    specs: list[TenantSpec],
    duration: float,
    on_ready: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    if any(spec.api == "blocking" for spec in specs):
        return await run_blocking_tenants(address, specs, duration, on_ready)
    sessions = [
        await bf.connect(
            address,
            fraction=spec.fraction,
            mode=spec.mode,
            weight=spec.weight,
            client_name=spec.name,
        )
        for spec in specs
    ]
    try:
        await asyncio.gather(*(warm_up(s.devices[0]) for s in sessions))
        on_ready()
        stop_at = time.monotonic() + duration
        results = await asyncio.gather(
            *(
                tick(s.devices[0], spec.kernel_us, spec.period_s, stop_at)
                if spec.light
                else closed_loop(s.devices[0], spec.kernel_us, spec.closed_k, stop_at)
                if spec.closed_k
                else saturate(s.devices[0], spec.kernel_us, stop_at)
                for s, spec in zip(sessions, specs, strict=True)
            )
        )
    finally:
        for session in sessions:
            await session.close()
    return {spec.name: result for spec, result in zip(specs, results, strict=True)}


async def run_blocking_tenants(
    address: str, specs: list[TenantSpec], duration: float, on_ready: Callable[[], None]
) -> dict[str, Any]:
    """Closed-loop tenants on the blocking API, a thread each (no event loop in their way)."""
    if not all(spec.closed_k for spec in specs):
        raise ValueError("the blocking API runs closed-loop tenants only")
    started = threading.Barrier(len(specs) + 1)
    stop = [math.inf]
    tasks = [
        asyncio.create_task(asyncio.to_thread(closed_loop_blocking, address, spec, started, stop))
        for spec in specs
    ]
    await asyncio.to_thread(started.wait)
    stop[0] = time.monotonic() + duration
    on_ready()
    results = await asyncio.gather(*tasks)
    return {spec.name: result for spec, result in zip(specs, results, strict=True)}


def client_main(argv: list[str]) -> None:
    """``--client ADDRESS DURATION SPECS_JSON``: run tenants; print READY once every tenant is
    connected and warmed up, then their results as JSON."""
    address, duration, raw = argv[0], float(argv[1]), json.loads(argv[2])
    specs = [TenantSpec(**spec) for spec in raw]

    def ready() -> None:
        print(READY, flush=True)

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        print(json.dumps(runner.run(run_tenants(address, specs, duration, ready))), flush=True)


# ----------------------------------------------------------------------------------------------
# The server and the sampler (they run in this process)


class ServerThread:
    """A ``bf.Server`` on its own event loop thread, with a way to run coroutines on it."""

    def __init__(self, options: ServerOptions, scheduling: str = "fair") -> None:
        self.loop = new_event_loop()
        self.server = bf.Server(
            executor=options.executor,
            gpus=1,
            gpu_memory=options.gpu_memory,
            scheduling=scheduling,
        )
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def device_times(self) -> dict[str, float]:
        """Each connected tenant's measured device time so far, by client name."""

        async def read() -> dict[str, float]:
            return {
                session["client"]: lease["usage"]["device_time"]
                for session in self.server.sessions()
                for lease in session["leases"]
            }

        return self.call(read())


@dataclass
class Trace:
    """Device time per tenant sampled every SAMPLE_S seconds while the tenants ran."""

    times: list[float] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)

    def window_shares(self, names: list[str], window: float = WINDOW_S) -> list[dict[str, float]]:
        """Each tenant's share of wall time in consecutive windows (skipping the first, warm-up)."""
        step = max(1, round(window / SAMPLE_S))
        out = []
        for start in range(step, len(self.times) - step, step):
            end = start + step
            span = self.times[end] - self.times[start]
            out.append(
                {
                    n: (self.samples[end].get(n, 0.0) - self.samples[start].get(n, 0.0)) / span
                    for n in names
                }
            )
        return out


def run_scenario(
    specs: list[TenantSpec], duration: float, options: ServerOptions, scheduling: str = "fair"
) -> tuple[Trace, dict[str, Any]]:
    """Start a server, run ``specs`` in a client process for ``duration`` s, sample device time
    from the moment every tenant is connected and warmed up."""
    with ServerThread(options, scheduling) as server:
        command = [
            sys.executable,
            __file__,
            "--client",
            server.server.address,
            str(duration),
            json.dumps([spec.__dict__ for spec in specs]),
        ]
        client = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        ready = threading.Event()
        lines: list[str] = []

        def read_output() -> None:
            assert client.stdout is not None
            for line in client.stdout:
                if line.strip() == READY:
                    ready.set()
                else:
                    lines.append(line)

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        trace = Trace()
        names = {spec.name for spec in specs}
        started = time.monotonic()
        while client.poll() is None:
            if ready.is_set():  # every tenant connected and warmed up: the measurement runs
                sample = server.device_times()
                if set(sample) == names:
                    trace.times.append(time.monotonic() - started)
                    trace.samples.append(sample)
            time.sleep(SAMPLE_S)
        client.wait()
        reader.join()
        if client.returncode != 0:
            raise RuntimeError(f"the client process failed with exit code {client.returncode}")
    return trace, json.loads("".join(lines))


# ----------------------------------------------------------------------------------------------
# Metrics


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all values are equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def entitled(specs: list[TenantSpec]) -> dict[str, float]:
    """What each saturating tenant is promised: its weight over the sum of weights."""
    weights = {s.name: s.weight or s.fraction for s in specs}
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def fair20(duration: float, options: ServerOptions) -> dict[str, Any]:
    specs = [TenantSpec(f"t{i:02d}", 0.05, HEAVY_US) for i in range(20)]
    trace, _ = run_scenario(specs, duration, options)
    names = [s.name for s in specs]
    promised = entitled(specs)

    def per_window(window: float) -> tuple[list[float], list[float], list[float]]:
        jains, deviations, busy = [], [], []
        for shares in trace.window_shares(names, window):
            total = sum(shares.values())
            busy.append(total)
            # Achieved share of the device time used in the window, against the entitled share.
            ratios = [shares[n] / total / promised[n] for n in names]
            jains.append(jain(ratios))
            deviations.append(max(abs(r - 1) for r in ratios))
        return jains, deviations, busy

    jains, deviations, busy = per_window(WINDOW_S)
    _, deviations_2s, _ = per_window(2 * WINDOW_S)
    return {
        "windows": len(jains),
        "jain_min": min(jains),
        "jain_mean": statistics.fmean(jains),
        "max_share_deviation": max(deviations),
        "mean_share_deviation": statistics.fmean(deviations),
        "max_share_deviation_2s_windows": max(deviations_2s) if deviations_2s else None,
        "device_busy": statistics.fmean(busy),
        "targets": {"jain_min": ">= 0.99", "max_share_deviation": "<= 0.05"},
        "met": min(jains) >= 0.99 and max(deviations) <= 0.05,
        "_trace": trace,
        "_specs": specs,
    }


def ratio(duration: float, options: ServerOptions) -> dict[str, Any]:
    specs = [TenantSpec("small", 0.1, HEAVY_US), TenantSpec("large", 0.9, HEAVY_US)]
    trace, _ = run_scenario(specs, duration, options)
    windows = trace.window_shares(["small", "large"])
    small = sum(w["small"] for w in windows)
    large = sum(w["large"] for w in windows)
    achieved = large / small
    return {
        "achieved_ratio": achieved,
        "target_ratio": 9.0,
        "error": abs(achieved / 9.0 - 1),
        "targets": {"error": "<= 0.05"},
        "met": abs(achieved / 9.0 - 1) <= 0.05,
        "_trace": trace,
        "_specs": specs,
    }


def alone(duration: float, options: ServerOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, fraction, lo, hi in (("share", 0.05, 0.95, 1.0), ("cap", 0.25, 0.23, 0.27)):
        specs = [TenantSpec(f"alone-{mode}", fraction, HEAVY_US, mode=mode)]
        trace, _ = run_scenario(specs, duration, options)
        shares = [w[specs[0].name] for w in trace.window_shares([specs[0].name])]
        out[mode] = {
            "fraction": fraction,
            "share_mean": statistics.fmean(shares),
            "share_min": min(shares),
            "share_max": max(shares),
            "target": f"{lo:.2f}..{hi:.2f} in every 1 s window",
            "met": lo <= min(shares) and max(shares) <= hi,
        }
    out["met"] = out["share"]["met"] and out["cap"]["met"]
    return out


def light(duration: float, options: ServerOptions) -> dict[str, Any]:
    """The light tenant's latency alone, then beside 19 saturating tenants.

    Its demand is 10 % of the GPU. At weight 0.05 among twenty tenants of 0.05 it would be entitled
    to 5 %, and fair queuing rightly holds it there, queueing its kernels. The promise under test
    is for a tenant working within its entitlement, so it gets weight 0.2 (a 17 % entitlement);
    the run at weight 0.05 is reported too, for comparison.
    """
    light_us = 1000
    solo_spec = TenantSpec("light", 0.05, light_us, light=True, weight=0.2)
    _, solo = run_scenario([solo_spec], duration, options)
    heavy = [TenantSpec(f"h{i:02d}", 0.05, HEAVY_US) for i in range(19)]
    _, crowded = run_scenario([solo_spec, *heavy], duration, options)
    throttled_spec = TenantSpec("light", 0.05, light_us, light=True)
    _, throttled = run_scenario([throttled_spec, *heavy], duration, options)
    solo_p99 = percentile(solo["light"], 99)
    crowded_p99 = percentile(crowded["light"], 99)
    bound = solo_p99 + HEAVY_US / 1e6 + 0.001
    return {
        "solo_p50_ms": percentile(solo["light"], 50) * 1e3,
        "solo_p99_ms": solo_p99 * 1e3,
        "crowded_p50_ms": percentile(crowded["light"], 50) * 1e3,
        "crowded_p99_ms": crowded_p99 * 1e3,
        "bound_ms": bound * 1e3,
        "samples": len(crowded["light"]),
        "at_weight_0.05_p99_ms": percentile(throttled["light"], 99) * 1e3,
        "targets": {"crowded_p99_ms": "<= solo p99 + 5 ms + 1 ms"},
        "met": crowded_p99 <= bound,
    }


async def launch_rate(address: str, count: int, kernel_us: int) -> float:
    """Kernels per second of ``count`` back-to-back ``busy`` kernels from one tenant."""
    async with bf.connect(address, fraction=0.05, client_name="rate") as session:
        gpu = session.devices[0]
        busy = await gpu.builtin("busy")
        for _ in range(100):  # warm-up
            await busy.launch(1, 1, [kernel_us])
        await gpu.synchronize()
        started = time.perf_counter()
        for _ in range(count):
            await busy.launch(1, 1, [kernel_us])
        await gpu.synchronize()
        return count / (time.perf_counter() - started)


def overhead(duration: float, options: ServerOptions) -> dict[str, Any]:
    """Back-to-back 100 us kernels under the fair scheduler and under FIFO, alternating runs."""
    kernel_us, count = 100, max(500, int(duration * 2000))
    rates: dict[str, list[float]] = {"fair": [], "fifo": []}
    for _ in range(3):
        for scheduling in ("fifo", "fair"):
            with ServerThread(options, scheduling) as server:
                command = [
                    sys.executable,
                    __file__,
                    "--rate",
                    server.server.address,
                    str(count),
                    str(kernel_us),
                ]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                rates[scheduling].append(float(out.stdout.split()[-1]))
    fair, fifo = statistics.median(rates["fair"]), statistics.median(rates["fifo"])
    return {
        "kernel_us": kernel_us,
        "kernels": count,
        "fair_per_s": fair,
        "fifo_per_s": fifo,
        "ratio": fair / fifo,
        "runs": rates,
        "targets": {"ratio": ">= 0.98"},
        "met": fair / fifo >= 0.98,
    }


CLOSED_KERNEL_US = 2000
CLOSED_K = (1, 4, 16)


def closed(duration: float, options: ServerOptions) -> dict[str, Any]:
    """Two closed-loop tenants at 0.1 and 0.9, each k kernels then a wait, for every k, API and
    scheduling; the target is on fair scheduling (FIFO is what the device does without it)."""
    runs: dict[str, Any] = {}
    errors = []
    last: tuple[Trace, list[TenantSpec]] | None = None
    for api in ("async", "blocking"):
        for k in CLOSED_K:
            for scheduling in ("fair", "fifo"):
                specs = [
                    TenantSpec("small", 0.1, CLOSED_KERNEL_US, closed_k=k, api=api),
                    TenantSpec("large", 0.9, CLOSED_KERNEL_US, closed_k=k, api=api),
                ]
                trace, _ = run_scenario(specs, duration, options, scheduling)
                windows = trace.window_shares(["small", "large"])
                small = sum(w["small"] for w in windows)
                large = sum(w["large"] for w in windows)
                achieved = large / small if small else math.inf
                busy = statistics.fmean(w["small"] + w["large"] for w in windows)
                runs[f"{api} k={k} {scheduling}"] = {
                    "achieved_ratio": achieved,
                    "device_busy": busy,
                }
                if scheduling == "fair":
                    errors.append(abs(achieved / 9.0 - 1))
                    if api == "async" and k == 1:
                        last = (trace, specs)
    result: dict[str, Any] = {
        "kernel_us": CLOSED_KERNEL_US,
        "runs": runs,
        "worst_error_fair": max(errors),
        "targets": {"worst_error_fair": "<= 0.05 for every k and API"},
        "met": max(errors) <= 0.05,
    }
    if last is not None:
        result["_trace"], result["_specs"] = last
    return result


def closed20(duration: float, options: ServerOptions) -> dict[str, Any]:
    specs = [TenantSpec(f"c{i:02d}", 0.05, CLOSED_KERNEL_US, closed_k=1) for i in range(20)]
    trace, _ = run_scenario(specs, duration, options)
    names = [s.name for s in specs]
    promised = entitled(specs)
    jains, deviations = [], []
    for shares in trace.window_shares(names):
        total = sum(shares.values())
        ratios = [shares[n] / total / promised[n] for n in names]
        jains.append(jain(ratios))
        deviations.append(max(abs(r - 1) for r in ratios))
    return {
        "windows": len(jains),
        "jain_min": min(jains),
        "max_share_deviation": max(deviations),
        "targets": {"jain_min": ">= 0.99", "max_share_deviation": "<= 0.05"},
        "met": min(jains) >= 0.99 and max(deviations) <= 0.05,
        "_trace": trace,
        "_specs": specs,
    }


def closed_cost(duration: float, options: ServerOptions) -> dict[str, Any]:
    """What anticipation costs: a lone closed-loop tenant under fair vs FIFO (it must not be
    slowed), and the device's use with a light saturating tenant beside a heavy closed-loop one
    (held time may cost no more than the heavy tenant's own think time costs it alone)."""
    alone_busy: dict[str, float] = {}
    for scheduling in ("fair", "fifo"):
        specs = [TenantSpec("loop", 0.9, CLOSED_KERNEL_US, closed_k=1)]
        trace, _ = run_scenario(specs, duration, options, scheduling)
        alone_busy[scheduling] = statistics.fmean(w["loop"] for w in trace.window_shares(["loop"]))
    specs = [
        TenantSpec("loop", 0.9, CLOSED_KERNEL_US, closed_k=1),
        TenantSpec("light", 0.1, CLOSED_KERNEL_US),
    ]
    trace, _ = run_scenario(specs, duration, options)
    windows = trace.window_shares(["loop", "light"])
    together = statistics.fmean(w["loop"] + w["light"] for w in windows)
    ratio = alone_busy["fair"] / alone_busy["fifo"]
    # Alone, the loop leaves the device idle for its think time; beside a saturating tenant the
    # device may idle at most that much (what anticipation holds for it), never more.
    allowed_idle = 1 - alone_busy["fifo"]
    return {
        "alone_fair_busy": alone_busy["fair"],
        "alone_fifo_busy": alone_busy["fifo"],
        "alone_ratio": ratio,
        "beside_light_busy": together,
        "beside_light_idle": 1 - together,
        "allowed_idle": allowed_idle,
        "targets": {"alone_ratio": ">= 0.98", "beside_light_idle": "<= allowed_idle"},
        "met": ratio >= 0.98 and 1 - together <= allowed_idle + 0.01,
    }


SCENARIOS: dict[str, Callable[[float, ServerOptions], dict[str, Any]]] = {
    "fair20": fair20,
    "ratio": ratio,
    "alone": alone,
    "light": light,
    "overhead": overhead,
    "closed": closed,
    "closed20": closed20,
    "closed_cost": closed_cost,
}


# ----------------------------------------------------------------------------------------------
# Report


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Achieved vs entitled share over time, per tenant, for the saturating scenarios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    traced = [(name, r) for name, r in results.items() if "_trace" in r]
    if not traced:
        return False
    figure, axes = plt.subplots(len(traced), 1, figsize=(9, 3.2 * len(traced)), squeeze=False)
    for axis, (name, result) in zip(axes[:, 0], traced, strict=True):
        specs, trace = result["_specs"], result["_trace"]
        names = [spec.name for spec in specs]
        windows = trace.window_shares(names, window=0.5)
        xs = [0.5 * (i + 1) for i in range(len(windows))]
        promised = entitled(specs)
        for n in names:
            line = axis.plot(xs, [w[n] for w in windows], linewidth=1)[0]
            axis.axhline(promised[n], color=line.get_color(), linestyle=":", linewidth=0.8)
        axis.set_title(f"{name}: achieved (solid) vs entitled (dotted) share, 0.5 s windows")
        axis.set_xlabel("seconds")
        axis.set_ylabel("share of the GPU")
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def summary_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    rows = []
    if "fair20" in results:
        r = results["fair20"]
        rows.append(("fair20", "Jain's index, worst 1 s window", f"{r['jain_min']:.4f}", ">= 0.99"))
        rows.append(("fair20", "max share deviation", f"{r['max_share_deviation']:.1%}", "<= 5 %"))
        rows.append(("fair20", "mean share deviation", f"{r['mean_share_deviation']:.1%}", "-"))
        if r["max_share_deviation_2s_windows"] is not None:
            rows.append(
                (
                    "fair20",
                    "max deviation, 2 s windows",
                    f"{r['max_share_deviation_2s_windows']:.1%}",
                    "-",
                )
            )
        rows.append(("fair20", "device busy", f"{r['device_busy']:.1%}", "-"))
    if "ratio" in results:
        r = results["ratio"]
        rows.append(("ratio", "large : small", f"{r['achieved_ratio']:.2f} : 1", "9 : 1 +- 5 %"))
    if "alone" in results:
        r = results["alone"]
        rows.append(
            ("alone", "0.05 share, worst window", f"{r['share']['share_min']:.1%}", ">= 95 %")
        )
        cap = r["cap"]
        rows.append(
            (
                "alone",
                "0.25 cap, windows",
                f"{cap['share_min']:.1%} .. {cap['share_max']:.1%}",
                "23 .. 27 %",
            )
        )
    if "light" in results:
        r = results["light"]
        rows.append(("light", "solo p99", f"{r['solo_p99_ms']:.2f} ms", "-"))
        rows.append(
            (
                "light",
                "p99 beside 19 heavy",
                f"{r['crowded_p99_ms']:.2f} ms",
                f"<= {r['bound_ms']:.2f} ms",
            )
        )
        rows.append(("light", "same at weight 0.05", f"{r['at_weight_0.05_p99_ms']:.2f} ms", "-"))
    if "overhead" in results:
        r = results["overhead"]
        rows.append(
            (
                "overhead",
                "100 us kernels/s fair vs fifo",
                f"{r['fair_per_s']:.0f} vs {r['fifo_per_s']:.0f} ({r['ratio']:.1%})",
                ">= 98 %",
            )
        )
    if "closed" in results:
        r = results["closed"]
        for name, run in r["runs"].items():
            target = "9 : 1 +- 5 %" if name.endswith("fair") else "-"
            rows.append(
                ("closed", f"{name} large : small", f"{run['achieved_ratio']:.2f} : 1", target)
            )
    if "closed20" in results:
        r = results["closed20"]
        rows.append(
            ("closed20", "Jain's index, worst 1 s window", f"{r['jain_min']:.4f}", ">= 0.99")
        )
        rows.append(
            ("closed20", "max share deviation", f"{r['max_share_deviation']:.1%}", "<= 5 %")
        )
    if "closed_cost" in results:
        r = results["closed_cost"]
        rows.append(
            ("closed_cost", "alone, fair vs fifo device time", f"{r['alone_ratio']:.1%}", ">= 98 %")
        )
        rows.append(
            (
                "closed_cost",
                "idle beside a light tenant",
                f"{r['beside_light_idle']:.1%}",
                f"<= {r['allowed_idle']:.1%} (its think time alone)",
            )
        )
    return rows


def size_text(text: str) -> str:
    """An argparse type: a size such as 8GiB, checked here, passed on as written."""
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def describe_device(options: ServerOptions) -> dict[str, Any]:
    """The device the servers run, for the report: executor kind, name, memory offered."""
    info: dict[str, Any] = {"executor": options.executor, "gpu_memory": options.gpu_memory}
    if options.executor != "pycuda":
        return info | {"name": "NumPy reference device"}
    device = load_driver().Device(0)
    major, minor = device.compute_capability()
    return info | {
        "name": str(device.name()),
        "compute_capability": f"{major}.{minor}",
        "gpu_total_memory": int(device.total_memory()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure how fairly a bitfusion-net server shares a GPU's time between tenants."
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                        help="run only this scenario (repeatable; default: all)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds each scenario runs (default: %(default)s)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="3 s scenarios, for a smoke test")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help="where fairness.json and fairness.png go (default: perf/results)")  # fmt: skip
    parser.add_argument("--executor", choices=workload.EXECUTOR_CHOICES, default="numpy",
                        help="what the server runs: the NumPy reference device, this host's "
                        "NVIDIA GPU through PyCUDA, or 'auto' (PyCUDA when a GPU is usable); not "
                        "numpy: results go to fairness-KIND.json/.png (default: %(default)s)")  # fmt: skip
    parser.add_argument("--gpu-memory", metavar="SIZE", type=size_text,
                        help="the device's memory (NumPy) or the cap on what is offered to "
                        "tenants (PyCUDA; each tenant also pays for its CUDA context) (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_GPU_MEMORY.items()) + ")")  # fmt: skip
    parser.add_argument("--name", metavar="STEM",
                        help="file name of the results without suffix (default: fairness, or "
                        "fairness-KIND for another executor than numpy)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        executor = workload.resolve_executor(args.executor)
    except GpuUnavailable as exc:
        print(
            f"error: --executor {args.executor} needs a usable NVIDIA GPU: {exc}", file=sys.stderr
        )
        return 2
    options = ServerOptions(executor, args.gpu_memory or DEFAULT_GPU_MEMORY[executor])
    stem = args.name or ("fairness" if executor == "numpy" else f"fairness-{executor}")
    device = describe_device(options)
    print(f"executor {executor}: {device['name']}", file=sys.stderr, flush=True)
    duration = 3.0 if args.quick else args.duration
    chosen = args.scenario or list(SCENARIOS)
    results: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(chosen, 1):
        print(f"[{index}/{len(chosen)}] {name} ({duration:g} s) ...", file=sys.stderr, flush=True)
        try:
            results[name] = SCENARIOS[name](duration, options)
        except Exception as exc:  # noqa: BLE001 - reported; the other scenarios still run
            print(f"{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            results[name] = {"failure": f"{type(exc).__name__}: {exc}", "met": False}
    failed = [name for name, result in results.items() if "failure" in result]
    args.output.mkdir(parents=True, exist_ok=True)
    plotted = plot(results, args.output / f"{stem}.png")
    public = {
        name: {k: v for k, v in result.items() if not k.startswith("_")}
        for name, result in results.items()
    }
    report = {
        "duration_s": duration,
        "window_s": WINDOW_S,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "executor": executor,
        "gpu_memory": options.gpu_memory,
        "device": device,
        "scenarios": public,
    }
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2))
    rows = summary_rows({k: v for k, v in results.items() if k not in failed})
    rows += [(name, "FAILED", results[name]["failure"][:60], "-") for name in failed]
    widths = [
        max(len(row[i]) for row in rows + [("scenario", "figure", "measured", "target")])
        for i in range(4)
    ]
    header = ("scenario", "figure", "measured", "target")
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    met = [name for name, result in public.items() if result.get("met")]
    print(f"targets met: {len(met)}/{len(public)} ({', '.join(met) or 'none'})")
    print(
        f"wrote {args.output / f'{stem}.json'}"
        + (f" and {args.output / f'{stem}.png'}" if plotted else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--rate":
        rate = asyncio.run(launch_rate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        print(rate)
    else:
        sys.exit(main())
