"""The PyCUDA executor on a real NVIDIA GPU: it must behave like the NumPy reference device.

- Built-in kernels: every built-in runs the same launch on a ``PycudaExecutor`` tenant and on a
  ``NumpyExecutor`` tenant (random float32 inputs, odd sizes, 1-D and 3-D geometries) and the
  results are compared: bit for bit where the CUDA twin rounds as NumPy does (saxpy, fill, relu),
  within float32 rounding bounds where it adds in another order (gemm, softmax, reduce_sum).
- Errors: the same executor errors as on the NumPy device, raised before anything reaches the
  GPU, so a refused launch never costs a tenant its context.
- Memory: the context's own cost is charged, limits hold exactly, tenants cannot reach each
  other's pointers, and closing a tenant gives its promise back.
- User modules (PTX, cubin, fatbin, compiled here with nvcc) and their globals, fault isolation
  between tenants' contexts, streams and events (queries and waits too), device attributes,
  16-bit memsets, the server end to end, and weighted fair sharing of the GPU.

Every test skips, naming what is missing, where no usable GPU and PyCUDA are present. Device work
goes through ``Executor.submit`` as the server drives it (``call`` waits for a reply, ``post`` does
not); each wait is bounded, so a hung worker fails a test instead of stalling the run.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pytest

import bitfusion_net as bf
from executors import (
    BUILTINS,
    DeferredError,
    DeviceError,
    DeviceOutOfMemory,
    Executor,
    FunctionInfo,
    GpuUnavailable,
    InvalidHandle,
    InvalidValue,
    KernelFault,
    NumpyExecutor,
    PycudaExecutor,
    Tenant,
    Unsupported,
)
from executors.base import arg_struct_format
from executors.cuda_build import (
    BUILTINS_SOURCE,
    NVCC_FLAGS,
    PORTABLE_PTX_ARCH,
    NvccError,
    compile_cuda,
    find_nvcc,
)
from executors.pycuda_device import PycudaTenant

# The integration helpers live beside the integration tests, which pytest only puts on sys.path
# when it collects them; this file must also run on its own (pytest tests/gpu).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from integration_support import CliServer, run, serve  # noqa: E402

pytestmark = pytest.mark.gpu

T = TypeVar("T")

MiB = 2**20
GiB = 2**30
F32 = np.float32
EXECUTOR_MEMORY = 8 * GiB  # what the module's executor offers its tenants
TENANT_LIMIT = 2 * GiB  # each tenant's own CUDA context alone takes hundreds of MiB
TIMEOUT_S = 60.0  # the most one submitted call may take (a context, a module JIT, nvcc...)
SERVER_TEST_S = 90.0  # one asyncio.run() of a server test (pytest-timeout is 120 s)
CLI_START_S = 60.0  # a server subprocess importing PyCUDA and starting CUDA
NVCC_TIMEOUT_S = 120
NAN_BITS = 0x7FC0_0000  # a float32 quiet NaN, as memset_d32 writes it
FILL_BITS = 0xDEAD_BEEF
# %globaltimer, which ``busy`` spins on, may advance in steps of up to a microsecond, so a busy
# kernel can end that much short of its nominal time as CUDA events measure it.
TIMER_SLACK_MS = 0.01

Dim3 = tuple[int, int, int]

GEOMETRIES = [
    pytest.param(((1, 1, 1), (1, 1, 1)), id="one-thread"),
    pytest.param(((7, 1, 1), (96, 1, 1)), id="1d-7x96"),
    pytest.param(((2, 3, 2), (4, 4, 2)), id="3d-2x3x2-4x4x2"),
]

# Kernels of the user-module tests: mixed argument sizes, so that the executor's repacking of the
# wire's unpadded arguments into CUDA's naturally aligned parameter buffer is exercised.
USER_KERNELS = r"""
// affine: y[i] = scale*x[i] + offset, in double; every result is exact in double for scale 0.5.
extern "C" __global__ void affine(int n, double scale, const float* x, float* y, long long offset) {
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = (float)(scale * (double)x[i] + (double)offset);
    }
}

// small_args: echoes 1-, 2- and 4-byte arguments, which CUDA reads at their natural alignment.
extern "C" __global__ void small_args(signed char b, short h, unsigned char ub, float f, int* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        out[0] = b;
        out[1] = h;
        out[2] = ub;
        out[3] = (int)f;
    }
}

// write_to: stores through whatever pointer it is given; given a bad one, the context faults.
extern "C" __global__ void write_to(int* p, int value) {
    *p = value;
}
"""
# A module with globals (MODULE_GET_GLOBAL): a __constant__ table the kernel reads and a
# __device__ array it counts in. Variables at namespace scope keep their names unmangled.
GLOBAL_KERNELS = r"""
__constant__ float coefficients[8];
__device__ int counter[4];

// scaled: y[i] = coefficients[i % 8] * x[i], one multiplication, exact as NumPy's float32 one;
// counter[0] counts the elements done.
extern "C" __global__ void scaled(int n, const float* x, float* y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = coefficients[i % 8] * x[i];
        atomicAdd(&counter[0], 1);
    }
}
"""
SCALED_ARG_TYPES = "iPP"
AFFINE_ARG_TYPES = "idPPq"
SMALL_ARGS_ARG_TYPES = "bhBfP"
WRITE_TO_ARG_TYPES = "Pi"


# -- driving an executor ----------------------------------------------------------------------------
def call(executor: Executor, tenant: Tenant, op: Callable[[], T], timeout: float = TIMEOUT_S) -> T:
    """Submit ``op`` wanting a reply, wait for it, and return its result or raise its error."""
    return cast(T, executor.call(tenant, op, timeout))


def close_tenant(executor: Executor, tenant: Tenant) -> None:
    """Close ``tenant`` and wait until its memory is back."""
    closed = threading.Event()
    executor.close_tenant(tenant, on_done=closed.set)
    assert closed.wait(TIMEOUT_S), "the tenant was not released in time"


@dataclass(eq=False)
class Side:
    """One tenant on one device, driven through ``submit`` as the server drives it."""

    executor: Executor
    tenant: Tenant
    allocations: list[int] = field(default_factory=list)
    functions: dict[str, FunctionInfo] = field(default_factory=dict)

    def call(self, op: Callable[[], T]) -> T:
        return call(self.executor, self.tenant, op)

    def post(self, op: Callable[[], Any], tag: int = 0) -> None:
        """Submit without a reply, as the server does for asynchronous CUDA calls."""
        self.executor.submit(self.tenant, op, wants_reply=False, tag=tag)

    def memory_used(self) -> int:
        return self.executor.usage(self.tenant).memory_used

    def mem_get_info(self) -> tuple[int, int]:
        return self.call(self.tenant.mem_get_info)

    def alloc(self, nbytes: int) -> int:
        ptr = self.call(lambda: self.tenant.mem_alloc(nbytes))
        self.allocations.append(ptr)
        return ptr

    def free(self, ptr: int) -> None:
        self.call(lambda: self.tenant.mem_free(ptr))
        self.allocations.remove(ptr)

    def free_all(self) -> None:
        while self.allocations:
            self.free(self.allocations[-1])

    def upload(self, array: np.ndarray) -> int:
        ptr = self.alloc(array.nbytes)
        payload = memoryview(np.ascontiguousarray(array).tobytes())
        self.call(lambda: self.tenant.memcpy_htod(ptr, payload, 0))
        return ptr

    def download(self, ptr: int, count: int, dtype: Any = F32) -> np.ndarray:
        host = np.empty(count, dtype)
        self.call(lambda: self.tenant.memcpy_dtoh(memoryview(host.data), ptr, 0))
        return host

    def memset32(self, ptr: int, bits: int, count: int) -> None:
        self.call(lambda: self.tenant.memset(ptr, bits, 4, count, 0))

    def function(self, name: str) -> FunctionInfo:
        """A built-in kernel (module 0), looked up once per tenant."""
        info = self.functions.get(name)
        if info is None:
            info = self.functions[name] = self.call(lambda: self.tenant.get_function(0, name, None))
        return info

    def launch(
        self,
        name: str,
        *args: Any,
        grid: Dim3 = (1, 1, 1),
        block: Dim3 = (128, 1, 1),
        shared_mem: int = 0,
        stream: int = 0,
    ) -> None:
        self.launch_function(
            self.function(name), *args, grid=grid, block=block, shared_mem=shared_mem, stream=stream
        )

    def launch_function(
        self,
        info: FunctionInfo,
        *args: Any,
        grid: Dim3 = (1, 1, 1),
        block: Dim3 = (128, 1, 1),
        shared_mem: int = 0,
        stream: int = 0,
    ) -> None:
        packed = struct.pack(arg_struct_format(info.arg_types), *args)
        self.call(lambda: self.tenant.launch(info.handle, grid, block, shared_mem, stream, packed))


class Tenants:
    """Opens tenants on the module's GPU and closes whatever a test leaves open."""

    def __init__(self, executor: PycudaExecutor) -> None:
        self.executor = executor
        self._open: list[Side] = []

    def open(self, limit: int = TENANT_LIMIT, weight: float = 1.0) -> Side:
        side = Side(self.executor, self.executor.open_tenant(limit, weight))
        self._open.append(side)
        return side

    def close(self, side: Side) -> None:
        self._open.remove(side)
        close_tenant(self.executor, side.tenant)

    def close_all(self) -> None:
        while self._open:
            self.close(self._open[-1])


class TwinPair:
    """A tenant on the GPU and one on the NumPy device, kept across the twin tests.

    After each test its allocations are freed; a tenant that cannot free them (its context was
    lost to a fault, which is itself a failure of that test) is closed and replaced, so one
    failure does not cascade into the tests after it.
    """

    def __init__(self, gpu: PycudaExecutor, reference: NumpyExecutor) -> None:
        self._executors: tuple[Executor, Executor] = (gpu, reference)
        self._sides: list[Side | None] = [None, None]

    def sides(self) -> tuple[Side, Side]:
        for index, executor in enumerate(self._executors):
            if self._sides[index] is None:
                self._sides[index] = Side(executor, executor.open_tenant(TENANT_LIMIT, 1.0))
        gpu_side, reference_side = self._sides
        assert gpu_side is not None and reference_side is not None
        return gpu_side, reference_side

    def run(self, work: Callable[[Side], T]) -> tuple[T, T]:
        """``work`` on the GPU tenant, then on the NumPy tenant: (GPU result, NumPy result)."""
        gpu_side, reference_side = self.sides()
        return work(gpu_side), work(reference_side)

    def reset(self) -> None:
        for index, side in enumerate(self._sides):
            if side is None:
                continue
            try:
                side.free_all()
                side.call(side.tenant.synchronize)
            except (DeviceError, DeferredError):
                close_tenant(side.executor, side.tenant)
                self._sides[index] = None

    def close(self) -> None:
        for index, side in enumerate(self._sides):
            if side is not None:
                close_tenant(side.executor, side.tenant)
                self._sides[index] = None


def random_f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(F32)


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _needs_a_gpu(cuda_gpu: None) -> None:
    """Every test here needs the GPU: ``cuda_gpu`` skips it, saying why, where there is none."""


@pytest.fixture(scope="module")
def gpu() -> Iterator[PycudaExecutor]:
    """The module's one GPU executor (module-scoped fixtures run before ``cuda_gpu``, so this
    skips by itself where no GPU is usable)."""
    try:
        executor = PycudaExecutor(memory=EXECUTOR_MEMORY)
    except GpuUnavailable as exc:
        pytest.skip(f"no usable NVIDIA GPU: {exc}")
    try:
        try:
            # nvcc builds the built-ins once (then from its cache), before any test's clock runs.
            executor.builtins_image()
        except Unsupported as exc:
            pytest.fail(f"the built-in kernels must build on a GPU host (nvcc is required): {exc}")
        yield executor
    finally:
        executor.close()


@pytest.fixture(scope="module")
def reference() -> Iterator[NumpyExecutor]:
    executor = NumpyExecutor(memory=4 * GiB)
    yield executor
    executor.close()


@pytest.fixture
def tenants(gpu: PycudaExecutor) -> Iterator[Tenants]:
    opened = Tenants(gpu)
    yield opened
    opened.close_all()


@pytest.fixture(scope="class")
def twin_pair(gpu: PycudaExecutor, reference: NumpyExecutor) -> Iterator[TwinPair]:
    pair = TwinPair(gpu, reference)
    yield pair
    pair.close()


@pytest.fixture
def twins(twin_pair: TwinPair) -> Iterator[TwinPair]:
    yield twin_pair
    twin_pair.reset()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def compile_fatbin(source: Path, arch: str) -> bytes:
    """A fatbin for ``arch`` (machine code plus its PTX); ``compile_cuda`` makes ptx/cubin only."""
    output = source.with_name(f"{source.stem}-{arch}.fatbin")
    command = [find_nvcc(), *NVCC_FLAGS, "-fatbin", f"-arch={arch}", "-o", str(output), str(source)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise NvccError(f"{' '.join(command)} failed:\n{result.stderr or result.stdout}")
    return output.read_bytes()


@pytest.fixture(scope="module")
def user_images(gpu: PycudaExecutor, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """USER_KERNELS as portable PTX, as a cubin and as a fatbin for this GPU."""
    source = tmp_path_factory.mktemp("user-kernels") / "user_kernels.cu"
    source.write_text(USER_KERNELS)
    major, minor = gpu.compute_capability
    arch = f"sm_{major}{minor}"
    try:
        return {
            "ptx": compile_cuda(source, "ptx", PORTABLE_PTX_ARCH, use_cache=False),
            "cubin": compile_cuda(source, "cubin", arch, use_cache=False),
            "fatbin": compile_fatbin(source, arch),
        }
    except NvccError as exc:
        pytest.fail(f"nvcc is required for the GPU tests (it builds the built-ins too): {exc}")


@pytest.fixture(scope="module")
def global_images(
    gpu: PycudaExecutor, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    """GLOBAL_KERNELS as portable PTX and as a cubin for this GPU."""
    source = tmp_path_factory.mktemp("global-kernels") / "global_kernels.cu"
    source.write_text(GLOBAL_KERNELS)
    major, minor = gpu.compute_capability
    try:
        return {
            "ptx": compile_cuda(source, "ptx", PORTABLE_PTX_ARCH, use_cache=False),
            "cubin": compile_cuda(source, "cubin", f"sm_{major}{minor}", use_cache=False),
        }
    except NvccError as exc:
        pytest.fail(f"nvcc is required for the GPU tests (it builds the built-ins too): {exc}")


# -- built-in kernels: the CUDA twins against the NumPy twins ---------------------------------------
class TestBuiltinTwins:
    """The same launches on the GPU and on the NumPy reference device give the same results."""

    def test_every_builtin_is_covered(self) -> None:
        # A new built-in needs its twin test here (busy: test_busy_occupies_the_gpu_for_its_time).
        assert set(BUILTINS) == {"saxpy", "fill", "gemm", "relu", "softmax", "reduce_sum", "busy"}

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    @pytest.mark.parametrize("n", [1, 3, 1000, 4099])
    def test_saxpy(
        self, twins: TwinPair, rng: np.random.Generator, geometry: tuple[Dim3, Dim3], n: int
    ) -> None:
        grid, block = geometry
        a = -1.7  # packed as float32 by both: the same a on both devices
        x, y = random_f32(rng, n), random_f32(rng, n)

        def work(side: Side) -> tuple[np.ndarray, np.ndarray]:
            x_ptr, y_ptr = side.upload(x), side.upload(y)
            side.launch("saxpy", n, a, x_ptr, y_ptr, grid=grid, block=block)
            return side.download(y_ptr, n), side.download(x_ptr, n)

        (gpu_y, gpu_x), (ref_y, _) = twins.run(work)
        np.testing.assert_array_equal(gpu_y, ref_y)  # no FMA in the CUDA twin: bit for bit
        np.testing.assert_array_equal(gpu_y, F32(a) * x + y)
        np.testing.assert_array_equal(gpu_x, x)

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    def test_saxpy_in_place(
        self, twins: TwinPair, rng: np.random.Generator, geometry: tuple[Dim3, Dim3]
    ) -> None:
        grid, block = geometry
        x = random_f32(rng, 2049)

        def work(side: Side) -> np.ndarray:
            ptr = side.upload(x)
            side.launch("saxpy", x.size, 3.0, ptr, ptr, grid=grid, block=block)
            return side.download(ptr, x.size)

        gpu_out, ref_out = twins.run(work)
        np.testing.assert_array_equal(gpu_out, ref_out)
        np.testing.assert_array_equal(gpu_out, F32(3.0) * x + x)

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    @pytest.mark.parametrize("n", [1, 3, 1000, 4099])
    @pytest.mark.parametrize("value", [-7.25, float("inf")])
    def test_fill_writes_exactly_n_elements(
        self, twins: TwinPair, geometry: tuple[Dim3, Dim3], n: int, value: float
    ) -> None:
        grid, block = geometry
        pad = 64

        def work(side: Side) -> np.ndarray:
            ptr = side.alloc(4 * (n + pad))
            side.memset32(ptr, FILL_BITS, n + pad)
            side.launch("fill", n, value, ptr, grid=grid, block=block)
            return side.download(ptr, n + pad, np.uint32)

        gpu_out, ref_out = twins.run(work)
        np.testing.assert_array_equal(gpu_out, ref_out)  # the bit patterns, padding included
        np.testing.assert_array_equal(gpu_out[:n].view(F32), np.full(n, value, F32))
        assert (gpu_out[n:] == FILL_BITS).all()

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    @pytest.mark.parametrize("n", [1, 3, 1000, 4099])
    def test_relu(
        self, twins: TwinPair, rng: np.random.Generator, geometry: tuple[Dim3, Dim3], n: int
    ) -> None:
        grid, block = geometry
        x = random_f32(rng, n)
        specials = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, -1.0], F32)
        x[: min(n, specials.size)] = specials[:n]

        def work(side: Side) -> tuple[np.ndarray, np.ndarray]:
            x_ptr = side.upload(x)
            y_ptr = side.alloc(x.nbytes)
            side.launch("relu", n, x_ptr, y_ptr, grid=grid, block=block)
            out = side.download(y_ptr, n)
            side.launch("relu", n, x_ptr, x_ptr, grid=grid, block=block)  # in place
            return out, side.download(x_ptr, n)

        (gpu_out, gpu_in_place), (ref_out, ref_in_place) = twins.run(work)
        expected = np.where(x > 0, x, F32(0)).astype(F32)  # NaN -> 0, like CUDA's fmaxf
        for result in (gpu_out, gpu_in_place, ref_out, ref_in_place):
            assert not np.isnan(result).any()
            np.testing.assert_array_equal(result, expected)

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    @pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33), (64, 257)])
    def test_softmax(
        self,
        twins: TwinPair,
        rng: np.random.Generator,
        geometry: tuple[Dim3, Dim3],
        shape: tuple[int, int],
    ) -> None:
        grid, block = geometry
        rows, cols = shape
        x = random_f32(rng, rows, cols) * 3
        x[0] += 1000  # would overflow exp() without subtracting the row max

        def work(side: Side) -> tuple[np.ndarray, np.ndarray]:
            x_ptr = side.upload(x)
            y_ptr = side.alloc(x.nbytes)
            side.launch("softmax", rows, cols, x_ptr, y_ptr, grid=grid, block=block)
            out = side.download(y_ptr, x.size).reshape(rows, cols)
            side.launch("softmax", rows, cols, x_ptr, x_ptr, grid=grid, block=block)  # in place
            return out, side.download(x_ptr, x.size).reshape(rows, cols)

        (gpu_out, gpu_in_place), (ref_out, ref_in_place) = twins.run(work)
        # expf and NumPy's exp are each within a few ulp; the sums are both taken in double.
        np.testing.assert_allclose(gpu_out, ref_out, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(gpu_in_place, gpu_out)
        np.testing.assert_array_equal(ref_in_place, ref_out)
        np.testing.assert_allclose(gpu_out.sum(axis=1, dtype=np.float64), 1.0, rtol=1e-5)

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    @pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (5, 3, 7), (33, 17, 9), (64, 48, 300)])
    def test_gemm(
        self,
        twins: TwinPair,
        rng: np.random.Generator,
        geometry: tuple[Dim3, Dim3],
        m: int,
        n: int,
        k: int,
    ) -> None:
        grid, block = geometry
        alpha, beta = 1.5, -0.5
        a, b, c = random_f32(rng, m, k), random_f32(rng, k, n), random_f32(rng, m, n)

        def work(side: Side) -> np.ndarray:
            a_ptr, b_ptr, c_ptr = side.upload(a), side.upload(b), side.upload(c)
            side.launch("gemm", m, n, k, alpha, a_ptr, b_ptr, beta, c_ptr, grid=grid, block=block)
            return side.download(c_ptr, m * n).reshape(m, n)

        gpu_out, ref_out = twins.run(work)
        # Both sum k float32 products in float32, in different orders: each is within
        # (k + 2) * eps of the exact result, relative to the sum of the terms' magnitudes.
        magnitude = abs(alpha) * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
        magnitude += abs(beta) * np.abs(c.astype(np.float64))
        atol = 2 * (k + 2) * float(np.finfo(F32).eps) * float(magnitude.max())
        np.testing.assert_allclose(gpu_out, ref_out, rtol=1e-5, atol=atol)
        exact = alpha * (a.astype(np.float64) @ b.astype(np.float64)) + beta * c
        np.testing.assert_allclose(gpu_out, exact, rtol=1e-5, atol=atol)

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    def test_gemm_with_beta_zero_does_not_read_c(
        self, twins: TwinPair, rng: np.random.Generator, geometry: tuple[Dim3, Dim3]
    ) -> None:
        grid, block = geometry
        m, n, k = 9, 11, 13
        a, b = random_f32(rng, m, k), random_f32(rng, k, n)

        def work(side: Side) -> np.ndarray:
            a_ptr, b_ptr = side.upload(a), side.upload(b)
            c_ptr = side.alloc(4 * m * n)
            side.memset32(c_ptr, NAN_BITS, m * n)  # uninitialised memory may hold NaN bits
            side.launch("gemm", m, n, k, 2.0, a_ptr, b_ptr, 0.0, c_ptr, grid=grid, block=block)
            return side.download(c_ptr, m * n).reshape(m, n)

        gpu_out, ref_out = twins.run(work)
        assert not np.isnan(gpu_out).any()
        assert not np.isnan(ref_out).any()
        magnitude = 2.0 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
        atol = 2 * (k + 2) * float(np.finfo(F32).eps) * float(magnitude.max())
        np.testing.assert_allclose(gpu_out, ref_out, rtol=1e-5, atol=atol)

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    def test_gemm_with_k_zero_only_scales_c(
        self, twins: TwinPair, rng: np.random.Generator, geometry: tuple[Dim3, Dim3]
    ) -> None:
        grid, block = geometry
        m, n = 5, 7
        c = random_f32(rng, m, n)

        def work(side: Side) -> tuple[np.ndarray, np.ndarray]:
            c_ptr = side.upload(c)
            # A and B are null: with k == 0 neither is read.
            side.launch("gemm", m, n, 0, 1.0, 0, 0, 1.5, c_ptr, grid=grid, block=block)
            scaled = side.download(c_ptr, m * n)
            side.memset32(c_ptr, NAN_BITS, m * n)
            side.launch("gemm", m, n, 0, 1.0, 0, 0, 0.0, c_ptr, grid=grid, block=block)
            return scaled, side.download(c_ptr, m * n)

        (gpu_scaled, gpu_zeroed), (ref_scaled, ref_zeroed) = twins.run(work)
        np.testing.assert_array_equal(gpu_scaled, ref_scaled)
        np.testing.assert_array_equal(gpu_scaled, (F32(1.5) * c).ravel())
        np.testing.assert_array_equal(gpu_zeroed, ref_zeroed)
        np.testing.assert_array_equal(gpu_zeroed, np.zeros(m * n, F32))

    @pytest.mark.parametrize("geometry", GEOMETRIES)
    @pytest.mark.parametrize("n", [1, 3, 1000, 40_001])
    def test_reduce_sum(
        self, twins: TwinPair, rng: np.random.Generator, geometry: tuple[Dim3, Dim3], n: int
    ) -> None:
        grid, block = geometry
        x = random_f32(rng, n)

        def work(side: Side) -> float:
            x_ptr = side.upload(x)
            out_ptr = side.upload(np.array([42.0], F32))
            side.launch("reduce_sum", n, x_ptr, out_ptr, grid=grid, block=block)
            return float(side.download(out_ptr, 1)[0])

        gpu_sum, ref_sum = twins.run(work)
        # Both add in double and round once to float32: at most an ulp apart.
        np.testing.assert_allclose(gpu_sum, ref_sum, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gpu_sum, x.astype(np.float64).sum(), rtol=1e-6, atol=1e-6)

    def test_reduce_sum_of_nothing_leaves_out_alone(self, twins: TwinPair) -> None:
        def work(side: Side) -> float:
            x_ptr = side.upload(np.ones(4, F32))
            out_ptr = side.upload(np.array([42.0], F32))
            side.launch("reduce_sum", 0, x_ptr, out_ptr, grid=(2, 1, 1), block=(64, 1, 1))
            return float(side.download(out_ptr, 1)[0])

        assert twins.run(work) == (42.0, 42.0)  # the NumPy twin writes nothing when n == 0

    @pytest.mark.parametrize(
        ("name", "args"),
        [
            ("saxpy", (0, 1.0, 0, 0)),
            ("fill", (0, 1.0, 0)),
            ("gemm", (0, 4, 4, 1.0, 0, 0, 1.0, 0)),
            ("gemm", (4, 0, 4, 1.0, 0, 0, 1.0, 0)),
            ("relu", (0, 0, 0)),
            ("softmax", (0, 4, 0, 0)),
            ("softmax", (3, 0, 0, 0)),
            ("reduce_sum", (0, 0, 0)),
            ("busy", (0,)),
        ],
    )
    @pytest.mark.parametrize("geometry", GEOMETRIES)
    def test_zero_sizes_address_no_memory(
        self, twins: TwinPair, name: str, args: tuple[Any, ...], geometry: tuple[Dim3, Dim3]
    ) -> None:
        grid, block = geometry

        def work(side: Side) -> None:
            side.launch(name, *args, grid=grid, block=block)  # null pointers, never dereferenced
            side.call(side.tenant.synchronize)

        twins.run(work)

    @pytest.mark.parametrize(
        ("name", "args"),
        [
            ("saxpy", (-1, 1.0, 0, 0)),
            ("fill", (-1, 1.0, 0)),
            ("gemm", (2, -1, 2, 1.0, 0, 0, 1.0, 0)),
            ("gemm", (2, 2, -1, 1.0, 0, 0, 1.0, 0)),
            ("relu", (-5, 0, 0)),
            ("softmax", (-1, 4, 0, 0)),
            ("softmax", (4, -1, 0, 0)),
            ("reduce_sum", (-1, 0, 0)),
            ("busy", (-1,)),
        ],
    )
    def test_negative_sizes_are_invalid(
        self, twins: TwinPair, name: str, args: tuple[Any, ...]
    ) -> None:
        def work(side: Side) -> None:
            with pytest.raises(InvalidValue):
                side.launch(name, *args)
            side.call(side.tenant.synchronize)  # refused before launch: the context is fine

        twins.run(work)

    def test_memset_and_copies_match(self, twins: TwinPair) -> None:
        data = (np.arange(1000) * 7 % 256).astype(np.uint8)  # every byte value appears

        def work(side: Side) -> np.ndarray:
            t = side.tenant
            ptr = side.upload(data)
            other = side.alloc(data.size)
            side.call(lambda: t.memcpy_dtod(other, ptr, data.size, 0))
            side.call(lambda: t.memset(other + 4, 0x1AB, 1, 13, 0))  # masked to 0xAB
            side.call(lambda: t.memset(other + 100, 0x1_3F80_0000, 4, 25, 0))  # masked: 1.0f
            side.call(lambda: t.memcpy_dtod(ptr + 10, ptr, 500, 0))  # forward overlap
            side.call(lambda: t.memcpy_dtod(ptr + 600, ptr + 620, 300, 0))  # backward overlap
            side.call(lambda: t.memcpy_dtod(ptr + 5, other + 3, 1, 0))
            both = np.concatenate(
                [side.download(ptr, data.size, np.uint8), side.download(other, data.size, np.uint8)]
            )
            return both

        gpu_bytes, ref_bytes = twins.run(work)
        np.testing.assert_array_equal(gpu_bytes, ref_bytes)
        expected = data.copy()
        expected[10:510] = data[0:500]
        expected[600:900] = expected[620:920].copy()
        expected[5] = data[3]
        np.testing.assert_array_equal(gpu_bytes[: data.size], expected)
        copied = gpu_bytes[data.size :]
        assert copied[4:17].tolist() == [0xAB] * 13
        assert copied[100:200].view(F32).tolist() == [1.0] * 25

    def test_errors_match_the_numpy_device(self, twins: TwinPair) -> None:
        cases: list[tuple[str, Callable[[Side, int, int], object], type[Exception]]] = [
            ("kernel past the end", lambda s, p, o: s.launch("fill", 65, 0.0, p), KernelFault),
            ("kernel before the start", lambda s, p, o: s.launch("fill", 1, 0.0, p - 4),
             KernelFault),
            ("kernel output past the end",
             lambda s, p, o: s.launch("reduce_sum", 1, p, o + 4), KernelFault),
            ("kernel misaligned", lambda s, p, o: s.launch("reduce_sum", 4, p + 2, o),
             KernelFault),
            ("kernel on no allocation", lambda s, p, o: s.launch("relu", 4, 0x10, p),
             KernelFault),
            ("dtoh past the end",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_dtoh(memoryview(bytearray(257)), p, 0)),
             InvalidHandle),
            ("dtoh before the start",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_dtoh(memoryview(bytearray(4)), p - 4, 0)),
             InvalidHandle),
            ("htod past the end",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_htod(p + 8, memoryview(bytes(249)), 0)),
             InvalidHandle),
            ("dtod past the end",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_dtod(o, p + 254, 4, 0)), InvalidHandle),
            ("dtod negative size",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_dtod(o, p, -1, 0)), InvalidValue),
            ("dtoh into read-only memory",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_dtoh(memoryview(bytes(4)), p, 0)),
             InvalidValue),
            ("memset past the end",
             lambda s, p, o: s.call(lambda: s.tenant.memset(p + 4, 0, 4, 64, 0)), InvalidHandle),
            ("memset misaligned",
             lambda s, p, o: s.call(lambda: s.tenant.memset(p + 2, 0, 4, 1, 0)), InvalidValue),
            ("memset item size",
             lambda s, p, o: s.call(lambda: s.tenant.memset(p, 0, 2, 1, 0)), InvalidValue),
            ("memset negative count",
             lambda s, p, o: s.call(lambda: s.tenant.memset(p, 0, 1, -1, 0)), InvalidValue),
            ("free inside an allocation",
             lambda s, p, o: s.call(lambda: s.tenant.mem_free(p + 4)), InvalidHandle),
            ("free of nothing", lambda s, p, o: s.call(lambda: s.tenant.mem_free(0x1234)),
             InvalidHandle),
            ("alloc of nothing", lambda s, p, o: s.call(lambda: s.tenant.mem_alloc(0)),
             InvalidValue),
            ("alloc of less", lambda s, p, o: s.call(lambda: s.tenant.mem_alloc(-1)),
             InvalidValue),
            ("unknown built-in",
             lambda s, p, o: s.call(lambda: s.tenant.get_function(0, "nope", None)),
             InvalidHandle),
            ("built-in with other arg types",
             lambda s, p, o: s.call(lambda: s.tenant.get_function(0, "saxpy", "iPP")),
             InvalidValue),
            ("unknown module",
             lambda s, p, o: s.call(lambda: s.tenant.get_function(7777, "saxpy", None)),
             InvalidHandle),
            ("unknown function",
             lambda s, p, o: s.call(lambda: s.tenant.launch(
                 9999, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<ifQ", 0, 0.0, 0))),
             InvalidHandle),
            ("launch on an unknown stream",
             lambda s, p, o: s.launch("fill", 0, 0.0, 0, stream=12345), InvalidHandle),
            ("arguments too short",
             lambda s, p, o: s.call(lambda: s.tenant.launch(
                 s.function("fill").handle, (1, 1, 1), (1, 1, 1), 0, 0,
                 struct.pack("<ifQ", 0, 0.0, 0)[:-1])),
             InvalidValue),
            ("copy on an unknown stream",
             lambda s, p, o: s.call(lambda: s.tenant.memcpy_htod(p, memoryview(bytes(4)), 12345)),
             InvalidHandle),
            ("synchronize an unknown stream",
             lambda s, p, o: s.call(lambda: s.tenant.stream_synchronize(12345)), InvalidHandle),
            ("destroy the default stream",
             lambda s, p, o: s.call(lambda: s.tenant.stream_destroy(0)), InvalidValue),
            ("synchronize an unknown event",
             lambda s, p, o: s.call(lambda: s.tenant.event_synchronize(12345)), InvalidHandle),
            ("record an unknown event",
             lambda s, p, o: s.call(lambda: s.tenant.event_record(12345, 0)), InvalidHandle),
            ("destroy an unknown event",
             lambda s, p, o: s.call(lambda: s.tenant.event_destroy(12345)), InvalidHandle),
            ("time unknown events",
             lambda s, p, o: s.call(lambda: s.tenant.event_elapsed_ms(12345, 12346)),
             InvalidHandle),
            ("unload an unknown module",
             lambda s, p, o: s.call(lambda: s.tenant.module_unload(12345)), InvalidHandle),
        ]  # fmt: skip

        def work(side: Side) -> list[str]:
            ptr = side.upload(np.arange(64, dtype=F32))  # 256 bytes: no slack after it
            out = side.alloc(4)
            outcomes = []
            for what, action, _expected in cases:
                try:
                    action(side, ptr, out)
                except DeviceError as exc:
                    outcomes.append(f"{what}: {type(exc).__name__}")
                else:
                    outcomes.append(f"{what}: no error")
            # Every error was found before the GPU saw anything: the tenant still works.
            side.launch("fill", 64, 2.5, ptr)
            np.testing.assert_array_equal(side.download(ptr, 64), np.full(64, 2.5, F32))
            return outcomes

        gpu_outcomes, ref_outcomes = twins.run(work)
        expected = [f"{what}: {error.__name__}" for what, _action, error in cases]
        assert ref_outcomes == expected
        assert gpu_outcomes == expected

    def test_launch_geometry_is_validated_against_each_device(self, twins: TwinPair) -> None:
        def work(side: Side) -> None:
            props = side.executor.properties
            threads, (gx, gy, gz), shared = (
                props.max_threads_per_block,
                props.max_grid,
                props.max_shared_memory_per_block,
            )
            refused: list[tuple[Dim3, Dim3, int]] = [
                ((0, 1, 1), (1, 1, 1), 0),
                ((gx + 1, 1, 1), (1, 1, 1), 0),
                ((1, gy + 1, 1), (1, 1, 1), 0),
                ((1, 1, gz + 1), (1, 1, 1), 0),
                ((1, 1, 1), (0, 1, 1), 0),
                ((1, 1, 1), (1, 1, 0), 0),
                ((1, 1, 1), (threads, 2, 1), 0),
                ((1, 1, 1), (1, 1, 1), -1),
                ((1, 1, 1), (1, 1, 1), shared + 1),
            ]
            for grid, block, shared_mem in refused:
                with pytest.raises(InvalidValue):
                    side.launch("fill", 0, 0.0, 0, grid=grid, block=block, shared_mem=shared_mem)
            # The limits themselves are fine (n == 0: every thread finds nothing to do).
            side.launch(
                "fill", 0, 0.0, 0, grid=(1, gy, 1), block=(threads, 1, 1), shared_mem=shared
            )
            side.launch("fill", 0, 0.0, 0, grid=(1, 1, gz), block=(1, 1, 64))
            side.call(side.tenant.synchronize)

        twins.run(work)

    def test_a_block_shape_the_gpu_cannot_run_is_refused(self, twins: TwinPair) -> None:
        # CUDA limits a block's z dimension to 64 threads; ``check_launch`` knows only the total
        # per block, so the GPU itself refuses this launch, synchronously, and the context lives.
        gpu_side, _reference_side = twins.sides()
        with pytest.raises(InvalidValue):
            gpu_side.launch("fill", 0, 0.0, 0, block=(1, 1, 65))
        ptr = gpu_side.alloc(64)
        gpu_side.launch("fill", 16, 3.0, ptr)
        np.testing.assert_array_equal(gpu_side.download(ptr, 16), np.full(16, 3.0, F32))

    def test_sticky_errors(self, twins: TwinPair) -> None:
        def work(side: Side) -> None:
            t = side.tenant
            ptr = side.alloc(16)
            fill = side.function("fill")
            args = struct.pack("<ifQ", 5, 1.0, ptr)  # 5 floats into 16 bytes: refused

            def faulting_launch() -> None:
                t.launch(fill.handle, (1, 1, 1), (32, 1, 1), 0, 0, args)

            side.post(faulting_launch, tag=41)
            side.post(faulting_launch, tag=42)
            side.post(lambda: t.memset(ptr, 0, 1, 16, 0), tag=43)
            with pytest.raises(DeferredError) as caught:
                side.call(t.synchronize)
            failure = caught.value.failure
            assert isinstance(failure.error, KernelFault)
            assert failure.tag == 41
            assert failure.later_failures == 1
            side.call(t.synchronize)  # reported once; the context was never touched
            assert side.download(ptr, 16, np.uint8).tolist() == [0] * 16

        twins.run(work)


# -- busy: the scheduler tests' unit of device time -------------------------------------------------
def test_busy_occupies_the_gpu_for_its_time(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    side.launch("busy", 0, block=(1, 1, 1))  # the context and the built-ins are ready
    start, end = side.call(t.event_create), side.call(t.event_create)
    device_time = gpu.usage(t).device_time
    gpu_time = cast(PycudaTenant, t).gpu_time

    side.post(lambda: t.event_record(start, 0))
    began = time.perf_counter()
    side.launch("busy", 20_000, block=(1, 1, 1))
    wall = time.perf_counter() - began
    side.post(lambda: t.event_record(end, 0))
    side.call(lambda: t.event_synchronize(end))
    elapsed = side.call(lambda: t.event_elapsed_ms(start, end))

    assert 20.0 - TIMER_SLACK_MS <= elapsed < 200.0
    assert 0.020 - TIMER_SLACK_MS / 1000 <= wall < 0.2
    assert gpu.usage(t).device_time - device_time >= 0.020 - TIMER_SLACK_MS / 1000
    assert cast(PycudaTenant, t).gpu_time - gpu_time >= 0.020 - TIMER_SLACK_MS / 1000
    assert gpu.usage(t).kernels == 2

    # Many threads spin side by side: the kernel still takes its time, not a multiple of it.
    side.post(lambda: t.event_record(start, 0))
    side.launch("busy", 5_000, grid=(2, 3, 2), block=(4, 4, 2))
    side.post(lambda: t.event_record(end, 0))
    elapsed = side.call(lambda: t.event_elapsed_ms(start, end))
    assert 5.0 - TIMER_SLACK_MS <= elapsed < 100.0


# -- memory: the context's cost, limits, isolation, promises ----------------------------------------
def test_the_context_is_charged_from_its_first_use(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    assert side.mem_get_info() == (TENANT_LIMIT, TENANT_LIMIT)  # no context yet
    assert side.memory_used() == 0

    first = side.alloc(1)  # creates the context, whose device memory is charged too
    free, total = side.mem_get_info()
    assert total == TENANT_LIMIT
    context_cost = TENANT_LIMIT - free - 256
    assert 0 < context_cost < TENANT_LIMIT
    assert side.memory_used() == TENANT_LIMIT - free

    side.free(first)  # an allocation's charge comes back exactly
    assert side.mem_get_info() == (free + 256, TENANT_LIMIT)
    second = side.alloc(1000)  # charged in units of 256 bytes
    assert side.mem_get_info() == (free + 256 - 1024, TENANT_LIMIT)
    third = side.alloc(256)
    assert side.mem_get_info() == (free + 256 - 1024 - 256, TENANT_LIMIT)
    side.free(second)
    side.free(third)
    assert side.mem_get_info() == (free + 256, TENANT_LIMIT)
    assert side.memory_used() == context_cost


def test_allocations_past_the_limit_are_refused_without_leaking(
    gpu: PycudaExecutor, tenants: Tenants
) -> None:
    side = tenants.open()
    side.alloc(1)
    used = side.memory_used()
    with pytest.raises(DeviceOutOfMemory, match=str(TENANT_LIMIT)):
        side.alloc(TENANT_LIMIT)
    assert side.memory_used() == used
    free = side.mem_get_info()[0]
    assert free == TENANT_LIMIT - used

    rest = side.alloc(free // 256 * 256)  # the whole of what is left can be had
    assert side.mem_get_info()[0] == free % 256
    with pytest.raises(DeviceOutOfMemory):
        side.alloc(1)
    side.free(rest)
    assert side.memory_used() == used
    assert side.mem_get_info() == (free, TENANT_LIMIT)
    assert gpu.usage(side.tenant).memory_high_water == used + free // 256 * 256


def test_a_lease_too_small_for_a_context_is_refused_cleanly(
    gpu: PycudaExecutor, tenants: Tenants
) -> None:
    limit = 64 * 1024  # far less than any CUDA context takes
    side = tenants.open(limit=limit)
    for _ in range(2):  # and again: nothing of the first attempt is left over
        with pytest.raises(DeviceOutOfMemory, match="CUDA context"):
            side.alloc(256)
        assert side.memory_used() == 0
        assert side.mem_get_info() == (limit, limit)


def test_tenants_cannot_touch_each_others_memory(gpu: PycudaExecutor, tenants: Tenants) -> None:
    owner, intruder = tenants.open(), tenants.open()
    data = np.arange(16, dtype=F32)
    ptr = owner.upload(data)
    t = intruder.tenant
    # Function handles are per tenant too (checked while the intruder has none of its own, since
    # both tenants number their handles from 1).
    owners_fill = owner.function("fill")
    with pytest.raises(InvalidHandle):
        intruder.call(
            lambda: t.launch(
                owners_fill.handle, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<ifQ", 0, 0.0, 0)
            )
        )
    mine = intruder.alloc(64)
    with pytest.raises(InvalidHandle, match=hex(ptr)):
        intruder.call(lambda: t.mem_free(ptr))
    with pytest.raises(InvalidHandle):
        intruder.download(ptr, 16)
    with pytest.raises(InvalidHandle):
        intruder.call(lambda: t.memcpy_htod(ptr, memoryview(bytes(4)), 0))
    with pytest.raises(InvalidHandle):
        intruder.call(lambda: t.memset(ptr, 0, 1, 4, 0))
    with pytest.raises(InvalidHandle):
        intruder.call(lambda: t.memcpy_dtod(mine, ptr, 64, 0))
    with pytest.raises(InvalidHandle):
        intruder.call(lambda: t.memcpy_dtod(ptr, mine, 64, 0))
    with pytest.raises(KernelFault):
        intruder.launch("fill", 16, 0.0, ptr)
    with pytest.raises(KernelFault):
        intruder.launch("saxpy", 16, 1.0, ptr, mine)
    intruder.launch("fill", 16, 1.0, mine)  # the intruder is unharmed, and so is the owner
    np.testing.assert_array_equal(intruder.download(mine, 16), np.ones(16, F32))
    np.testing.assert_array_equal(owner.download(ptr, 16), data)


def test_the_device_promises_no_more_than_it_has(gpu: PycudaExecutor, tenants: Tenants) -> None:
    total = gpu.properties.total_memory
    assert gpu.properties.executor == "pycuda"
    assert 0 < total <= EXECUTOR_MEMORY
    with pytest.raises(DeviceOutOfMemory):
        gpu.open_tenant(total + 1, 1.0)
    whole = tenants.open(limit=total)  # fails if an earlier test left a tenant open
    with pytest.raises(DeviceOutOfMemory):
        gpu.open_tenant(1, 1.0)
    whole.alloc(MiB)
    tenants.close(whole)
    again = tenants.open(limit=total)  # closing gave the whole promise back
    again.alloc(MiB)
    assert again.mem_get_info()[1] == total


# -- user modules: PTX, cubin, fatbin ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ptx", "cubin", "fatbin"])
def test_a_user_module_runs(
    gpu: PycudaExecutor,
    tenants: Tenants,
    user_images: dict[str, bytes],
    rng: np.random.Generator,
    kind: str,
) -> None:
    side = tenants.open()
    t = side.tenant
    n = 1000
    x = random_f32(rng, n)
    x_ptr, y_ptr, out_ptr = side.upload(x), side.alloc(x.nbytes), side.alloc(16)
    before = side.memory_used()

    module = side.call(lambda: t.module_load(user_images[kind]))
    assert module != 0
    assert side.memory_used() >= before  # the module's device memory is charged
    affine = side.call(lambda: t.get_function(module, "affine", AFFINE_ARG_TYPES))
    assert affine.arg_types == AFFINE_ARG_TYPES
    assert side.call(lambda: t.get_function(module, "affine", AFFINE_ARG_TYPES)) == affine
    side.launch_function(affine, n, 0.5, x_ptr, y_ptr, 3, grid=(4, 1, 1), block=(128, 1, 1))
    expected = (0.5 * x.astype(np.float64) + 3).astype(F32)
    np.testing.assert_array_equal(side.download(y_ptr, n), expected)

    small = side.call(lambda: t.get_function(module, "small_args", SMALL_ARGS_ARG_TYPES))
    side.launch_function(small, -5, -1234, 200, 7.75, out_ptr, block=(1, 1, 1))
    assert side.download(out_ptr, 4, np.int32).tolist() == [-5, -1234, 200, 7]

    with pytest.raises(InvalidHandle):
        side.call(lambda: t.get_function(module, "no_such_kernel", "i"))

    side.call(lambda: t.module_unload(module))
    assert side.memory_used() == before  # the module's charge came back exactly
    with pytest.raises(InvalidHandle):  # its functions went with it
        side.launch_function(affine, n, 0.5, x_ptr, y_ptr, 3)
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.get_function(module, "affine", AFFINE_ARG_TYPES))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.module_unload(module))
    side.launch("fill", n, 1.0, y_ptr)  # the tenant carries on
    np.testing.assert_array_equal(side.download(y_ptr, n), np.ones(n, F32))


def test_ptx_declarations_are_checked_against_the_ptx(
    gpu: PycudaExecutor, tenants: Tenants, user_images: dict[str, bytes]
) -> None:
    side = tenants.open()
    t = side.tenant
    ptx = user_images["ptx"]
    module = side.call(lambda: t.module_load(ptx.rstrip(b"\0")))  # no NUL: the executor adds it
    for wrong in ["ifPPq", "idPP", "idPPd", "idPPqi", "PdPPq"]:
        with pytest.raises(InvalidValue, match="affine"):
            side.call(partial(t.get_function, module, "affine", wrong))
    for undeclared in ["", "idPPz"]:
        with pytest.raises(InvalidValue):
            side.call(partial(t.get_function, module, "affine", undeclared))
    with pytest.raises(InvalidHandle, match="affine"):  # the message lists the module's kernels
        side.call(lambda: t.get_function(module, "no_such_kernel", "i"))
    write_to = side.call(lambda: t.get_function(module, "write_to", WRITE_TO_ARG_TYPES))
    assert write_to.arg_types == WRITE_TO_ARG_TYPES
    affine = side.call(lambda: t.get_function(module, "affine", AFFINE_ARG_TYPES))
    with pytest.raises(InvalidValue):  # a valid launch needs exactly the declared bytes
        side.call(
            lambda: t.launch(affine.handle, (1, 1, 1), (1, 1, 1), 0, 0, bytes(40))
        )  # 40 is CUDA's padded size, not the wire's 36


@pytest.mark.parametrize("kind", ["ptx", "cubin"])
def test_module_globals_are_addressable_until_the_module_goes(
    gpu: PycudaExecutor,
    tenants: Tenants,
    global_images: dict[str, bytes],
    rng: np.random.Generator,
    kind: str,
) -> None:
    side, neighbour = tenants.open(), tenants.open()
    t = side.tenant
    module = side.call(lambda: t.module_load(global_images[kind]))
    table, table_size = side.call(lambda: t.module_get_global(module, "coefficients"))
    assert table != 0 and table_size == 8 * 4
    assert side.call(lambda: t.module_get_global(module, "coefficients")) == (table, table_size)
    counter, counter_size = side.call(lambda: t.module_get_global(module, "counter"))
    assert counter_size == 4 * 4 and counter != table
    # Copies and memsets reach a global like an allocation: exactly its bytes.
    coefficients = np.arange(1, 9, dtype=F32)
    side.call(lambda: t.memcpy_htod(table, memoryview(coefficients.tobytes()), 0))
    side.call(lambda: t.memset(counter, 0, 4, 4, 0))
    np.testing.assert_array_equal(side.download(table, 8), coefficients)
    n = 1000
    x = random_f32(rng, n)
    x_ptr, y_ptr = side.upload(x), side.alloc(x.nbytes)
    scaled = side.call(lambda: t.get_function(module, "scaled", SCALED_ARG_TYPES))
    side.launch_function(scaled, n, x_ptr, y_ptr, grid=(4, 1, 1), block=(128, 1, 1))
    np.testing.assert_array_equal(side.download(y_ptr, n), coefficients[np.arange(n) % 8] * x)
    assert side.download(counter, 4, np.int32).tolist() == [n, 0, 0, 0]
    with pytest.raises(InvalidHandle):  # one int past the end of the global
        side.call(lambda: t.memset(counter, 0, 4, 5, 0))
    with pytest.raises(InvalidHandle):  # a global is not an allocation: it cannot be freed
        side.call(lambda: t.mem_free(counter))
    with pytest.raises(InvalidHandle):  # another tenant's context knows nothing of it
        neighbour.call(lambda: neighbour.tenant.memset(counter, 0, 4, 1, 0))
    with pytest.raises(InvalidValue, match="no_such_global"):
        side.call(lambda: t.module_get_global(module, "no_such_global"))
    with pytest.raises(InvalidValue, match="module 0"):  # the built-ins have no globals
        side.call(lambda: t.module_get_global(0, "counter"))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.module_get_global(module + 1000, "counter"))
    side.call(lambda: t.module_unload(module))
    with pytest.raises(InvalidHandle):  # its globals went with it
        side.call(lambda: t.memset(counter, 0, 4, 1, 0))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.module_get_global(module, "counter"))
    side.launch("fill", n, 1.0, y_ptr)  # the tenant carries on
    np.testing.assert_array_equal(side.download(y_ptr, n), np.ones(n, F32))


def test_bad_images_are_refused(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    side.alloc(1)
    used = side.memory_used()
    # A truncated cubin is refused before the driver sees it (cuModuleLoadData takes no length):
    # executors/cuda_images.py checks its size fields; tests/executors/test_cuda_images.py more.
    major, minor = gpu.compute_capability
    cubin = compile_cuda(BUILTINS_SOURCE, "cubin", f"sm_{major}{minor}")
    for image in [
        cubin[: len(cubin) // 2],
        b"",
        b"garbage",
        bytes(64),
        b"// not PTX\n.version 8.0\n.target sm_75\n.address_size 64\nthis is not PTX at all\n",
    ]:
        with pytest.raises(InvalidValue):
            side.call(partial(t.module_load, image))
        assert side.memory_used() == used
    side.launch("fill", 0, 0.0, 0)
    side.call(t.synchronize)


def test_module_zero_cannot_be_unloaded(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    side.launch("fill", 0, 0.0, 0)
    # (The NumPy device answers InvalidHandle here, the GPU InvalidValue: either way, refused.)
    with pytest.raises((InvalidValue, InvalidHandle)):
        side.call(lambda: t.module_unload(0))
    ptr = side.alloc(64)
    side.launch("fill", 16, 4.0, ptr)  # the built-ins are still there
    np.testing.assert_array_equal(side.download(ptr, 16), np.full(16, 4.0, F32))


# -- a fault costs only the faulting tenant its context ---------------------------------------------
def load_write_to(side: Side, ptx: bytes) -> FunctionInfo:
    t = side.tenant
    module = side.call(lambda: t.module_load(ptx))
    return side.call(lambda: t.get_function(module, "write_to", WRITE_TO_ARG_TYPES))


def test_a_fault_loses_only_the_faulting_tenants_context(
    gpu: PycudaExecutor,
    tenants: Tenants,
    user_images: dict[str, bytes],
    rng: np.random.Generator,
) -> None:
    n = 4096
    data, y = random_f32(rng, n), random_f32(rng, n)
    bystander = tenants.open()  # opened before the fault, with data on the GPU
    kept, y_ptr = bystander.upload(data), bystander.upload(y)
    bystander.launch("fill", 0, 0.0, 0)

    victim = tenants.open()
    victim_ptr = victim.upload(data)
    write_to = load_write_to(victim, user_images["ptx"])
    with pytest.raises(KernelFault, match="context is lost"):
        victim.launch_function(write_to, 0x10, 1, block=(1, 1, 1))
    t = victim.tenant
    with pytest.raises(KernelFault, match="context is lost"):
        victim.call(lambda: t.mem_alloc(256))
    with pytest.raises(KernelFault, match="context is lost"):
        victim.download(victim_ptr, 4)
    with pytest.raises(KernelFault, match="context is lost"):
        victim.launch("fill", 4, 0.0, victim_ptr)
    with pytest.raises(KernelFault):
        victim.call(t.synchronize)

    # The bystander's context, memory and kernels are untouched.
    np.testing.assert_array_equal(bystander.download(kept, n), data)
    bystander.launch("saxpy", n, 2.0, kept, y_ptr, grid=(8, 1, 1), block=(256, 1, 1))
    np.testing.assert_array_equal(bystander.download(y_ptr, n), F32(2.0) * data + y)
    more = bystander.upload(data[::-1].copy())
    np.testing.assert_array_equal(bystander.download(more, n), data[::-1])

    # The victim can be closed, which gives its promise back, and a new tenant works.
    tenants.close(victim)
    replacement = tenants.open()
    fresh = replacement.upload(data)
    replacement.launch("relu", n, fresh, fresh, grid=(4, 1, 1), block=(128, 1, 1))
    np.testing.assert_array_equal(replacement.download(fresh, n), np.fmax(data, F32(0)))
    np.testing.assert_array_equal(bystander.download(kept, n), data)


def test_a_fault_in_a_call_nobody_waited_for_is_sticky(
    gpu: PycudaExecutor, tenants: Tenants, user_images: dict[str, bytes]
) -> None:
    bystander = tenants.open()
    kept = bystander.upload(np.arange(256, dtype=F32))
    victim = tenants.open()
    write_to = load_write_to(victim, user_images["ptx"])
    t = victim.tenant
    args = struct.pack(arg_struct_format(WRITE_TO_ARG_TYPES), 0x10, 1)
    victim.post(lambda: t.launch(write_to.handle, (1, 1, 1), (1, 1, 1), 0, 0, args), tag=77)
    with pytest.raises(DeferredError) as caught:
        victim.call(t.synchronize)
    assert isinstance(caught.value.failure.error, KernelFault)
    assert caught.value.failure.tag == 77
    with pytest.raises(KernelFault, match="context is lost"):  # and the context stays lost
        victim.call(t.synchronize)
    np.testing.assert_array_equal(bystander.download(kept, 256), np.arange(256, dtype=F32))


# -- streams and events -----------------------------------------------------------------------------
def test_streams(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    stream = side.call(t.stream_create)
    other = side.call(t.stream_create)
    assert 0 not in (stream, other) and stream != other
    ptr = side.alloc(64 * 4)
    side.launch("fill", 64, 2.0, ptr, stream=stream)
    side.call(lambda: t.stream_synchronize(stream))
    side.call(lambda: t.stream_synchronize(0))
    np.testing.assert_array_equal(side.download(ptr, 64), np.full(64, 2.0, F32))
    side.call(lambda: t.memset(ptr, 0, 4, 32, other))
    host = np.empty(64, F32)
    side.call(lambda: t.memcpy_dtoh(memoryview(host.data), ptr, other))
    np.testing.assert_array_equal(host, np.r_[np.zeros(32, F32), np.full(32, 2.0, F32)])

    side.call(lambda: t.stream_destroy(stream))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.stream_synchronize(stream))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.stream_destroy(stream))
    with pytest.raises(InvalidHandle):
        side.launch("fill", 64, 1.0, ptr, stream=stream)
    with pytest.raises(InvalidValue):
        side.call(lambda: t.stream_destroy(0))
    side.call(lambda: t.stream_destroy(other))


def test_events(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    stream = side.call(t.stream_create)
    start, end = side.call(t.event_create), side.call(t.event_create)
    with pytest.raises(InvalidValue):  # never recorded
        side.call(lambda: t.event_elapsed_ms(start, end))
    side.post(lambda: t.event_record(start, 0))
    with pytest.raises(InvalidValue):  # one recorded, the other not
        side.call(lambda: t.event_elapsed_ms(start, end))
    side.launch("busy", 5_000, block=(1, 1, 1))
    side.post(lambda: t.event_record(end, stream))
    side.call(lambda: t.event_synchronize(end))
    elapsed = side.call(lambda: t.event_elapsed_ms(start, end))
    assert 5.0 - TIMER_SLACK_MS <= elapsed < 1000.0
    side.post(lambda: t.event_record(start, 0))  # recorded again, after end
    assert side.call(lambda: t.event_elapsed_ms(end, start)) >= 0.0

    side.call(lambda: t.event_destroy(start))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.event_synchronize(start))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.event_record(start, 0))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.event_elapsed_ms(start, end))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.event_record(end, 99))
    side.call(lambda: t.event_destroy(end))


def test_stream_and_event_queries_and_waits(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    first, second = side.call(t.stream_create), side.call(t.stream_create)
    event = side.call(t.event_create)
    assert side.call(lambda: t.event_query(event)) is True  # never recorded: reached, as in CUDA
    side.call(lambda: t.stream_wait_event(second, event))  # waiting on it is a no-op
    ptr = side.alloc(1024 * 4)
    side.launch("busy", 2_000, block=(1, 1, 1), stream=first)
    side.post(lambda: t.event_record(event, first))
    side.post(lambda: t.stream_wait_event(second, event))
    side.launch("fill", 1024, 4.0, ptr, stream=second)
    assert side.call(lambda: t.stream_query(second)) is True
    assert side.call(lambda: t.stream_query(0)) is True
    assert side.call(lambda: t.event_query(event)) is True
    np.testing.assert_array_equal(side.download(ptr, 1024), np.full(1024, 4.0, F32))
    # Queries read the tenant's tables only: answered on the caller's thread, where no CUDA
    # context is current, while nothing of the tenant runs.
    assert gpu.run_if_idle(t, lambda: t.stream_query(first)) == (True, True)
    assert gpu.run_if_idle(t, lambda: t.event_query(event)) == (True, True)
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.stream_query(99))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.event_query(99))
    for stream, waited in ((99, event), (first, 99)):
        side.post(lambda s=stream, e=waited: t.stream_wait_event(s, e), tag=5)
        with pytest.raises(DeferredError) as caught:
            side.call(t.synchronize)
        assert isinstance(caught.value.failure.error, InvalidHandle)
        assert caught.value.failure.tag == 5
    side.call(lambda: t.event_destroy(event))
    with pytest.raises(InvalidHandle):
        side.call(lambda: t.event_query(event))


def test_memset_d16(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    stream = side.call(t.stream_create)
    ptr = side.alloc(64)
    side.memset32(ptr, 0, 16)
    side.call(lambda: t.memset(ptr + 2, 0x1_BEEF, 2, 30, stream))  # masked to 16 bits
    assert side.download(ptr, 32, np.uint16).tolist() == [0] + [0xBEEF] * 30 + [0]
    assert side.download(ptr, 4, np.uint8).tolist() == [0, 0, 0xEF, 0xBE]  # little-endian
    with pytest.raises(InvalidValue, match="2-byte-aligned"):
        side.call(lambda: t.memset(ptr + 1, 0, 2, 1, 0))
    with pytest.raises(InvalidHandle):  # refused before the GPU sees it
        side.call(lambda: t.memset(ptr + 2, 0, 2, 32, 0))
    with pytest.raises(InvalidValue, match="1, 2 or 4"):
        side.call(lambda: t.memset(ptr, 0, 3, 1, 0))
    assert side.download(ptr, 32, np.uint16).tolist() == [0] + [0xBEEF] * 30 + [0]


def test_device_attributes_are_the_gpus(gpu: PycudaExecutor, tenants: Tenants) -> None:
    side = tenants.open()
    t = side.tenant
    attributes = side.call(t.device_attributes)
    with warnings.catch_warnings():  # PyCUDA warns for attributes the driver refuses
        warnings.simplefilter("ignore")
        expected = {int(k): int(v) for k, v in gpu.cuda_device.get_attributes().items()}
    assert attributes == expected
    assert (attributes[75], attributes[76]) == gpu.compute_capability
    props = gpu.properties
    assert attributes[1] == props.max_threads_per_block
    assert (attributes[2], attributes[3], attributes[4]) == props.max_block
    assert (attributes[5], attributes[6], attributes[7]) == props.max_grid
    assert attributes[8] == props.max_shared_memory_per_block
    assert attributes[10] == 32
    assert all(0 <= key < 2**32 and -(2**31) <= value < 2**31 for key, value in attributes.items())
    # Read once when the executor started: answered without the worker or a CUDA call.
    ran, again = gpu.run_if_idle(t, t.device_attributes)
    assert ran and again == attributes


# -- the server on the GPU, through the public API --------------------------------------------------
async def upload_remote(device: bf.RemoteDevice, array: np.ndarray) -> bf.DevicePtr:
    ptr = await device.mem_alloc(array.nbytes)
    await device.memcpy_htod(ptr, array)
    return ptr


async def download_remote(
    device: bf.RemoteDevice, ptr: int, count: int, dtype: Any = F32
) -> np.ndarray:
    out = np.empty(count, dtype)
    await device.memcpy_dtoh(out, ptr)
    return out


def test_the_server_runs_builtins_on_the_gpu(rng: np.random.Generator) -> None:
    n, a = 100_003, 2.5
    x, y = random_f32(rng, n), random_f32(rng, n)
    m, k, cols = 33, 41, 17
    a_mat, b_mat, c_mat = random_f32(rng, m, k), random_f32(rng, k, cols), random_f32(rng, m, cols)

    async def main() -> tuple[str, np.ndarray, np.ndarray]:
        async with (
            serve(executor="pycuda", gpus=1, gpu_memory="8GiB") as server,
            bf.connect(server.address, fraction=0.25) as session,
        ):
            gpu = session.devices[0]
            x_ptr, y_ptr = await upload_remote(gpu, x), await upload_remote(gpu, y)
            saxpy = await gpu.builtin("saxpy")
            assert saxpy.arg_types == "ifPP"
            await saxpy.launch((n + 255) // 256, 256, [n, a, x_ptr, y_ptr])
            y_out = await download_remote(gpu, y_ptr, n)

            a_ptr = await upload_remote(gpu, a_mat)
            b_ptr = await upload_remote(gpu, b_mat)
            c_ptr = await upload_remote(gpu, c_mat)
            gemm = await gpu.builtin("gemm")
            await gemm.launch((4, 2), (16, 16), [m, cols, k, 0.5, a_ptr, b_ptr, 2.0, c_ptr])
            await gpu.synchronize()
            c_out = await download_remote(gpu, c_ptr, m * cols)
            return gpu.executor, y_out, c_out.reshape(m, cols)

    executor, y_out, c_out = run(main(), SERVER_TEST_S)
    assert executor == "pycuda"
    np.testing.assert_array_equal(y_out, F32(a) * x + y)  # bit for bit: no FMA in saxpy
    expected = 0.5 * (a_mat.astype(np.float64) @ b_mat) + 2.0 * c_mat
    np.testing.assert_allclose(c_out, expected, rtol=1e-5, atol=1e-4)


def test_two_clients_on_one_gpu_see_their_own_limits() -> None:
    async def main() -> None:
        async with serve(executor="pycuda", gpus=1, gpu_memory="8GiB") as server:
            async with (
                bf.connect(server.address, fraction=0.25) as first,
                bf.connect(server.address, fraction=0.25) as second,
            ):
                one, two = first.devices[0], second.devices[0]
                assert one.executor == two.executor == "pycuda"
                limit = one.memory_limit
                assert two.memory_limit == limit
                assert abs(limit - one.total_memory / 4) <= 1
                assert (await two.mem_get_info()) == (limit, limit)  # untouched: nothing charged

                ptr = await one.mem_alloc(64 * MiB)  # its context's cost is charged as well
                free_one, total_one = await one.mem_get_info()
                assert total_one == limit and free_one <= limit - 64 * MiB
                assert (await two.mem_get_info()) == (limit, limit)  # the neighbour's is not

                theirs = await two.mem_alloc(MiB)
                free_two, total_two = await two.mem_get_info()
                assert total_two == limit and free_two <= limit - MiB
                assert (await one.mem_get_info()) == (free_one, limit)

                with pytest.raises(bf.OutOfMemoryError):
                    await one.mem_alloc(limit)
                with pytest.raises(bf.InvalidHandleError):
                    await download_remote(two, ptr, 4)
                await two.memset_d32(theirs, 0x3F80_0000, 4)
                np.testing.assert_array_equal(
                    await download_remote(two, theirs, 4), np.ones(4, F32)
                )

    run(main(), SERVER_TEST_S)


def test_a_client_loads_and_runs_ptx_through_the_server(
    user_images: dict[str, bytes], rng: np.random.Generator
) -> None:
    n = 5000
    x = random_f32(rng, n)

    async def main() -> np.ndarray:
        async with (
            serve(executor="pycuda", gpus=1, gpu_memory="8GiB") as server,
            bf.connect(server.address, fraction=0.25) as session,
        ):
            gpu = session.devices[0]
            module = await gpu.module_load(user_images["ptx"])
            with pytest.raises(bf.InvalidValueError):
                await module.get_function("affine", "ifPPq")  # checked against the PTX
            affine = await module.get_function("affine", AFFINE_ARG_TYPES)
            x_ptr, y_ptr = await upload_remote(gpu, x), await gpu.mem_alloc(x.nbytes)
            await affine.launch(8, 128, [n, 0.5, x_ptr, y_ptr, 3])
            out = await download_remote(gpu, y_ptr, n)
            await module.unload()
            await gpu.synchronize()
            return out

    out = run(main(), SERVER_TEST_S)
    np.testing.assert_array_equal(out, (0.5 * x.astype(np.float64) + 3).astype(F32))


def test_a_client_uses_globals_attributes_queries_and_memset_d16_through_the_server(
    gpu: PycudaExecutor, global_images: dict[str, bytes], rng: np.random.Generator
) -> None:
    n = 4096
    x = random_f32(rng, n)
    coefficients = np.linspace(0.5, 4.0, 8, dtype=F32)

    async def main() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, int]]:
        async with (
            serve(executor="pycuda", gpus=1, gpu_memory="8GiB") as server,
            bf.connect(server.address, fraction=0.25) as session,
        ):
            device = session.devices[0]
            attributes = await device.attributes()
            module = await device.module_load(global_images["ptx"])
            table, size = await module.get_global("coefficients")
            assert size == coefficients.nbytes
            counter, _ = await module.get_global("counter")
            await device.memcpy_htod(table, coefficients)
            await device.memset_d32(counter, 0, 4)
            scaled = await module.get_function("scaled", SCALED_ARG_TYPES)
            x_ptr, y_ptr = await upload_remote(device, x), await device.mem_alloc(x.nbytes)
            first, second = await device.create_stream(), await device.create_stream()
            done = await device.create_event()
            await scaled.launch(16, 128, [n, x_ptr, y_ptr], stream=first)
            await done.record(first)
            await second.wait_event(done)
            half = await device.mem_alloc(8 * 2)
            await device.memset_d16(half, 0xABCD, 8, stream=second)
            assert await second.query() and await first.query() and await done.query()
            y = await download_remote(device, y_ptr, n)
            counted = await download_remote(device, counter, 4, np.int32)
            halves = await download_remote(device, half, 8, np.uint16)
            await module.unload()
            await device.synchronize()
            return y, counted, halves, attributes

    y, counted, halves, attributes = run(main(), SERVER_TEST_S)
    np.testing.assert_array_equal(y, coefficients[np.arange(n) % 8] * x)
    assert counted.tolist() == [n, 0, 0, 0]
    assert halves.tolist() == [0xABCD] * 8
    assert (attributes[75], attributes[76]) == gpu.compute_capability


def test_the_cli_server_picks_pycuda_when_a_gpu_is_present() -> None:
    # cli_server() with a longer start-up allowance: a fresh process initialises CUDA first.
    server = CliServer(
        "--listen", "tcp://127.0.0.1:0", "--executor", "auto", "--gpus", "1",
        "--gpu-memory", "8GiB", "--log-level", "WARNING",
    )  # fmt: skip
    try:
        address = server.wait_listening(timeout=CLI_START_S)

        async def main() -> tuple[str, np.ndarray]:
            async with bf.connect(address, fraction=0.5) as session:
                gpu = session.devices[0]
                ptr = await gpu.mem_alloc(4 * 100)
                await (await gpu.builtin("fill")).launch(1, 64, [100, 1.25, ptr])
                return gpu.executor, await download_remote(gpu, ptr, 100)

        executor, out = run(main(), SERVER_TEST_S)
        assert executor == "pycuda", server.stderr_text()
        np.testing.assert_array_equal(out, np.full(100, 1.25, F32))
        assert server.terminate() == 0, server.stderr_text()
        assert "Traceback" not in server.stderr_text()
    finally:
        server.close()


# -- fair sharing of the GPU ------------------------------------------------------------------------
def test_weighted_fair_sharing_of_the_gpu(gpu: PycudaExecutor, tenants: Tenants) -> None:
    """Two backlogged tenants of weights 3 and 1 get device time in that ratio."""
    kernel_us, duration, depth = 2_000, 1.5, 4
    heavy, light = tenants.open(weight=3.0), tenants.open(weight=1.0)
    sides = [heavy, light]
    args = struct.pack("<q", kernel_us)
    launches: list[Callable[[], None]] = []
    for side in sides:
        side.launch("busy", 0, block=(1, 1, 1))  # contexts and built-ins, before measuring
        handle, tenant = side.function("busy").handle, side.tenant
        launches.append(partial(tenant.launch, handle, (1, 1, 1), (1, 1, 1), 0, 0, args))
    before = [gpu.usage(side.tenant).device_time for side in sides]

    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        for side, launch in zip(sides, launches, strict=True):
            while gpu.queued(side.tenant) < depth:  # both stay backlogged, neither queues deeply
                gpu.submit(side.tenant, launch, wants_reply=False)
        time.sleep(0.0005)
    heavy_time, light_time = (
        gpu.usage(side.tenant).device_time - start
        for side, start in zip(sides, before, strict=True)
    )
    for side in sides:
        side.call(side.tenant.synchronize)  # every kernel ran without an error

    assert heavy_time + light_time >= 0.5 * duration, (heavy_time, light_time)
    assert light_time > 0
    ratio = heavy_time / light_time
    assert 2.4 <= ratio <= 3.6, f"device time {heavy_time:.3f} s vs {light_time:.3f} s"
