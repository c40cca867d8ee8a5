"""SourceModule compiles with this machine's nvcc, then the NumPy device refuses the image."""

import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv
from pycuda.compiler import SourceModule, compile

KERNEL = """
__global__ void multiply_them(float *dest, float *a, float *b)
{
  const int i = threadIdx.x;
  dest[i] = a[i] * b[i];
}
"""

cubin = compile(KERNEL)
assert cubin[:4] == b"\x7fELF", cubin[:4]
assert compile(KERNEL) == cubin  # from the cache the second time
print("ok compiled", len(cubin))
try:
    SourceModule(KERNEL)
except drv.RuntimeError as exc:
    assert "GPU executor" in str(exc), exc
    print("ok refused:", exc)
else:
    raise AssertionError("the NumPy device loaded a cubin")
try:
    SourceModule("__global__ void broken( { }")
except drv.CompileError as exc:
    assert "error" in exc.stderr, exc.stderr
    print("ok compile error")
