"""Every built-in kernel, launched through the network, against NumPy on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from integration_support import ClientApi, run, serve

import bitfusion_net as bf

F32 = np.float32
NAN_BITS = 0x7FC0_0000  # a float32 quiet NaN, as memset_d32 writes it


async def upload(device: bf.RemoteDevice, array: np.ndarray) -> bf.DevicePtr:
    ptr = await device.mem_alloc(array.nbytes)
    await device.memcpy_htod(ptr, array)
    return ptr


async def download(device: bf.RemoteDevice, ptr: int, count: int) -> np.ndarray:
    out = np.empty(count, F32)
    await device.memcpy_dtoh(out, ptr)
    return out


def test_saxpy(api: ClientApi) -> None:
    rng = np.random.default_rng(1)
    n, a = 100_003, 2.5
    x = rng.standard_normal(n, dtype=F32)
    y = rng.standard_normal(n, dtype=F32)

    async def main() -> np.ndarray:
        async with serve() as server, api.connect(server.address, fraction=0.25) as session:
            device = session.devices[0]
            x_ptr, y_ptr = await upload(device, x), await upload(device, y)
            saxpy = await device.builtin("saxpy")
            assert saxpy.arg_types == "ifPP"
            await saxpy.launch((n + 255) // 256, 256, [n, a, x_ptr, y_ptr])
            await device.synchronize()
            return await download(device, y_ptr, n)

    np.testing.assert_allclose(run(main()), F32(a) * x + y, rtol=1e-6, atol=1e-6)


def test_saxpy_in_place_x_is_y(api: ClientApi) -> None:
    x = np.random.default_rng(2).standard_normal(4096, dtype=F32)

    async def main() -> np.ndarray:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await upload(device, x)
            await (await device.builtin("saxpy")).launch(16, 256, [x.size, 3.0, ptr, ptr])
            return await download(device, ptr, x.size)

    np.testing.assert_allclose(run(main()), F32(3.0) * x + x, rtol=1e-6)


def test_fill_writes_exactly_n_elements(api: ClientApi) -> None:
    n, pad = 5000, 64

    async def main() -> np.ndarray:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc((n + pad) * 4)
            await device.memset_d32(ptr, 0xDEADBEEF, n + pad)
            await (await device.builtin("fill")).launch(20, 256, [n, -7.25, ptr])
            out = np.empty(n + pad, np.uint32)
            await device.memcpy_dtoh(out, ptr)
            return out

    out = run(main())
    np.testing.assert_array_equal(out[:n].view(F32), np.full(n, -7.25, F32))
    assert (out[n:] == 0xDEADBEEF).all()  # the padding past n was not touched


@pytest.mark.parametrize(
    ("m", "n", "k", "alpha", "beta"), [(33, 17, 9, 1.5, 0.5), (64, 128, 40, -0.75, 2.0)]
)
def test_gemm_with_alpha_and_beta(m: int, n: int, k: int, alpha: float, beta: float, api: ClientApi) -> None:
    rng = np.random.default_rng(m * n * k)
    a = rng.standard_normal((m, k), dtype=F32)
    b = rng.standard_normal((k, n), dtype=F32)
    c = rng.standard_normal((m, n), dtype=F32)

    async def main() -> np.ndarray:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            a_ptr = await upload(device, a)
            b_ptr = await upload(device, b)
            c_ptr = await upload(device, c)
            gemm = await device.builtin("gemm")
            assert gemm.arg_types == "iiifPPfP"
            await gemm.launch((4, 4), (16, 16), [m, n, k, alpha, a_ptr, b_ptr, beta, c_ptr])
            return (await download(device, c_ptr, m * n)).reshape(m, n)

    expected = alpha * (a.astype(np.float64) @ b.astype(np.float64)) + beta * c.astype(np.float64)
    np.testing.assert_allclose(run(main()), expected, rtol=1e-4, atol=1e-4)


def test_gemm_beta_zero_does_not_read_c(api: ClientApi) -> None:
    """BLAS semantics: with beta == 0 leftover NaNs in C must not leak into the result."""
    rng = np.random.default_rng(7)
    m, n, k = 8, 12, 5
    a = rng.standard_normal((m, k), dtype=F32)
    b = rng.standard_normal((k, n), dtype=F32)

    async def main() -> np.ndarray:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            a_ptr, b_ptr = await upload(device, a), await upload(device, b)
            c_ptr = await device.mem_alloc(m * n * 4)
            await device.memset_d32(c_ptr, NAN_BITS, m * n)
            await (await device.builtin("gemm")).launch(
                1, 64, [m, n, k, 2.0, a_ptr, b_ptr, 0.0, c_ptr]
            )
            return (await download(device, c_ptr, m * n)).reshape(m, n)

    result = run(main())
    assert not np.isnan(result).any()
    np.testing.assert_allclose(result, 2.0 * (a.astype(np.float64) @ b), rtol=1e-4, atol=1e-4)


def test_relu_maps_negatives_and_nan_to_zero(api: ClientApi) -> None:
    x = np.random.default_rng(3).standard_normal(10_000, dtype=F32)
    x[0], x[1], x[2] = np.nan, np.inf, -np.inf

    async def main() -> tuple[np.ndarray, np.ndarray]:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            x_ptr = await upload(device, x)
            y_ptr = await device.mem_alloc(x.nbytes)
            relu = await device.builtin("relu")
            await relu.launch(40, 256, [x.size, x_ptr, y_ptr])
            out = await download(device, y_ptr, x.size)
            await relu.launch(40, 256, [x.size, x_ptr, x_ptr])  # in place
            return out, await download(device, x_ptr, x.size)

    out, in_place = run(main())
    expected = np.where(x > 0, x, F32(0))  # NaN > 0 is False: NaN becomes 0, as fmaxf does
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(in_place, expected)


def test_softmax_rows(api: ClientApi) -> None:
    rows, cols = 7, 129
    # Large magnitudes: a kernel that forgot to subtract the row max would overflow exp().
    x = np.random.default_rng(4).standard_normal((rows, cols), dtype=F32) * F32(60)

    async def main() -> np.ndarray:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            x_ptr = await upload(device, x)
            y_ptr = await device.mem_alloc(x.nbytes)
            softmax = await device.builtin("softmax")
            assert softmax.arg_types == "iiPP"
            await softmax.launch(rows, 128, [rows, cols, x_ptr, y_ptr])
            return (await download(device, y_ptr, rows * cols)).reshape(rows, cols)

    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    expected = e / e.sum(axis=1, keepdims=True)
    result = run(main())
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.sum(axis=1), np.ones(rows), rtol=1e-5)


def test_reduce_sum(api: ClientApi) -> None:
    x = np.random.default_rng(5).uniform(-1, 1, 1_000_001).astype(F32)

    async def main() -> float:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            x_ptr = await upload(device, x)
            out_ptr = await device.mem_alloc(4)
            await (await device.builtin("reduce_sum")).launch(1024, 256, [x.size, x_ptr, out_ptr])
            return float((await download(device, out_ptr, 1))[0])

    assert run(main()) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5, abs=1e-3)


def test_busy_completes(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            busy = await device.builtin("busy")
            assert busy.arg_types == "q"
            await busy.launch(1, 1, [2_000])  # 2 ms
            await busy.launch(1, 1, [0])
            await device.synchronize()

    run(main())


def test_kernel_on_pointer_plus_offset(api: ClientApi) -> None:
    """``ptr + offset`` addresses the inside of an allocation, for kernels as for copies."""
    rng = np.random.default_rng(6)
    n, offset = 4096, 1000
    x = rng.standard_normal(n, dtype=F32)
    y = rng.standard_normal(n, dtype=F32)

    async def main() -> tuple[np.ndarray, float]:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            x_ptr, y_ptr = await upload(device, x), await upload(device, y)
            assert isinstance(x_ptr + 4 * offset, bf.DevicePtr)
            saxpy = await device.builtin("saxpy")
            await saxpy.launch(16, 256, [n - offset, -2.0, x_ptr + 4 * offset, y_ptr + 4 * offset])
            total_ptr = await device.mem_alloc(4)
            reduce_sum = await device.builtin("reduce_sum")
            await reduce_sum.launch(1, 256, [10, x_ptr + 4 * (n - 10), total_ptr])
            total = float((await download(device, total_ptr, 1))[0])
            return await download(device, y_ptr, n), total

    result, total = run(main())
    np.testing.assert_array_equal(result[:offset], y[:offset])
    np.testing.assert_allclose(
        result[offset:], F32(-2.0) * x[offset:] + y[offset:], rtol=1e-6, atol=1e-6
    )
    assert total == pytest.approx(float(x[-10:].astype(np.float64).sum()), rel=1e-5, abs=1e-6)


def test_geometry_does_not_change_results(api: ClientApi) -> None:
    x = np.random.default_rng(8).standard_normal(3000, dtype=F32)

    async def main() -> list[np.ndarray]:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            x_ptr = await upload(device, x)
            relu = await device.builtin("relu")
            outs = []
            for grid, block in [(1, 1), ((2, 3), (4, 4, 2)), (1000, 1024)]:
                y_ptr = await device.mem_alloc(x.nbytes)
                await relu.launch(grid, block, [x.size, x_ptr, y_ptr])
                outs.append(await download(device, y_ptr, x.size))
            return outs

    first, *others = run(main())
    for other in others:
        np.testing.assert_array_equal(other, first)
