"""Every CUDA source compiles with nvcc, and the built-ins' CUDA twins match their NumPy twins'
declarations. This runs without a GPU (nvcc is installed here and on CI, so it never skips):
a syntax error or a changed signature in a .cu file fails the suite, not a GPU run later."""

from __future__ import annotations

from pathlib import Path

import pytest

from executors import BUILTINS, cuda_build
from executors.cuda_build import (
    BUILTINS_SOURCE,
    CUDA_SOURCES,
    NvccError,
    NvccNotFound,
    builtins_image,
    compile_cuda,
    find_nvcc,
    ptx_to_cubin,
)
from executors.ptx import check_arg_types, kernel_params

CURRENT_ARCH = "compute_90"  # Hopper: current, and accepted by nvcc 12 and 13


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test compiles into its own cache, so a stale entry elsewhere cannot hide an error."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITFUSION_CACHE_DIR", str(cache))
    return cache


def test_nvcc_is_installed() -> None:
    # Not a skip: CI has the CUDA toolkit, and the compile checks below are its point.
    assert find_nvcc()


@pytest.mark.parametrize("source", sorted(CUDA_SOURCES.glob("*.cu")), ids=lambda p: p.name)
def test_every_source_compiles_to_ptx(source: Path) -> None:
    ptx = compile_cuda(source, "ptx", CURRENT_ARCH).decode()
    assert ptx.endswith("\0"), "PTX is handed to cuModuleLoadData as a C string"
    assert kernel_params(ptx), f"{source.name} defines no kernel"


def test_builtin_twins_have_the_numpy_twins_signatures() -> None:
    kernels = kernel_params(compile_cuda(BUILTINS_SOURCE, "ptx", CURRENT_ARCH).decode())
    assert sorted(kernels) == sorted(BUILTINS), "every built-in needs exactly one CUDA twin"
    for name, builtin in BUILTINS.items():
        check_arg_types(name, builtin.arg_types, kernels[name])


def test_builtins_build_machine_code_for_a_known_gpu_and_cache_it(private_cache: Path) -> None:
    image = builtins_image((9, 0))
    assert image.startswith(b"\x7fELF"), "sm_90 is known to nvcc: expected a cubin"
    cached = list((private_cache / "cuda").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == image
    assert builtins_image((9, 0)) == image  # from the cache this time


def test_builtins_fall_back_to_portable_ptx_for_an_unknown_gpu() -> None:
    image = builtins_image((99, 9))  # no nvcc knows sm_999
    assert b".target sm_75" in image and image.endswith(b"\0")


def test_a_broken_source_reports_nvccs_diagnostics(tmp_path: Path) -> None:
    source = tmp_path / "broken.cu"
    source.write_text('extern "C" __global__ void k(int n) { undeclared = n; }\n')
    with pytest.raises(NvccError, match="undeclared"):
        compile_cuda(source, "ptx", CURRENT_ARCH)


def test_a_missing_nvcc_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NVCC", str(tmp_path / "no-nvcc"))
    with pytest.raises(NvccNotFound, match=r"\$NVCC"):
        compile_cuda(BUILTINS_SOURCE, "ptx", CURRENT_ARCH)
    monkeypatch.delenv("NVCC")
    for variable in ("CUDA_ROOT", "CUDA_PATH"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    monkeypatch.setattr(cuda_build, "_FALLBACK_NVCC", tmp_path / "default" / "nvcc")
    with pytest.raises(NvccNotFound) as raised:
        find_nvcc()
    for looked_at in (tmp_path / "toolkit" / "bin" / "nvcc", tmp_path / "default" / "nvcc"):
        assert str(looked_at) in str(raised.value)


def test_ptxas_assembles_tenants_ptx_and_explains_what_it_refuses() -> None:
    ptx = compile_cuda(BUILTINS_SOURCE, "ptx", "compute_75")
    assert ptx_to_cubin(ptx, "sm_90").startswith(b"\x7fELF")
    broken = b".version 8.0\n.target sm_75\n.address_size 64\nthis is not ptx\n\0"
    with pytest.raises(NvccError, match=r"module\.ptx, line 4.*syntax error"):
        ptx_to_cubin(broken, "sm_90")
    with pytest.raises(NvccError, match="gpu-name"):  # a GPU newer than this ptxas
        ptx_to_cubin(ptx, "sm_999")
