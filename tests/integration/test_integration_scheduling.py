"""Fair-share leases through the public API: modes, weights, per-tenant accounting.

How well the scheduler shares time is measured in perf/fairness.py and unit-tested on a fake clock
in tests/executors; here we check what a client asks for is what it gets and can read back.
"""

from __future__ import annotations

import numpy as np
import pytest
from integration_support import ClientApi, MiB, run, serve

import bitfusion_net as bf


def test_mode_and_weight_are_granted_and_shown_by_the_server(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            async with (
                api.connect(server.address, fraction=0.25, mode="cap") as capped,
                api.connect(server.address, fraction=0.05, weight=0.5) as weighted,
                api.connect(server.address, fraction=0.1) as plain,
            ):
                assert (capped.devices[0].mode, capped.devices[0].weight) == ("cap", 0.25)
                assert (weighted.devices[0].mode, weighted.devices[0].weight) == ("share", 0.5)
                assert (plain.devices[0].mode, plain.devices[0].weight) == ("share", 0.1)
                leases = sorted(
                    (lease["fraction"], lease["mode"], lease["weight"])
                    for session in server.sessions()
                    for lease in session["leases"]
                )
                assert leases == [(0.05, "share", 0.5), (0.1, "share", 0.1), (0.25, "cap", 0.25)]

    run(main())


def test_stats_count_the_tenants_own_work_and_memory(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            async with (
                api.connect(server.address, fraction=0.5) as mine,
                api.connect(server.address, fraction=0.5) as other,
            ):
                gpu = mine.devices[0]
                fresh = await gpu.stats()
                assert (fresh.kernels, fresh.memory_used, fresh.memory_high_water) == (0, 0, 0)

                first = await gpu.mem_alloc(3 * MiB)
                second = await gpu.mem_alloc(MiB)
                await gpu.mem_free(first)
                busy = await gpu.builtin("busy")
                for _ in range(3):
                    await busy.launch(1, 1, [2000])  # 2 ms each
                await gpu.memcpy_htod(second, np.zeros(MiB, np.uint8))
                await other.devices[0].mem_alloc(MiB)  # someone else's work is not ours

                stats = await gpu.stats()
                assert stats.kernels == 3
                assert stats.memory_used == MiB
                assert stats.memory_high_water == 4 * MiB
                assert stats.device_time >= 0.006  # the three busy kernels alone
                assert stats.operations >= 8  # 3 allocs/frees, 3 kernels, 1 copy, the first stats
                assert stats.queue_wait >= 0
                usage = [
                    lease["usage"]
                    for session in server.sessions()
                    for lease in session["leases"]
                    if lease["fraction"] == 0.5 and lease["usage"]["kernels"] == 3
                ]
                assert len(usage) == 1 and usage[0]["memory_high_water"] == 4 * MiB

    run(main())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "greedy"}, "mode"),
        ({"weight": 0.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
    ],
)
def test_bad_mode_or_weight_is_refused_locally(kwargs: dict[str, object], match: str, api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server:
            with pytest.raises(bf.InvalidValueError, match=match):
                await api.connect(server.address, fraction=0.5, **kwargs)  # type: ignore[arg-type]

    run(main())


def test_the_blocking_api_reads_stats_too() -> None:
    async def main() -> None:
        async with serve() as server:
            address = server.address

            def blocking() -> bf.TenantStats:
                with bf.connect_sync(address, fraction=0.5, mode="cap") as session:
                    gpu = session.devices[0]
                    gpu.builtin("fill").launch(1, 32, [4, 1.0, gpu.mem_alloc(16)])
                    assert gpu.mode == "cap"
                    return gpu.stats()

            import asyncio

            stats = await asyncio.get_running_loop().run_in_executor(None, blocking)
            assert stats.kernels == 1 and stats.memory_used == 256

    run(main())
