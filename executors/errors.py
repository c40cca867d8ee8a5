"""Errors raised by executors.

Executors are a standalone layer (they never import the network package), so they have their own
error hierarchy. The server maps each class to a wire error code; the client turns that code into
the matching ``bitfusion_net`` exception.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class of every error an executor raises on purpose."""


class DeviceOutOfMemory(DeviceError):
    """An allocation would exceed the tenant's memory limit (or the device's memory)."""


class InvalidHandle(DeviceError):
    """A pointer, stream, event, module or function handle that is not the tenant's."""


class InvalidValue(DeviceError):
    """An argument is out of range: a negative size, a bad launch geometry, a wrong value type."""


class KernelFault(DeviceError):
    """A kernel failed while running, e.g. it addressed memory outside the tenant's allocations."""


class Unsupported(DeviceError):
    """The executor cannot do this at all (e.g. loading a PTX module on the NumPy device)."""
