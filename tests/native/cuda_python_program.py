"""A cuda-python program that knows nothing of bitfusion-net (tests/native/test_agent.py runs it
under ``bitfusion-net run``): device queries, contexts, memory, copies, memsets, streams, events,
a built-in kernel launched through ``cuLaunchKernel``, and a PTX module the NumPy device refuses.
Prints "ok STEP" per step and "ALL OK" at the end; any failed check raises."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
from cuda.bindings import driver as cu

R = cu.CUresult


def ok(result: tuple) -> object:  # type: ignore[type-arg]
    """The values of a call that must succeed."""
    error, *values = result
    assert error == R.CUDA_SUCCESS, f"{error!r}"
    return values[0] if len(values) == 1 else tuple(values) or None


def fails(result: tuple, expected: R) -> None:  # type: ignore[type-arg]
    assert result[0] == expected, f"{result[0]!r}, expected {expected!r}"


def main() -> int:
    ok(cu.cuInit(0))
    assert ok(cu.cuDriverGetVersion()) >= 12000
    assert ok(cu.cuDeviceGetCount()) == 1
    dev = ok(cu.cuDeviceGet(0))
    name = ok(cu.cuDeviceGetName(64, dev))
    assert name.rstrip(b"\0 ").decode() == "NumPy reference device", name
    total = ok(cu.cuDeviceTotalMem(dev))
    assert total == 512 << 20, total  # half of the server's 1 GiB GPU: the lease
    major = ok(
        cu.cuDeviceGetAttribute(
            cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev
        )
    )
    sms = ok(
        cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
    )
    assert major == 8 and sms >= 1
    print("ok devices", flush=True)

    primary = ok(cu.cuDevicePrimaryCtxRetain(dev))
    ctx = ok(cu.cuCtxCreate(None, 0, dev))
    assert int(ok(cu.cuCtxGetCurrent())) == int(ctx)
    assert int(ok(cu.cuCtxGetDevice())) == int(dev)
    ok(cu.cuCtxPushCurrent(primary))
    assert int(ok(cu.cuCtxPopCurrent())) == int(primary)
    assert int(ok(cu.cuCtxGetCurrent())) == int(ctx)
    print("ok contexts", flush=True)

    free, total = ok(cu.cuMemGetInfo())
    assert total == 512 << 20 and 0 < free <= total
    n = 3 << 18  # 768 Ki floats: 3 MiB, several max_payload pieces
    ptr = ok(cu.cuMemAlloc(n * 4))
    base, size = ok(cu.cuMemGetAddressRange(int(ptr) + 64))
    assert int(base) == int(ptr) and size == n * 4
    memtype = ok(
        cu.cuPointerGetAttribute(cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr)
    )
    assert memtype == cu.CUmemorytype.CU_MEMORYTYPE_DEVICE
    fails(cu.cuMemAlloc(1 << 40), R.CUDA_ERROR_OUT_OF_MEMORY)
    print("ok memory", flush=True)

    host = np.arange(n, dtype=np.float32)
    back = np.zeros_like(host)
    ok(cu.cuMemcpyHtoD(ptr, host.ctypes.data, host.nbytes))
    other = ok(cu.cuMemAlloc(n * 4))
    ok(cu.cuMemcpyDtoD(other, ptr, host.nbytes))
    ok(cu.cuMemcpyDtoH(back.ctypes.data, other, back.nbytes))
    assert np.array_equal(host, back)
    stream = ok(cu.cuStreamCreate(0))
    back[:] = 0
    ok(cu.cuMemcpyHtoDAsync(ptr, host.ctypes.data, 4096, stream))
    ok(cu.cuMemcpyDtoHAsync(back.ctypes.data, ptr, 4096, stream))
    ok(cu.cuStreamSynchronize(stream))
    assert np.array_equal(host[:1024], back[:1024])
    print("ok copies", flush=True)

    ok(cu.cuMemsetD32(ptr, 0x3F800000, n))  # 1.0f
    ok(cu.cuMemsetD8Async(other, 0, n * 4, stream))
    ok(cu.cuMemsetD16(other, 0x4000, 2))  # the top half of 2.0f... in the first float
    ok(cu.cuMemcpyDtoH(back.ctypes.data, ptr, back.nbytes))
    assert np.all(back == 1.0)
    words = np.zeros(4, dtype=np.uint16)
    ok(cu.cuMemcpyDtoH(words.ctypes.data, other, words.nbytes))
    assert list(words) == [0x4000, 0x4000, 0, 0], list(words)
    print("ok memsets", flush=True)

    start = ok(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT))
    end = ok(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT))
    ok(cu.cuEventRecord(start, stream))
    ok(cu.cuMemsetD32Async(ptr, 0, n, stream))
    ok(cu.cuEventRecord(end, stream))
    ok(cu.cuStreamWaitEvent(None, end, 0))
    ok(cu.cuEventSynchronize(end))
    ok(cu.cuEventQuery(end))
    ok(cu.cuStreamQuery(stream))
    assert ok(cu.cuEventElapsedTime(start, end)) >= 0.0
    ok(cu.cuEventDestroy(start))
    ok(cu.cuEventDestroy(end))
    ok(cu.cuStreamDestroy(stream))
    print("ok streams and events", flush=True)

    ptx = b".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry k(.param .u64 p)\n{\n ret;\n}\n\0"
    fails(cu.cuModuleLoadData(ptx), R.CUDA_ERROR_NOT_SUPPORTED)
    builtins = ok(cu.cuModuleLoadData(b"bitfusion-net:builtin\0"))
    saxpy = ok(cu.cuModuleGetFunction(builtins, b"saxpy"))
    x = np.arange(1000, dtype=np.float32)
    dx, dy = ok(cu.cuMemAlloc(x.nbytes)), ok(cu.cuMemAlloc(x.nbytes))
    ok(cu.cuMemcpyHtoD(dx, x.ctypes.data, x.nbytes))
    ok(cu.cuMemsetD32(dy, 0x3F800000, 1000))
    args = (
        (1000, 3.0, int(dx), int(dy)),
        (ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p),
    )
    ok(cu.cuLaunchKernel(saxpy, 4, 1, 1, 256, 1, 1, 0, None, args, 0))
    ok(cu.cuCtxSynchronize())
    y = np.zeros_like(x)
    ok(cu.cuMemcpyDtoH(y.ctypes.data, dy, y.nbytes))
    assert np.allclose(y, 3.0 * x + 1.0)
    ok(cu.cuModuleUnload(builtins))
    print("ok modules", flush=True)

    for p in (ptr, other, dx, dy):
        ok(cu.cuMemFree(p))
    ok(cu.cuCtxDestroy(ctx))
    ok(cu.cuDevicePrimaryCtxRelease(dev))
    print("ALL OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
