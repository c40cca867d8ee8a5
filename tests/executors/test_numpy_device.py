"""The NumPy reference device: built-in kernels, quotas, isolation, bounds and sticky errors.

Most tests go through ``Executor.submit`` as the server does; a few call tenant methods directly
where the worker adds nothing (argument validation with no device work queued).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from executors import (
    BUILTINS,
    DeferredError,
    DeviceOutOfMemory,
    Executor,
    InvalidHandle,
    InvalidValue,
    KernelFault,
    NumpyExecutor,
    Tenant,
    Unsupported,
    create_executors,
)
from executors.base import ARG_TYPE_CODES, arg_struct_format
from executors.numpy_device import AddressSpace, NumpyTenant

GiB = 2**30
MiB = 2**20
TIMEOUT_S = 5.0


@pytest.fixture
def device() -> Iterator[NumpyExecutor]:
    executor = NumpyExecutor(memory=GiB)
    yield executor
    executor.close()


@pytest.fixture
def tenant(device: NumpyExecutor) -> NumpyTenant:
    return device.open_tenant(256 * MiB, 1.0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def call(device: Executor, tenant: Tenant, op: Callable[[], Any]) -> Any:
    """Submit ``op`` wanting a reply, wait for it, and return its result or raise its error."""
    return device.call(tenant, op, TIMEOUT_S)


def post(device: Executor, tenant: Tenant, op: Callable[[], Any], tag: int = 0) -> None:
    """Submit ``op`` without a reply, as the server does for asynchronous CUDA calls."""
    device.submit(tenant, op, wants_reply=False, tag=tag)


def upload(device: NumpyExecutor, tenant: NumpyTenant, array: np.ndarray) -> int:
    ptr: int = call(device, tenant, lambda: tenant.mem_alloc(array.nbytes))
    payload = memoryview(array.tobytes())
    call(device, tenant, lambda: tenant.memcpy_htod(ptr, payload, 0))
    return ptr


def download(
    device: NumpyExecutor, tenant: NumpyTenant, ptr: int, count: int, dtype: Any = np.float32
) -> np.ndarray:
    host = np.empty(count, dtype)
    call(device, tenant, lambda: tenant.memcpy_dtoh(memoryview(host.data), ptr, 0))
    return host


def launch(
    device: NumpyExecutor,
    tenant: NumpyTenant,
    name: str,
    *args: Any,
    grid: tuple[int, int, int] = (1, 1, 1),
    block: tuple[int, int, int] = (128, 1, 1),
) -> None:
    function = call(device, tenant, lambda: tenant.get_function(0, name, None))
    packed = struct.pack(arg_struct_format(function.arg_types), *args)
    call(device, tenant, lambda: tenant.launch(function.handle, grid, block, 0, 0, packed))


def random_f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# -- built-in kernels ---------------------------------------------------------------------------


def test_builtins_declare_valid_arg_types() -> None:
    for name, builtin in BUILTINS.items():
        assert builtin.name == name
        assert set(builtin.arg_types) <= ARG_TYPE_CODES
        assert builtin.doc


def test_saxpy(device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator) -> None:
    n = 300_001  # not a multiple of the chunk size
    x, y = random_f32(rng, n), random_f32(rng, n)
    x_ptr, y_ptr = upload(device, tenant, x), upload(device, tenant, y)
    launch(device, tenant, "saxpy", n, 2.5, x_ptr, y_ptr)
    np.testing.assert_allclose(download(device, tenant, y_ptr, n), 2.5 * x + y, rtol=1e-6)
    assert np.array_equal(download(device, tenant, x_ptr, n), x)


def test_saxpy_in_place(
    device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator
) -> None:
    x = random_f32(rng, 1000)
    ptr = upload(device, tenant, x)
    launch(device, tenant, "saxpy", x.size, -3.0, ptr, ptr)
    np.testing.assert_allclose(download(device, tenant, ptr, x.size), -2.0 * x, rtol=1e-6)


def test_fill(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    ptr = call(device, tenant, lambda: tenant.mem_alloc(4 * 100))
    launch(device, tenant, "fill", 100, 1.25, ptr)
    assert np.array_equal(download(device, tenant, ptr, 100), np.full(100, 1.25, np.float32))


def test_gemm(device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator) -> None:
    m, n, k = 37, 29, 41
    a, b, c = random_f32(rng, m, k), random_f32(rng, k, n), random_f32(rng, m, n)
    a_ptr, b_ptr, c_ptr = (upload(device, tenant, array) for array in (a, b, c))
    launch(device, tenant, "gemm", m, n, k, 0.5, a_ptr, b_ptr, 2.0, c_ptr, grid=(2, 2, 1))
    expected = 0.5 * (a.astype(np.float64) @ b) + 2.0 * c
    result = download(device, tenant, c_ptr, m * n).reshape(m, n)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)


def test_gemm_beta_zero_does_not_read_c(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    a, b = np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)
    c = np.full((2, 2), np.nan, np.float32)  # uninitialised device memory may hold NaN bits
    a_ptr, b_ptr, c_ptr = (upload(device, tenant, array) for array in (a, b, c))
    launch(device, tenant, "gemm", 2, 2, 3, 1.0, a_ptr, b_ptr, 0.0, c_ptr)
    assert np.array_equal(download(device, tenant, c_ptr, 4), np.full(4, 3.0, np.float32))


def test_gemm_on_sub_ranges_of_one_allocation(
    device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator
) -> None:
    m, n, k = 8, 6, 5
    a, b, c = random_f32(rng, m, k), random_f32(rng, k, n), random_f32(rng, m, n)
    pad = random_f32(rng, 3)
    # One allocation: pad | A | B | C | pad; the kernel gets pointers into its middle.
    packed = np.concatenate([pad, a.ravel(), b.ravel(), c.ravel(), pad])
    base = upload(device, tenant, packed)
    a_at = pad.size
    b_at = a_at + a.size
    c_at = b_at + b.size
    a_ptr, b_ptr, c_ptr = (base + 4 * at for at in (a_at, b_at, c_at))
    launch(device, tenant, "gemm", m, n, k, 1.0, a_ptr, b_ptr, 1.0, c_ptr)
    after = download(device, tenant, base, packed.size)
    result = after[c_at : c_at + m * n].reshape(m, n)
    np.testing.assert_allclose(result, a @ b + c, rtol=1e-5, atol=1e-5)
    after[c_at : c_at + m * n] = packed[c_at : c_at + m * n]
    assert np.array_equal(after, packed)  # nothing outside C was written


def test_relu(device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator) -> None:
    x = random_f32(rng, 1000)
    x[:3] = [np.nan, -0.0, np.inf]
    x_ptr = upload(device, tenant, x)
    y_ptr = call(device, tenant, lambda: tenant.mem_alloc(x.nbytes))
    launch(device, tenant, "relu", x.size, x_ptr, y_ptr)
    expected = np.where(x > 0, x, 0).astype(np.float32)  # NaN -> 0, like CUDA's fmaxf
    assert np.array_equal(download(device, tenant, y_ptr, x.size), expected)
    launch(device, tenant, "relu", x.size, x_ptr, x_ptr)
    assert np.array_equal(download(device, tenant, x_ptr, x.size), expected)


def test_softmax(device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator) -> None:
    rows, cols = 7, 33
    x = random_f32(rng, rows, cols) * 10
    x[0] += 1000  # would overflow exp() without subtracting the row max
    shifted = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    x_ptr = upload(device, tenant, x)
    y_ptr = call(device, tenant, lambda: tenant.mem_alloc(x.nbytes))
    launch(device, tenant, "softmax", rows, cols, x_ptr, y_ptr)
    result = download(device, tenant, y_ptr, x.size).reshape(rows, cols)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)
    launch(device, tenant, "softmax", rows, cols, x_ptr, x_ptr)
    in_place = download(device, tenant, x_ptr, x.size).reshape(rows, cols)
    assert np.array_equal(in_place, result)


def test_reduce_sum(device: NumpyExecutor, tenant: NumpyTenant, rng: np.random.Generator) -> None:
    x = random_f32(rng, 100_000) + 1
    x_ptr = upload(device, tenant, x)
    out_ptr = call(device, tenant, lambda: tenant.mem_alloc(4))
    launch(device, tenant, "reduce_sum", x.size, x_ptr, out_ptr)
    assert download(device, tenant, out_ptr, 1)[0] == np.float32(x.astype(np.float64).sum())


def test_busy_occupies_the_worker(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    start = time.perf_counter()
    launch(device, tenant, "busy", 20_000)
    assert time.perf_counter() - start >= 0.020


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("saxpy", (-1, 1.0, 0, 0)),
        ("fill", (-1, 1.0, 0)),
        ("gemm", (2, -1, 2, 1.0, 0, 0, 1.0, 0)),
        ("relu", (-5, 0, 0)),
        ("softmax", (-1, 4, 0, 0)),
        ("reduce_sum", (-1, 0, 0)),
        ("busy", (-1,)),
    ],
)
def test_negative_sizes_are_invalid(
    device: NumpyExecutor, tenant: NumpyTenant, name: str, args: tuple[Any, ...]
) -> None:
    with pytest.raises(InvalidValue):
        launch(device, tenant, name, *args)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("saxpy", (0, 1.0, 0, 0)),
        ("gemm", (0, 4, 4, 1.0, 0, 0, 1.0, 0)),
        ("softmax", (3, 0, 0, 0)),
        ("reduce_sum", (0, 0, 0)),
    ],
)
def test_zero_sizes_address_no_memory(
    device: NumpyExecutor, tenant: NumpyTenant, name: str, args: tuple[Any, ...]
) -> None:
    launch(device, tenant, name, *args)  # null pointers, yet nothing is dereferenced


def test_gemm_with_k_zero_only_scales_c(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    c_ptr = upload(device, tenant, np.full(6, 2.0, np.float32))
    launch(device, tenant, "gemm", 2, 3, 0, 1.0, 0, 0, 1.5, c_ptr)
    assert np.array_equal(download(device, tenant, c_ptr, 6), np.full(6, 3.0, np.float32))


# -- launch validation --------------------------------------------------------------------------


def test_get_function_errors(tenant: NumpyTenant) -> None:
    with pytest.raises(InvalidHandle, match="saxpy"):  # the message lists the built-ins
        tenant.get_function(0, "nope", None)
    with pytest.raises(InvalidValue):
        tenant.get_function(0, "saxpy", "iPP")
    with pytest.raises(InvalidHandle):
        tenant.get_function(7, "saxpy", None)
    assert tenant.get_function(0, "saxpy", "ifPP") == tenant.get_function(0, "saxpy", None)


@pytest.mark.parametrize(
    ("grid", "block", "shared_mem", "error"),
    [
        ((0, 1, 1), (1, 1, 1), 0, InvalidValue),
        ((1, 65536, 1), (1, 1, 1), 0, InvalidValue),
        ((2**31, 1, 1), (1, 1, 1), 0, InvalidValue),
        ((1, 1, 1), (0, 1, 1), 0, InvalidValue),
        ((1, 1, 1), (1024, 2, 1), 0, InvalidValue),
        ((1, 1, 1), (1, 1, 1), -1, InvalidValue),
        ((1, 1, 1), (1, 1, 1), 48 * 1024 + 1, InvalidValue),
    ],
)
def test_launch_geometry_is_validated(
    tenant: NumpyTenant,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
    error: type[Exception],
) -> None:
    function = tenant.get_function(0, "fill", None)
    with pytest.raises(error):
        tenant.launch(function.handle, grid, block, shared_mem, 0, struct.pack("<ifQ", 0, 0.0, 0))


def test_launch_handles_and_arguments_are_validated(tenant: NumpyTenant) -> None:
    function = tenant.get_function(0, "fill", None)
    args = struct.pack("<ifQ", 0, 0.0, 0)
    with pytest.raises(InvalidHandle):
        tenant.launch(function.handle + 100, (1, 1, 1), (1, 1, 1), 0, 0, args)
    with pytest.raises(InvalidHandle):
        tenant.launch(function.handle, (1, 1, 1), (1, 1, 1), 0, 12345, args)
    with pytest.raises(InvalidValue):
        tenant.launch(function.handle, (1, 1, 1), (1, 1, 1), 0, 0, args[:-1])
    tenant.launch(function.handle, (4096, 4096, 1), (1024, 1, 1), 48 * 1024, 0, args)
    # Within the device's limits, but more empty blocks than a GPU could get through: a built-in
    # is refused it (its grid-stride loops need no more than BUILTIN_MAX_BLOCKS).
    with pytest.raises(InvalidValue, match="at most 16777216 blocks"):
        tenant.launch(function.handle, (65535, 65535, 65535), (1024, 1, 1), 0, 0, args)


def test_function_handles_are_per_tenant(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    other = device.open_tenant(MiB, 1.0)
    function = tenant.get_function(0, "busy", None)
    with pytest.raises(InvalidHandle):
        other.launch(function.handle, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<q", 0))


def test_modules_are_unsupported(tenant: NumpyTenant) -> None:
    with pytest.raises(Unsupported, match="pycuda"):
        tenant.module_load(b"// PTX")
    with pytest.raises(InvalidHandle):
        tenant.module_unload(0)


# -- memory: quotas, isolation, bounds ----------------------------------------------------------


def test_quota(device: NumpyExecutor) -> None:
    limit = int(0.05 * GiB)
    holder = device.open_tenant(limit, 0.05)
    call(device, holder, lambda: holder.mem_alloc(50 * MiB))
    with pytest.raises(DeviceOutOfMemory, match=str(limit)):
        call(device, holder, lambda: holder.mem_alloc(2 * MiB))
    assert call(device, holder, holder.mem_get_info) == (limit - 50 * MiB, limit)
    fresh = device.open_tenant(limit, 0.05)
    with pytest.raises(DeviceOutOfMemory):
        call(device, fresh, lambda: fresh.mem_alloc(52 * MiB))
    assert call(device, fresh, fresh.mem_get_info) == (limit, limit)


def test_allocations_charge_their_aligned_size(tenant: NumpyTenant) -> None:
    free, total = tenant.mem_get_info()
    ptr = tenant.mem_alloc(1)
    assert tenant.mem_get_info() == (free - 256, total)
    tenant.mem_free(ptr)
    assert tenant.mem_get_info() == (free, total)


def test_allocation_sizes_are_validated(tenant: NumpyTenant) -> None:
    for nbytes in (0, -1):
        with pytest.raises(InvalidValue):
            tenant.mem_alloc(nbytes)


def test_addresses_are_aligned_and_not_reused_soon(tenant: NumpyTenant) -> None:
    first = tenant.mem_alloc(100)
    tenant.mem_free(first)
    addresses = [tenant.mem_alloc(100) for _ in range(10)]
    assert first not in addresses
    assert all(address % 256 == 0 for address in [first, *addresses])
    assert len(set(addresses)) == len(addresses)


def test_device_refuses_oversubscribed_tenant_limits(device: NumpyExecutor) -> None:
    device.open_tenant(GiB // 2, 0.5)
    device.open_tenant(GiB // 4, 0.25)
    with pytest.raises(DeviceOutOfMemory):
        device.open_tenant(GiB // 4 + 1, 0.25)
    device.open_tenant(GiB // 4, 0.25)


def test_release_gives_memory_back(device: NumpyExecutor) -> None:
    first = device.open_tenant(GiB, 1.0)
    ptr = call(device, first, lambda: first.mem_alloc(MiB))
    with pytest.raises(DeviceOutOfMemory):
        device.open_tenant(1, 1.0)
    closed = threading.Event()
    device.close_tenant(first, closed.set)
    assert closed.wait(TIMEOUT_S)
    second = device.open_tenant(GiB, 1.0)
    assert call(device, second, second.mem_get_info) == (GiB, GiB)
    with pytest.raises(InvalidHandle):
        call(device, first, lambda: first.mem_free(ptr))
    with pytest.raises(InvalidHandle):  # a closed tenant cannot allocate outside the accounting
        call(device, first, lambda: first.mem_alloc(1))


def test_tenants_cannot_touch_each_others_memory(device: NumpyExecutor) -> None:
    owner = device.open_tenant(MiB, 0.5)
    intruder = device.open_tenant(MiB, 0.5)
    ptr = upload(device, owner, np.arange(16, dtype=np.float32))
    with pytest.raises(InvalidHandle, match=hex(ptr)):
        call(device, intruder, lambda: intruder.mem_free(ptr))
    with pytest.raises(InvalidHandle):
        download(device, intruder, ptr, 16)
    with pytest.raises(InvalidHandle):
        call(device, intruder, lambda: intruder.memcpy_htod(ptr, memoryview(bytes(4)), 0))
    with pytest.raises(InvalidHandle):
        call(device, intruder, lambda: intruder.memset(ptr, 0, 1, 4, 0))
    with pytest.raises(KernelFault):
        launch(device, intruder, "fill", 16, 0.0, ptr)
    assert np.array_equal(download(device, owner, ptr, 16), np.arange(16, dtype=np.float32))


def test_use_after_free(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    ptr = upload(device, tenant, np.zeros(8, np.float32))
    call(device, tenant, lambda: tenant.mem_free(ptr))
    with pytest.raises(InvalidHandle):
        download(device, tenant, ptr, 8)
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.mem_free(ptr))


def test_mem_free_needs_the_allocation_start(tenant: NumpyTenant) -> None:
    ptr = tenant.mem_alloc(64)
    with pytest.raises(InvalidHandle, match="not its start"):
        tenant.mem_free(ptr + 4)
    tenant.mem_free(ptr)


def test_bounds(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    ptr = upload(device, tenant, np.arange(64, dtype=np.float32))  # 256 bytes: no slack
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memcpy_dtoh(memoryview(bytearray(257)), ptr, 0))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memcpy_htod(ptr + 8, memoryview(bytes(249)), 0))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memcpy_dtoh(memoryview(bytearray(4)), ptr - 4, 0))
    assert np.array_equal(download(device, tenant, ptr + 252, 1), [63.0])
    out_ptr = call(device, tenant, lambda: tenant.mem_alloc(4))
    with pytest.raises(KernelFault, match="illegal address"):
        launch(device, tenant, "reduce_sum", 65, ptr, out_ptr)
    with pytest.raises(KernelFault, match="misaligned"):
        launch(device, tenant, "reduce_sum", 4, ptr + 2, out_ptr)


# -- sticky asynchronous errors -----------------------------------------------------------------


def test_sticky_errors(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    ptr = call(device, tenant, lambda: tenant.mem_alloc(16))
    fill = call(device, tenant, lambda: tenant.get_function(0, "fill", None))

    def faulting_launch() -> None:
        tenant.launch(fill.handle, (1, 1, 1), (32, 1, 1), 0, 0, struct.pack("<ifQ", 5, 1.0, ptr))

    post(device, tenant, faulting_launch, tag=41)
    post(device, tenant, faulting_launch, tag=42)
    post(device, tenant, lambda: tenant.memset(ptr, 0, 1, 16, 0), tag=43)
    with pytest.raises(DeferredError) as caught:
        call(device, tenant, tenant.synchronize)
    failure = caught.value.failure
    assert isinstance(failure.error, KernelFault)
    assert failure.tag == 41
    assert failure.later_failures == 1
    assert call(device, tenant, tenant.mem_get_info)[0] > 0  # the error was reported once


def test_sticky_errors_stay_with_their_tenant(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    other = device.open_tenant(MiB, 1.0)
    post(device, tenant, lambda: tenant.mem_free(0x1234), tag=7)
    call(device, other, other.synchronize)
    with pytest.raises(DeferredError):
        call(device, tenant, tenant.synchronize)


# -- memset and device-to-device copies ---------------------------------------------------------


def test_memset(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    ptr = call(device, tenant, lambda: tenant.mem_alloc(16))
    call(device, tenant, lambda: tenant.memset(ptr, 0x1AB, 1, 16, 0))  # masked to 0xAB
    assert download(device, tenant, ptr, 16, np.uint8).tolist() == [0xAB] * 16
    call(device, tenant, lambda: tenant.memset(ptr + 4, 0x1_3F80_0000, 4, 2, 0))
    assert download(device, tenant, ptr, 4).view(np.uint32)[1:3].tolist() == [0x3F80_0000] * 2
    assert download(device, tenant, ptr, 4)[1] == 1.0
    with pytest.raises(InvalidValue):
        call(device, tenant, lambda: tenant.memset(ptr + 2, 0, 4, 1, 0))
    for itemsize in (0, 3, 8):
        with pytest.raises(InvalidValue, match="1, 2 or 4"):
            call(device, tenant, lambda itemsize=itemsize: tenant.memset(ptr, 0, itemsize, 1, 0))
    with pytest.raises(InvalidValue):
        call(device, tenant, lambda: tenant.memset(ptr, 0, 1, -1, 0))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memset(ptr + 4, 0, 4, 4, 0))  # 4 bytes too many


def test_memset_d16(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    ptr = call(device, tenant, lambda: tenant.mem_alloc(16))
    call(device, tenant, lambda: tenant.memset(ptr, 0, 1, 16, 0))
    post(device, tenant, lambda: tenant.memset(ptr + 2, 0x1_ABCD, 2, 3, 0))  # masked to 0xABCD
    items = download(device, tenant, ptr, 8, np.uint16).tolist()
    assert items == [0, 0xABCD, 0xABCD, 0xABCD, 0, 0, 0, 0]
    # Little-endian items, as on a GPU: the low byte first.
    assert download(device, tenant, ptr, 4, np.uint8).tolist() == [0, 0, 0xCD, 0xAB]
    call(device, tenant, lambda: tenant.memset(ptr, 0x1234, 2, 8, 0))  # the whole allocation
    assert download(device, tenant, ptr, 8, np.uint16).tolist() == [0x1234] * 8
    call(device, tenant, lambda: tenant.memset(ptr + 16, 7, 2, 0, 0))  # nothing: no memory touched
    with pytest.raises(InvalidValue, match="2-byte-aligned"):
        call(device, tenant, lambda: tenant.memset(ptr + 1, 0, 2, 1, 0))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memset(ptr + 2, 0, 2, 8, 0))  # 2 bytes too many
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memset(ptr, 0, 2, 1, 99))  # not one of its streams
    assert download(device, tenant, ptr, 8, np.uint16).tolist() == [0x1234] * 8


def test_dtod_copies(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    data = np.arange(100, dtype=np.uint8)
    ptr = upload(device, tenant, data)
    other = call(device, tenant, lambda: tenant.mem_alloc(100))
    call(device, tenant, lambda: tenant.memcpy_dtod(other, ptr, 100, 0))
    assert np.array_equal(download(device, tenant, other, 100, np.uint8), data)
    call(device, tenant, lambda: tenant.memcpy_dtod(ptr + 10, ptr, 50, 0))  # forward overlap
    expected = data.copy()
    expected[10:60] = data[0:50]
    assert np.array_equal(download(device, tenant, ptr, 100, np.uint8), expected)
    call(device, tenant, lambda: tenant.memcpy_dtod(ptr, ptr + 10, 50, 0))  # backward overlap
    expected[0:50] = expected[10:60].copy()
    assert np.array_equal(download(device, tenant, ptr, 100, np.uint8), expected)
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.memcpy_dtod(ptr + 51, ptr, 50, 0))


# -- streams and events -------------------------------------------------------------------------


def test_streams(tenant: NumpyTenant) -> None:
    stream = tenant.stream_create()
    assert stream != 0
    assert tenant.stream_create() != stream
    tenant.stream_synchronize(stream)
    tenant.stream_synchronize(0)
    ptr = tenant.mem_alloc(4)
    tenant.memset(ptr, 0, 4, 1, stream)
    tenant.stream_destroy(stream)
    with pytest.raises(InvalidHandle):
        tenant.stream_synchronize(stream)
    with pytest.raises(InvalidHandle):
        tenant.stream_destroy(stream)
    with pytest.raises(InvalidValue):
        tenant.stream_destroy(0)


def test_events(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    start = call(device, tenant, tenant.event_create)
    end = call(device, tenant, tenant.event_create)
    with pytest.raises(InvalidValue):
        call(device, tenant, lambda: tenant.event_elapsed_ms(start, end))
    post(device, tenant, lambda: tenant.event_record(start, 0))
    launch(device, tenant, "busy", 5_000)
    post(device, tenant, lambda: tenant.event_record(end, 0))
    call(device, tenant, lambda: tenant.event_synchronize(end))
    assert call(device, tenant, lambda: tenant.event_elapsed_ms(start, end)) >= 5.0
    call(device, tenant, lambda: tenant.event_destroy(start))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.event_synchronize(start))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.event_record(end, 99))


def test_stream_and_event_queries(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    """Work has always finished before a query runs, so every query says done; handles that are
    not the tenant's are refused as by the other stream and event calls."""
    stream = call(device, tenant, tenant.stream_create)
    event = call(device, tenant, tenant.event_create)
    assert call(device, tenant, lambda: tenant.event_query(event)) is True  # never recorded
    launch(device, tenant, "busy", 2_000)
    post(device, tenant, lambda: tenant.event_record(event, stream))
    assert call(device, tenant, lambda: tenant.stream_query(stream)) is True
    assert call(device, tenant, lambda: tenant.stream_query(0)) is True
    assert call(device, tenant, lambda: tenant.event_query(event)) is True
    # Answered without the worker while the tenant is idle: they only read its tables.
    assert device.run_if_idle(tenant, lambda: tenant.stream_query(stream)) == (True, True)
    assert device.run_if_idle(tenant, lambda: tenant.event_query(event)) == (True, True)
    for bad in (99, event):
        with pytest.raises(InvalidHandle, match="stream"):
            call(device, tenant, lambda bad=bad: tenant.stream_query(bad))
    with pytest.raises(InvalidHandle, match="event"):
        call(device, tenant, lambda: tenant.event_query(stream))
    call(device, tenant, lambda: tenant.stream_destroy(stream))
    call(device, tenant, lambda: tenant.event_destroy(event))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.stream_query(stream))
    with pytest.raises(InvalidHandle):
        call(device, tenant, lambda: tenant.event_query(event))


def test_stream_wait_event_orders_streams(device: NumpyExecutor, tenant: NumpyTenant) -> None:
    """Work after the wait sees what was done before the event; bad handles are sticky errors
    (the call has no reply), reported at the next call that waits."""
    first, second = (
        call(device, tenant, tenant.stream_create),
        call(device, tenant, tenant.stream_create),
    )
    event = call(device, tenant, tenant.event_create)
    ptr = call(device, tenant, lambda: tenant.mem_alloc(64))
    post(device, tenant, lambda: tenant.memset(ptr, 5, 4, 16, first))
    post(device, tenant, lambda: tenant.event_record(event, first))
    post(device, tenant, lambda: tenant.stream_wait_event(second, event))
    post(device, tenant, lambda: tenant.memcpy_dtod(ptr + 32, ptr, 32, second))
    assert download(device, tenant, ptr, 16, np.uint32).tolist() == [5] * 16
    never = call(device, tenant, tenant.event_create)
    call(device, tenant, lambda: tenant.stream_wait_event(0, never))  # a never-recorded event
    for stream, event_handle, what in ((99, event, "stream 99"), (first, 99, "event 99")):
        post(device, tenant, lambda s=stream, e=event_handle: tenant.stream_wait_event(s, e), tag=7)
        with pytest.raises(DeferredError, match=what) as caught:
            call(device, tenant, tenant.synchronize)
        assert isinstance(caught.value.failure.error, InvalidHandle)
        assert caught.value.failure.tag == 7


def test_device_attributes_describe_the_device_it_is(device: NumpyExecutor) -> None:
    """A plausible CUDA device (compute capability 8.0) whose limits are the ones the NumPy
    device enforces, by CUDA's own attribute numbers (cuda.h)."""
    tenant = device.open_tenant(MiB, 1.0)
    attributes = call(device, tenant, tenant.device_attributes)
    props = device.properties
    assert attributes[1] == props.max_threads_per_block == 1024  # MAX_THREADS_PER_BLOCK
    assert (attributes[2], attributes[3], attributes[4]) == props.max_block  # MAX_BLOCK_DIM_X/Y/Z
    assert (attributes[5], attributes[6], attributes[7]) == props.max_grid  # MAX_GRID_DIM_X/Y/Z
    assert attributes[8] == props.max_shared_memory_per_block  # MAX_SHARED_MEMORY_PER_BLOCK
    assert attributes[97] == attributes[8]  # ..._OPTIN: a launch may not ask for more
    assert (attributes[75], attributes[76]) == (8, 0)  # COMPUTE_CAPABILITY_MAJOR/MINOR
    assert attributes[10] == 32  # WARP_SIZE
    assert attributes[9] == 65536 and attributes[12] == 65536  # constant memory, registers
    assert attributes[13] > 0 and attributes[16] > 0  # CLOCK_RATE, MULTIPROCESSOR_COUNT
    assert attributes[39] >= attributes[1]  # MAX_THREADS_PER_MULTIPROCESSOR
    assert attributes[31] == 0  # CONCURRENT_KERNELS: one operation at a time
    assert attributes[41] == 1  # UNIFIED_ADDRESSING: its addresses are never host addresses
    assert attributes[19] == 0  # CAN_MAP_HOST_MEMORY
    assert (attributes[33], attributes[34]) == (device.index, 0)  # PCI bus and device ids
    assert all(0 < key < 2**32 and -(2**31) <= value < 2**31 for key, value in attributes.items())
    # A launch at every limit at once is one the device accepts (and one past any is not).
    builtin = call(device, tenant, lambda: tenant.get_function(0, "fill", None))
    ptr = call(device, tenant, lambda: tenant.mem_alloc(4))
    args = struct.pack(arg_struct_format(builtin.arg_types), 1, 1.0, ptr)
    block = (attributes[2], 1, 1)
    call(
        device,
        tenant,
        lambda: tenant.launch(builtin.handle, (1, 1, 1), block, attributes[8], 0, args),
    )
    with pytest.raises(InvalidValue):
        call(
            device,
            tenant,
            lambda: tenant.launch(builtin.handle, (1, 1, 1), block, attributes[8] + 1, 0, args),
        )
    # Answered from a table, without the worker; each caller gets its own copy.
    ran, again = device.run_if_idle(tenant, tenant.device_attributes)
    assert ran and again == attributes
    again.clear()
    assert call(device, tenant, tenant.device_attributes) == attributes
    other = NumpyExecutor(index=3, memory=MiB)
    try:
        neighbour = other.open_tenant(MiB, 1.0)
        theirs = call(other, neighbour, neighbour.device_attributes)
        assert theirs[33] == 3 and {**theirs, 33: device.index} == attributes
    finally:
        other.close()


def test_module_get_global(tenant: NumpyTenant) -> None:
    """The built-in library has no globals (INVALID_VALUE, naming the global); any other module
    is not loaded (INVALID_HANDLE)."""
    with pytest.raises(InvalidValue, match="'counter'") as caught:
        tenant.module_get_global(0, "counter")
    assert "module 0" in str(caught.value)
    with pytest.raises(InvalidHandle, match="module 7 is not loaded"):
        tenant.module_get_global(7, "counter")


# -- construction -------------------------------------------------------------------------------


def test_create_executors() -> None:
    executors = create_executors("numpy", 2, GiB)
    try:
        assert [executor.properties.executor for executor in executors] == ["numpy", "numpy"]
        assert all(executor.properties.total_memory == GiB for executor in executors)
        first, second = (executor.open_tenant(MiB, 1.0) for executor in executors)
        ptr = call(executors[0], first, lambda: first.mem_alloc(16))
        with pytest.raises(InvalidHandle):  # another device's pointer is never yours
            call(executors[1], second, lambda: second.mem_free(ptr))
    finally:
        for executor in executors:
            executor.close()
    with pytest.raises(ValueError, match="numpy"):
        create_executors("cuda", 1, GiB)


def test_tenant_arguments_are_validated(device: NumpyExecutor) -> None:
    with pytest.raises(InvalidValue):
        device.open_tenant(-1, 1.0)
    with pytest.raises(InvalidValue):
        device.open_tenant(MiB, 0.0)


def test_device_addresses_lie_above_every_host_address() -> None:
    """Above 2**56 (no x86-64 or arm64 user address, even with 5-level paging, reaches it), below
    2**63 (a signed 64-bit reader sees the same number), each device in its own 1 TiB."""
    devices = [NumpyExecutor(index, MiB) for index in (0, 1, 5)]
    try:
        starts = []
        for device in devices:
            tenant = device.open_tenant(MiB, 1.0)
            ptr = call(device, tenant, lambda tenant=tenant: tenant.mem_alloc(MiB))
            assert 2**56 < ptr and ptr + MiB < 2**63
            starts.append(ptr)
        assert starts == [2**57, 2**57 + 2**40, 2**57 + 5 * 2**40]
    finally:
        for device in devices:
            device.close()
    last = (2**63 - 2**57) // 2**40 - 1  # the last device whose whole span is below 2**63
    assert 2**57 + (last + 1) * 2**40 <= 2**63
    NumpyExecutor(last, MiB).close()
    with pytest.raises(ValueError, match="device index"):
        NumpyExecutor(last + 1, MiB)


def test_address_space_roves_then_wraps_around() -> None:
    space = AddressSpace(0x10000, 1024)
    first, second, third = (space.reserve(200) for _ in range(3))
    assert [first, second, third] == [0x10000, 0x10100, 0x10200]
    space.unreserve(first)
    assert space.reserve(256) == 0x10300  # the cursor goes on past the freed range
    space.unreserve(third)
    assert space.reserve(1) == 0x10000  # then wraps to the first gap from the start
    assert space.reserve(256) == 0x10200
    with pytest.raises(DeviceOutOfMemory):
        space.reserve(1)
    space.unreserve(second)
    with pytest.raises(DeviceOutOfMemory):
        space.reserve(257)  # a single free gap of 256 bytes cannot hold it


def test_staging_buffers_are_reused_within_bounds() -> None:
    from executors.staging import StagingPool

    pool = StagingPool(capacity=3 * MiB)
    first = pool.take(MiB)
    first[:4] = b"data"
    pool.give_back(first)
    again = pool.take(MiB - 100)  # fits in the idle 1 MiB buffer: the same memory comes back
    assert again.obj is first.obj and len(again) == MiB - 100
    assert pool.take(MiB).obj is not first.obj  # it is taken: never handed out twice
    pool.give_back(again)
    assert pool.take(MiB // 4).obj is not again.obj  # four times too big: not wasted on this
    small = pool.take(100)
    pool.give_back(small)
    assert pool.take(100).obj is not small.obj  # small buffers are not worth pooling

    big = [pool.take(2 * MiB) for _ in range(3)]
    for buffer in big:
        pool.give_back(buffer)
    kept = {id(pool.take(2 * MiB).obj) for _ in range(3)}
    assert len(kept & {id(b.obj) for b in big}) == 1  # only 3 MiB may sit idle: one of them
