"""examples/remote_ptx.py: its kernels compile to PTX that matches the declared argument types,
it explains itself on the NumPy reference device, and it runs on a GPU where one is usable.

nvcc is a requirement of this suite (it is installed here and on CI), so the PTX test fails rather
than skips without it; only the GPU test skips, with the reason, where no GPU and PyCUDA are usable.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from executors.ptx import check_arg_types, kernel_params

# The integration helpers live beside the integration tests, which pytest only puts on sys.path
# when it collects them; this file must also run on its own (pytest tests/examples).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from integration_support import cli_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "remote_ptx.py"
KERNEL_SOURCES = sorted((REPO / "examples" / "kernels").glob("*.cu"))
EXAMPLE_TIMEOUT_S = 60.0  # nvcc, a server start and one small kernel; pytest-timeout is 120 s

@functools.cache
def example() -> ModuleType:
    """examples/remote_ptx.py as a module (examples/ is not a package), for its declarations."""
    spec = importlib.util.spec_from_file_location("remote_ptx_example", EXAMPLE)
    assert spec is not None and spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )


def test_kernels_compile_to_ptx_matching_the_declared_arg_types() -> None:
    remote_ptx = example()
    assert remote_ptx.KERNEL_SOURCE in KERNEL_SOURCES, (remote_ptx.KERNEL_SOURCE, KERNEL_SOURCES)
    declared = {remote_ptx.KERNEL_SOURCE: {remote_ptx.KERNEL_NAME: remote_ptx.KERNEL_ARG_TYPES}}
    for source in KERNEL_SOURCES:
        try:
            ptx = remote_ptx.compile_ptx(source)
        except remote_ptx.NvccError as exc:
            pytest.fail(f"nvcc is required for this test (it is installed on CI): {exc}")
        entries = kernel_params(ptx.rstrip(b"\0").decode())
        assert entries, f"{source.name}: no .entry in its PTX"
        for name, arg_types in declared.get(source, {}).items():
            assert name in entries, f"{source.name}: no .entry {name} in {sorted(entries)}"
            check_arg_types(name, arg_types, entries[name])  # raises InvalidValue on a mismatch


def test_nvcc_env_var_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    remote_ptx = example()
    monkeypatch.setenv("NVCC", str(REPO / "no-such-nvcc"))
    with pytest.raises(remote_ptx.NvccError, match="NVCC"):
        remote_ptx.find_nvcc()
    monkeypatch.delenv("NVCC")
    real = remote_ptx.find_nvcc()  # fails with the lookup order in the message if nvcc is absent
    monkeypatch.setenv("NVCC", real)
    monkeypatch.setenv("PATH", os.defpath)
    assert remote_ptx.find_nvcc() == real


def test_on_the_numpy_reference_device_it_explains_and_exits_2() -> None:
    result = run_example()
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "needs a server whose devices can load PTX modules" in output, output
    assert "python -m bitfusion_net.server --executor pycuda" in output, output
    assert "Traceback" not in output, output


@pytest.mark.gpu
def test_runs_on_a_gpu(cuda_gpu: None) -> None:
    with cli_server("--executor", "pycuda") as server:
        result = run_example(server.address)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{output}\nserver stderr:\n{server.stderr_text()}"
    assert "result matches NumPy" in result.stdout, output
