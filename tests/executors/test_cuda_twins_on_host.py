"""The built-ins' CUDA twins, run on the CPU, against their NumPy twins.

Without a GPU the CUDA source would only be compiled, never run. So the suite also compiles
``executors/cuda/builtins.cu`` as host C++ under a small emulation of CUDA's execution model
(``cuda_host/emulation.cpp``: blocks in turn, a block's threads as real threads with a real barrier)
and checks every kernel over several launch geometries against its NumPy twin: the same
comparison the GPU suite makes on a GPU (``tests/gpu``), here on every CI run. It finds indexing,
grid-stride and edge-case mistakes; it cannot find what only a GPU does differently (warps, memory
ordering, the device's own expf).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from executors import BUILTINS, KernelFault
from executors.cuda_build import BUILTINS_SOURCE

EMULATION = Path(__file__).with_name("cuda_host") / "emulation.cpp"
GEOMETRIES = [((1, 1, 1), (1, 1, 1)), ((7, 1, 1), (96, 1, 1)), ((2, 3, 2), (4, 4, 2))]
_C_TYPES = {"i": ctypes.c_int32, "q": ctypes.c_int64, "f": ctypes.c_float, "P": ctypes.c_uint64}


@pytest.fixture(scope="module")
def host_gpu(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++20 compiler (g++) is needed to run the CUDA twins on the CPU"
    library = tmp_path_factory.mktemp("cuda_host") / "builtins_on_host.so"
    subprocess.run(
        [compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-shared", "-fPIC",
         f'-DKERNELS="{BUILTINS_SOURCE}"', "-x", "c++", str(EMULATION), "-o", str(library)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lib = ctypes.CDLL(str(library))
    lib.bf_launch.restype = ctypes.c_int
    return lib


class HostMemory:
    """Host arrays addressed by their real addresses: the CUDA twin gets the addresses as device
    pointers, the NumPy twin resolves them back to views (KernelMemory)."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def put(self, array: np.ndarray) -> int:
        array = np.array(array, copy=True, order="C")  # each twin works on its own copy
        self.arrays.append(array)
        return int(array.ctypes.data) if array.nbytes else 0

    def view(self, ptr: int, dtype: npt.DTypeLike, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        for array in self.arrays:
            start = array.ctypes.data
            if start <= ptr and ptr + count * dt.itemsize <= start + array.nbytes:
                raw = array.view(np.uint8)[ptr - start : ptr - start + count * dt.itemsize]
                return raw.view(dt)
        raise KernelFault(f"no host array holds {count} x {dt} at {ptr:#x}")


def run_twins(
    lib: ctypes.CDLL,
    name: str,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    make_args: Any,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Run ``name`` on fresh copies of the same inputs with each twin; their arrays after it.

    ``make_args(put)`` builds the arguments, calling ``put(array)`` for each buffer.
    """
    results = []
    for twin in ("cuda", "numpy"):
        memory = HostMemory()
        args = make_args(memory.put)
        builtin = BUILTINS[name]
        if twin == "numpy":
            builtin.run(memory, tuple(args))
        else:
            values = [
                _C_TYPES[code](value) for code, value in zip(builtin.arg_types, args, strict=True)
            ]
            params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            assert lib.bf_launch(name.encode(), *grid, *block, params) == 0
        results.append(memory.arrays)
    return results[0], results[1]


def random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(("grid", "block"), GEOMETRIES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 33, 1000])
def test_elementwise_kernels_are_bit_identical(host_gpu: ctypes.CDLL, grid, block, n: int) -> None:
    rng = np.random.default_rng(n)
    x, y = random(rng, n), random(rng, n)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45], np.float32)
    relu_in = np.concatenate([x, special])
    cases = {
        "saxpy": lambda put: [n, 1.7, put(x), put(y)],
        "fill": lambda put: [n, -2.5, put(np.full(n + 3, 7.0, np.float32))],
        "relu": lambda put: [len(relu_in), put(relu_in), put(np.zeros_like(relu_in))],
    }
    for name, make_args in cases.items():
        cuda, numpy = run_twins(host_gpu, name, grid, block, make_args)
        for ours, theirs in zip(cuda, numpy, strict=True):
            np.testing.assert_array_equal(
                ours.view(np.uint32), theirs.view(np.uint32), err_msg=name
            )


@pytest.mark.parametrize(("grid", "block"), GEOMETRIES, ids=str)
def test_saxpy_and_relu_in_place(host_gpu: ctypes.CDLL, grid, block) -> None:
    x = random(np.random.default_rng(1), 301)
    for name, make_args in {
        "saxpy": lambda put: [301, -0.5, (p := put(x)), p],
        "relu": lambda put: [301, (p := put(x)), p],
    }.items():
        cuda, numpy = run_twins(host_gpu, name, grid, block, make_args)
        np.testing.assert_array_equal(cuda[0], numpy[0], err_msg=name)


@pytest.mark.parametrize(("grid", "block"), GEOMETRIES, ids=str)
@pytest.mark.parametrize(
    ("m", "n", "k", "alpha", "beta"),
    [(3, 4, 5, 1.0, 0.0), (17, 9, 31, -2.0, 0.5), (5, 6, 0, np.inf, 0.5), (0, 3, 4, 1.0, 1.0)],
)
def test_gemm(host_gpu: ctypes.CDLL, grid, block, m, n, k, alpha, beta) -> None:
    rng = np.random.default_rng(m * 100 + k)
    a, b = random(rng, m, k), random(rng, k, n)
    c = np.full((m, n), np.nan, np.float32) if beta == 0 else random(rng, m, n)
    cuda, numpy = run_twins(
        host_gpu, "gemm", grid, block, lambda put: [m, n, k, alpha, put(a), put(b), beta, put(c)]
    )
    scale = np.abs(a) @ np.abs(b) * abs(alpha) if k else np.zeros((m, n), np.float32)
    kept = np.abs(beta * c) if beta else 0.0  # beta == 0: C is not read (it holds NaN here)
    tolerance = 1e-5 * (scale + kept + 1e-6)
    assert not np.isnan(cuda[2]).any()
    np.testing.assert_array_less(np.abs(cuda[2] - numpy[2]), tolerance + 1e-30)


@pytest.mark.parametrize(("grid", "block"), GEOMETRIES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 13), (3, 0), (2, 300)])
def test_softmax(host_gpu: ctypes.CDLL, grid, block, rows: int, cols: int) -> None:
    x = random(np.random.default_rng(rows), rows, cols) * 30
    if rows and cols:
        x[0, 0] = 1000.0  # exp would overflow without subtracting the row's max
    for in_place in (False, True):
        cuda, numpy = run_twins(
            host_gpu,
            "softmax",
            grid,
            block,
            lambda put, same=in_place: [
                rows,
                cols,
                (p := put(x)),
                p if same else put(np.zeros_like(x)),
            ],
        )
        np.testing.assert_allclose(cuda[-1], numpy[-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("grid", "block"), [*GEOMETRIES, ((3, 1, 1), (33, 1, 1)), ((1, 1, 1), (1024, 1, 1))], ids=str
)
@pytest.mark.parametrize("n", [0, 1, 1000, 4097])
def test_reduce_sum(host_gpu: ctypes.CDLL, grid, block, n: int) -> None:
    x = random(np.random.default_rng(n), n)
    out = np.array([42.0], np.float32)  # an empty sum leaves it alone, on both twins
    cuda, numpy = run_twins(host_gpu, "reduce_sum", grid, block, lambda put: [n, put(x), put(out)])
    np.testing.assert_allclose(cuda[1], numpy[1], rtol=1e-6, atol=1e-6)
    if n == 0:
        assert cuda[1][0] == 42.0


def test_busy_spins_for_its_time(host_gpu: ctypes.CDLL) -> None:
    started = time.perf_counter()
    run_twins(host_gpu, "busy", (1, 1, 1), (2, 1, 1), lambda put: [3000])
    elapsed = time.perf_counter() - started
    assert elapsed >= 2 * 0.003  # each twin held its "device" for 3 ms


def test_every_builtin_is_emulated(host_gpu: ctypes.CDLL) -> None:
    for name in BUILTINS:
        params = (ctypes.c_void_p * 0)()
        # A launch of zero blocks runs nothing but proves the kernel is in the table.
        assert host_gpu.bf_launch(name.encode(), 0, 1, 1, 1, 1, 1, params) == 0, name
    assert host_gpu.bf_launch(b"no_such_kernel", 1, 1, 1, 1, 1, 1, None) == -1
