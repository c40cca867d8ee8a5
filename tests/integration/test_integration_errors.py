"""Errors through the network: sticky asynchronous errors, typed exceptions, local checks."""

from __future__ import annotations

import numpy as np
import pytest
from integration_support import ClientApi, run, serve

import bitfusion_net as bf

F32 = np.float32


def test_bad_launch_is_sticky_until_the_next_synchronize(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(1024 * 4)
            fill = await device.builtin("fill")
            await fill.launch(4, 256, [2048, 1.0, ptr])  # n past the end: returns without error
            with pytest.raises(bf.KernelError) as caught:
                await device.synchronize()
            error = caught.value
            assert isinstance(error.deferred_from, int) and error.deferred_from > 0
            assert error.later_failures == 0
            assert "illegal address" in error.message
            assert f"#{error.deferred_from}" in str(error)

            await device.synchronize()  # the error was reported once; the next call succeeds
            await fill.launch(4, 256, [1024, 5.0, ptr])  # and the tenant still works
            out = np.empty(1024, F32)
            await device.memcpy_dtoh(out, ptr)
            assert (out == 5.0).all()

    run(main())


def test_later_failures_are_counted_and_the_first_error_wins(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(256)
            await (await device.builtin("fill")).launch(1, 1, [1000, 1.0, ptr])  # KernelError
            await device.memset_d8(ptr, 0, 10_000)  # InvalidHandleError
            await device.mem_free(ptr + 1)  # InvalidHandleError
            with pytest.raises(bf.KernelError) as caught:
                await device.synchronize()
            assert caught.value.later_failures == 2
            assert "2 later call(s) failed too" in str(caught.value)
            await device.synchronize()

    run(main())


def test_sticky_error_surfaces_at_any_call_that_waits_and_that_call_does_not_run(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(256)
            await device.memset_d32(ptr, 1, 1000)  # out of bounds
            with pytest.raises(bf.InvalidHandleError) as caught:
                await device.mem_alloc(1 * 2**20)
            assert caught.value.deferred_from is not None
            # The allocation that carried the error was not made.
            assert (await device.mem_get_info())[0] == device.memory_limit - 256

    run(main())


def test_bad_launch_geometry_and_handles_are_deferred_invalid_value_errors(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(1024)
            fill = await device.builtin("fill")
            await fill.launch(1, (1024, 2), [1, 1.0, ptr])  # 2048 threads per block
            with pytest.raises(bf.InvalidValueError) as caught:
                await device.synchronize()
            assert caught.value.deferred_from is not None
            await fill.launch(1, 1, [1, 1.0, ptr], shared_mem=1 << 20)
            with pytest.raises(bf.InvalidValueError):
                await device.synchronize()
            await fill.launch(1, 1, [-1, 1.0, ptr])  # negative size
            with pytest.raises(bf.InvalidValueError):
                await device.synchronize()

            stream = await device.create_stream()
            await stream.destroy()
            await fill.launch(1, 1, [1, 1.0, ptr], stream=stream)  # a destroyed stream
            with pytest.raises(bf.InvalidHandleError):
                await device.synchronize()
            await device.synchronize()

    run(main())


def test_wrong_argument_count_and_types_raise_invalid_value_locally(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            ptr = await device.mem_alloc(1024)
            fill = await device.builtin("fill")  # "ifP"
            for args in (
                [],
                [1, 1.0],
                [1, 1.0, ptr, 4],
                [1.5, 1.0, ptr],  # float for an int
                ["1", 1.0, ptr],
                [True, 1.0, ptr],  # a bool is not a size
                [1, "1.0", ptr],  # str for a float
                [1, 1.0, 3.5],  # float for a pointer
                [1, 1.0, None],
            ):
                with pytest.raises(bf.InvalidValueError):
                    await fill.launch(1, 1, args)
            with pytest.raises(bf.InvalidValueError):
                await (await device.builtin("gemm")).launch(1, 1, [1, 1, 1, 1.0, ptr, ptr, 1.0])
            # An int that does not fit its C type is an invalid value, still caught locally.
            with pytest.raises(bf.InvalidValueError):
                await fill.launch(1, 1, [2**40, 1.0, ptr])
            with pytest.raises(bf.InvalidValueError):
                await fill.launch(0, 1, [1, 1.0, ptr])  # a grid of 0 blocks
            with pytest.raises(bf.InvalidValueError):
                await fill.launch((1, 1, 1, 1), 1, [1, 1.0, ptr])
            with pytest.raises(bf.InvalidValueError):
                await device.memset_d8(ptr, 256, 1)  # does not fit a byte
            with pytest.raises(bf.InvalidValueError):
                await device.memset_d32(ptr, -1, 1)
            # Nothing was sent, so nothing is pending on the server.
            await device.synchronize()
            # numpy scalars are accepted where Python numbers are.
            await fill.launch(1, 1, [np.int64(256), np.float32(2.0), ptr])
            out = np.empty(256, F32)
            await device.memcpy_dtoh(out, ptr)
            assert (out == 2.0).all()

    run(main())


def test_typed_errors_of_calls_that_wait(api: ClientApi) -> None:
    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            device = session.devices[0]
            with pytest.raises(bf.InvalidHandleError):
                await device.builtin("no_such_kernel")
            with pytest.raises(bf.UnsupportedError):
                await device.module_load(b"// PTX\n.version 7.0\n")
            with pytest.raises(bf.InvalidHandleError):
                await device.memcpy_dtoh(np.zeros(8, np.uint8), 0x1234)
            ptr = await device.mem_alloc(64)
            with pytest.raises(bf.InvalidValueError):  # a read-only host buffer
                await device.memcpy_dtoh(b"\0" * 64, ptr)
            with pytest.raises(bf.InvalidValueError):  # not contiguous
                await device.memcpy_htod(ptr, np.zeros((8, 8), np.uint8)[:, ::2])
            with pytest.raises(bf.InvalidHandleError):  # past the end of the allocation
                await device.memcpy_dtoh(np.zeros(65, np.uint8), ptr)
            start, end = await device.create_event(), await device.create_event()
            await start.record()
            with pytest.raises(bf.InvalidValueError):  # ``end`` was never recorded
                await start.elapsed_ms(end)
            await device.synchronize()

    run(main())


def test_error_hierarchy() -> None:
    for cls in (bf.OutOfMemoryError, bf.CapacityError, bf.InvalidHandleError,
                bf.InvalidValueError, bf.ProtocolError, bf.ConnectionLostError, bf.KernelError,
                bf.UnsupportedError):  # fmt: skip
        assert issubclass(cls, bf.BitfusionError)
    assert issubclass(bf.OutOfMemoryError, MemoryError)
    assert issubclass(bf.InvalidValueError, ValueError)


def test_staging_buffers_come_back_when_copies_fail_or_never_run(api: ClientApi) -> None:
    # The device's staging memory (pinned on GPUs) is reused from a pool: a copy that fails, or
    # that is skipped because an earlier call failed, must still give its buffer back.
    size = 256 * 1024

    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.1) as session:
            pool = server._executors[0]._staging  # white box: the NumPy device's pool
            device = session.devices[0]
            ptr = await device.mem_alloc(size)
            data = np.zeros(size, np.uint8)
            await device.memcpy_htod(ptr, data)
            await device.synchronize()
            before = pool._idle_bytes
            out = np.empty(size, np.uint8)
            with pytest.raises(bf.InvalidHandleError):
                await device.memcpy_dtoh(out, ptr + 1)  # 1 byte past the allocation
            assert pool._idle_bytes == before  # the refused copy's buffer is back
            fill = await device.builtin("fill")
            await fill.launch(1, 1, [size, 1.0, ptr])  # out of bounds: a sticky error
            with pytest.raises(bf.KernelError):
                await device.memcpy_dtoh(out, ptr)  # skipped for the earlier error
            assert pool._idle_bytes == before
            await device.memcpy_dtoh(out, ptr)  # and the next copy reuses it
            assert pool._idle_bytes == before

    run(main())
