"""Sessions that lease several GPUs of one server."""

from __future__ import annotations

import numpy as np
import pytest
from integration_support import ClientApi, GiB, run, serve, wait_released

import bitfusion_net as bf

N = 1 << 16


def test_two_gpu_session_devices_are_distinct_and_independent(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpus=2, gpu_memory="1GiB") as server:
            async with api.connect(server.address, gpus=2, fraction=0.5) as session:
                d0, d1 = session.devices
                assert [d0.index, d1.index] == [0, 1]
                assert {d0.server_gpu, d1.server_gpu} == {0, 1}
                for device in (d0, d1):
                    assert device.memory_limit == GiB // 2
                    assert await device.mem_get_info() == (GiB // 2, GiB // 2)
                assert [g["tenants"] for g in server.gpus()] == [1, 1]

                patterns = [np.full(N, value, np.uint8) for value in (0x11, 0x22)]
                ptrs = []
                for device, pattern in zip(session.devices, patterns, strict=True):
                    ptr = await device.mem_alloc(N)
                    await device.memcpy_htod(ptr, pattern)
                    ptrs.append(ptr)
                # Work on one device does not touch the other.
                await (await d1.builtin("fill")).launch(1, 256, [N // 4, 0.0, ptrs[1]])
                out = np.empty(N, np.uint8)
                await d0.memcpy_dtoh(out, ptrs[0])
                np.testing.assert_array_equal(out, patterns[0])
                await d1.memcpy_dtoh(out, ptrs[1])
                assert not out.any()
                # Memory accounting is per device.
                assert (await d0.mem_get_info())[0] == GiB // 2 - N
                await d1.mem_free(ptrs[1])
                assert (await d1.mem_get_info())[0] == GiB // 2
                assert (await d0.mem_get_info())[0] == GiB // 2 - N

                # A pointer of one device means nothing on the other.
                with pytest.raises(bf.InvalidHandleError):
                    await d1.memcpy_dtoh(out, ptrs[0])
                await d1.memset_d8(ptrs[0], 0, N)
                with pytest.raises(bf.InvalidHandleError):
                    await d1.synchronize()
                await d0.synchronize()  # device 1's sticky error is not device 0's
                await d0.memcpy_dtoh(out, ptrs[0])
                np.testing.assert_array_equal(out, patterns[0])
            await wait_released(server)

    run(main())


def test_a_multi_gpu_lease_takes_distinct_gpus_or_nothing(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpus=2, gpu_memory="1GiB") as server:
            async with api.connect(server.address, fraction=1.0) as whole:
                # One GPU is taken whole: two half GPUs cannot be on distinct GPUs any more,
                # even though 1.0 of capacity is free in total.
                with pytest.raises(bf.CapacityError):
                    await api.connect(server.address, gpus=2, fraction=0.5)
                # ... and the refusal took nothing.
                assert [g["tenants"] for g in server.gpus()].count(0) == 1
                async with api.connect(server.address, fraction=0.5) as half:
                    assert half.devices[0].server_gpu != whole.devices[0].server_gpu
            await wait_released(server)
            async with api.connect(server.address, gpus=2, fraction=0.05) as session:
                assert sorted(d.server_gpu for d in session.devices) == [0, 1]

    run(main())


def test_asking_for_more_gpus_than_the_server_has_is_an_invalid_value(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpus=2) as server:
            with pytest.raises(bf.InvalidValueError) as caught:
                await api.connect(server.address, gpus=3, fraction=0.05)
            assert "3 GPU(s)" in str(caught.value)
            async with serve(gpus=1) as single:
                with pytest.raises(bf.InvalidValueError):
                    await api.connect(single.address, gpus=2)
            await wait_released(server)

    run(main())


def test_memcpy_peer_moves_many_chunks_exactly_and_reports_a_bad_source(api: ClientApi) -> None:
    """Between two GPUs the bytes pass through the client in 8 MiB chunks (the async API reads
    one while it sends the one before): every byte lands, and a source range past its
    allocation is the read's typed error."""

    async def main() -> None:
        async with serve(gpus=2, gpu_memory="1GiB") as server:
            async with api.connect(server.address, gpus=2, fraction=0.5) as session:
                a, b = session.devices
                size = 3 * 8 * 2**20 + 5
                data = np.random.default_rng(7).integers(0, 255, size, np.uint8)
                src, dst = await a.mem_alloc(size), await b.mem_alloc(size)
                await a.memcpy_htod(src, data)
                await session.memcpy_peer(1, dst, 0, src, size)
                out = np.empty_like(data)
                await b.memcpy_dtoh(out, dst)
                assert (out == data).all()
                with pytest.raises(bf.InvalidHandleError, match="not inside one of"):
                    await session.memcpy_peer(1, dst, 0, src + 2**20, size)
                await b.memcpy_dtoh(out, dst)  # the session goes on
                assert (out[: 2**20] == data[2**20 : 2**21]).all()

    run(main())
