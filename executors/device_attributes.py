"""CUDA device attributes: the numbers of ``CUdevice_attribute`` and the NumPy device's values.

A client asks a device for its attributes (DEVICE_ATTRIBUTES, docs/PROTOCOL.md section 6.1) as
CUDA's own numbers, so that a PyCUDA-compatible layer can hand them on unchanged. The PyCUDA
executor reports the GPU's real values. The NumPy reference device has no real values to report;
``reference_attributes`` is the documented set it reports instead: a plausible CUDA device whose
limits are exactly the ones the NumPy device enforces (``DeviceProperties``), and which tells
the truth wherever a program could act on the difference (it runs one operation at a time, and
it cannot map host memory).
"""

from __future__ import annotations

from enum import IntEnum

from .base import DeviceProperties


class DeviceAttribute(IntEnum):
    """The ``CUdevice_attribute`` numbers used here, exactly as CUDA's ``cuda.h`` has them."""

    MAX_THREADS_PER_BLOCK = 1
    MAX_BLOCK_DIM_X = 2
    MAX_BLOCK_DIM_Y = 3
    MAX_BLOCK_DIM_Z = 4
    MAX_GRID_DIM_X = 5
    MAX_GRID_DIM_Y = 6
    MAX_GRID_DIM_Z = 7
    MAX_SHARED_MEMORY_PER_BLOCK = 8
    TOTAL_CONSTANT_MEMORY = 9
    WARP_SIZE = 10
    MAX_PITCH = 11
    MAX_REGISTERS_PER_BLOCK = 12
    CLOCK_RATE = 13
    TEXTURE_ALIGNMENT = 14
    GPU_OVERLAP = 15
    MULTIPROCESSOR_COUNT = 16
    KERNEL_EXEC_TIMEOUT = 17
    INTEGRATED = 18
    CAN_MAP_HOST_MEMORY = 19
    COMPUTE_MODE = 20
    CONCURRENT_KERNELS = 31
    ECC_ENABLED = 32
    PCI_BUS_ID = 33
    PCI_DEVICE_ID = 34
    TCC_DRIVER = 35
    MEMORY_CLOCK_RATE = 36
    GLOBAL_MEMORY_BUS_WIDTH = 37
    L2_CACHE_SIZE = 38
    MAX_THREADS_PER_MULTIPROCESSOR = 39
    ASYNC_ENGINE_COUNT = 40
    UNIFIED_ADDRESSING = 41
    PCI_DOMAIN_ID = 50
    COMPUTE_CAPABILITY_MAJOR = 75
    COMPUTE_CAPABILITY_MINOR = 76
    STREAM_PRIORITIES_SUPPORTED = 78
    GLOBAL_L1_CACHE_SUPPORTED = 79
    LOCAL_L1_CACHE_SUPPORTED = 80
    MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81
    MAX_REGISTERS_PER_MULTIPROCESSOR = 82
    MANAGED_MEMORY = 83
    MULTI_GPU_BOARD = 84
    SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO = 87
    CONCURRENT_MANAGED_ACCESS = 89
    COOPERATIVE_LAUNCH = 95
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
    MAX_BLOCKS_PER_MULTIPROCESSOR = 106


# Compute capability 8.0 (an A100-class part): every CUDA toolkit in use targets it (CUDA 13's
# nvcc builds nothing below 7.5, so a client that compiles for the capability it is told must be
# told a current one), and its per-block limits are the ones DeviceProperties defaults to.
REFERENCE_COMPUTE_CAPABILITY = (8, 0)

A = DeviceAttribute
# What the NumPy device reports beyond the limits it enforces: an A100-class device (sm_80),
# except where it says what the NumPy device really does.
_REFERENCE_FIXED: dict[DeviceAttribute, int] = {
    A.TOTAL_CONSTANT_MEMORY: 64 * 1024,
    A.WARP_SIZE: 32,
    A.MAX_PITCH: 2**31 - 1,
    A.MAX_REGISTERS_PER_BLOCK: 65536,
    A.CLOCK_RATE: 1_410_000,  # kHz
    A.TEXTURE_ALIGNMENT: 512,
    A.MULTIPROCESSOR_COUNT: 108,
    A.KERNEL_EXEC_TIMEOUT: 0,
    A.INTEGRATED: 0,
    A.COMPUTE_MODE: 0,  # CU_COMPUTEMODE_DEFAULT: any number of contexts (here: tenants)
    A.ECC_ENABLED: 0,
    A.PCI_DEVICE_ID: 0,
    A.PCI_DOMAIN_ID: 0,
    A.TCC_DRIVER: 0,
    A.MEMORY_CLOCK_RATE: 1_215_000,  # kHz
    A.GLOBAL_MEMORY_BUS_WIDTH: 5120,  # bits
    A.L2_CACHE_SIZE: 40 * 2**20,
    A.MAX_THREADS_PER_MULTIPROCESSOR: 2048,
    A.COMPUTE_CAPABILITY_MAJOR: REFERENCE_COMPUTE_CAPABILITY[0],
    A.COMPUTE_CAPABILITY_MINOR: REFERENCE_COMPUTE_CAPABILITY[1],
    A.GLOBAL_L1_CACHE_SUPPORTED: 1,
    A.LOCAL_L1_CACHE_SUPPORTED: 1,
    A.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: 164 * 1024,
    A.MAX_REGISTERS_PER_MULTIPROCESSOR: 65536,
    A.MULTI_GPU_BOARD: 0,
    A.SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO: 2,
    A.MAX_BLOCKS_PER_MULTIPROCESSOR: 32,
    # Device addresses never coincide with host addresses (they lie above any a host can have,
    # numpy_device._ADDRESS_BASE), which is what unified addressing lets a program rely on when
    # it tells device pointers from host pointers by value.
    A.UNIFIED_ADDRESSING: 1,
    # The truth about the NumPy device, where an A100 would differ: one operation runs at a time
    # (no concurrent kernels, no copy engines beside them), streams have no priorities, and the
    # device can neither map host memory nor manage memory shared with the host.
    A.CONCURRENT_KERNELS: 0,
    A.GPU_OVERLAP: 0,
    A.ASYNC_ENGINE_COUNT: 0,
    A.STREAM_PRIORITIES_SUPPORTED: 0,
    A.CAN_MAP_HOST_MEMORY: 0,
    A.MANAGED_MEMORY: 0,
    A.CONCURRENT_MANAGED_ACCESS: 0,
    A.COOPERATIVE_LAUNCH: 0,
}


def reference_attributes(properties: DeviceProperties, index: int) -> dict[int, int]:
    """The attributes the NumPy device ``index`` reports: its enforced limits (threads, block,
    grid, shared memory, so that a launch inside them is one it accepts) and ``_REFERENCE_FIXED``.
    Each device has its own PCI bus number, so programs that tell GPUs apart by PCI location
    see distinct devices. Attributes not listed are absent (unknown to a client)."""
    (bx, by, bz), (gx, gy, gz) = properties.max_block, properties.max_grid
    shared = properties.max_shared_memory_per_block
    limits = {
        A.MAX_THREADS_PER_BLOCK: properties.max_threads_per_block,
        A.MAX_BLOCK_DIM_X: bx,
        A.MAX_BLOCK_DIM_Y: by,
        A.MAX_BLOCK_DIM_Z: bz,
        A.MAX_GRID_DIM_X: gx,
        A.MAX_GRID_DIM_Y: gy,
        A.MAX_GRID_DIM_Z: gz,
        A.MAX_SHARED_MEMORY_PER_BLOCK: shared,
        # A launch may not ask for more than that (check_launch): there is nothing to opt in to.
        A.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: shared,
        A.PCI_BUS_ID: index,
    }
    return {int(key): value for key, value in sorted({**_REFERENCE_FIXED, **limits}.items())}
