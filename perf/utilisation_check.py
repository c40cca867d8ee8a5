"""The check of ``perf/utilisation.py``'s simulated GPU against a real server: the same ON/OFF
tenants on a real in-process server (NumPy device, loopback port 0) and on a one-GPU
``Simulation``, under the fair and the FIFO scheduler; each tenant's slowdown compared."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

# perf/ is on sys.path when the benchmark runs as a script, so its sibling modules import by name.
from utilisation_sim import Simulation
from utilisation_workload import Job, Task, Workload

import bitfusion_net as bf
from bitfusion_net.transport import new_event_loop


@dataclass(frozen=True)
class BenchTenant:
    name: str
    fraction: float
    gaps: tuple[float, ...]  # seconds before each burst, and after the last
    kernels: tuple[int, ...]  # ``busy`` kernels in each burst


BENCH_KERNEL_US = 4000


def bench_tenants(rounds: int, seed: int) -> list[BenchTenant]:
    """Three ON/OFF tenants at 0.5, 0.25 and 0.25 of one GPU, bursts of 4 ms kernels."""
    rng = np.random.default_rng([seed, 17])
    tenants = []
    for name, fraction in (("half", 0.5), ("quarter_a", 0.25), ("quarter_b", 0.25)):
        gaps = tuple(float(g) for g in rng.uniform(0.01, 0.15, rounds)) + (0.0,)
        kernels = tuple(int(k) for k in rng.integers(5, 31, rounds))
        tenants.append(BenchTenant(name, fraction, gaps, kernels))
    return tenants


def simulate_bench(tenants: list[BenchTenant], policy: str) -> dict[str, float]:
    """Each tenant's slowdown on a one-GPU simulated server (the cluster simulation's code)."""
    kernel_s = BENCH_KERNEL_US / 1e6
    jobs: list[Job] = [
        Task(
            i,
            "batch",
            0.0,
            1,
            t.fraction,
            0,
            np.array(t.gaps),
            np.array([k * kernel_s for k in t.kernels]),
        )  # fmt: skip
        for i, t in enumerate(tenants)
    ]
    longest = max(job.dedicated for job in jobs if isinstance(job, Task))
    workload = Workload(jobs, horizon=20 * longest + 60, warmup=0.0, notebook_share=0.0,
                        reserved_rate=0.0)  # fmt: skip
    sim = Simulation(workload, 1, policy, 0.0, slice_s=kernel_s)
    sim.run()
    return {t.name: sim.completed[i] for i, t in enumerate(tenants)}


async def _real_tenant(address: str, tenant: BenchTenant, start: asyncio.Event) -> float:
    session = await bf.connect(address, fraction=tenant.fraction, client_name=tenant.name)
    try:
        gpu = session.devices[0]
        busy = await gpu.builtin("busy")
        await busy.launch(1, 1, [1])  # the tenant's context and kernels, before the clock runs
        await gpu.synchronize()
        await start.wait()
        began = time.monotonic()
        for gap, count in zip(tenant.gaps, tenant.kernels, strict=False):
            await asyncio.sleep(gap)
            for _ in range(count):
                await busy.launch(1, 1, [BENCH_KERNEL_US])
            await gpu.synchronize()
        await asyncio.sleep(tenant.gaps[-1])
        return time.monotonic() - began
    finally:
        await session.close()


def real_bench(tenants: list[BenchTenant], scheduling: str) -> dict[str, float]:
    """Each tenant's slowdown on a real in-process server (NumPy device, loopback port 0)."""
    loop = new_event_loop()
    server = bf.Server(executor="numpy", gpus=1, gpu_memory="1GiB", scheduling=scheduling)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_server(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    try:
        on_server(server.start())

        async def everyone() -> list[float]:
            start = asyncio.Event()
            tasks = [asyncio.create_task(_real_tenant(server.address, t, start)) for t in tenants]
            await asyncio.sleep(0.5)  # every tenant connected and warmed up
            start.set()
            return await asyncio.gather(*tasks)

        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            completions = runner.run(everyone())
    finally:
        on_server(server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    kernel_s = BENCH_KERNEL_US / 1e6
    return {
        t.name: took / (sum(t.gaps) + kernel_s * sum(t.kernels))
        for t, took in zip(tenants, completions, strict=True)
    }


BENCH_TOLERANCE = 0.15  # relative difference in a tenant's slowdown counted as agreement


def validate_scheduler(rounds: int, seed: int) -> dict[str, Any]:
    """The simulated GPU against a real server, for both disciplines the policies use."""
    tenants = bench_tenants(rounds, seed)
    out: dict[str, Any] = {
        "tenants": {t.name: {"fraction": t.fraction, "bursts": len(t.kernels)} for t in tenants},
        "kernel_us": BENCH_KERNEL_US,
        "tolerance": BENCH_TOLERANCE,
    }
    for policy, scheduling in (("ours", "fair"), ("memory_only", "fifo")):
        simulated = simulate_bench(tenants, policy)
        real = real_bench(tenants, scheduling)
        differences = {n: simulated[n] / real[n] - 1 for n in real}
        out[scheduling] = {
            "simulated_slowdown": simulated,
            "real_slowdown": real,
            "relative_difference": differences,
            "agrees": all(abs(d) <= BENCH_TOLERANCE for d in differences.values()),
        }
    return out
