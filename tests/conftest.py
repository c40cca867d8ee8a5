"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest

from executors.pycuda_device import gpu_unavailable_reason


@pytest.fixture
def cuda_gpu() -> None:
    """For ``@pytest.mark.gpu`` tests: skip, saying what is missing, unless a GPU is usable."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no usable NVIDIA GPU: {reason}")
