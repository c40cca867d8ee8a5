"""gpuarray round trips, zeros, fill, slices and float32 arithmetic (the server's built-ins)."""

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv
import pycuda.gpuarray as gpuarray

a = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
a_gpu = gpuarray.to_gpu(a)
assert a_gpu.shape == (64, 32) and a_gpu.dtype == np.float32 and a_gpu.size == 2048
assert a_gpu.nbytes == a.nbytes and a_gpu.strides == a.strides and len(a_gpu) == 64
assert (a_gpu.get() == a).all()
print("ok to_gpu get")

z = gpuarray.zeros((10,), np.int32)
assert (z.get() == 0).all()
z.fill(7)
assert (z.get() == 7).all()
f = gpuarray.empty((100,), np.float32).fill(2.5)
assert (f.get() == 2.5).all()
d = gpuarray.zeros_like(gpuarray.to_gpu(np.ones(8))).fill(0)
assert (d.get() == 0).all()
print("ok zeros fill")

s = a_gpu[10:20]
assert s.shape == (10, 32) and (s.get() == a[10:20]).all()
s.set(np.zeros((10, 32), np.float32))
assert (a_gpu.get()[10:20] == 0).all() and (a_gpu.get()[:10] == a[:10]).all()
assert (a_gpu.copy().get() == a_gpu.get()).all()
assert (a_gpu.reshape(2048).get() == a_gpu.get().ravel()).all()
print("ok slices")

x = gpuarray.to_gpu(np.arange(16, dtype=np.float32))
y = gpuarray.to_gpu(np.full(16, 10, np.float32))
assert np.allclose((x + y).get(), np.arange(16) + 10)
assert np.allclose((y - x).get(), 10 - np.arange(16))
assert np.allclose((x * 3).get(), np.arange(16) * 3)
assert np.allclose((2 * x + 1).get(), np.arange(16) * 2 + 1)
assert np.allclose((x / 2).get(), np.arange(16) / 2)
assert np.allclose((-x).get(), -np.arange(16))
print("ok float32 arithmetic")

assert (gpuarray.arange(5, dtype=np.int32).get() == np.arange(5)).all()
try:
    gpuarray.to_gpu(np.ones(4)).fill(1.5)  # float64 1.5 repeats no byte pattern: a kernel
except drv.Error as exc:
    assert "GPU executor" in str(exc) or "nvcc" in str(exc), exc
    print("ok needs a kernel:", type(exc).__name__)
