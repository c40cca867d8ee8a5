"""CUDA calls a PyCUDA-compatible layer needs, end to end on both APIs: device attributes,
16-bit memsets, stream and event queries, stream waits and module globals (PROTOCOL.md 6).

Each test drives a real in-process server on the NumPy reference device through the public API,
once with the async client and once with the blocking one (the ``api`` fixture).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from integration_support import ClientApi, OverBlocking, run, serve, wait_released

import bitfusion_net as bf
from bitfusion_net.protocol import Opcode

# CUdevice_attribute numbers (CUDA's cuda.h).
MAX_THREADS_PER_BLOCK, MAX_BLOCK_DIM_X, WARP_SIZE, PCI_BUS_ID = 1, 2, 10, 33
COMPUTE_CAPABILITY_MAJOR, COMPUTE_CAPABILITY_MINOR = 75, 76


def module_handle(device: Any, handle: int) -> Any:
    """The API's module object for ``handle`` on ``device`` (module 0: the built-in library,
    which no call returns as a module, since nothing can be loaded into or out of it)."""
    if isinstance(device, OverBlocking):
        return OverBlocking(bf.SyncModule(device._target, handle))
    return bf.Module(device, handle)


def test_device_attributes_are_asked_once_per_device(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpus=2) as server:
            async with api.connect(server.address, gpus=2, fraction=0.5) as session:
                first, second = session.devices
                attributes = await first.attributes()
                assert attributes[MAX_THREADS_PER_BLOCK] == 1024
                assert attributes[MAX_BLOCK_DIM_X] == 1024 and attributes[WARP_SIZE] == 32
                capability = (
                    attributes[COMPUTE_CAPABILITY_MAJOR],
                    attributes[COMPUTE_CAPABILITY_MINOR],
                )
                assert capability == (8, 0)
                attributes.clear()  # the caller's copy: the device's answer stays as it came
                again = await first.attributes()
                assert again[COMPUTE_CAPABILITY_MAJOR] == 8
                # Answered from the client's cache: the server was asked once.
                assert server.stats.requests[Opcode.DEVICE_ATTRIBUTES] == 1
                theirs = await second.attributes()
                assert server.stats.requests[Opcode.DEVICE_ATTRIBUTES] == 2
                # Two GPUs of one server: the same kind of device, told apart by its PCI bus.
                assert {theirs[PCI_BUS_ID], again[PCI_BUS_ID]} == {0, 1}
                assert {**theirs, PCI_BUS_ID: 0} == {**again, PCI_BUS_ID: 0}
            await wait_released(server)

    run(main())


def test_memset_d16(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server:
            async with api.connect(server.address, fraction=0.5) as session:
                device = session.devices[0]
                stream = await device.create_stream()
                ptr = await device.mem_alloc(64)
                await device.memset_d8(ptr, 0, 64)
                await device.memset_d16(ptr + 2, 0xBEEF, 30, stream=stream)
                out = np.empty(32, np.uint16)
                await device.memcpy_dtoh(out, ptr)
                assert out.tolist() == [0] + [0xBEEF] * 30 + [0]
                for bad in (-1, 0x1_0000, 1.5):  # refused here: nothing is sent
                    with pytest.raises(bf.InvalidValueError, match="memset value"):
                        await device.memset_d16(ptr, bad, 1)
                await device.memset_d16(ptr + 1, 0, 1)  # not 2-byte aligned: sticky, on the server
                with pytest.raises(bf.InvalidValueError, match="2-byte-aligned") as caught:
                    await device.synchronize()
                assert caught.value.deferred_from is not None
                await device.memset_d16(ptr + 62, 1, 2)  # past the end of the allocation
                with pytest.raises(bf.InvalidHandleError):
                    await device.synchronize()
                await device.memcpy_dtoh(out, ptr)
                assert out.tolist() == [0] + [0xBEEF] * 30 + [0]  # neither failure wrote anything
            await wait_released(server)

    run(main())


def test_stream_and_event_queries_and_waits(api: ClientApi) -> None:
    async def main() -> None:
        async with serve(gpus=2) as server:
            async with api.connect(server.address, gpus=2, fraction=0.5) as session:
                device, other = session.devices
                producer, consumer = await device.create_stream(), await device.create_stream()
                ready = await device.create_event()
                assert await ready.query() is True  # never recorded: reached, as in CUDA
                n = 4096
                ptr = await device.mem_alloc(2 * n * 4)
                fill = await device.builtin("fill")
                await fill.launch(16, 256, [n, 3.0, ptr], stream=producer)
                await ready.record(producer)
                await consumer.wait_event(ready)
                await device.memcpy_dtod(ptr + n * 4, ptr, n * 4, stream=consumer)
                assert await consumer.query() is True  # the reference device finishes each call
                assert await producer.query() is True
                assert await ready.query() is True
                out = np.empty(2 * n, np.float32)
                await device.memcpy_dtoh(out, ptr)
                np.testing.assert_array_equal(out, np.full(2 * n, 3.0, np.float32))
                # An event of another device is refused here, before anything is sent.
                elsewhere = await other.create_event()
                with pytest.raises(bf.InvalidValueError, match="its own device"):
                    await consumer.wait_event(elsewhere)
                # Handles that are no longer the lease's: INVALID_HANDLE, as for the other calls.
                await producer.destroy()
                await ready.destroy()
                with pytest.raises(bf.InvalidHandleError):
                    await producer.query()
                with pytest.raises(bf.InvalidHandleError):
                    await ready.query()
                await consumer.wait_event(ready)  # no reply: the failure is sticky
                with pytest.raises(bf.InvalidHandleError) as caught:
                    await device.synchronize()
                assert caught.value.deferred_from is not None
                await device.synchronize()  # reported once
            await wait_released(server)

    run(main())


def test_module_globals(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server:
            async with api.connect(server.address, fraction=0.5) as session:
                device = session.devices[0]
                with pytest.raises(bf.InvalidValueError, match="'lookup_table'"):
                    await module_handle(device, 0).get_global("lookup_table")
                with pytest.raises(bf.InvalidHandleError, match="module 42 is not loaded"):
                    await module_handle(device, 42).get_global("lookup_table")
                with pytest.raises(bf.InvalidValueError, match="name is a string"):
                    await module_handle(device, 0).get_global(b"lookup_table")
                await device.synchronize()  # none of them left a sticky error
            await wait_released(server)

    run(main())
