"""Device attribute numbers are CUDA's: the server's executors and the PyCUDA-compatible layer
each name them (neither may import the other), so both are held to the toolkit's ``cuda.h``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from bitfusion_net.pycuda_compat.driver import device_attribute
from executors.device_attributes import DeviceAttribute


def _cuda_h() -> Path:
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda/include/cuda.h")]
    if nvcc is not None:
        candidates.insert(0, Path(nvcc).resolve().parents[1] / "include" / "cuda.h")
    for candidate in candidates:
        if candidate.exists():
            return candidate
    pytest.fail("no cuda.h: this machine kind has the CUDA toolkit's headers; fix the image")


def test_both_enums_are_cudas_numbers() -> None:
    text = _cuda_h().read_text(errors="replace")
    cuda = {
        name: int(number)
        for name, number in re.findall(r"CU_DEVICE_ATTRIBUTE_(\w+)\s*=\s*(\d+)", text)
    }
    for enum in (device_attribute, DeviceAttribute):
        wrong = {a.name: a.value for a in enum if cuda.get(a.name) != a.value}
        assert not wrong, f"{enum.__qualname__} disagrees with cuda.h on {wrong}"


def test_the_layer_knows_every_attribute_the_servers_report() -> None:
    missing = {a.name for a in DeviceAttribute} - {a.name for a in device_attribute}
    assert not missing, f"pycuda_compat would drop {missing} from get_attributes()"
