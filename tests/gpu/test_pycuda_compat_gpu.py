"""PyCUDA programs, unmodified, under ``bitfusion-net run`` against a server on a real GPU:
``SourceModule`` kernels, gpuarray arithmetic, timed calls and events (the NumPy-device half of
this is tests/integration/test_integration_pycuda_compat.py). Skipped, naming what is missing,
without a usable GPU and PyCUDA on the server side."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "tests" / "integration" / "pycuda_programs" / "gpu_kernels.py"
sys.path.insert(0, str(ROOT / "tests" / "integration"))

pytestmark = pytest.mark.gpu


def test_pycuda_programs_run_on_a_gpu_server(cuda_gpu: None, tmp_path: Path) -> None:
    from control_support import bare, bfnet, cli_env, describe
    from integration_support import cli_server

    with cli_server("--executor", "pycuda", "--gpu-memory", "4GiB") as server:
        env = cli_env(tmp_path / "home", tmp_path / "tmp", {"PYCUDA_CACHE_DIR": str(tmp_path)})
        result = bfnet(
            "run", "-n", "1", "-p", "0.25", "--server_list", bare(server.address),
            "--", sys.executable, str(PROGRAM),
            env=env, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, describe(result)
    for line in ("ok hello_gpu", "ok prepared invocation", "ok globals",
                 "ok gpuarray arithmetic", "ok timed calls and events"):  # fmt: skip
        assert line in result.stdout, describe(result)
