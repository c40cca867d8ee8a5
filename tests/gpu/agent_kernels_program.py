"""A cuda-python program that knows nothing of bitfusion-net (tests/gpu/test_agent_gpu.py runs it
under ``bitfusion-net run`` against a GPU server): the same kernel from PTX, from a cubin and from
a fatbin, each loaded with ``cuModuleLoadData`` and launched with ``cuLaunchKernel``, both with
``kernelParams`` and with ``extra``. Argument: a directory holding scale.ptx, scale.cubin and
scale.fatbin. Prints "ok IMAGE" per image and "ALL OK"."""

from __future__ import annotations

import ctypes
import struct
import sys
from pathlib import Path

import numpy as np
from cuda.bindings import driver as cu

R = cu.CUresult
N = 4096


def ok(result: tuple) -> object:  # type: ignore[type-arg]
    error, *values = result
    assert error == R.CUDA_SUCCESS, f"{error!r}"
    return values[0] if len(values) == 1 else tuple(values) or None


def main(images: Path) -> int:
    ok(cu.cuInit(0))
    dev = ok(cu.cuDeviceGet(0))
    ctx = ok(cu.cuDevicePrimaryCtxRetain(dev))
    ok(cu.cuCtxSetCurrent(ctx))
    x = np.arange(N, dtype=np.float32)
    dx = ok(cu.cuMemAlloc(x.nbytes))
    for kind in ("ptx", "cubin", "fatbin"):
        data = (images / f"scale.{kind}").read_bytes() + (b"\0" if kind == "ptx" else b"")
        module = ok(cu.cuModuleLoadData(data))
        scale = ok(cu.cuModuleGetFunction(module, b"scale"))
        ok(cu.cuMemcpyHtoD(dx, x.ctypes.data, x.nbytes))
        params = ((int(dx), 2.0, N), (ctypes.c_void_p, ctypes.c_float, ctypes.c_int))
        ok(cu.cuLaunchKernel(scale, N // 256, 1, 1, 256, 1, 1, 0, None, params, 0))
        # the same launch packed by the caller: CU_LAUNCH_PARAM_BUFFER_POINTER/SIZE/END
        packed = struct.pack("<Qfi", int(dx), 3.0, N)
        buffer = ctypes.create_string_buffer(packed, len(packed))
        size = ctypes.c_size_t(len(packed))
        extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(buffer), 2, ctypes.addressof(size), 0)
        ok(cu.cuLaunchKernel(scale, N // 256, 1, 1, 256, 1, 1, 0, None, 0, ctypes.addressof(extra)))
        ok(cu.cuCtxSynchronize())
        y = np.zeros_like(x)
        ok(cu.cuMemcpyDtoH(y.ctypes.data, dx, y.nbytes))
        assert np.allclose(y, 6.0 * x), (kind, y[:4])
        ok(cu.cuModuleUnload(module))
        print(f"ok {kind}", flush=True)
    ok(cu.cuMemFree(dx))
    ok(cu.cuDevicePrimaryCtxRelease(dev))
    print("ALL OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
