"""Out of memory, bad handles and sticky errors, as a PyCUDA program meets them."""

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv

from bitfusion_net.pycuda_compat import builtin

MiB = 2**20
try:
    drv.mem_alloc(300 * MiB)  # the lease holds 256 MiB
except drv.MemoryError as exc:
    print("ok out of memory:", exc)
else:
    raise AssertionError("300 MiB allocated in a 256 MiB lease")

stream = drv.Stream()
stream.remote.destroy()  # the handle is gone on the server
try:
    stream.synchronize()
except drv.LogicError as exc:
    print("ok bad handle:", exc)
else:
    raise AssertionError("a destroyed stream synchronised")

x = drv.mem_alloc(16)
x.free()
# A launch does not wait: its error (a freed pointer) is sticky and surfaces at the next call
# that waits, as CUDA's asynchronous errors do.
builtin("fill")(np.int32(4), np.float32(1), x, block=(4, 1, 1))
try:
    drv.Context.synchronize()
except drv.Error as exc:
    assert isinstance(exc, drv.LaunchError | drv.LogicError), type(exc)
    print("ok sticky:", type(exc).__name__, exc)
else:
    raise AssertionError("the faulting launch went unreported")
ok = drv.mem_alloc(16)  # the session goes on
drv.memset_d32(ok, 1, 4)
assert (drv.from_device(ok, (4,), np.uint32) == 1).all()
print("ok after the error")
