"""The ``libcuda.so.1`` agent (docs/AGENT.md) against a server on a real GPU: cuda-python loading
one kernel from PTX, a cubin and a fatbin and launching it both ways, and stock PyTorch running a
real matmul, each under ``bitfusion-net run`` (the NumPy-device half of this is
tests/native/test_agent.py). Skipped, naming what is missing, without a usable GPU and PyCUDA on
the server side, nvcc, cuda-bindings or PyTorch."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = Path(__file__).with_name("agent_kernels_program.py")
sys.path.insert(0, str(ROOT / "tests" / "integration"))

pytestmark = pytest.mark.gpu

KERNEL = r"""
extern "C" __global__ void scale(float *x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
"""


def _run_under_agent(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    from control_support import bare, bfnet, cli_env
    from integration_support import cli_server

    with cli_server("--executor", "pycuda", "--gpu-memory", "4GiB") as server:
        env = cli_env(tmp_path / "home", tmp_path / "tmp")
        return bfnet(
            "run", "-n", "1", "-p", "0.25", "--server_list", bare(server.address), "--",
            *command, env=env, timeout=300,
        )  # fmt: skip


def test_cuda_python_kernels_from_ptx_cubin_and_fatbin(cuda_gpu: None, tmp_path: Path) -> None:
    from control_support import describe

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: it compiles the kernel")
    if importlib.util.find_spec("cuda.bindings") is None:
        pytest.skip("cuda-bindings is not installed")
    source = tmp_path / "scale.cu"
    source.write_text(KERNEL)
    for kind, flags in (("ptx", ["-ptx"]), ("cubin", ["-cubin", "-arch=native"]),
                        ("fatbin", ["-fatbin", "-arch=native"])):  # fmt: skip
        subprocess.run(
            [nvcc, *flags, "-o", str(tmp_path / f"scale.{kind}"), str(source)],
            check=True, timeout=300, capture_output=True,
        )  # fmt: skip
    result = _run_under_agent(tmp_path, sys.executable, str(PROGRAM), str(tmp_path))
    assert result.returncode == 0, describe(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "ALL"))]
    assert lines == ["ok ptx", "ok cubin", "ok fatbin", "ALL OK"], describe(result)


def test_stock_pytorch_runs_a_real_matmul(cuda_gpu: None, tmp_path: Path) -> None:
    from control_support import describe

    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed")
    script = (
        "import torch\n"
        "assert torch.cuda.is_available()\n"
        "free, total = torch.cuda.mem_get_info()\n"
        "x = torch.ones(64, 64).cuda()\n"
        "print('matmul', (x @ x).sum().item(), 'lease', total)\n"
    )
    result = _run_under_agent(tmp_path, sys.executable, "-c", script)
    assert result.returncode == 0, describe(result)
    assert "matmul 262144.0 lease" in result.stdout, describe(result)
