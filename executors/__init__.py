"""Executors: the server-side devices that run tenants' GPU work.

One ``Executor`` per physical (or emulated) GPU; one ``Tenant`` per lease on it. The server picks
an executor kind at start-up with ``create_executors``: ``PycudaExecutor`` for NVIDIA GPUs (PyCUDA
is imported only then), ``NumpyExecutor`` for the reference device everywhere else.
"""

from __future__ import annotations

import logging

from .base import (
    DeferredError,
    DeviceProperties,
    Executor,
    FunctionInfo,
    MemoryBudget,
    Tenant,
    TenantUsage,
)
from .builtins import BUILTINS
from .cuda_driver import GpuUnavailable, gpu_count, gpu_unavailable_reason
from .errors import (
    DeviceError,
    DeviceOutOfMemory,
    InvalidHandle,
    InvalidValue,
    KernelFault,
    Unsupported,
)
from .numpy_device import NumpyExecutor
from .pycuda_device import PycudaExecutor

__all__ = [
    "BUILTINS",
    "EXECUTOR_KINDS",
    "DeferredError",
    "DeviceError",
    "DeviceOutOfMemory",
    "DeviceProperties",
    "Executor",
    "FunctionInfo",
    "GpuUnavailable",
    "InvalidHandle",
    "InvalidValue",
    "KernelFault",
    "MemoryBudget",
    "NumpyExecutor",
    "PycudaExecutor",
    "Tenant",
    "TenantUsage",
    "Unsupported",
    "create_executors",
]

EXECUTOR_KINDS = ("auto", "numpy", "pycuda")
NUMPY_DEFAULT_MEMORY = 16 * 2**30

log = logging.getLogger(__name__)


def create_executors(
    kind: str, count: int | None = None, memory: int | None = None, scheduling: str = "fair"
) -> list[Executor]:
    """The devices a server shares, indexed from 0.

    ``kind``: "pycuda" (this host's NVIDIA GPUs), "numpy" (NumPy reference devices) or "auto"
    (PyCUDA when a driver and a GPU are present, else NumPy; the choice and its reason are logged).
    ``count``: how many devices (default: every GPU, or one NumPy device). ``memory``: bytes per
    device (NumPy: its size, default 16 GiB; PyCUDA: a cap on what is offered to tenants, default
    the GPU's free memory less a headroom). ``scheduling``: "fair" (weighted fair time-slicing,
    the default) or "fifo" (arrival order, the baseline).

    Raises ``ValueError`` for a kind or count this host cannot provide, and ``GpuUnavailable``
    (saying what is missing) for "pycuda" without a usable GPU, so a server fails at start-up
    rather than on the first lease.
    """
    if kind not in EXECUTOR_KINDS:
        raise ValueError(
            f"unknown executor kind {kind!r}; supported kinds: {', '.join(EXECUTOR_KINDS)}"
        )
    if count is not None and count < 1:
        raise ValueError(f"executor count must be at least 1, got {count}")
    if kind == "auto":
        reason = gpu_unavailable_reason()
        if reason is not None:
            log.info("no usable GPU, serving NumPy reference devices: %s", reason)
            kind = "numpy"
        else:
            kind = "pycuda"
            log.info("NVIDIA GPU found: serving it with the PyCUDA executor")
    if kind == "numpy":
        size = NUMPY_DEFAULT_MEMORY if memory is None else memory
        return [NumpyExecutor(i, size, scheduling=scheduling) for i in range(count or 1)]
    available = gpu_count()
    if count is not None and count > available:
        raise ValueError(f"{count} GPUs asked for, but CUDA sees only {available}")
    executors: list[Executor] = []
    try:
        for index in range(count or available):
            executors.append(PycudaExecutor(index, memory, scheduling=scheduling))
    except BaseException:
        for executor in executors:
            executor.close()
        raise
    return executors
