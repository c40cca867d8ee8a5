"""Latency, bandwidth and launch-rate benchmark of bitfusion-net, beside baselines, in one run.

    python perf/latency.py                          # start a server on loopback and measure
    python perf/latency.py --quick --output /tmp/r  # a fast run (the smoke test's)
    python perf/latency.py --server tcp://HOST:PORT # measure a server started elsewhere
    python perf/latency.py --executor pycuda        # the server (and the in-process side) on a GPU
    python perf/latency.py --tls                    # and the cost of TLS, beside plain TCP
    python perf/latency.py --transport rdma         # over rdma:// (perf/latency_rdma.py)

Measures, side by side (perf/README.md explains each figure):

1. round trip of the smallest synchronising call (``mem_get_info``), async and blocking API;
2. ``memcpy_htod`` (+ ``synchronize``) and ``memcpy_dtoh`` from 8 B to 256 MiB: latency, GB/s;
3. pipelined no-reply launches of the built-in ``fill`` kernel (n=1): launches per second;
4. training steps of a small MLP with the built-in kernels, remote versus the same kind of executor
   in-process (NumPy, or PyCUDA with ``--executor pycuda``; the results must match);
5. baselines on the same machine: C TCP ping-pong and bulk copies (``native/tcp_baseline.c``,
   compiled here), a raw uvloop echo server, pyzmq REQ/REP and grpcio unary calls (optional);
6. with ``--tls``: the round trip (both APIs) and the 64 MiB copies each way (both APIs) to a TLS
   server beside the same to the plain one, in interleaved rounds, and their ratio (a
   self-signed certificate is made for the run with ``openssl``).

Writes a table on stdout, ``latency.json`` and ``latency.png`` into ``perf/results`` (or
``--output``); with another executor than NumPy, ``latency-KIND.json`` and ``latency-KIND.png``,
so that the committed NumPy results stay. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One BLAS thread, for this process and the server it starts, unless the caller chose otherwise
# (set before NumPy loads). The NumPy device runs kernels on one worker thread; on small shared
# machines multithreaded OpenBLAS sgemm was measured 300x slower on the MLP's small matrices
# (15 ms instead of 0.05 ms for 64x256 @ 256x128), which would measure BLAS threads fighting,
# not the network path. Both sides of the MLP comparison run with the same setting.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# perf/ is on sys.path when this file runs as a script, so its sibling modules import by name.
import baselines as bl  # noqa: E402
import latency_report as report  # noqa: E402
import mlp_workload as workload  # noqa: E402
import numpy as np  # noqa: E402

import bitfusion_net as bf  # noqa: E402
from bitfusion_net.transport import ClientTls, loop_factory, parse_address  # noqa: E402
from executors import GpuUnavailable  # noqa: E402

HERE = Path(__file__).resolve().parent
KiB, MiB, GiB = 2**10, 2**20, 2**30
SERVER_MEMORY = {"numpy": "2GiB", "pycuda": "8GiB"}  # per executor kind
# What a lease needs beyond its data: a PyCUDA tenant is charged for its own CUDA context
# (hundreds of MiB on big GPUs) and its modules; a NumPy tenant for nothing.
CONTEXT_ALLOWANCE = {"numpy": 0, "pycuda": GiB}
HEAD_TO_HEAD_SIZE = 64 * MiB
format_size = report.format_size


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    quick: bool
    rtt_samples: int
    rtt_warmup: int
    grpc_samples: int
    sizes: tuple[int, ...]
    copy_budget: int  # bytes moved per size and direction (bounds the repetitions)
    copy_min_reps: int
    copy_max_reps: int
    launches: int
    launch_runs: int
    blocking_launches: int
    posts: int  # pipelined messages per baseline run
    mlp: workload.MlpShape
    mlp_warmup: int
    mlp_rounds: int
    mlp_steps: int
    h2h_rounds: int  # interleaved rounds of ours / C / uvloop for the targets
    h2h_samples: int  # round trips per round and contender
    h2h_reps: int  # HEAD_TO_HEAD_SIZE copies per round, contender and direction


def make_config(quick: bool) -> Config:
    if quick:
        return Config(
            quick=True,
            rtt_samples=1000,
            rtt_warmup=200,
            grpc_samples=300,
            sizes=(8, 512, 32 * KiB, 2 * MiB, 16 * MiB),
            copy_budget=32 * MiB,
            copy_min_reps=2,
            copy_max_reps=200,
            launches=2000,
            launch_runs=2,
            blocking_launches=500,
            posts=20_000,
            mlp=workload.MlpShape(batch=64, inputs=256, hidden=128, classes=10),
            mlp_warmup=2,
            mlp_rounds=2,
            mlp_steps=5,
            h2h_rounds=2,
            h2h_samples=500,
            h2h_reps=2,
        )
    sizes = tuple(8 * 4**k for k in range(12)) + (64 * MiB, 128 * MiB, 256 * MiB)
    return Config(
        quick=False,
        rtt_samples=20_000,
        rtt_warmup=2000,
        grpc_samples=5000,
        sizes=sizes,
        copy_budget=512 * MiB,
        copy_min_reps=6,
        copy_max_reps=1000,
        launches=20_000,
        launch_runs=5,
        blocking_launches=5000,
        posts=200_000,
        mlp=workload.MlpShape(batch=128, inputs=784, hidden=256, classes=10),
        mlp_warmup=5,
        mlp_rounds=10,
        mlp_steps=20,
        h2h_rounds=12,
        h2h_samples=2000,
        h2h_reps=4,
    )


def copy_reps(cfg: Config, size: int) -> int:
    return max(cfg.copy_min_reps, min(cfg.copy_max_reps, cfg.copy_budget // size))


# -- progress -------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on stderr when tqdm is installed, otherwise a plain progress line."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self._total = total
        self._done = 0
        self._label = ""
        self._enabled = enabled
        self._bar: Any = None
        self._tty = sys.stderr.isatty()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False)

    def stage(self, label: str) -> None:
        self._label = label
        if self._bar is not None:
            self._bar.set_description(label)
        else:
            self._line()

    def advance(self, steps: int = 1) -> None:
        self._done = min(self._total, self._done + steps)
        if self._bar is not None:
            self._bar.update(steps)
        elif self._tty:
            self._line()

    def _line(self) -> None:
        if not self._enabled:
            return
        text = f"[{self._done:3d}/{self._total}] {self._label}"
        if self._tty:
            print(f"\r{text:<72}", end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self._tty:
            print(file=sys.stderr)


def count_steps(cfg: Config, tls: bool = False) -> int:
    fixed = 2 + 2 + 3 + 1 + 1 + 2 + 2 + 1 + 2  # build, servers, round trips, launches, MLP, C,
    # uvloop round trip and posts, zmq and grpc, report, blocking echo, concurrent clients
    return fixed + 2 * len(cfg.sizes) + cfg.h2h_rounds + (cfg.h2h_rounds + 1 if tls else 0)


# -- timing helpers -------------------------------------------------------------------------------
async def time_async(call: Callable[[], Awaitable[Any]], reps: int, warmup: int) -> list[int]:
    """Nanoseconds of ``reps`` awaited calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        await call()
    gc.collect()
    clock = time.perf_counter_ns
    timings = [0] * reps
    for i in range(reps):
        started = clock()
        await call()
        timings[i] = clock() - started
    return timings


def time_sync(call: Callable[[], Any], reps: int, warmup: int) -> list[int]:
    for _ in range(warmup):
        call()
    gc.collect()
    clock = time.perf_counter_ns
    timings = [0] * reps
    for i in range(reps):
        started = clock()
        call()
        timings[i] = clock() - started
    return timings


def copy_result(size: int, timings: Sequence[int]) -> dict[str, float]:
    summary = bl.summarize(timings)
    return {
        "size": size,
        "reps": len(timings),
        "p50_us": summary["p50_us"],
        "min_us": summary["min_us"],
        "mean_us": summary["mean_us"],
        "gbps": size / summary["p50_us"] / 1e3,  # bytes per microsecond / 1000 = GB/s
    }


def rate_result(count: int, seconds: Sequence[float]) -> dict[str, float]:
    rates = [count / s for s in seconds]
    return {
        "per_second": statistics.median(rates),
        "best_per_second": max(rates),
        "count": count,
        "runs": len(rates),
    }


# -- 1. round trip --------------------------------------------------------------------------------
async def bench_round_trip_async(gpu: bf.RemoteDevice, cfg: Config) -> dict[str, float]:
    return bl.summarize(await time_async(gpu.mem_get_info, cfg.rtt_samples, cfg.rtt_warmup))


def bench_round_trip_blocking(gpu: bf.SyncRemoteDevice, cfg: Config) -> dict[str, float]:
    return bl.summarize(time_sync(gpu.mem_get_info, cfg.rtt_samples, cfg.rtt_warmup))


# -- 2. copies ------------------------------------------------------------------------------------
async def bench_copies(
    gpu: bf.RemoteDevice, cfg: Config, host: memoryview, progress: Progress
) -> dict[str, list[dict[str, float]]]:
    """memcpy_htod + synchronize, and memcpy_dtoh, for each size, into one device buffer."""
    device = await gpu.mem_alloc(max(cfg.sizes))
    htod: list[dict[str, float]] = []
    dtoh: list[dict[str, float]] = []
    try:
        for size in cfg.sizes:
            progress.stage(f"ours: copies of {format_size(size)}")
            view = host[:size]
            reps = copy_reps(cfg, size)

            async def to_device(view: memoryview = view) -> None:
                await gpu.memcpy_htod(device, view)
                await gpu.synchronize()

            async def to_host(view: memoryview = view) -> None:
                await gpu.memcpy_dtoh(view, device)

            htod.append(copy_result(size, await time_async(to_device, reps, max(1, reps // 10))))
            dtoh.append(copy_result(size, await time_async(to_host, reps, max(1, reps // 10))))
            progress.advance()
    finally:
        await gpu.mem_free(device)
    return {"htod": htod, "dtoh": dtoh}


# -- 3. pipelined launches ------------------------------------------------------------------------
async def bench_launches_async(gpu: bf.RemoteDevice, cfg: Config) -> dict[str, float]:
    """N no-reply launches of fill(n=1), then one synchronize; launches per second end to end."""
    fill = await gpu.builtin("fill")
    out = await gpu.mem_alloc(4)
    args = [1, 0.0, out]

    async def burst(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            await fill.launch(1, 1, args)
        await gpu.synchronize()
        return time.perf_counter() - started

    await burst(min(1000, cfg.launches))
    gc.collect()
    seconds = [await burst(cfg.launches) for _ in range(cfg.launch_runs)]
    await gpu.mem_free(out)
    return rate_result(cfg.launches, seconds)


def bench_launches_blocking(gpu: bf.SyncRemoteDevice, cfg: Config) -> dict[str, float]:
    fill = gpu.builtin("fill")
    out = gpu.mem_alloc(4)
    args = [1, 0.0, out]

    def burst(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            fill.launch(1, 1, args)
        gpu.synchronize()
        return time.perf_counter() - started

    burst(min(200, cfg.blocking_launches))
    gc.collect()
    seconds = [burst(cfg.blocking_launches) for _ in range(cfg.launch_runs)]
    gpu.mem_free(out)
    return rate_result(cfg.blocking_launches, seconds)


def bench_launches_inprocess(cfg: Config, executor: str) -> dict[str, float]:
    """The same launches submitted straight to an in-process executor of the server's kind (NumPy
    or PyCUDA): the device's ceiling."""
    with workload.local_driver(executor) as driver:
        run = workload.drive

        async def burst(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                await driver.launch("fill", 1, [1, 0.0, out])
            await driver.synchronize()
            return time.perf_counter() - started

        out = run(driver.alloc(4))
        run(driver.load("fill"))
        run(burst(min(1000, cfg.launches)))
        gc.collect()
        seconds = [run(burst(cfg.launches)) for _ in range(cfg.launch_runs)]
    return rate_result(cfg.launches, seconds)


# -- 3b. many clients at once --------------------------------------------------------------------
def _concurrent_client(address: str, seconds: float, results: Any) -> None:
    """One of the concurrent clients: blocking mem_get_info calls until the deadline."""
    with bf.connect_sync(address, fraction=0.05, client_name="perf/concurrent") as session:
        gpu = session.devices[0]
        for _ in range(200):
            gpu.mem_get_info()
        results.put("ready")
        count, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            gpu.mem_get_info()
            count += 1
        results.put(count)


def bench_concurrent_clients(address: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` processes of blocking clients, each calling mem_get_info in a loop: the
    server's rate of small synchronous requests and its CPU time per request."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # no loop is running here: forking is safe
    queue = context.Queue()
    workers = [
        context.Process(target=_concurrent_client, args=(address, seconds, queue))
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        queue.get(timeout=60)  # every client connected and warm
    pid = bl.SERVER_PIDS.get(address)
    cpu_before = bl.process_cpu_seconds(pid) if pid else None
    started = time.perf_counter()
    counts = [queue.get(timeout=seconds + 60) for _ in workers]
    elapsed = time.perf_counter() - started
    cpu = bl.process_cpu_seconds(pid) - cpu_before if pid and cpu_before is not None else None
    for worker in workers:
        worker.join(30)
    total = sum(counts)
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": total,
        "per_second": total / elapsed,
        "server_cpu_seconds": cpu,
        "server_cpu_us_per_request": None if cpu is None else cpu / total * 1e6,
    }


# -- 4. the MLP training step: see mlp_workload.py ------------------------------------------------


# -- 5. baselines ---------------------------------------------------------------------------------
def bench_c(cfg: Config, binary: Path, address: str) -> dict[str, Any]:
    """The C client against the C server: ping-pong, put/get at every size, pipelined posts."""
    plan = [("ping", bl.PING_SIZE, cfg.rtt_samples)]
    plan += [("put", size, copy_reps(cfg, size)) for size in cfg.sizes]
    plan += [("get", size, copy_reps(cfg, size)) for size in cfg.sizes]
    plan += [("post", bl.POST_SIZE, cfg.posts)]
    lines = bl.run_c_client(binary, address, plan, timeout=600)
    by_op: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_op.setdefault(line["op"], []).append(line)

    def copies(op: str) -> list[dict[str, float]]:
        return [
            {
                "size": r["size"],
                "reps": r["count"],
                "p50_us": r["p50_us"],
                "min_us": r["min_us"],
                "mean_us": r["mean_us"],
                "gbps": r["size"] / r["p50_us"] / 1e3,
            }
            for r in by_op[op]
        ]

    ping = by_op["ping"][0]
    return {
        "round_trip": {k: ping[k] for k in ("p50_us", "p99_us", "p999_us", "min_us", "mean_us")}
        | {"samples": ping["count"], "message_bytes": bl.PING_SIZE + bl.HEADER.size},
        "put": copies("put"),
        "get": copies("get"),
        "posts": {"per_second": by_op["post"][0]["per_second"], "count": cfg.posts},
    }


async def bench_uvloop(
    cfg: Config, client: bl.UvloopBaselineClient, host: memoryview, progress: Progress
) -> dict[str, Any]:
    """The raw uvloop echo: the same round trips, copies and pipelined messages as ours."""
    progress.stage("uvloop echo: round trip")
    message = bl.ping_message()

    async def ping() -> None:
        await client.ping(message, bl.PING_SIZE)

    round_trip = bl.summarize(await time_async(ping, cfg.rtt_samples, cfg.rtt_warmup))
    round_trip["message_bytes"] = len(message)
    progress.advance()
    put: list[dict[str, float]] = []
    get: list[dict[str, float]] = []
    for size in cfg.sizes:
        progress.stage(f"uvloop echo: copies of {format_size(size)}")
        view, reps = host[:size], copy_reps(cfg, size)
        warm = max(1, reps // 10)

        async def to_server(view: memoryview = view) -> None:
            await client.put(view)

        async def from_server(view: memoryview = view) -> None:
            await client.get(view)

        put.append(copy_result(size, await time_async(to_server, reps, warm)))
        get.append(copy_result(size, await time_async(from_server, reps, warm)))
        progress.advance()
    progress.stage("uvloop echo: pipelined messages")
    burst = [bl.post_message()] * cfg.posts
    await client.post_burst(burst[: min(len(burst), 10_000)])
    seconds = []
    for _ in range(cfg.launch_runs):
        started = time.perf_counter()
        await client.post_burst(burst)
        seconds.append(time.perf_counter() - started)
    progress.advance()
    return {
        "round_trip": round_trip,
        "put": put,
        "get": get,
        "posts": rate_result(cfg.posts, seconds),
    }


def bench_optional_rpc(
    kind: str, cfg: Config, address: str | None, progress: Progress
) -> dict[str, Any]:
    """pyzmq REQ/REP or grpcio unary round trips; skipped with a note when not importable."""
    module = "zmq" if kind == "zmq" else "grpc"
    package = "pyzmq" if kind == "zmq" else "grpcio"
    progress.stage(f"{package}: round trip")
    try:
        __import__(module)
    except ImportError:
        return {"skipped": f"{package} is not installed (pip install -e '.[bench]')"}
    measure = bl.zmq_round_trip if kind == "zmq" else bl.grpc_round_trip
    samples = cfg.rtt_samples if kind == "zmq" else cfg.grpc_samples
    warmup = max(10, samples // 10)
    with contextlib.ExitStack() as stack:
        if address is None:
            command = "zmq-rep-server" if kind == "zmq" else "grpc-server"
            address = stack.enter_context(bl.server_process(bl.python_server(command), package))
        return {"round_trip": measure(address, samples, warmup) | {"message_bytes": bl.PING_SIZE}}


# -- 6. head to head, for the targets -------------------------------------------------------------
def _median_ratio(mine: Sequence[float], theirs: Sequence[float]) -> float | None:
    pairs = [a / b for a, b in zip(mine, theirs, strict=False) if b]
    return statistics.median(pairs) if pairs else None


async def bench_head_to_head(
    gpu: bf.RemoteDevice,
    sync_gpu: bf.SyncRemoteDevice,
    uv: bl.UvloopBaselineClient,
    echo: bl.BlockingBaselineClient,
    raw: bl.RawWireClient,
    c: tuple[Path, str] | None,
    cfg: Config,
    host: memoryview,
    progress: Progress,
) -> dict[str, Any]:
    """Rounds of ours (both APIs), uvloop, the blocking echo, the raw wire client and C back to
    back: round-trip p50 and 64 MiB copies each way.

    Each API is held to its matching baseline: the async API to the uvloop echo (an event loop
    on both sides), the blocking API to the blocking-socket echo (plain blocking sockets on both
    sides, Python). The raw wire client (a bare blocking socket sending pre-encoded frames to our
    server) shows what the server alone costs.

    On a shared, noisy machine the sweeps run seconds to minutes apart, and the machine's speed
    may change between them. Here every contender is measured in every short round; the targets
    compare each contender's best round (lowest p50, highest GB/s: its speed when the machine was
    quiet), and the median of the per-round ratios is reported beside it.
    """
    size = min(HEAD_TO_HEAD_SIZE, max(cfg.sizes))
    samples, reps = cfg.h2h_samples, cfg.h2h_reps
    view = host[:size]
    message = bl.ping_message()
    rtt: dict[str, list[float]] = {
        "ours": [], "blocking": [], "uvloop": [], "blocking_echo": [], "raw_wire": [], "c": [],
    }  # fmt: skip
    kinds = (
        "ours_htod", "ours_dtoh", "blocking_htod", "blocking_dtoh", "uvloop_put", "uvloop_get",
        "c_put", "c_get",
    )  # fmt: skip
    gbps: dict[str, list[float]] = {kind: [] for kind in kinds}

    async def p50(call: Callable[[], Awaitable[Any]]) -> float:
        return bl.summarize(await time_async(call, samples, samples // 10))["p50_us"]

    async def bandwidth(call: Callable[[], Awaitable[Any]]) -> float:
        return copy_result(size, await time_async(call, reps, 1))["gbps"]

    def p50_sync(call: Callable[[], Any]) -> float:
        return bl.summarize(time_sync(call, samples, samples // 10))["p50_us"]

    def bandwidth_sync(call: Callable[[], Any]) -> float:
        return copy_result(size, time_sync(call, reps, 1))["gbps"]

    device = await gpu.mem_alloc(size)
    sync_device = sync_gpu.mem_alloc(size)

    def to_device_sync() -> None:
        sync_gpu.memcpy_htod(sync_device, view)
        sync_gpu.synchronize()

    def to_host_sync() -> None:
        sync_gpu.memcpy_dtoh(view, sync_device)

    async def to_device() -> None:
        await gpu.memcpy_htod(device, view)
        await gpu.synchronize()

    async def to_host() -> None:
        await gpu.memcpy_dtoh(view, device)

    try:
        for round_ in range(cfg.h2h_rounds):
            progress.stage(f"head to head: round {round_ + 1} of {cfg.h2h_rounds}")
            gc.collect()
            rtt["ours"].append(await p50(gpu.mem_get_info))
            rtt["uvloop"].append(await p50(lambda: uv.ping(message, bl.PING_SIZE)))
            rtt["blocking"].append(p50_sync(sync_gpu.mem_get_info))
            rtt["blocking_echo"].append(p50_sync(echo.ping))
            rtt["raw_wire"].append(p50_sync(raw.ping))
            gbps["ours_htod"].append(await bandwidth(to_device))
            gbps["ours_dtoh"].append(await bandwidth(to_host))
            gbps["blocking_htod"].append(bandwidth_sync(to_device_sync))
            gbps["blocking_dtoh"].append(bandwidth_sync(to_host_sync))
            gbps["uvloop_put"].append(await bandwidth(lambda: uv.put(view)))
            gbps["uvloop_get"].append(await bandwidth(lambda: uv.get(view)))
            if c is not None:
                plan = [("ping", bl.PING_SIZE, samples), ("put", size, reps), ("get", size, reps)]
                ping, put, get = bl.run_c_client(c[0], c[1], plan, timeout=300)
                rtt["c"].append(ping["p50_us"])
                gbps["c_put"].append(size / put["p50_us"] / 1e3)
                gbps["c_get"].append(size / get["p50_us"] / 1e3)
            progress.advance()
    finally:
        await gpu.mem_free(device)
        sync_gpu.mem_free(sync_device)
    best_rtt = {k: min(v) for k, v in rtt.items() if v}
    best_gbps = {k: max(v) for k, v in gbps.items() if v}
    pairs = {
        "rtt_vs_uvloop": ("ours", "uvloop"),
        "rtt_vs_c": ("ours", "c"),
        "rtt_blocking_vs_blocking_echo": ("blocking", "blocking_echo"),
        "rtt_blocking_vs_c": ("blocking", "c"),
        "rtt_raw_wire_vs_blocking_echo": ("raw_wire", "blocking_echo"),
        "htod_vs_c": ("ours_htod", "c_put"),
        "dtoh_vs_c": ("ours_dtoh", "c_get"),
        "blocking_htod_vs_c": ("blocking_htod", "c_put"),
        "blocking_dtoh_vs_c": ("blocking_dtoh", "c_get"),
        "htod_vs_uvloop": ("ours_htod", "uvloop_put"),
        "dtoh_vs_uvloop": ("ours_dtoh", "uvloop_get"),
    }
    ratios: dict[str, float | None] = {}
    median_ratios: dict[str, float | None] = {}
    for name, (mine, theirs) in pairs.items():
        series, best = (rtt, best_rtt) if name.startswith("rtt") else (gbps, best_gbps)
        ratios[name] = best[mine] / best[theirs] if theirs in best else None
        median_ratios[name] = _median_ratio(series[mine], series[theirs])
    return {
        "rounds": cfg.h2h_rounds,
        "samples_per_round": samples,
        "copy_size": size,
        "copy_reps_per_round": reps,
        "round_trip_p50_us": best_rtt,
        "copy_gbps": best_gbps,
        "ratios": ratios,
        "median_of_round_ratios": median_ratios,
        "per_round": {"round_trip_p50_us": rtt, "copy_gbps": gbps},
    }


# -- 7. TLS beside plain TCP ---------------------------------------------------------------------
TLS_FIGURES = {  # what --tls measures on both servers: label and unit
    "rtt_async": ("round trip p50, async API", "us"),
    "rtt_blocking": ("round trip p50, blocking API", "us"),
    "htod_async": ("memcpy_htod + sync, async API", "GB/s"),
    "dtoh_async": ("memcpy_dtoh, async API", "GB/s"),
    "htod_blocking": ("memcpy_htod + sync, blocking API", "GB/s"),
    "dtoh_blocking": ("memcpy_dtoh, blocking API", "GB/s"),
}


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway EC P-256 certificate for 127.0.0.1 and localhost, and its key, made with
    ``openssl``; clients trust it as its own CA. Raises SystemExit without ``openssl``."""
    if shutil.which("openssl") is None:
        raise SystemExit("--tls needs the openssl command to make a throwaway certificate")
    cert, key = directory / "server.pem", directory / "server-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],  # fmt: skip
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@contextlib.contextmanager
def tls_server(executor: str, cert: Path, key: Path) -> Iterator[str]:
    """A server like ``bitfusion_server``'s (same flags), serving TLS; yields its tls:// address."""
    argv = [
        sys.executable, "-m", "bitfusion_net.server", "--tls-cert", str(cert), "--tls-key", str(key),
        "--listen", "tcp://127.0.0.1:0", "--executor", executor,
        "--gpu-memory", SERVER_MEMORY[executor], "--log-level", "WARNING",
    ]  # fmt: skip
    with bl.server_process(argv, "the TLS server") as address:
        yield address


def negotiated(address: str, ca_file: Path) -> str:
    """The TLS version and cipher suite a client of ours gets from the server at ``address``."""
    target = parse_address(address)
    context = ClientTls(ca_file=ca_file).context()
    with socket.create_connection((target.host, target.port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=target.host) as tls_sock:
            cipher = tls_sock.cipher()
            return f"{tls_sock.version()} {cipher[0] if cipher else '?'}"


async def tls_round(
    gpu: bf.RemoteDevice,
    sync_gpu: bf.SyncRemoteDevice,
    ptr: int,
    sync_ptr: int,
    view: memoryview,
    cfg: Config,
) -> dict[str, float]:
    """One round on one server: round-trip p50 (us) and copy GB/s, both APIs."""
    samples, reps, size = cfg.h2h_samples, cfg.h2h_reps, len(view)

    async def to_device() -> None:
        await gpu.memcpy_htod(ptr, view)
        await gpu.synchronize()

    async def to_host() -> None:
        await gpu.memcpy_dtoh(view, ptr)

    def to_device_sync() -> None:
        sync_gpu.memcpy_htod(sync_ptr, view)
        sync_gpu.synchronize()

    def to_host_sync() -> None:
        sync_gpu.memcpy_dtoh(view, sync_ptr)

    return {
        "rtt_async": bl.summarize(await time_async(gpu.mem_get_info, samples, samples // 10))[
            "p50_us"
        ],
        "rtt_blocking": bl.summarize(time_sync(sync_gpu.mem_get_info, samples, samples // 10))[
            "p50_us"
        ],
        "htod_async": copy_result(size, await time_async(to_device, reps, 1))["gbps"],
        "dtoh_async": copy_result(size, await time_async(to_host, reps, 1))["gbps"],
        "htod_blocking": copy_result(size, time_sync(to_device_sync, reps, 1))["gbps"],
        "dtoh_blocking": copy_result(size, time_sync(to_host_sync, reps, 1))["gbps"],
    }


async def bench_tls(
    plain: str, tls: str, ca_file: Path, cfg: Config, host: memoryview, progress: Progress
) -> dict[str, Any]:
    """Round trips (both APIs) and copies each way (both APIs) to the plain server and to the
    TLS one, in interleaved rounds as in ``bench_head_to_head``: each figure's best round, the
    ratio TLS / plain of the best rounds, and the median of the per-round ratios."""
    size = min(HEAD_TO_HEAD_SIZE, max(cfg.sizes))
    view = host[:size]
    lease = size + 16 * MiB
    client_tls = ClientTls(ca_file=ca_file)
    figures = tuple(TLS_FIGURES)
    tls_protocol = negotiated(tls, ca_file)
    series: dict[str, dict[str, list[float]]] = {
        kind: {figure: [] for figure in figures} for kind in ("plain", "tls")
    }
    addresses = {"plain": plain, "tls": tls}
    async with contextlib.AsyncExitStack() as stack:
        gpus, sync_gpus, pointers, sync_pointers = {}, {}, {}, {}
        for kind, address in addresses.items():
            tls_settings = client_tls if kind == "tls" else None
            session = await stack.enter_async_context(
                bf.connect(address, memory=lease, client_name=f"perf/tls-{kind}", tls=tls_settings)
            )
            sync_session = bf.connect_sync(
                address, memory=lease, client_name=f"perf/tls-{kind}-sync", tls=tls_settings
            )
            stack.callback(sync_session.close)
            gpus[kind], sync_gpus[kind] = session.devices[0], sync_session.devices[0]
            pointers[kind] = await gpus[kind].mem_alloc(size)
            sync_pointers[kind] = sync_gpus[kind].mem_alloc(size)
        progress.advance()
        for round_ in range(cfg.h2h_rounds):
            progress.stage(f"TLS beside plain TCP: round {round_ + 1} of {cfg.h2h_rounds}")
            gc.collect()
            for kind in ("plain", "tls"):
                measured = await tls_round(
                    gpus[kind], sync_gpus[kind], pointers[kind], sync_pointers[kind], view, cfg
                )
                for figure, value in measured.items():
                    series[kind][figure].append(value)
            progress.advance()

    def best(values: list[float], figure: str) -> float:
        return min(values) if figure.startswith("rtt") else max(values)

    best_of = {
        kind: {figure: best(values, figure) for figure, values in by_figure.items()}
        for kind, by_figure in series.items()
    }
    return {
        "rounds": cfg.h2h_rounds,
        "samples_per_round": cfg.h2h_samples,
        "copy_size": size,
        "copy_reps_per_round": cfg.h2h_reps,
        "protocol": tls_protocol,
        "round_trip_p50_us": {
            kind: {f: v for f, v in b.items() if f.startswith("rtt")} for kind, b in best_of.items()
        },  # fmt: skip
        "copy_gbps": {
            kind: {f: v for f, v in b.items() if not f.startswith("rtt")}
            for kind, b in best_of.items()
        },  # fmt: skip
        "ratios": {f: best_of["tls"][f] / best_of["plain"][f] for f in figures},
        "median_of_round_ratios": {
            f: _median_ratio(series["tls"][f], series["plain"][f]) for f in figures
        },
        "per_round": series,
    }


def print_tls_report(tls: dict[str, Any]) -> None:
    """The TLS figures beside the plain ones: best rounds, their ratio TLS / plain, and the
    median of the per-round ratios."""
    print()
    print(
        f"TLS beside plain TCP: {tls['rounds']} interleaved rounds, copies of "
        f"{format_size(tls['copy_size'])}; ratio = TLS / plain (latency: lower is better)"
    )
    header = f"{'figure':<36}{'plain':>14}{'TLS':>14}{'ratio':>8}{'median':>8}"
    print(header)
    print("-" * len(header))
    for figure, (label, unit) in TLS_FIGURES.items():
        group = "round_trip_p50_us" if unit == "us" else "copy_gbps"
        digits = 1 if unit == "us" else 2
        plain, secure = tls[group]["plain"][figure], tls[group]["tls"][figure]
        median = tls["median_of_round_ratios"][figure]
        print(
            f"{label:<36}{f'{plain:.{digits}f} {unit}':>14}{f'{secure:.{digits}f} {unit}':>14}"
            f"{tls['ratios'][figure]:>8.2f}{'-' if median is None else f'{median:.2f}':>8}"
        )


# -- orchestration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peers:
    """Where everything listens: our server, the C baseline (binary and address), uvloop echo;
    and the executor kind the server runs (the in-process comparisons use the same)."""

    server: str
    c: tuple[Path, str] | None
    c_note: str
    uvloop: str
    blocking_echo: str
    executor: str = "numpy"


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load {load:.2f}"
    )


@contextlib.contextmanager
def bitfusion_server(address: str | None, executor: str = "numpy") -> Iterator[str]:
    """The server to measure: the one given, or a subprocess on a free loopback port running
    ``executor`` ("numpy" or "pycuda")."""
    if address is not None:
        yield address
        return
    argv = [
        sys.executable, "-m", "bitfusion_net.server", "--listen", "tcp://127.0.0.1:0",
        "--executor", executor, "--gpu-memory", SERVER_MEMORY[executor], "--log-level", "WARNING",
    ]  # fmt: skip
    with bl.server_process(argv, "bitfusion-net server") as started:
        yield started


async def measure_async(
    peers: Peers, cfg: Config, host: memoryview, progress: Progress
) -> dict[str, Any]:
    """Everything that runs on this process's event loop: ours (async API), C, uvloop."""
    results: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    # the copy buffer, the MLP, the launch target; and the CUDA context on a GPU
    lease = max(cfg.sizes) + 64 * MiB + CONTEXT_ALLOWANCE[peers.executor]
    async with bf.connect(peers.server, memory=lease, client_name="perf/latency") as session:
        gpu = session.devices[0]
        results["device"] = {
            "executor": gpu.executor,
            "name": gpu.name,
            "lease_memory": gpu.memory_limit,
        }
        progress.stage("ours: round trip, async API")
        results["round_trip_async"] = await bench_round_trip_async(gpu, cfg)
        progress.advance()
        results["memcpy"] = await bench_copies(gpu, cfg, host, progress)
        progress.stage("ours: pipelined launches, async API")
        results["launches_async"] = await bench_launches_async(gpu, cfg)
        progress.advance()
        progress.stage("ours: MLP training steps, remote vs in-process")
        results["mlp"] = await workload.compare_remote_local(
            gpu, cfg.mlp, cfg.mlp_warmup, cfg.mlp_rounds, cfg.mlp_steps, peers.executor
        )
        progress.advance()
        progress.stage("C TCP baseline")
        baselines["c"] = (
            bench_c(cfg, *peers.c) if peers.c is not None else {"skipped": peers.c_note}
        )
        progress.advance()
        uv = await bl.UvloopBaselineClient.connect(peers.uvloop)
        echo = bl.BlockingBaselineClient(peers.blocking_echo)
        raw = bl.RawWireClient(peers.server)
        # The blocking API needs no loop: it runs here, between the async measurements.
        sync_lease = HEAD_TO_HEAD_SIZE + 16 * MiB + CONTEXT_ALLOWANCE[peers.executor]
        sync_session = bf.connect_sync(
            peers.server, memory=sync_lease, client_name="perf/latency-h2h"
        )
        try:
            baselines["uvloop"] = await bench_uvloop(cfg, uv, host, progress)
            progress.stage("blocking echo and raw wire: round trip")
            baselines["blocking_echo"] = {
                "round_trip": bl.summarize(time_sync(echo.ping, cfg.rtt_samples, cfg.rtt_warmup))
            }
            baselines["raw_wire"] = {
                "round_trip": bl.summarize(time_sync(raw.ping, cfg.rtt_samples, cfg.rtt_warmup))
            }
            progress.advance()
            results["head_to_head"] = await bench_head_to_head(
                gpu, sync_session.devices[0], uv, echo, raw, peers.c, cfg, host, progress
            )
        finally:
            sync_session.close()
            raw.close()
            echo.close()
            uv.close()
    results["baselines"] = baselines
    return results


def measure_blocking(
    address: str, cfg: Config, progress: Progress, executor: str = "numpy"
) -> dict[str, Any]:
    """The blocking API, from this thread (it has no loop and no thread of its own)."""
    lease = 64 * MiB + CONTEXT_ALLOWANCE[executor]
    with bf.connect_sync(address, memory=lease, client_name="perf/latency-sync") as session:
        gpu = session.devices[0]
        progress.stage("ours: round trip, blocking API")
        round_trip = bench_round_trip_blocking(gpu, cfg)
        progress.advance()
        progress.stage("ours: pipelined launches, blocking API")
        launches = bench_launches_blocking(gpu, cfg)
        progress.advance()
    return {"round_trip": round_trip, "launches": launches}


def baseline_addresses(spec: str | None) -> dict[str, str | None]:
    """``--baselines-at HOST:PORT``: C on PORT, uvloop PORT+1, pyzmq PORT+2, grpcio PORT+3,
    the blocking echo PORT+4."""
    kinds = ("c", "uvloop", "zmq", "grpc", "blocking_echo")
    if spec is None:
        return dict.fromkeys(kinds)
    host, _, port_text = spec.rpartition(":")
    if not host or not port_text.isdigit():
        raise SystemExit(f"--baselines-at wants HOST:PORT, got {spec!r}")
    port = int(port_text)
    return {kind: f"tcp://{host}:{port + offset}" for offset, kind in enumerate(kinds)}


def result_stem(args: argparse.Namespace) -> str:
    """The results' file name without suffix: ``--name``, else ``latency`` for the NumPy executor
    and ``latency-KIND`` for any other, so a GPU run never overwrites the committed NumPy one."""
    if args.name:
        return str(args.name)
    return "latency" if args.executor == "numpy" else f"latency-{args.executor}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = make_config(args.quick)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    baseline_addresses(args.baselines_at)  # refuse a malformed --baselines-at before starting
    host_array = np.full(max(cfg.sizes), 0x5A, np.uint8)  # pages touched, as a real buffer's are
    meta: dict[str, Any] = {
        "machine": machine(),
        "quick": cfg.quick,
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sizes": list(cfg.sizes),
        "numpy": np.__version__,
        "bitfusion_net": bf.__version__,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "keep_awake": args.keep_awake,
        "executor": args.executor,
        "config": {k: v for k, v in vars(cfg).items() if k not in ("sizes", "mlp")},
    }
    progress = Progress(count_steps(cfg, args.tls), enabled=not args.no_progress)
    try:
        with bl.keep_awake(args.keep_awake):
            return measure_all(args, cfg, progress, host_array.data, meta)
    finally:
        progress.close()


def measure_all(
    args: argparse.Namespace,
    cfg: Config,
    progress: Progress,
    host: memoryview,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Every measurement, the targets, the JSON and the plot; returns the results."""
    output, remote, notes = Path(args.output), baseline_addresses(args.baselines_at), []
    stem, executor = result_stem(args), args.executor
    progress.stage("building the C baseline")
    binary, c_note = bl.build_c_baseline(Path(args.build_dir))
    notes.append(c_note)
    progress.advance()

    progress.stage("starting the servers")
    with contextlib.ExitStack() as servers:
        address = servers.enter_context(bitfusion_server(args.server, executor))
        c_peer = None
        if binary is not None:
            c_address = remote["c"] or servers.enter_context(
                bl.server_process([str(binary), "server", "127.0.0.1", "0"], "C server")
            )
            c_peer = (binary, c_address)
        uv_address = remote["uvloop"] or servers.enter_context(
            bl.server_process(bl.python_server("uvloop-echo-server"), "uvloop echo server")
        )
        blocking_echo = remote["blocking_echo"] or servers.enter_context(
            bl.server_process(bl.python_server("blocking-echo-server"), "blocking echo server")
        )
        meta["server"] = address
        progress.advance()
        peers = Peers(address, c_peer, c_note, uv_address, blocking_echo, executor)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            measured = runner.run(measure_async(peers, cfg, host, progress))
        blocking = measure_blocking(address, cfg, progress, executor)
        progress.stage("ours: 8 concurrent blocking clients")
        concurrent = bench_concurrent_clients(address, 8, 2.0 if cfg.quick else 10.0)
        progress.advance()
        tls_results = None
        if args.tls:
            progress.stage("TLS beside plain TCP: starting a TLS server")
            directory = Path(servers.enter_context(tempfile.TemporaryDirectory()))
            cert, key = self_signed_certificate(directory)
            tls_address = servers.enter_context(tls_server(executor, cert, key))
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                tls_results = runner.run(bench_tls(address, tls_address, cert, cfg, host, progress))
    meta["device"] = measured["device"]
    if measured["device"]["executor"] != executor:
        notes.append(
            f"the server measured runs the {measured['device']['executor']} executor, the "
            f"in-process comparisons the {executor} one: pass the matching --executor"
        )

    progress.stage("in-process executor: pipelined launches")
    inprocess = bench_launches_inprocess(cfg, executor)
    progress.advance()
    baselines = measured["baselines"]
    for kind in ("zmq", "grpc"):
        baselines[kind] = bench_optional_rpc(kind, cfg, remote[kind], progress)
        progress.advance()

    progress.stage("report")
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["load_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results: dict[str, Any] = {
        "meta": meta,
        "round_trip": {
            "async": measured["round_trip_async"],
            "blocking": blocking["round_trip"],
        },
        "memcpy": measured["memcpy"],
        "launches": {
            "kernel": "fill(n=1)",
            "async": measured["launches_async"],
            "blocking": blocking["launches"],
            "inprocess": inprocess,
        },
        "mlp": measured["mlp"],
        "concurrent": concurrent,
        "baselines": baselines,
        "head_to_head": measured["head_to_head"],
        "notes": notes,
    }
    if tls_results is not None:
        results["tls"] = tls_results
    results["targets"] = report.evaluate_targets(results)
    notes.append(report.plot(results, output / f"{stem}.png"))
    report.write_json(results, output / f"{stem}.json")
    notes.append(f"results written to {output / f'{stem}.json'}")
    progress.advance()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python perf/latency.py",
        description=(
            "Measure bitfusion-net's round-trip latency, copy bandwidth, pipelined launch rate "
            "and a small MLP training step (remote vs in-process), beside C, uvloop, pyzmq and "
            "grpcio baselines on the same machine, in one run. Prints a table and writes "
            "latency.json and latency.png (latency-pycuda.* with --executor pycuda). Targets are "
            "reported, never asserted."
        ),
        epilog="See perf/README.md for what each figure means and for runs across two hosts.",
    )
    parser.add_argument(
        "--server",
        metavar="tcp://HOST:PORT",
        help="measure this running server instead of starting one on loopback (rdma://HOST:PORT "
        "with --transport rdma; the run leases "
        "384 MiB of device memory, 144 MiB with --quick, and 2 GiB more with --executor pycuda "
        "for the two tenants' CUDA contexts)",
    )
    parser.add_argument(
        "--baselines-at",
        metavar="HOST:PORT",
        help="use baseline servers started elsewhere by 'python perf/baselines.py serve-all "
        "--port PORT' (C on PORT, uvloop PORT+1, pyzmq PORT+2, grpcio PORT+3, blocking echo PORT+4) instead of "
        "starting them on loopback",
    )
    parser.add_argument(
        "--executor",
        default="numpy",
        choices=list(workload.EXECUTOR_CHOICES),
        help="what the server started here runs, and the in-process comparisons with it: the "
        "NumPy reference device, this host's NVIDIA GPU through PyCUDA, or 'auto' (PyCUDA when a "
        "GPU is usable). Not numpy: results go to latency-KIND.json/.png (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples, copies up to 16 MiB: a run of seconds (the smoke test's)",
    )
    parser.add_argument(
        "--output",
        default=str(HERE / "results"),
        metavar="DIR",
        help="where latency.json and latency.png go (default: perf/results)",
    )
    parser.add_argument(
        "--name",
        metavar="STEM",
        help="file name of the results without suffix (default: latency, or latency-KIND for "
        "another executor than numpy)",
    )
    parser.add_argument(
        "--build-dir",
        default=str(HERE / "build"),
        metavar="DIR",
        help="where the C baseline is compiled (default: perf/build, ignored by git)",
    )
    parser.add_argument(
        "--keep-awake",
        action="store_true",
        help="run a nice-19 busy loop meanwhile, so that an idle (virtual) CPU never halts: on "
        "VMs, waking a halted vCPU adds tens of microseconds to every loopback round trip",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also measure a TLS server (a throwaway self-signed certificate, made with openssl) "
        "beside the plain one: round trips and 64 MiB copies of both APIs, and their ratio",
    )
    parser.add_argument(
        "--transport",
        default="tcp",
        choices=["tcp", "rdma"],
        help="rdma: round trips, copies and launches of both APIs over rdma:// instead of the "
        "whole TCP suite (perf/latency_rdma.py); on a real device beside TCP in the same run, "
        "on the verbs simulator labelled simulated (default: %(default)s)",
    )
    parser.add_argument(
        "--rdma-provider",
        default="auto",
        choices=["auto", "pyverbs", "simulator"],
        help="with --transport rdma: a real device through pyverbs, the in-process verbs "
        "simulator, or auto (pyverbs when a device is usable, else the simulator, with a note)",
    )
    parser.add_argument(
        "--tcp-server",
        metavar="tcp://HOST:PORT",
        help="with --transport rdma and --server: the same server's TCP address, measured beside",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.transport == "rdma":
        import latency_rdma  # it builds on this module's measurements

        results = latency_rdma.run(args)
        latency_rdma.print_report(results)
        return 0
    requested = args.executor
    try:
        args.executor = workload.resolve_executor(requested)
    except GpuUnavailable as exc:
        print(f"error: --executor {requested} needs a usable NVIDIA GPU: {exc}", file=sys.stderr)
        return 2
    if args.tls and args.server is not None:
        print(
            "error: --tls starts its own TLS server beside a local one: drop --server",
            file=sys.stderr,
        )
        return 2
    results = run(args)
    report.print_report(results)
    if "tls" in results:
        print_tls_report(results["tls"])
    device = results["meta"]["device"]
    print(f"executor {device['executor']}: {device['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
