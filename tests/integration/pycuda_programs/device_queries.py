"""Devices, contexts and versions, as a PyCUDA program asks for them."""

import pycuda
import pycuda.autoinit
import pycuda.driver as drv

MiB = 2**20

assert drv.Device.count() == 1
dev = pycuda.autoinit.device
assert dev == drv.Device(0) and drv.Context.get_device() == dev
print("ok device", dev.name())
major, minor = dev.compute_capability()
assert (major, minor) >= (7, 5), (major, minor)
print("ok compute_capability", major, minor)
assert dev.total_memory() == 256 * MiB, dev.total_memory()  # -p 0.25 of a 1 GiB device
print("ok total_memory")
attributes = dev.get_attributes()
threads = attributes[drv.device_attribute.MAX_THREADS_PER_BLOCK]
assert (
    threads
    == dev.get_attribute(drv.device_attribute.MAX_THREADS_PER_BLOCK)
    == dev.max_threads_per_block
)
assert attributes[drv.device_attribute.WARP_SIZE] == 32
assert attributes[drv.device_attribute.MULTIPROCESSOR_COUNT] >= 1
print("ok attributes", len(attributes))
free, total = drv.mem_get_info()
assert total == 256 * MiB and 0 < free <= total
print("ok mem_get_info")
assert drv.get_version() >= (12, 0, 0) and drv.get_driver_version() >= 12000
assert pycuda.VERSION
print("ok versions")
second = dev.make_context()  # pushed on top of autoinit's
assert drv.Context.get_current() is second
drv.Context.synchronize()
assert drv.Context.pop() is second and drv.Context.get_current() is pycuda.autoinit.context
second.detach()
primary = dev.retain_primary_context()
primary.push()
assert drv.Context.get_device() == dev
drv.Context.pop()
print("ok contexts")
try:
    drv.Device(1)
except drv.LogicError as exc:
    assert "ordinal 1" in str(exc)
    print("ok bad ordinal")
