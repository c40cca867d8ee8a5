"""PyCUDA programs, unmodified, under ``bitfusion-net run`` against a NumPy-device server.

Each program in ``pycuda_programs/`` is written as for PyCUDA (``import pycuda.autoinit``,
``pycuda.driver as drv``, ``pycuda.gpuarray``, ``SourceModule``) and checks its own results; the
test runs it with ``run -n 1 -p 0.25`` on a server with one 1 GiB NumPy device and wants every
check's ``ok`` line. PyCUDA itself is not installed here: ``import pycuda`` finds the
PyCUDA-compatible layer only because ``run`` put it first on the path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_support import bare, bfnet, cli_env, describe, is_free
from integration_support import CliServer, cli_server

PROGRAMS = Path(__file__).resolve().parent / "pycuda_programs"
RUN_TIMEOUT_S = 90.0  # a program imports numpy and connects; source_module.py runs nvcc twice

EXPECTED = {
    "device_queries.py": [
        "ok device", "ok compute_capability", "ok total_memory", "ok attributes",
        "ok mem_get_info", "ok versions", "ok contexts", "ok bad ordinal",
    ],
    "memory_and_copies.py": [
        "ok htod dtoh", "ok dtod from_device", "ok to_device", "ok pagelocked",
        "ok async copies, streams and events", "ok wait_for_event", "ok memsets", "ok free",
    ],
    "kernels.py": [
        "ok call with In/InOut", "ok timed call", "ok prepared calls", "ok Out",
        "ok argument rules",
    ],
    "gpuarrays.py": [
        "ok to_gpu get", "ok zeros fill", "ok slices", "ok float32 arithmetic", "ok needs a kernel",
    ],
    "source_module.py": ["ok compiled", "ok refused", "ok compile error"],
    "errors.py": ["ok out of memory", "ok bad handle", "ok sticky", "ok after the error"],
}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[CliServer]:
    with cli_server() as running:
        yield running


@pytest.mark.parametrize("program", sorted(EXPECTED))
def test_a_pycuda_program_runs_unmodified_under_run(
    program: str, server: CliServer, tmp_path: Path
) -> None:
    if program == "source_module.py" and shutil.which("nvcc") is None:
        pytest.fail("nvcc is not on PATH: this machine kind has the CUDA toolkit; fix the image")
    env = cli_env(tmp_path / "home", tmp_path / "tmp", {"PYCUDA_CACHE_DIR": str(tmp_path)})
    result = bfnet(
        "run", "-n", "1", "-p", "0.25", "--server_list", bare(server.address),
        "--", sys.executable, str(PROGRAMS / program),
        env=env, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    for expected in EXPECTED[program]:
        assert any(line.startswith(expected) for line in lines), (expected, describe(result))
    assert is_free(server.address)  # the program's memory and lease are back


def test_without_the_layer_import_pycuda_finds_nothing(server: CliServer, tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", tmp_path / "tmp")
    result = bfnet(
        "run", "--no-pycuda", "-n", "1", "-p", "0.25", "--server_list", bare(server.address),
        "--", sys.executable, "-c", "import pycuda",
        env=env, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 1 and "No module named 'pycuda'" in result.stderr, describe(result)


def test_python_m_runs_a_program_on_a_reservation_from_request_gpus(
    server: CliServer, tmp_path: Path
) -> None:
    env = cli_env(tmp_path / "home", tmp_path / "tmp")
    lease = tmp_path / "lease.json"
    reserved = bfnet(
        "request_gpus", "-n", "1", "-p", "0.25", "--server_list", bare(server.address),
        "-f", str(lease), env=env,
    )  # fmt: skip
    assert reserved.returncode == 0, describe(reserved)
    try:
        env["BITFUSION_NET_LEASE"] = str(lease)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bitfusion_net.pycuda_compat",
                str(PROGRAMS / "device_queries.py"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr
        assert "ok contexts" in done.stdout
    finally:
        released = bfnet("release_gpus", "-f", str(lease), env=env)
        assert released.returncode == 0, describe(released)


def test_a_program_without_a_reservation_is_told_how_to_get_one(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home", tmp_path / "tmp")
    done = subprocess.run(
        [sys.executable, "-m", "bitfusion_net.pycuda_compat", "-m", "pycuda.autoinit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert "bitfusion-net run" in done.stderr and "RuntimeError" in done.stderr, done.stderr
