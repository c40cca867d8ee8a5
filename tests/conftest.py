"""Fixtures shared by every test directory."""

from __future__ import annotations

import functools

import pytest

from executors import GpuUnavailable
from executors.pycuda_device import gpu_count


@functools.cache
def gpu_unusable() -> str | None:
    """Why no NVIDIA GPU can be used here (PyCUDA, its driver, a device), or None if one can."""
    try:
        gpu_count()
    except GpuUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture
def cuda_gpu() -> None:
    """For ``@pytest.mark.gpu`` tests: skip, saying what is missing, unless a GPU is usable."""
    reason = gpu_unusable()
    if reason is not None:
        pytest.skip(f"no usable NVIDIA GPU: {reason}")
