"""Choosing an executor: ``auto`` falls back to NumPy without a GPU and says why, ``pycuda`` without
one fails at start-up naming what is missing, and the driver's failure modes read clearly.

These run everywhere: on a machine with a GPU the same tests check that it is picked instead.
"""

from __future__ import annotations

import importlib.abc
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from executors import GpuUnavailable, NumpyExecutor, create_executors, cuda_driver
from executors.cuda_driver import gpu_unavailable_reason, load_driver


def close_all(executors: list) -> None:
    for executor in executors:
        executor.close()


def test_auto_serves_a_gpu_if_usable_else_numpy_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="executors")
    executors = create_executors("auto", count=1, memory=2**30)
    try:
        reason = gpu_unavailable_reason()
        if reason is None:
            assert executors[0].properties.executor == "pycuda"
            assert "serving it with the PyCUDA executor" in caplog.text
        else:
            assert isinstance(executors[0], NumpyExecutor)
            assert executors[0].properties.total_memory == 2**30
            assert f"no usable GPU, serving NumPy reference devices: {reason}" in caplog.text
    finally:
        close_all(executors)


def test_pycuda_without_a_gpu_fails_at_once_saying_what_is_missing() -> None:
    reason = gpu_unavailable_reason()
    if reason is None:
        executors = create_executors("pycuda", count=1)
        try:
            assert executors[0].properties.executor == "pycuda"
        finally:
            close_all(executors)
        return
    with pytest.raises(GpuUnavailable) as raised:
        create_executors("pycuda", count=1)
    assert str(raised.value) == reason
    assert any(word in reason for word in ("PyCUDA", "driver", "CUDA", "GPU"))


def test_numpy_defaults_to_one_16_gib_device() -> None:
    executors = create_executors("numpy")
    try:
        assert len(executors) == 1
        assert executors[0].properties.total_memory == 16 * 2**30
    finally:
        close_all(executors)


def test_unknown_kind_and_bad_count_are_refused() -> None:
    with pytest.raises(ValueError, match="supported kinds: auto, numpy, pycuda"):
        create_executors("rocm")
    with pytest.raises(ValueError, match="at least 1"):
        create_executors("numpy", count=0)


def test_the_cli_fails_fast_without_a_gpu() -> None:
    reason = gpu_unavailable_reason()
    if reason is None:  # with a GPU it starts and serves: the GPU tests check that
        pytest.skip("a GPU is usable here, so --executor pycuda starts instead of failing")
    result = subprocess.run(
        [sys.executable, "-m", "bitfusion_net.server", "--executor", "pycuda"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "error: --executor pycuda needs a usable NVIDIA GPU" in result.stderr
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


class _RefuseImport(importlib.abc.MetaPathFinder):
    """Makes ``import pycuda.driver`` fail the way a machine without the driver library does."""

    def __init__(self, error: ImportError) -> None:
        self.error = error

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == "pycuda" or fullname.startswith("pycuda."):
            raise self.error
        return None


@pytest.fixture
def fresh_driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """load_driver as on a fresh process: nothing loaded, no pycuda module imported."""
    monkeypatch.setattr(cuda_driver, "_driver", None)
    for name in [n for n in sys.modules if n == "pycuda" or n.startswith("pycuda.")]:
        monkeypatch.delitem(sys.modules, name)
    yield


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ModuleNotFoundError("No module named 'pycuda'", name="pycuda"),
            "pip install 'bitfusion-net[gpu]'",
        ),
        (
            ImportError("libcuda.so.1: cannot open shared object file: No such file or directory"),
            "is an NVIDIA driver installed and is libcuda.so.1 on the library path?",
        ),
        (
            ModuleNotFoundError("No module named 'pytools'", name="pytools"),
            "PyCUDA could not be imported",
        ),
    ],
    ids=["no-pycuda", "no-driver", "broken-pycuda"],
)
def test_import_failures_say_what_is_missing(
    fresh_driver: None,
    monkeypatch: pytest.MonkeyPatch,
    error: ImportError,
    expected: str,
) -> None:
    monkeypatch.setattr(sys, "meta_path", [_RefuseImport(error), *sys.meta_path])
    with pytest.raises(GpuUnavailable) as raised:
        load_driver()
    assert expected in str(raised.value)
