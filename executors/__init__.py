"""Executors: the server-side devices that run tenants' GPU work.

One ``Executor`` per physical (or emulated) GPU; one ``Tenant`` per lease on it. The server picks
an executor kind at start-up with ``create_executors``.
"""

from __future__ import annotations

from .base import DeferredError, DeviceProperties, Executor, FunctionInfo, Tenant, TenantUsage
from .builtins import BUILTINS
from .errors import (
    DeviceError,
    DeviceOutOfMemory,
    InvalidHandle,
    InvalidValue,
    KernelFault,
    Unsupported,
)
from .numpy_device import NumpyExecutor

__all__ = [
    "BUILTINS",
    "EXECUTOR_KINDS",
    "DeferredError",
    "DeviceError",
    "DeviceOutOfMemory",
    "DeviceProperties",
    "Executor",
    "FunctionInfo",
    "InvalidHandle",
    "InvalidValue",
    "KernelFault",
    "NumpyExecutor",
    "Tenant",
    "TenantUsage",
    "Unsupported",
    "create_executors",
]

EXECUTOR_KINDS = ("numpy",)


def create_executors(
    kind: str, count: int, memory: int, scheduling: str = "fair"
) -> list[Executor]:
    """``count`` devices of one ``kind``, each with ``memory`` bytes, indexed from 0.

    Raises ``ValueError`` for a kind this build does not provide, so a mistyped
    ``--executor`` fails at start-up rather than on the first lease. ``scheduling`` is "fair"
    (weighted fair time-slicing, the default) or "fifo" (arrival order, the baseline).
    """
    if kind not in EXECUTOR_KINDS:
        raise ValueError(
            f"unknown executor kind {kind!r}; supported kinds: {', '.join(EXECUTOR_KINDS)}"
        )
    if count < 1:
        raise ValueError(f"executor count must be at least 1, got {count}")
    return [NumpyExecutor(index, memory, scheduling=scheduling) for index in range(count)]
