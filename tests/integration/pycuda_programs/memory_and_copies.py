"""Allocation, every kind of copy (sync and async, with streams and events), memsets."""

import numpy as np
import pycuda.autoinit  # noqa: F401
import pycuda.driver as drv

a = np.arange(1024, dtype=np.float32)
a_gpu = drv.mem_alloc(a.nbytes)
drv.memcpy_htod(a_gpu, a)
back = np.empty_like(a)
drv.memcpy_dtoh(back, a_gpu)
assert (back == a).all()
print("ok htod dtoh")

b_gpu = drv.mem_alloc_like(a)
drv.memcpy_dtod(b_gpu, a_gpu, a.nbytes)
assert (drv.from_device_like(b_gpu, a) == a).all()
assert (drv.from_device(b_gpu, (32, 32), np.float32) == a.reshape(32, 32)).all()
print("ok dtod from_device")

c_gpu = drv.to_device(a * 2)
assert (drv.from_device_like(c_gpu, a) == a * 2).all()
print("ok to_device")

host = drv.pagelocked_empty((256,), np.float64)
assert host.ctypes.data % 4096 == 0 and host.shape == (256,)
zeros = drv.pagelocked_zeros((4, 4), np.int32)
assert zeros.sum() == 0
print("ok pagelocked")

stream = drv.Stream()
start, end = drv.Event(), drv.Event()
start.record(stream)
pinned = drv.pagelocked_empty(a.shape, a.dtype)
drv.memcpy_htod_async(a_gpu, a + 1, stream)
drv.memcpy_dtod_async(b_gpu, a_gpu, a.nbytes, stream)
drv.memcpy_dtoh_async(pinned, b_gpu, stream)
end.record(stream)
end.synchronize()
assert end.query() and stream.is_done()
stream.synchronize()
assert (pinned == a + 1).all()
assert start.time_till(end) >= 0 and end.time_since(start) >= 0
print("ok async copies, streams and events")

other = drv.Stream()
other.wait_for_event(end)
drv.memcpy_dtoh_async(pinned, a_gpu, other)
other.synchronize()
assert (pinned == a + 1).all()
print("ok wait_for_event")

words = drv.mem_alloc(64)
drv.memset_d8(words, 0xAB, 64)
assert (drv.from_device(words, (64,), np.uint8) == 0xAB).all()
drv.memset_d16(words, 0x1234, 32)
assert (drv.from_device(words, (32,), np.uint16) == 0x1234).all()
drv.memset_d32(words, 0xDEADBEEF, 16)
assert (drv.from_device(words, (16,), np.uint32) == 0xDEADBEEF).all()
drv.memset_d32_async(words, 7, 16, stream)
drv.memset_d16_async(words, 9, 8, stream)  # the first 16 bytes
drv.memset_d8_async(words, 1, 2, stream)
stream.synchronize()
got = drv.from_device(words, (64,), np.uint8)
assert list(got[:2]) == [1, 1] and list(got[2:4]) == [9, 0] and list(got[16:20]) == [7, 0, 0, 0]
print("ok memsets")

for allocation in (a_gpu, b_gpu, c_gpu, words):
    allocation.free()
free, total = drv.mem_get_info()
assert free == total, (free, total)
print("ok free")
