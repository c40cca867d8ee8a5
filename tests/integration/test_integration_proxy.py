"""Adversity through a fuzzing proxy: a real client and a real server, bytes split, delayed,
stalled or cut between them. Whatever the timing, results are exact; a cut is a typed error on
the client and a released lease on the server, which goes on serving everyone else."""

from __future__ import annotations

import numpy as np
import pytest
from fuzzing_proxy import FuzzingProxy, Mangling
from integration_support import ClientApi, MiB, run, serve, wait_released

import bitfusion_net as bf

F32 = np.float32


async def workload(session: object, size: int = 256 * 1024) -> None:
    """Copies both ways and kernels in between, every result checked."""
    device = session.devices[0]  # type: ignore[attr-defined]
    data = np.random.default_rng(5).standard_normal(size // 4, dtype=F32)
    ptr = await device.mem_alloc(data.nbytes)
    await device.memcpy_htod(ptr, data)
    saxpy = await device.builtin("saxpy")
    await saxpy.launch(64, 256, [data.size, 2.0, ptr, ptr])  # y = 2y + y
    out = np.empty_like(data)
    await device.memcpy_dtoh(out, ptr)
    np.testing.assert_array_equal(out, F32(2.0) * data + data)
    free, total = await device.mem_get_info()
    assert free == total - data.nbytes
    await device.mem_free(ptr)
    await device.synchronize()


MANGLINGS = {
    "one-byte pieces both ways": (Mangling(piece=1), Mangling(piece=1)),
    "a millisecond per piece": (Mangling(piece=4096, delay=0.001), Mangling(delay=0.001)),
    "stalls mid-frame both ways": (
        Mangling(stall_after=30, stall_for=0.3),
        Mangling(stall_after=90, stall_for=0.3),
    ),
}


@pytest.mark.parametrize("mangling", sorted(MANGLINGS))
def test_results_are_exact_whatever_the_timing(mangling: str, api: ClientApi) -> None:
    upstream, downstream = MANGLINGS[mangling]
    size = 16 * 1024 if upstream.piece == 1 else 256 * 1024

    async def main() -> None:
        async with serve() as server, FuzzingProxy(server.address, upstream, downstream) as proxy:
            async with api.connect(proxy.address, fraction=0.25) as session:
                await workload(session, size)
            await wait_released(server)

    run(main())


@pytest.mark.parametrize(
    ("where", "upstream", "downstream"),
    [
        ("in the HELLO", Mangling(cut_after=30), Mangling()),
        ("in a copy to the device", Mangling(cut_after=64 + 1000), Mangling()),
        ("in the HELLO reply", Mangling(), Mangling(cut_after=50)),
        ("in a copy back", Mangling(), Mangling(cut_after=200 + 100_000)),
    ],
)
def test_a_cut_is_a_typed_error_and_the_lease_comes_back(
    where: str, upstream: Mangling, downstream: Mangling, api: ClientApi
) -> None:
    async def main() -> None:
        async with serve() as server, FuzzingProxy(server.address, upstream, downstream) as proxy:
            with pytest.raises(bf.ConnectionLostError):
                async with api.connect(proxy.address, fraction=0.5) as session:
                    await workload(session, 4 * MiB)
            assert proxy.cut.is_set(), where
            await wait_released(server)
            # The server is unharmed: a direct client gets the whole GPU.
            async with api.connect(server.address, fraction=1.0) as session:
                await workload(session)

    run(main())
