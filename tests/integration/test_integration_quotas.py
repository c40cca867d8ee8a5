"""Fractional leases: hard memory limits per tenant, and how many tenants a GPU holds."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from integration_support import ClientApi, GiB, MiB, run, serve, wait_released, wait_tenants

import bitfusion_net as bf

SHARE_UNITS = 1_000_000  # the server keeps shares in millionths of a GPU
LIMIT_005 = GiB * 50_000 // SHARE_UNITS  # a 0.05 lease of a 1 GiB device: 51.2 MiB


def test_tenant_at_005_holds_50_mib_and_is_refused_more(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            async with api.connect(server.address, fraction=0.05) as session:
                device = session.devices[0]
                assert device.fraction == pytest.approx(0.05)
                assert device.total_memory == GiB
                assert device.memory_limit == LIMIT_005
                assert await device.mem_get_info() == (LIMIT_005, LIMIT_005)

                # One request beyond the limit is refused outright, and refusing costs nothing.
                with pytest.raises(bf.OutOfMemoryError) as refused:
                    await device.mem_alloc(52 * MiB)
                assert refused.value.deferred_from is None
                assert isinstance(refused.value, MemoryError)
                assert await device.mem_get_info() == (LIMIT_005, LIMIT_005)

                ptrs = [await device.mem_alloc(10 * MiB) for _ in range(5)]  # 50 MiB held
                free, total = await device.mem_get_info()
                assert total == device.memory_limit == LIMIT_005
                assert free == LIMIT_005 - 50 * MiB
                with pytest.raises(bf.OutOfMemoryError):
                    await device.mem_alloc(2 * MiB)
                # What is left still fits exactly (it is a multiple of the 256-byte granule).
                rest = await device.mem_alloc(free // 256 * 256)
                with pytest.raises(bf.OutOfMemoryError):
                    await device.mem_alloc(1)
                await device.mem_free(rest)

                # Freeing makes room again.
                await device.mem_free(ptrs.pop())
                assert (await device.mem_get_info())[0] == LIMIT_005 - 40 * MiB
                again = await device.mem_alloc(10 * MiB)
                assert again not in ptrs
                await device.synchronize()
                assert server.gpus()[0]["leased_memory"] == LIMIT_005
            await wait_released(server)

    run(main())


def test_explicit_memory_lease(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            async with api.connect(server.address, memory="100MiB") as session:
                device = session.devices[0]
                assert device.memory_limit == 100 * MiB
                # Its compute share is the memory's share of the device (rounded up).
                assert device.fraction == pytest.approx(100 / 1024, abs=1e-6)
                assert await device.mem_get_info() == (100 * MiB, 100 * MiB)
                gpu = server.gpus()[0]
                assert gpu["leased_memory"] == 100 * MiB and gpu["tenants"] == 1
                assert gpu["leased_fraction"] == pytest.approx(device.fraction)
                ptr = await device.mem_alloc(100 * MiB)
                with pytest.raises(bf.OutOfMemoryError):
                    await device.mem_alloc(256)
                await device.mem_free(ptr)
                assert await device.mem_get_info() == (100 * MiB, 100 * MiB)
            async with api.connect(server.address, memory=4096 * 1024) as session:
                assert session.devices[0].memory_limit == 4 * MiB
                # The smallest compute share is the server's minimum slice.
                assert session.devices[0].fraction == pytest.approx(0.05)
            await wait_released(server)

    run(main())


def test_lease_requests_the_server_cannot_place_or_accept(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            with pytest.raises(bf.CapacityError):
                await api.connect(server.address, memory="2GiB")  # bigger than the device
            with pytest.raises(bf.InvalidValueError):
                await api.connect(server.address, fraction=0.01)  # below the 1/20 minimum
            with pytest.raises(bf.InvalidValueError):  # refused locally, before connecting
                await api.connect(server.address, fraction=1.5)
            with pytest.raises(bf.InvalidValueError):
                await api.connect(server.address, fraction=0.5, memory="1MiB")
            with pytest.raises(bf.InvalidValueError):
                await api.connect(server.address, memory=0)
            with pytest.raises(bf.InvalidValueError):
                await api.connect(server.address, gpus=0)
            await wait_released(server)
        async with serve(gpu_memory="1GiB", min_fraction=0.25) as server:
            with pytest.raises(bf.InvalidValueError):
                await api.connect(server.address, fraction=0.2)
            async with api.connect(server.address, fraction=0.25) as session:
                assert session.devices[0].memory_limit == GiB // 4

    run(main())


def test_allocation_size_validation(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            with pytest.raises(bf.InvalidValueError):
                await device.mem_alloc(0)
            with pytest.raises(bf.InvalidValueError):
                await device.mem_alloc(-1)
            with pytest.raises(bf.OutOfMemoryError):
                await device.mem_alloc(2**62)
            await device.synchronize()
            assert (await device.mem_get_info())[0] == device.memory_limit

    run(main())


def test_each_tenants_limit_is_a_guarantee(api: ClientApi) -> None:
    """Two half-GPU tenants can both fill their whole limit; neither can take the other's."""

    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            async with (
                api.connect(server.address, fraction=0.5) as first,
                api.connect(server.address, fraction=0.5) as second,
            ):
                a, b = first.devices[0], second.devices[0]
                a_ptr = await a.mem_alloc(GiB // 2)  # NumPy pages stay untouched: costs nothing
                with pytest.raises(bf.OutOfMemoryError):
                    await a.mem_alloc(256)
                assert await b.mem_get_info() == (GiB // 2, GiB // 2)
                b_ptr = await b.mem_alloc(GiB // 2)
                await a.mem_free(a_ptr)
                await b.mem_free(b_ptr)
                await a.synchronize()
                await b.synchronize()
            await wait_released(server)

    run(main())


def test_twenty_tenants_fit_and_a_twenty_first_is_refused(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server, contextlib.AsyncExitStack() as stack:
            sessions = await asyncio.gather(
                *(api.connect(server.address, fraction=0.05) for _ in range(20))
            )
            for session in sessions:
                stack.push_async_callback(session.close)
            gpu = server.gpus()[0]
            assert gpu["tenants"] == 20
            assert gpu["leased_fraction"] == pytest.approx(1.0)
            assert gpu["leased_memory"] == 20 * LIMIT_005 <= GiB
            assert len(server.sessions()) == 20
            # Every one of them can use its share.
            ptrs = await asyncio.gather(*(s.devices[0].mem_alloc(50 * MiB) for s in sessions))
            assert len(set(ptrs)) == 20

            with pytest.raises(bf.CapacityError):
                await api.connect(server.address, fraction=0.05)
            with pytest.raises(bf.CapacityError):
                await api.connect(server.address, memory="1MiB")
            assert server.gpus()[0]["tenants"] == 20  # the refused ones left nothing behind

            await sessions[7].close()  # its lease is released on the server asynchronously
            await wait_tenants(server, 19)
            assert server.gpus()[0]["leased_fraction"] == pytest.approx(0.95)
            async with api.connect(server.address, fraction=0.05) as newcomer:
                device = newcomer.devices[0]
                # The newcomer gets a fresh, whole share: nothing of the leaver's memory is charged.
                assert await device.mem_get_info() == (LIMIT_005, LIMIT_005)
                await device.mem_alloc(50 * MiB)
                with pytest.raises(bf.CapacityError):
                    await api.connect(server.address, fraction=0.05)
        # Leaving: the exit stack closes every session, then the server stops.

    run(main())


def test_whole_gpu_waits_for_every_fraction_to_leave(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            small = await api.connect(server.address, fraction=0.05)
            with pytest.raises(bf.CapacityError):
                await api.connect(server.address, fraction=1.0)
            await small.close()
            await wait_released(server)
            async with api.connect(server.address) as whole:  # the default is a whole GPU
                assert whole.devices[0].fraction == 1.0
                assert whole.devices[0].memory_limit == GiB

    run(main())
