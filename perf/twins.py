"""The built-in kernels on a GPU against their NumPy twins, side by side.

Every built-in kernel (``executors.builtins.BUILTINS``) runs on the same random float32 inputs, at
a few sizes and launch geometries, on a ``PycudaExecutor`` tenant (GPU 0) and on a
``NumpyExecutor`` tenant in this process, through ``open_tenant`` and ``submit`` as the server runs
them. For each case it records the largest absolute and relative difference and whether the
results are bit-identical; ``busy`` is timed instead: requested time, GPU time by CUDA events
around the kernel, and wall time from submission to completion.

Verdicts (any failure makes the exit status 1):

- ``saxpy``, ``fill`` and ``relu`` must be exact (equal values, NaN where NaN): they round as
  NumPy does.
- ``gemm``, ``softmax`` and ``reduce_sum`` add in another order than NumPy: each element's error
  must be within RTOL of its scale, the sum of the magnitudes of what was added (for ``gemm``
  ``|alpha| |A| @ |B| + |beta C|``, for ``reduce_sum`` ``sum |x|``, for ``softmax`` the value).
- ``busy``: the median GPU time must lie within BUSY_LOW..BUSY_HIGH of the request.

Writes ``perf/results/gpu-twins.json`` (or ``--output``) and prints a table. Without a usable
GPU (no PyCUDA, no driver, no device) it says what is missing and exits 2.

    python perf/twins.py
    python perf/twins.py --output /tmp/twins.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from executors import (
    BUILTINS,
    Executor,
    GpuUnavailable,
    NumpyExecutor,
    PycudaExecutor,
    Tenant,
)
from executors.base import arg_struct_format

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30
DEVICE_MEMORY = 8 * GiB  # NumPy: its size; PyCUDA: the cap on what is offered
TENANT_MEMORY = 4 * GiB  # the CUDA context is charged to it too
CALL_TIMEOUT_S = 300.0  # the first call compiles the built-ins with nvcc
EXACT = frozenset({"saxpy", "fill", "relu"})
RTOL = 1e-5
BUSY_REQUESTS_US = (10, 100, 1000, 5000)
BUSY_REPEATS = 10
BUSY_LOW, BUSY_HIGH = 0.98, 1.10  # GPU time / requested, median (plus BUSY_SLACK_US above)
BUSY_SLACK_US = 30.0
# A launch geometry: (grid, block), 3-D.
Dim3 = tuple[int, int, int]


@dataclass(frozen=True)
class Geometry:
    name: str
    grid: Dim3
    block: Dim3
    max_work: float = math.inf  # skip cases with more work per thread than this allows

    @property
    def threads(self) -> int:
        return math.prod(self.grid) * math.prod(self.block)


def geometries(elements: int) -> list[Geometry]:
    """One thread; one block; a grid covering ``elements`` with 256-thread blocks; an odd 3-D
    shape (96-thread blocks, not a power of two); and 1024 blocks of the largest block size."""
    cover = max(1, min(65535, -(-elements // 256)))
    shapes = [
        Geometry("1x1", (1, 1, 1), (1, 1, 1), max_work=2e6),
        Geometry("1x256", (1, 1, 1), (256, 1, 1), max_work=2e8),
        Geometry(f"{cover}x256", (cover, 1, 1), (256, 1, 1)),
        Geometry("3x2x2 of 8x4x3", (3, 2, 2), (8, 4, 3)),
        Geometry("1024x1024", (1024, 1, 1), (1024, 1, 1)),
    ]
    unique = {(shape.grid, shape.block): shape for shape in reversed(shapes)}
    return [shape for shape in shapes if unique[(shape.grid, shape.block)] is shape]


@dataclass(frozen=True)
class Buf:
    """In a case's arguments: the device address of its buffer number ``index``."""

    index: int


@dataclass
class Case:
    """One launch: its buffers' initial contents, its arguments, what it writes and the scale of
    each output element's rounding error (``None``: the kernel must be exact)."""

    kernel: str
    label: str
    buffers: list[np.ndarray]
    args: list[Any]  # ``Buf(i)`` stands for buffer i's device address
    outputs: list[int]  # indices of the buffers to compare
    work: float  # multiply-adds or elements: how long one thread would take
    elements: int  # the natural parallelism, for the covering grid
    # (initial buffers, NumPy's outputs) -> each output's error scale; None: exact
    scale: Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]] | None = None

    def arguments(self, ptrs: list[int]) -> list[Any]:
        return [ptrs[a.index] if isinstance(a, Buf) else a for a in self.args]


def f32(rng: np.random.Generator, count: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(count) * scale).astype(np.float32)


def sum_of_magnitudes(buffers: list[np.ndarray], _: list[np.ndarray]) -> list[np.ndarray]:
    """reduce_sum's error scale: sum |x|."""
    return [np.array([np.abs(buffers[0].astype(np.float64)).sum()])]


def own_value(_: list[np.ndarray], ref: list[np.ndarray]) -> list[np.ndarray]:
    """softmax's error scale: each probability is its own."""
    return [np.abs(ref[0].astype(np.float64))]


def gemm_scale(
    m: int, n: int, k: int, alpha: float, beta: float
) -> Callable[..., list[np.ndarray]]:
    """gemm's error scale: |alpha| |A| @ |B| + |beta C| (C's initial contents)."""

    def scale(buffers: list[np.ndarray], _: list[np.ndarray]) -> list[np.ndarray]:
        a = np.abs(buffers[0][: m * k].astype(np.float64)).reshape(m, k)
        b = np.abs(buffers[1][: k * n].astype(np.float64)).reshape(k, n)
        c = np.zeros(m * n) if beta == 0 else np.abs(beta * buffers[2].astype(np.float64))
        return [(abs(alpha) * (a @ b)).reshape(-1) + c]

    return scale


def cases(rng: np.random.Generator) -> Iterator[Case]:
    """Every built-in but ``busy``, at a few sizes; in-place and special-value variants."""
    x, y = Buf(0), Buf(1)
    for n in (1, 1000, 1_000_003):
        a = float(np.float32(rng.standard_normal()))
        yield Case("saxpy", f"n={n}", [f32(rng, n), f32(rng, n)], [n, a, x, y], [1], n, n)
        yield Case("fill", f"n={n}", [f32(rng, n)], [n, 3.25, x], [0], n, n)
        yield Case("relu", f"n={n}", [f32(rng, n), f32(rng, n)], [n, x, y], [1], n, n)
        yield Case(
            "reduce_sum", f"n={n}", [f32(rng, n), f32(rng, 1)], [n, x, y], [1], n, n,
            sum_of_magnitudes,
        )  # fmt: skip
    n = 4099
    yield Case("saxpy", f"n={n} in place (x is y)", [f32(rng, n)], [n, -0.75, x, x], [0], n, n)
    yield Case("relu", f"n={n} in place", [f32(rng, n)], [n, x, x], [0], n, n)
    specials = np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38], np.float32
    )
    n = specials.size
    yield Case(
        "relu", "NaN, inf, signed zeros, subnormals", [specials, f32(rng, n)], [n, x, y], [1],
        n, n,
    )  # fmt: skip
    yield Case("saxpy", "n=0 (addresses nothing)", [f32(rng, 4), f32(rng, 4)], [0, 2.0, x, y],
               [1], 1, 1)  # fmt: skip
    for rows, cols in ((1, 1), (128, 10), (1000, 257), (3, 4097)):
        size = rows * cols
        yield Case(
            "softmax", f"{rows}x{cols}", [f32(rng, size, 4.0), f32(rng, size)],
            [rows, cols, x, y], [1], size, rows, own_value,
        )  # fmt: skip
    rows, cols = 64, 33
    yield Case(
        "softmax", f"{rows}x{cols} in place", [f32(rng, rows * cols, 4.0)], [rows, cols, x, x],
        [0], rows * cols, rows, own_value,
    )  # fmt: skip
    gemms = (
        (1, 1, 1, 1.0, 0.0),
        (64, 10, 256, 1.0, 0.0),
        (33, 65, 17, 0.5, -1.25),
        (128, 256, 784, 1.0, 0.0),
        (256, 256, 256, -2.0, 0.5),
        (7, 5, 0, 1.0, 0.5),  # k == 0: only beta*C
    )
    for m, n, k, alpha, beta in gemms:
        c = f32(rng, m * n)
        if beta == 0:
            c[:] = np.nan  # C is write-only when beta == 0: leftover NaNs must not leak in
        yield Case(
            "gemm", f"{m}x{n}x{k} alpha={alpha:g} beta={beta:g}",
            [f32(rng, max(1, m * k)), f32(rng, max(1, k * n)), c],
            [m, n, k, alpha, Buf(0), Buf(1), beta, Buf(2)], [2], m * n * max(1, k), m * n,
            gemm_scale(m, n, k, alpha, beta),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# One side: a tenant of one executor


class Side:
    """A tenant on one executor, driven through ``submit`` as the server drives it."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.tenant: Tenant = executor.open_tenant(TENANT_MEMORY, 1.0)
        self.functions: dict[str, tuple[int, struct.Struct]] = {}

    def call(self, op: Callable[[], Any]) -> Any:
        return self.executor.call(self.tenant, op, CALL_TIMEOUT_S)

    def function(self, name: str) -> tuple[int, struct.Struct]:
        if name not in self.functions:
            tenant = self.tenant
            info = self.call(lambda: tenant.get_function(0, name, None))
            self.functions[name] = (info.handle, struct.Struct(arg_struct_format(info.arg_types)))
        return self.functions[name]

    def upload(self, array: np.ndarray) -> int:
        tenant, payload = self.tenant, np.ascontiguousarray(array).data.cast("B")
        ptr = int(self.call(lambda: tenant.mem_alloc(max(4, payload.nbytes))))
        self.call(lambda: tenant.memcpy_htod(ptr, payload, 0))
        return ptr

    def download(self, ptr: int, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        tenant, view = self.tenant, out.data.cast("B")
        self.call(lambda: tenant.memcpy_dtoh(view, ptr, 0))
        return out

    def free(self, ptr: int) -> None:
        tenant = self.tenant
        self.call(lambda: tenant.mem_free(ptr))

    def launch(self, name: str, geometry: Geometry, args: list[Any]) -> float:
        """Launch and wait; returns the seconds from submission to completion."""
        handle, layout = self.function(name)
        tenant, packed = self.tenant, layout.pack(*args)
        started = time.perf_counter()
        self.call(lambda: tenant.launch(handle, geometry.grid, geometry.block, 0, 0, packed))
        return time.perf_counter() - started

    def gpu_time(self) -> float | None:
        """Seconds of GPU time by CUDA events so far (PyCUDA tenants only)."""
        value = getattr(self.tenant, "gpu_time", None)
        return None if value is None else float(value)

    def run(self, case: Case, geometry: Geometry) -> tuple[list[np.ndarray], float, float | None]:
        """The case on this side: its outputs, wall seconds of the launch, GPU seconds."""
        ptrs = [self.upload(buffer) for buffer in case.buffers]
        try:
            before = self.gpu_time()
            wall = self.launch(case.kernel, geometry, case.arguments(ptrs))
            after = self.gpu_time()
            gpu = None if before is None or after is None else after - before
            outputs = [self.download(ptrs[i], case.buffers[i]) for i in case.outputs]
        finally:
            for ptr in ptrs:
                self.free(ptr)
        return outputs, wall, gpu

    def close(self) -> None:
        self.executor.close()


# ----------------------------------------------------------------------------------------------
# Comparison


def compare(case: Case, gpu: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, Any]:
    """Differences of the GPU's outputs from NumPy's, and the verdict."""
    max_abs = max_rel = max_scaled = 0.0
    bit_identical = values_equal = nan_match = True
    scales = case.scale(case.buffers, ref) if case.scale is not None else None
    for index, (got, want) in enumerate(zip(gpu, ref, strict=True)):
        bit_identical &= bool(np.array_equal(got.view(np.uint32), want.view(np.uint32)))
        values_equal &= bool(np.array_equal(got, want, equal_nan=True))
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        nan_match &= bool(np.array_equal(np.isnan(got64), np.isnan(want64)))
        both = np.isfinite(got64) & np.isfinite(want64)
        if not np.array_equal(np.isfinite(got64), np.isfinite(want64)) or not np.array_equal(
            got64[~both], want64[~both], equal_nan=True
        ):
            max_abs = max_rel = max_scaled = math.inf  # an inf or NaN where the other has none
            continue
        diff = np.abs(got64[both] - want64[both])
        if diff.size == 0:
            continue
        max_abs = max(max_abs, float(diff.max()))
        denominator = np.maximum(np.abs(want64[both]), np.finfo(np.float32).tiny)
        max_rel = max(max_rel, float((diff / denominator).max()))
        if scales is not None:
            scale = np.maximum(scales[index][both], np.finfo(np.float32).tiny)
            max_scaled = max(max_scaled, float((diff / scale).max()))
    if case.kernel in EXACT or scales is None:
        ok, tolerance = values_equal, "exact"
    else:
        ok, tolerance = nan_match and max_scaled <= RTOL, f"error <= {RTOL:g} x scale"
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "max_err_over_scale": max_scaled if scales is not None else None,
        "bit_identical": bit_identical,
        "values_equal": values_equal,
        "tolerance": tolerance,
        "ok": bool(ok),
    }


def run_cases(gpu: Side, ref: Side, seed: int) -> list[dict[str, Any]]:
    rows = []
    for case in cases(np.random.default_rng(seed)):
        for geometry in geometries(case.elements):
            if case.work / geometry.threads > geometry.max_work:
                continue
            row: dict[str, Any] = {
                "kernel": case.kernel,
                "case": case.label,
                "geometry": geometry.name,
                "grid": geometry.grid,
                "block": geometry.block,
            }
            try:
                want, ref_wall, _ = ref.run(case, geometry)
                got, gpu_wall, gpu_seconds = gpu.run(case, geometry)
            except Exception as exc:  # noqa: BLE001 - a failing case is reported, not fatal
                row |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            else:
                row |= compare(case, got, want)
                row["gpu_ms"] = None if gpu_seconds is None else gpu_seconds * 1e3
                row["gpu_wall_ms"] = gpu_wall * 1e3
                row["numpy_wall_ms"] = ref_wall * 1e3
            rows.append(row)
    return rows


def time_busy(gpu: Side, ref: Side) -> list[dict[str, Any]]:
    """busy(us) for each request: GPU time by CUDA events and wall time on the GPU, wall time on
    the NumPy device; medians of BUSY_REPEATS launches after one warm-up each."""
    one = Geometry("1x1", (1, 1, 1), (1, 1, 1))
    rows = []
    for requested in BUSY_REQUESTS_US:
        events: list[float] = []
        walls: list[float] = []
        numpy_walls: list[float] = []
        gpu.launch("busy", one, [requested])
        ref.launch("busy", one, [requested])
        for _ in range(BUSY_REPEATS):
            before = gpu.gpu_time()
            walls.append(gpu.launch("busy", one, [requested]) * 1e6)
            after = gpu.gpu_time()
            if before is not None and after is not None:
                events.append((after - before) * 1e6)
            numpy_walls.append(ref.launch("busy", one, [requested]) * 1e6)
        event_us = statistics.median(events) if events else math.nan
        low, high = BUSY_LOW * requested, BUSY_HIGH * requested + BUSY_SLACK_US
        rows.append(
            {
                "requested_us": requested,
                "cuda_event_us": event_us,
                "cuda_event_us_all": events,
                "wall_us": statistics.median(walls),
                "wall_us_all": walls,
                "numpy_wall_us": statistics.median(numpy_walls),
                "bounds_us": [low, high],
                "ok": low <= event_us <= high,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else ("0" if value == 0 else f"{value:.2e}")
    return str(value)


def worst(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def print_table(rows: list[dict[str, Any]], busy: list[dict[str, Any]]) -> None:
    """One line per kernel and case, the worst over its launch geometries (all are in the JSON)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["case"]), []).append(r)
    header = ("kernel", "case", "geometries", "max abs", "max rel", "err/scale", "bits", "verdict")
    table = []
    for (kernel, label), group in groups.items():
        identical = sum(bool(r.get("bit_identical")) for r in group)
        failed = [r for r in group if not r["ok"]]
        errors = sorted({r["error"] for r in failed if "error" in r})
        verdict = "ok" if not failed else f"FAIL in {len(failed)}"
        table.append(
            (
                kernel,
                label,
                str(len(group)),
                fmt(worst(group, "max_abs_diff")),
                fmt(worst(group, "max_rel_diff")),
                fmt(worst(group, "max_err_over_scale")),
                "same" if identical == len(group) else f"differ in {len(group) - identical}",
                " ".join([verdict, *errors]),
            )
        )
    widths = [max(len(str(row[i])) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()
    print(f"{'busy requested':>15}{'CUDA events':>14}{'GPU wall':>12}{'NumPy wall':>13}  verdict")
    for b in busy:
        print(
            f"{b['requested_us']:>12} us{b['cuda_event_us']:>11.1f} us{b['wall_us']:>9.1f} us"
            f"{b['numpy_wall_us']:>10.1f} us  {'ok' if b['ok'] else 'FAIL'}"
            f" (bounds {b['bounds_us'][0]:.0f}..{b['bounds_us'][1]:.0f} us)"
        )


def describe(executor: PycudaExecutor) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": executor.properties.name,
        "executor": executor.properties.executor,
        "compute_capability": ".".join(map(str, executor.compute_capability)),
        "memory_offered": executor.properties.total_memory,
    }
    try:
        import pycuda

        info["pycuda"] = pycuda.VERSION_TEXT
        info["cuda_driver"] = executor.cuda.get_driver_version()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run every built-in kernel on the GPU (PyCUDA) and on the NumPy device, "
        "compare the results, time busy, and write gpu-twins.json."
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu-twins.json",
                        help="the JSON report (default: perf/results/gpu-twins.json)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=2024, help="seed of the random inputs")
    args = parser.parse_args(argv)
    try:
        gpu_executor = PycudaExecutor(0, DEVICE_MEMORY)
    except GpuUnavailable as exc:
        print(f"twins: no usable NVIDIA GPU: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    gpu = Side(gpu_executor)
    ref = Side(NumpyExecutor(0, DEVICE_MEMORY))
    try:
        device = describe(gpu_executor)
        print(f"GPU 0: {device['name']} (compute capability {device['compute_capability']})")
        rows = run_cases(gpu, ref, args.seed)
        busy = time_busy(gpu, ref)
    finally:
        gpu.close()
        ref.close()
    failed = [f"{r['kernel']} {r['case']} {r['geometry']}" for r in rows if not r["ok"]]
    failed += [f"busy {b['requested_us']} us" for b in busy if not b["ok"]]
    report = {
        "device": device,
        "machine": {"node": platform.node(), "python": platform.python_version()},
        "numpy": np.__version__,
        "seed": args.seed,
        "kernels": sorted(name for name in BUILTINS if name != "busy"),
        "rtol": RTOL,
        "exact": sorted(EXACT),
        "cases": rows,
        "busy": busy,
        "failed": failed,
        "ok": not failed,
        "seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(rows, busy)
    print()
    print(f"{len(rows)} cases, {len(busy)} busy timings: {len(failed)} failed")
    for item in failed:
        print(f"  FAILED: {item}")
    print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
