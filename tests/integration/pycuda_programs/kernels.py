"""Kernel calls PyCUDA's way, on the server's built-in kernels: __call__ with In/Out/InOut,
prepare and the prepared calls, timed calls; and PyCUDA's argument rules."""

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv

from bitfusion_net.pycuda_compat import builtin

n = 4096
x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
y = np.ones(n, np.float32)
saxpy = builtin("saxpy")  # y = a*x + y

expected = 2 * x + y
saxpy(np.int32(n), np.float32(2), drv.In(x), drv.InOut(y), block=(256, 1, 1), grid=(16, 1))
assert np.allclose(y, expected)
print("ok call with In/InOut")

x_gpu, y_gpu = drv.to_device(x), drv.to_device(np.zeros(n, np.float32))
seconds = saxpy(
    np.int32(n), np.float32(3), x_gpu, y_gpu, block=(256, 1, 1), grid=(16, 1), time_kernel=True
)
assert isinstance(seconds, float) and seconds >= 0
assert np.allclose(drv.from_device_like(y_gpu, x), 3 * x)
print("ok timed call")

saxpy.prepare("ifPP")
saxpy.prepared_call((16, 1), (256, 1, 1), n, 1.0, x_gpu, y_gpu)
assert np.allclose(drv.from_device_like(y_gpu, x), 4 * x)
stream = drv.Stream()
saxpy.prepared_async_call((16, 1), (256, 1, 1), stream, n, -4.0, x_gpu, y_gpu)
stream.synchronize()
assert np.allclose(drv.from_device_like(y_gpu, x), 0 * x, atol=1e-5)
timed = saxpy.prepared_timed_call((16, 1), (256, 1, 1), n, 1.0, x_gpu, y_gpu)
assert timed() >= 0
fill = builtin("fill").prepare([np.int32, np.float32, np.intp])
fill.prepared_call((1, 1), (256, 1, 1), n, 5.0, y_gpu)
assert (drv.from_device_like(y_gpu, x) == 5).all()
print("ok prepared calls")

out = np.empty(n, np.float32)
builtin("relu")(np.int32(n), drv.In(x), drv.Out(out), block=(256, 1, 1))
assert (out == np.maximum(x, 0)).all()
print("ok Out")

for bad, why in (
    ((n, np.float32(1), x_gpu, y_gpu), "invalid type on parameter #0"),
    ((np.int32(n), np.float16(1), x_gpu, y_gpu), "half precision"),
    ((np.int32(n), np.float32(1), x, y_gpu), "by value"),
):
    try:
        saxpy(*bad, block=(256, 1, 1))
    except TypeError as exc:
        assert why in str(exc), exc
    else:
        raise AssertionError(f"{why}: accepted")
try:
    saxpy(np.int64(n), np.float32(1), x_gpu, y_gpu, block=(256, 1, 1))
except TypeError as exc:
    assert "takes (ifPP)" in str(exc), exc
print("ok argument rules")
