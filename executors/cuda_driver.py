"""Loading PyCUDA and the NVIDIA driver, and what CUDA's errors mean for a tenant.

PyCUDA is imported lazily: this module imports on machines without it, and ``load_driver`` says
precisely what is missing when a GPU is asked for.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .errors import DeviceError, DeviceOutOfMemory, InvalidValue

log = logging.getLogger(__name__)

# Messages of CUDA errors that mean the caller asked for something the GPU cannot do.
_CALLER_ERRORS = (
    "too many resources",
    "invalid argument",
    "invalid value",
    "invalid configuration",
    "invalid pitch",
    "not supported",
)
# Messages of the CUDA errors after which a context is unusable ("sticky" errors).
_CONTEXT_LOST = (
    "illegal memory access",
    "illegal address",
    "misaligned address",
    "illegal instruction",
    "unspecified launch failure",
    "launch failed",
    "hardware stack error",
    "exception on",
    "invalid program counter",
    "launch timed out",
    "context is destroyed",
    "an assert",
    "device-side assert",
    "not supported on global/shared address space",
    "uncorrectable ecc",
    "hardware exception",
)

_driver: Any = None
_driver_lock = threading.Lock()


class GpuUnavailable(RuntimeError):
    """No usable NVIDIA GPU here; the message says what is missing and how to fix it."""


def load_driver() -> Any:
    """``pycuda.driver``, initialised; raises ``GpuUnavailable`` saying what is missing."""
    global _driver
    with _driver_lock:
        if _driver is not None:
            return _driver
        # Eager loading makes a module's device memory appear when it loads, where it is measured
        # and charged, rather than at its kernels' first launches (lazy loading would let
        # tenants' code escape their limits).
        if os.environ.get("CUDA_MODULE_LOADING", "EAGER") != "EAGER":
            log.warning(
                "CUDA_MODULE_LOADING=%s overridden: the executor charges tenants for "
                "their modules at load, which needs EAGER",
                os.environ["CUDA_MODULE_LOADING"],
            )
        os.environ["CUDA_MODULE_LOADING"] = "EAGER"
        try:
            import pycuda.driver as cuda
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.split(".")[0] == "pycuda":
                raise GpuUnavailable(
                    "PyCUDA is not installed: install the GPU extra, "
                    "`CUDA_ROOT=/usr/local/cuda pip install 'bitfusion-net[gpu]'` "
                    "(it builds from source against the CUDA toolkit)"
                ) from None
            raise GpuUnavailable(f"PyCUDA could not be imported: {exc}") from None
        except ImportError as exc:
            # PyCUDA's extension links against the driver's libcuda.so.1.
            raise GpuUnavailable(
                f"the NVIDIA driver could not be loaded ({exc}); is an NVIDIA driver installed "
                "and is libcuda.so.1 on the library path?"
            ) from None
        try:
            cuda.init()
        except Exception as exc:  # noqa: BLE001 - any failure here means "no usable GPU"
            raise GpuUnavailable(
                f"CUDA could not start: {exc} (no NVIDIA GPU visible, or the driver is too old "
                "for this PyCUDA build)"
            ) from None
        _driver = cuda
        return cuda


def gpu_count() -> int:
    """How many NVIDIA GPUs CUDA sees; raises ``GpuUnavailable`` if none can be used."""
    cuda = load_driver()
    count = int(cuda.Device.count())
    if count == 0:
        raise GpuUnavailable(
            "the NVIDIA driver is loaded but sees no GPU (check CUDA_VISIBLE_DEVICES)"
        )
    return count


def gpu_unavailable_reason() -> str | None:
    """Why no NVIDIA GPU can be used here (PyCUDA, its driver, a device), or None if one can."""
    try:
        gpu_count()
    except GpuUnavailable as exc:
        return str(exc)
    return None


def classify_cuda_error(
    what: str, text: str, out_of_memory: bool
) -> tuple[DeviceError, bool]:
    """The executor error a CUDA error ``text`` from operation ``what`` stands for, and whether it
    leaves the context unusable (a "sticky" error: the tenant's context is lost)."""
    # "cuX failed: <CUDA's message>[ - <JIT log>]": the log is the tenant's own text.
    lowered = text.split(" - ", 1)[0].lower()
    if any(marker in lowered for marker in _CONTEXT_LOST):
        return (
            DeviceError(
                f"{what}: the GPU reported '{text}'; this tenant's CUDA context is lost "
                "(its memory and modules are gone): release the lease and request a new one"
            ),
            True,
        )
    if out_of_memory or "out of memory" in lowered:
        return DeviceOutOfMemory(f"{what}: the GPU is out of memory ({text})"), False
    if any(marker in lowered for marker in _CALLER_ERRORS):
        return InvalidValue(f"{what}: {text}"), False
    return DeviceError(f"{what}: {text}"), False
