"""On a GPU executor: SourceModule kernels (PyCUDA's hello_gpu), prepared invocation, globals,
gpuarray arithmetic through compiled elementwise kernels, timed calls and events."""

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv
import pycuda.gpuarray as gpuarray
from pycuda.compiler import SourceModule

mod = SourceModule("""
__global__ void multiply_them(float *dest, float *a, float *b)
{
  const int i = threadIdx.x;
  dest[i] = a[i] * b[i];
}
__device__ float scale;
__global__ void scale_them(float *x)
{
  x[threadIdx.x] *= scale;
}
""")
multiply_them = mod.get_function("multiply_them")
rng = np.random.default_rng(3)
a = rng.standard_normal(400).astype(np.float32)
b = rng.standard_normal(400).astype(np.float32)
dest = np.zeros_like(a)
multiply_them(drv.Out(dest), drv.In(a), drv.In(b), block=(400, 1, 1), grid=(1, 1))
assert np.allclose(dest, a * b)
print("ok hello_gpu")

a_gpu, b_gpu, d_gpu = drv.to_device(a), drv.to_device(b), drv.mem_alloc(a.nbytes)
multiply_them.prepare("PPP")
multiply_them.prepared_call((1, 1), (400, 1, 1), d_gpu, a_gpu, b_gpu)
assert np.allclose(drv.from_device_like(d_gpu, a), a * b)
seconds = multiply_them.prepared_timed_call((1, 1), (400, 1, 1), d_gpu, a_gpu, b_gpu)()
assert seconds > 0
print("ok prepared invocation")

address, size = mod.get_global("scale")
assert size == 4
drv.memcpy_htod(address, np.float32(3))
mod.get_function("scale_them")(d_gpu, block=(400, 1, 1))
assert np.allclose(drv.from_device_like(d_gpu, a), 3 * a * b)
print("ok globals")

x = gpuarray.to_gpu(np.arange(100, dtype=np.float64))
y = (x * 2 + 1) / 4 - x
assert np.allclose(y.get(), (np.arange(100) * 2 + 1) / 4 - np.arange(100))
ones = gpuarray.to_gpu(np.ones(10)).fill(1.5)
assert (ones.get() == 1.5).all()
ints = gpuarray.to_gpu(np.arange(10, dtype=np.int32))
assert ((ints * ints).get() == np.arange(10) ** 2).all()
print("ok gpuarray arithmetic")

start, end = drv.Event(), drv.Event()
start.record()
elapsed = multiply_them(d_gpu, a_gpu, b_gpu, block=(400, 1, 1), time_kernel=True)
end.record()
end.synchronize()
assert elapsed > 0 and start.time_till(end) > 0 and end.query()
stream = drv.Stream()
multiply_them(d_gpu, a_gpu, b_gpu, block=(400, 1, 1), stream=stream)
stream.synchronize()
assert stream.is_done()
print("ok timed calls and events")
