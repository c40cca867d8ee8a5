"""Sessions ending, cleanly or not: every way a client goes away gives its lease back."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import numpy as np
import pytest
from integration_support import (
    PROCESS_START_S,
    WAIT_S,
    ClientApi,
    GiB,
    cli_server,
    run,
    serve,
    wait_released,
    wait_tenants,
)

import bitfusion_net as bf

# A client that leases a whole GPU, allocates 256 MiB and copies it over and over one way.
# It prints "copying" once the first copy is through, so the kill lands in the middle of a later
# one.
COPY_CLIENT = """
import sys
import numpy as np
import bitfusion_net as bf

address, direction = sys.argv[1], sys.argv[2]
nbytes = 256 * 2**20
host = np.full(nbytes, 0x5A, np.uint8)
with bf.connect_sync(address, fraction=1.0, client_name="doomed") as session:
    device = session.devices[0]
    ptr = device.mem_alloc(nbytes)
    if direction == "dtoh":
        device.memcpy_htod(ptr, host)
        device.synchronize()
    first = True
    while True:
        if direction == "htod":
            device.memcpy_htod(ptr, host)
        else:
            device.memcpy_dtoh(host, ptr)
        if first:
            print("copying", flush=True)
            first = False
"""


async def _start_copy_client(address: str, direction: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", COPY_CLIENT, address, direction,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(PROCESS_START_S):
            line = await proc.stdout.readline()  # type: ignore[union-attr]
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert line == b"copying\n", f"the client failed to start (exit {proc.returncode})"
    return proc


async def _assert_whole_gpu_is_free(address: str) -> None:
    async with bf.connect(address, fraction=1.0) as session:
        device = session.devices[0]
        assert await device.mem_get_info() == (GiB, GiB)
        ptr = await device.mem_alloc(GiB)  # all of it (NumPy pages stay untouched)
        await device.mem_free(ptr)
        await device.synchronize()


@pytest.mark.parametrize("direction", ["htod", "dtoh"])
def test_sigkill_mid_copy_releases_the_lease(direction: str) -> None:
    async def main() -> None:
        async with serve(gpu_memory="1GiB") as server:
            proc = await _start_copy_client(server.address, direction)
            assert server.gpus()[0]["tenants"] == 1
            assert server.gpus()[0]["leased_fraction"] == 1.0
            assert [s["client"] for s in server.sessions()] == ["doomed"]
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
            await wait_released(server)
            await _assert_whole_gpu_is_free(server.address)
            await wait_released(server)

    run(main())


def test_sigkill_mid_copy_against_the_cli_server(api: ClientApi) -> None:
    """The same against ``python -m bitfusion_net.server`` (uvloop when installed)."""

    async def lease_whole_gpu(address: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:  # the server releases the lease asynchronously: retry until it has
            try:
                await _assert_whole_gpu_is_free(address)
                return
            except bf.CapacityError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def main(address: str) -> None:
        proc = await _start_copy_client(address, "dtoh")
        with pytest.raises(bf.CapacityError):  # the doomed client holds the GPU
            await api.connect(address, fraction=0.05)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await lease_whole_gpu(address)

    with cli_server("--gpu-memory", "1GiB") as server:
        run(main(server.address))
        assert server.proc.poll() is None  # still serving
        assert server.terminate() == 0


def test_closing_a_session_releases_its_lease(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpus=2) as server:
            async with api.connect(server.address, gpus=2, fraction=0.5, client_name="tidy") as s:
                ptr = await s.devices[1].mem_alloc(1024)
                await s.devices[1].memset_d8(ptr, 1, 1024)
                (status,) = server.sessions()
                assert status["client"] == "tidy"
                assert sorted(lease["gpu"] for lease in status["leases"]) == [0, 1]
                assert all(lease["fraction"] == 0.5 for lease in status["leases"])
                assert not s.closed
            assert s.closed
            with pytest.raises(bf.ConnectionLostError):
                await s.devices[0].mem_get_info()
            await wait_released(server)

    run(main())


def test_close_with_no_reply_work_still_queued(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server:
            session = await api.connect(server.address, fraction=0.5)
            device = session.devices[0]
            ptr = await device.mem_alloc(1 << 20)
            await device.memcpy_htod(ptr, np.ones(1 << 20, np.uint8))
            await device.mem_free(ptr)
            await session.close()  # nothing waited for the copy or the free
            await session.close()  # idempotent
            assert session.closed
            await wait_released(server)

    run(main())


def test_many_sessions_in_a_row_leave_nothing_behind(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server:
            for i in range(25):
                async with api.connect(server.address, fraction=1.0) as session:
                    await session.devices[0].mem_alloc(1 << 20)
                await wait_released(server)  # before the next whole-GPU lease can fit
                assert not server.sessions(), i

    run(main())


def test_server_going_away_fails_pending_and_later_calls(api: ClientApi) -> None:
    async def main() -> None:
        server = bf.Server("tcp://127.0.0.1:0", gpu_memory="1GiB")
        await server.start()
        try:
            session = await api.connect(server.address, fraction=0.5)
            device = session.devices[0]
            busy = await device.builtin("busy")
            await busy.launch(1, 1, [300_000])  # keeps the device busy while the server closes
            pending = asyncio.ensure_future(device.synchronize())
            await wait_tenants(server, 1)
        finally:
            await server.close()
        with pytest.raises(bf.ConnectionLostError):
            await pending
        assert session.closed
        with pytest.raises(bf.ConnectionLostError):
            await device.mem_get_info()
        with pytest.raises(bf.ConnectionLostError):
            await device.memset_d8(0, 0, 1)
        await session.close()

    run(main())
