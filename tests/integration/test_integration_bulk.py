"""Bulk copies: bit-exact round trips, chunking at the payload limit, and what they cost in RSS."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
from integration_support import (
    ClientApi,
    MiB,
    cli_server,
    reset_hwm,
    run,
    serve,
    vm_hwm,
    wait_released,
)

# The client of the 256 MiB round trip, in its own process so that its peak RSS is its own. Its
# baseline is taken after its two host arrays exist and are touched; what the copies add on top is
# the library's cost. The check itself runs after the last measurement (comparing allocates).
ROUND_TRIP_CLIENT = """
import json, sys
import numpy as np
import bitfusion_net as bf

def hwm():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

nbytes = 256 * 2**20
source = np.arange(nbytes // 4, dtype=np.uint32)
source *= np.uint32(2654435761)  # Knuth's multiplicative hash: every word differs, cheaply
source = source.view(np.uint8)
target = np.empty(nbytes, np.uint8)
target.fill(0)
try:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # drop the peak of building the arrays
except OSError:
    pass
baseline = hwm()
with bf.connect_sync(sys.argv[1], fraction=1.0) as session:
    device = session.devices[0]
    ptr = device.mem_alloc(nbytes)
    device.memcpy_htod(ptr, source)
    device.memcpy_dtoh(target, ptr)
    peak = hwm()
mismatches = int(np.count_nonzero(source != target))
print(json.dumps({"baseline": baseline, "peak": peak, "mismatches": mismatches}), flush=True)
"""


def test_256_mib_round_trip_is_bit_exact_and_bounded_in_rss() -> None:
    nbytes = 256 * MiB
    with cli_server("--gpu-memory", "512MiB") as server:
        reset_hwm(server.pid)
        server_before = vm_hwm(server.pid)
        result = subprocess.run(
            [sys.executable, "-c", ROUND_TRIP_CLIENT, server.address],
            capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        server_after = vm_hwm(server.pid)
        assert server.terminate() == 0, server.stderr_text()
    client = json.loads(result.stdout)
    server_growth = server_after - server_before
    client_growth = client["peak"] - client["baseline"]
    report = (
        f"server peak RSS growth {server_growth / MiB:.1f} MiB "
        f"({server_before / MiB:.1f} -> {server_after / MiB:.1f} MiB); "
        f"client peak RSS growth {client_growth / MiB:.1f} MiB "
        f"({client['baseline'] / MiB:.1f} -> {client['peak'] / MiB:.1f} MiB)"
    )
    print(report)
    assert client["mismatches"] == 0
    # The device memory itself is 256 MiB; one copy's worth of staging and some slack on top.
    assert server_growth <= nbytes + nbytes + 64 * MiB, report
    # The client copies straight from and into the caller's arrays: only slack on top.
    assert client_growth <= 64 * MiB, report


@pytest.mark.parametrize("size", [1, 255, 4096, 1 * MiB - 1, 1 * MiB, 3 * MiB + 7])
def test_copies_split_at_the_payload_limit_are_exact(size: int, api: ClientApi) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)

    async def main() -> None:
        async with serve(max_payload="1MiB") as server:
            async with api.connect(server.address, fraction=0.25) as session:
                assert session.max_payload == MiB
                device = session.devices[0]
                pad = 512
                ptr = await device.mem_alloc(size + 2 * pad)
                await device.memset_d8(ptr, 0xEE, size + 2 * pad)
                await device.memcpy_htod(ptr + pad, data)  # at an offset inside the allocation
                out = np.empty(size + 2 * pad, np.uint8)
                await device.memcpy_dtoh(out, ptr)
                np.testing.assert_array_equal(out[pad : pad + size], data)
                assert (out[:pad] == 0xEE).all() and (out[pad + size :] == 0xEE).all()
                middle = np.empty(size, np.uint8)
                await device.memcpy_dtoh(middle, ptr + pad)
                np.testing.assert_array_equal(middle, data)
            await wait_released(server)

    run(main())


def test_host_buffer_kinds_and_device_to_device_copies(api: ClientApi) -> None:
    matrix = np.random.default_rng(3).standard_normal((64, 33)).astype(np.float32)

    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.25) as session:
            device = session.devices[0]
            nbytes = matrix.nbytes
            a, b = await device.mem_alloc(nbytes), await device.mem_alloc(nbytes)
            for source in (matrix, matrix.tobytes(), bytearray(matrix.tobytes()),
                           memoryview(matrix.tobytes())):  # fmt: skip
                await device.memset_d8(a, 0, nbytes)
                await device.memcpy_htod(a, source)
                out = np.empty_like(matrix)  # 2-D destination
                await device.memcpy_dtoh(out, a)
                np.testing.assert_array_equal(out, matrix)
            into = bytearray(nbytes)
            await device.memcpy_dtoh(into, a)
            assert bytes(into) == matrix.tobytes()

            await device.memcpy_dtod(b, a, nbytes)
            await device.memcpy_dtod(a + 4, a, nbytes - 4)  # overlapping: behaves like memmove
            flat = matrix.reshape(-1)
            out = np.empty_like(flat)
            await device.memcpy_dtoh(out, b)
            np.testing.assert_array_equal(out, flat)
            await device.memcpy_dtoh(out, a)
            np.testing.assert_array_equal(out[1:], flat[:-1])

            await device.memset_d32(b, 0x01020304, nbytes // 4)
            words = np.empty(nbytes // 4, np.uint32)
            await device.memcpy_dtoh(words, b)
            assert (words == 0x01020304).all()
            await device.memcpy_htod(b, b"")  # empty copies are no-ops
            await device.memcpy_dtoh(bytearray(), b)
            await device.synchronize()

    run(main())


def test_large_copies_from_several_tenants_interleave_correctly(api: ClientApi) -> None:
    async def tenant(address: str, seed: int) -> None:
        data = np.random.default_rng(seed).integers(0, 256, 24 * MiB + seed, dtype=np.uint8)
        async with api.connect(address, fraction=0.2) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(data.nbytes)
            await device.memcpy_htod(ptr, data)
            out = np.empty_like(data)
            await device.memcpy_dtoh(out, ptr)
            np.testing.assert_array_equal(out, data)

    async def main() -> None:
        async with serve(max_payload="4MiB") as server:
            await asyncio.gather(*(tenant(server.address, seed) for seed in range(4)))
            await wait_released(server)

    run(main())
