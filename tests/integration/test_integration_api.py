"""The public API end to end: blocking and async twins, streams and events, connecting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from integration_support import ClientApi, GiB, poll_until, pool_is_empty, run, serve, wait_released

import bitfusion_net as bf
from bitfusion_net.protocol import messages as m

F32 = np.float32
N = 10_000
RNG = np.random.default_rng(21)
X = RNG.standard_normal(N, dtype=F32)
Y = RNG.standard_normal(N, dtype=F32)


async def workload_async(address: str) -> tuple[np.ndarray, float, tuple[int, int]]:
    """saxpy, relu and a reduction; returns (relu(2x + y), sum of it, mem_get_info)."""
    async with bf.connect(address, fraction=0.25) as session:
        device = session.devices[0]
        x_ptr = await device.mem_alloc(X.nbytes)
        y_ptr = await device.mem_alloc(Y.nbytes)
        out_ptr = await device.mem_alloc(4)
        await device.memcpy_htod(x_ptr, X)
        await device.memcpy_htod(y_ptr, Y)
        await (await device.builtin("saxpy")).launch(40, 256, [N, 2.0, x_ptr, y_ptr])
        await (await device.builtin("relu")).launch(40, 256, [N, y_ptr, y_ptr])
        await (await device.builtin("reduce_sum")).launch(1, 256, [N, y_ptr, out_ptr])
        await device.synchronize()
        result, total = np.empty(N, F32), np.empty(1, F32)
        await device.memcpy_dtoh(result, y_ptr)
        await device.memcpy_dtoh(total, out_ptr)
        info = await device.mem_get_info()
        await device.mem_free(x_ptr)
        return result, float(total[0]), info


def workload_sync(address: str) -> tuple[np.ndarray, float, tuple[int, int]]:
    with bf.connect_sync(address, fraction=0.25) as session:
        device = session.devices[0]
        x_ptr = device.mem_alloc(X.nbytes)
        y_ptr = device.mem_alloc(Y.nbytes)
        out_ptr = device.mem_alloc(4)
        device.memcpy_htod(x_ptr, X)
        device.memcpy_htod(y_ptr, Y)
        device.builtin("saxpy").launch(40, 256, [N, 2.0, x_ptr, y_ptr])
        device.builtin("relu").launch(40, 256, [N, y_ptr, y_ptr])
        device.builtin("reduce_sum").launch(1, 256, [N, y_ptr, out_ptr])
        device.synchronize()
        result, total = np.empty(N, F32), np.empty(1, F32)
        device.memcpy_dtoh(result, y_ptr)
        device.memcpy_dtoh(total, out_ptr)
        info = device.mem_get_info()
        device.mem_free(x_ptr)
        return result, float(total[0]), info


@contextlib.contextmanager
def server_in_thread(**kwargs: object) -> Iterator[tuple[str, bf.Server]]:
    """An in-process server on its own event loop thread, for the blocking API (which blocks)."""
    loop = asyncio.new_event_loop()
    server = bf.Server("tcp://127.0.0.1:0", gpu_memory="1GiB", **kwargs)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server.address, server
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_blocking_and_async_apis_give_the_same_results() -> None:
    async def via_async() -> tuple[np.ndarray, float, tuple[int, int]]:
        async with serve() as server:
            result = await workload_async(server.address)
            await wait_released(server)
            return result

    a_result, a_total, a_info = run(via_async())
    with server_in_thread() as (address, _server):
        s_result, s_total, s_info = workload_sync(address)

    expected = np.maximum(F32(2.0) * X + Y, F32(0))
    np.testing.assert_allclose(a_result, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(s_result, a_result)
    assert s_total == a_total == pytest.approx(float(expected.astype(np.float64).sum()), rel=1e-5)
    assert s_info == a_info
    assert a_info[1] == GiB // 4 and a_info[0] <= GiB // 4 - 2 * X.nbytes - 4


def test_blocking_api_surface() -> None:
    with server_in_thread() as (address, server):
        with bf.connect_sync(address, fraction=0.5, client_name="sync-client") as session:
            assert not session.closed
            (device,) = session.devices
            assert isinstance(device, bf.SyncRemoteDevice)
            assert (device.index, device.server_gpu, device.fraction) == (0, 0, 0.5)
            assert device.total_memory == GiB and device.memory_limit == GiB // 2
            assert device.executor == "numpy" and device.name
            assert server.sessions()[0]["client"] == "sync-client"

            ptr = device.mem_alloc(4096)
            stream = device.create_stream()
            start, end = device.create_event(), device.create_event()
            start.record(stream)
            device.memset_d32(ptr, 0x3F800000, 1024, stream=stream)  # 1.0f
            fill = device.builtin("fill")
            assert device.builtin("fill") is fill  # looked up once
            fill.launch(2, 256, [512, 4.0, ptr], stream=stream)
            end.record(stream)
            end.synchronize()
            stream.synchronize()
            assert start.elapsed_ms(end) >= 0.0
            out = np.empty(1024, F32)
            device.memcpy_dtoh(out, ptr, stream=stream)
            assert (out[:512] == 4.0).all() and (out[512:] == 1.0).all()
            other = device.mem_alloc(4096)
            device.memcpy_dtod(other, ptr, 4096)
            device.memset_d8(ptr, 0, 4096)
            device.memcpy_dtoh(out, other)
            assert (out[:512] == 4.0).all()
            with pytest.raises(bf.UnsupportedError):
                device.module_load(b"\x7fELF")
            fill.launch(1, 1, [2048, 0.0, ptr])
            with pytest.raises(bf.KernelError):
                device.synchronize()
            start.destroy()
            end.destroy()
            stream.destroy()
            device.mem_free(ptr)
            device.synchronize()
        assert session.closed
        session.close()  # idempotent
        # Its lease is released on the server's loop thread, asynchronously.
        poll_until(lambda: pool_is_empty(server), "the blocking session's lease released")


def test_streams_and_events(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server:
            session = await api.connect(server.address, fraction=0.5)  # plain await, no ``with``
            try:
                device = session.devices[0]
                if api.kind == "async":
                    assert isinstance(device, bf.RemoteDevice)
                assert "fraction 0.5" in repr(device)
                streams = [await device.create_stream() for _ in range(3)]
                assert len({s.handle for s in streams}) == 3
                ptr = await device.mem_alloc(3 * 1024 * 4)
                fill = await device.builtin("fill")
                start, end = await device.create_event(), await device.create_event()
                await start.record()
                for i, stream in enumerate(streams):
                    await fill.launch(4, 256, [1024, float(i), ptr + i * 4096], stream=stream)
                await end.record(streams[-1])
                for stream in streams:
                    await stream.synchronize()
                await end.synchronize()
                assert await start.elapsed_ms(end) >= 0.0
                out = np.empty(3 * 1024, F32)
                await device.memcpy_dtoh(out, ptr)
                np.testing.assert_array_equal(out, np.repeat(np.arange(3, dtype=F32), 1024))
                for stream in streams:
                    await stream.destroy()
                await start.destroy()
                await device.synchronize()
                with pytest.raises(bf.InvalidHandleError):
                    await start.synchronize()
            finally:
                await session.close()
            await wait_released(server)

    run(main())


def test_concurrent_sessions_on_one_gpu(api: ClientApi) -> None:
    async def tenant(address: str, seed: int) -> None:
        data = np.random.default_rng(seed).integers(0, 256, 3 << 20, dtype=np.uint8)
        async with api.connect(address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(data.nbytes)
            for _ in range(3):
                await device.memcpy_htod(ptr, data)
                out = np.empty_like(data)
                await device.memcpy_dtoh(out, ptr)
                np.testing.assert_array_equal(out, data)

    async def main() -> None:
        async with serve() as server:
            await asyncio.gather(*(tenant(server.address, seed) for seed in range(8)))
            await wait_released(server)

    run(main())


# -- connecting -----------------------------------------------------------------------------------
def _free_port() -> int:
    """A port nothing listens on (bound, then released, so the system just gave it to us)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connecting_to_a_port_with_nothing_listening(api: ClientApi) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(bf.ConnectionLostError):
        run(api.connect(address, fraction=0.5, timeout=5.0), timeout=10)

    async def with_block() -> None:
        async with api.connect(address, timeout=5.0):
            raise AssertionError("connected to nothing")

    with pytest.raises(bf.ConnectionLostError):
        run(with_block(), timeout=10)
    with pytest.raises(bf.ConnectionLostError):
        bf.connect_sync(address, timeout=5.0)


BAD_ADDRESSES = [
    "127.0.0.1:7000",  # no scheme
    "http://127.0.0.1:7000",
    "udp://127.0.0.1:7000",
    "tcp://127.0.0.1",  # no port
    "tcp://:7000",  # no host
    "tcp://127.0.0.1:99999",
    "tcp://127.0.0.1:port",
    "tcp://127.0.0.1:7000/path",
    "tcp://127.0.0.1:7000?x=1",
    "",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_bad_address_strings_raise_value_error(address: str, api: ClientApi) -> None:
    with pytest.raises(ValueError):
        run(api.connect(address), timeout=10)
    with pytest.raises(ValueError):
        bf.connect_sync(address)
    with pytest.raises(ValueError):
        bf.Server(address)


def test_ipv6_loopback_address(api: ClientApi) -> None:
    if not socket.has_ipv6:
        pytest.fail("this host has no IPv6 support")

    async def main() -> None:
        try:
            server = bf.Server("tcp://[::1]:0", gpu_memory="1GiB")
            await server.start()
        except OSError as exc:  # a container without ::1 configured
            pytest.fail(f"cannot listen on [::1]: {exc}")
        try:
            assert server.address.startswith("tcp://[::1]:")
            async with api.connect(server.address, fraction=0.5) as session:
                assert await session.devices[0].mem_get_info() == (GiB // 2, GiB // 2)
        finally:
            await server.close()

    run(main())


def test_the_blocking_api_runs_on_the_callers_thread() -> None:
    """No loop thread and no helper thread: a blocking session is a socket and a lock."""
    with server_in_thread() as (address, _server):
        before = threading.active_count()
        with bf.connect_sync(address, fraction=0.25) as session:
            device = session.devices[0]
            ptr = device.mem_alloc(1024)
            device.memset_d8(ptr, 7, 1024)
            out = np.empty(1024, np.uint8)
            device.memcpy_dtoh(out, ptr)
            assert (out == 7).all()
            assert threading.active_count() == before


def test_one_blocking_session_shared_by_threads() -> None:
    """Eight threads drive one session at once; each thread's copies and kernels see only its
    own data, and every reply reaches the thread that asked."""
    errors: list[BaseException] = []

    def worker(device: bf.SyncRemoteDevice, seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            fill = device.builtin("fill")
            ptr = device.mem_alloc(64 * 1024)
            for round_ in range(20):
                data = rng.standard_normal(16 * 1024, dtype=F32)
                device.memcpy_htod(ptr, data)
                out = np.empty_like(data)
                device.memcpy_dtoh(out, ptr)
                np.testing.assert_array_equal(out, data)
                fill.launch(4, 256, [1024, float(seed * 100 + round_), ptr])
                device.memcpy_dtoh(out[:1024], ptr)
                assert (out[:1024] == seed * 100 + round_).all()
            device.mem_free(ptr)
            device.synchronize()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    with server_in_thread() as (address, _server):
        with bf.connect_sync(address, fraction=0.5) as session:
            device = session.devices[0]
            threads = [threading.Thread(target=worker, args=(device, s)) for s in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert not errors, errors[0]
            assert device.mem_get_info()[0] == device.memory_limit


def test_a_blocking_session_hears_why_the_server_closed_it() -> None:
    """A no-reply call naming a device the session does not have is fatal; the server says why
    and closes. The next blocking call raises that reason, not a bare broken pipe."""
    with server_in_thread() as (address, _server):
        with bf.connect_sync(address, fraction=0.25) as session:
            device = session.devices[0]
            driver = device._driver
            driver.post(m.MemFree(5, 0))
            with pytest.raises(bf.ProtocolError, match="device 5 is not in this session"):
                for _ in range(100):  # the write may still succeed before the close arrives
                    device.memset_d8(device.mem_alloc(16), 0, 16)
            assert session.closed
            with pytest.raises(bf.ProtocolError):
                device.synchronize()
