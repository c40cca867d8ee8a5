"""A real server and both clients over ``rdma://``, on the verbs simulator
(``BITFUSION_NET_RDMA=simulator``: the server and the client share this process's simulated
fabric), and on this host's RDMA device where there is one. With the async and the blocking
client alike, calls, copies from 0 B to 64 MiB, kernels, streams and events, and typed errors
behave as over TCP; sessions share a GPU; a client that vanishes gives its GPU back; a server
that goes away is a typed error for the next call; and the simulator sees no RNR, access,
length or overrun fault. Where RDMA cannot be used, the server and the client say which of
pyverbs, its libraries or a device is missing."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from integration_support import ClientApi, MiB, pool_is_empty, run, wait_until

import bitfusion_net as bf
from bitfusion_net.transport import rdma, rdma_ring
from bitfusion_net.transport.verbs.pyverbs_backend import unavailable


@pytest.fixture(params=["simulator", pytest.param("device", marks=pytest.mark.rdma)])
def fabric(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The server and its clients over this process's simulated fabric, or over this host's
    RDMA device (skipped, saying what is missing, where there is none)."""
    if request.param == "device":
        reason = unavailable()
        if reason is not None:
            pytest.skip(f"no RDMA here: {reason}")
        monkeypatch.delenv(rdma.PROVIDER_ENV, raising=False)
        yield
        return
    monkeypatch.setenv(rdma.PROVIDER_ENV, "simulator")
    monkeypatch.setattr(rdma_ring, "_simulated", None)  # a fresh fabric for this test
    yield
    provider = rdma_ring._simulated
    if provider is not None:
        stats = provider.fabric.stats  # type: ignore[attr-defined]
        assert stats.faults == 0, (stats.as_dict(), provider.fabric.fault_log[:5])  # type: ignore[attr-defined]


def test_a_client_works_over_rdma(fabric: None, api: ClientApi) -> None:
    async def main() -> None:
        async with bf.Server(listen="rdma://127.0.0.1:0", gpus=1, gpu_memory="1GiB") as server:
            assert server.address.startswith("rdma://127.0.0.1:")
            async with await api.connect(server.address, fraction=0.25) as session:
                device = session.devices[0]
                for size in (0, 1, 4097, MiB, 64 * MiB):
                    data = np.random.default_rng(size).integers(0, 255, size, np.uint8)
                    ptr = await device.mem_alloc(max(1, size))
                    await device.memcpy_htod(ptr, data)
                    back = np.empty_like(data)
                    await device.memcpy_dtoh(back, ptr)
                    assert (back == data).all(), size
                    await device.mem_free(ptr)
                x = np.arange(4096, dtype=np.float32)
                ptr = await device.mem_alloc(x.nbytes)
                await device.memcpy_htod(ptr, x)
                saxpy = await device.builtin("saxpy")
                await saxpy.launch(16, 256, [x.size, 2.0, ptr, ptr])
                await device.memcpy_dtoh(x, ptr)
                assert np.allclose(x, 3 * np.arange(4096))
                stream, event = await device.create_stream(), await device.create_event()
                await device.memset_d32(ptr, 7, x.size, stream=stream)
                await event.record(stream)
                await event.synchronize()
                await device.memcpy_dtoh(x, ptr)
                assert (x.view(np.uint32) == 7).all()
                with pytest.raises(bf.OutOfMemoryError):
                    await device.mem_alloc(2**30)
                with pytest.raises(bf.InvalidHandleError):
                    await device.mem_free(0x1234)
                    await device.synchronize()
                free, total = await device.mem_get_info()
                assert total == 256 * MiB and free < total
            await wait_until(lambda: pool_is_empty(server), "the lease back after the close")

    run(main())


def test_sessions_over_rdma_share_a_gpu(fabric: None, api: ClientApi) -> None:
    async def main() -> None:
        async with bf.Server(listen="rdma://127.0.0.1:0", gpus=1, gpu_memory="1GiB") as server:

            async def tenant(seed: int) -> bool:
                async with await api.connect(server.address, fraction=0.25) as session:
                    device = session.devices[0]
                    data = np.random.default_rng(seed).integers(0, 255, 3 * MiB, np.uint8)
                    ptr = await device.mem_alloc(data.nbytes)
                    back = np.empty_like(data)
                    for _ in range(5):
                        await device.memcpy_htod(ptr, data)
                        await device.memcpy_dtoh(back, ptr)
                    return bool((back == data).all())

            assert all(await asyncio.gather(*(tenant(seed) for seed in range(4))))
            await wait_until(lambda: pool_is_empty(server), "every lease back")

    run(main())


def test_a_server_that_goes_away_is_a_typed_error(fabric: None, api: ClientApi) -> None:
    async def main() -> None:
        server = bf.Server(listen="rdma://127.0.0.1:0", gpus=1, gpu_memory="1GiB")
        await server.start()
        session = await api.connect(server.address, fraction=0.25, call_timeout=20)
        device = session.devices[0]
        ptr = await device.mem_alloc(MiB)
        await server.close()
        with pytest.raises(bf.ConnectionLostError):
            await device.memcpy_dtoh(np.empty(MiB, np.uint8), ptr)
        await session.close()

    run(main())


def test_a_client_that_vanishes_gives_its_gpu_back(fabric: None) -> None:
    async def main() -> None:
        async with bf.Server(listen="rdma://127.0.0.1:0", gpus=1, gpu_memory="1GiB") as server:
            session = await bf.connect(server.address, fraction=0.5)
            await session.devices[0].mem_alloc(MiB)
            for driver in session._drivers:  # its process died: the connection just ends
                driver.stream.abort()
            await wait_until(lambda: pool_is_empty(server), "the lease back after the abort")
            await asyncio.sleep(0)

    run(main())


def _pyverbs_missing() -> None:
    if importlib.util.find_spec("pyverbs") is not None:
        pytest.skip("pyverbs is installed here: this case needs a machine without it")


def test_without_rdma_the_server_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _pyverbs_missing()
    monkeypatch.delenv(rdma.PROVIDER_ENV, raising=False)
    done = subprocess.run(
        [sys.executable, "-m", "bitfusion_net.server", "--executor", "numpy",
         "--listen", "rdma://127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "pyverbs is not installed" in done.stderr, done.stderr
    assert "listening on" not in done.stdout


def test_without_rdma_a_client_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _pyverbs_missing()
    monkeypatch.delenv(rdma.PROVIDER_ENV, raising=False)

    async def main() -> None:
        with pytest.raises(bf.BitfusionError, match="pyverbs is not installed"):
            await bf.connect("rdma://127.0.0.1:9", fraction=0.25)

    run(main())


def test_rdma_and_tcp_side_by_side_serve_the_same_gpus(fabric: None) -> None:
    async def main() -> None:
        async with bf.Server(
            listen="tcp://127.0.0.1:0", also_listen=["rdma://127.0.0.1:0"], gpus=1
        ) as server:
            tcp, over_rdma = server.addresses
            assert tcp.startswith("tcp://") and over_rdma.startswith("rdma://")
            async with await bf.connect(over_rdma, fraction=0.5):
                loop = asyncio.get_running_loop()

                def blocking_beside() -> float:  # the blocking API over TCP, to the same GPU
                    with bf.connect_sync(tcp, fraction=0.25) as session:
                        return session.devices[0].fraction

                assert await loop.run_in_executor(None, blocking_beside) == 0.25
                with pytest.raises(bf.CapacityError):  # 0.5 + 0.75 > 1: one pool of GPUs
                    await bf.connect(over_rdma, fraction=0.75)

    run(main())


def test_the_command_listens_on_every_address_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rdma.PROVIDER_ENV, "simulator")
    process = subprocess.Popen(
        [sys.executable, "-m", "bitfusion_net.server", "--executor", "numpy",
         "--listen", "tcp://127.0.0.1:0", "--listen", "rdma://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        assert first.startswith("listening on tcp://127.0.0.1:"), first
        assert second.startswith("listening on rdma://127.0.0.1:"), second
    finally:
        process.terminate()
        process.wait(30)


def test_a_wrong_device_setting_is_refused_saying_which(
    fabric: None, api: ClientApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with bf.Server(listen="rdma://127.0.0.1:0", gpus=1) as server:
            monkeypatch.setenv(f"{rdma_ring.PROVIDER_ENV}_MTU", "1500")
            with pytest.raises(bf.InvalidValueError, match="MTU must be one of"):
                await api.connect(server.address, fraction=0.25)
            monkeypatch.setenv(f"{rdma_ring.PROVIDER_ENV}_MTU", "4096")  # meets the server's 1024
            async with await api.connect(server.address, fraction=0.25) as session:
                assert await session.devices[0].mem_get_info()
            monkeypatch.setenv(f"{rdma_ring.PROVIDER_ENV}_GID_INDEX", "1000")
            with pytest.raises(ConnectionError, match="GID index 1000.*_GID_INDEX"):
                await bf.Server(listen="rdma://127.0.0.1:0").start()

    run(main())


def test_the_cli_control_connection_works_over_rdma(fabric: None) -> None:
    """What ``list_gpus`` and ``request_gpus`` open to a server: a blocking control connection,
    here over rdma://; the server's info names every address it serves."""
    from bitfusion_net.cli.control import ControlConnection

    async def main() -> None:
        async with bf.Server(
            listen="tcp://127.0.0.1:0", also_listen=["rdma://127.0.0.1:0"], gpus=2
        ) as server:

            def ask() -> dict[str, object]:
                control = ControlConnection(server.addresses[1], timeout=20)
                try:
                    return control.info()
                finally:
                    control.close()

            info = await asyncio.to_thread(ask)
            assert info["server"]["addresses"] == server.addresses  # type: ignore[index]
            assert len(info["gpus"]) == 2  # type: ignore[arg-type]

    run(main())
