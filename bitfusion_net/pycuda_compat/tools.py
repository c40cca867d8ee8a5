"""``pycuda.tools``: the default context, and C type names of numpy dtypes."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import driver as drv

__all__ = ["clear_context_caches", "dtype_to_ctype", "make_default_context"]

_CTYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
    np.dtype(np.bool_): "bool",
}  # fmt: skip


def dtype_to_ctype(dtype: Any, with_fp_tex_hack: bool = False) -> str:
    """The CUDA C type of a numpy dtype (``int`` for int32, ``float`` for float32, ...)."""
    try:
        return _CTYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"unable to map dtype {np.dtype(dtype)} to a C type") from None


def make_default_context(ctx_maker: Any = None) -> drv.Context:
    """A context on the first device that makes one (``CUDA_DEVICE`` picks one by ordinal)."""
    maker = ctx_maker if ctx_maker is not None else (lambda device: device.make_context())
    chosen = os.environ.get("CUDA_DEVICE")
    if chosen is not None:
        return maker(drv.Device(int(chosen)))  # type: ignore[no-any-return]
    errors = []
    for ordinal in range(drv.Device.count()):
        try:
            return maker(drv.Device(ordinal))  # type: ignore[no-any-return]
        except drv.Error as exc:
            errors.append(f"device {ordinal}: {exc}")
    raise drv.RuntimeError("make_default_context: no device made a context: " + "; ".join(errors))


def clear_context_caches() -> None:
    """PyCUDA clears its per-context caches; this layer keeps none."""
