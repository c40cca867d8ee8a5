"""The built-in kernel library (module 0): the NumPy twins.

Every built-in has a CUDA C implementation (for the GPU executors) and a NumPy twin here with the
same name, the same argument types and the same results, so one client program runs unchanged on
every executor, and the examples and benchmarks have real work to do on machines without a GPU.

Conventions shared by both twins:

- Arguments are packed little-endian with no padding by ``arg_types`` (``struct`` codes; ``'P'`` is
  a device pointer). All float data is float32, matrices are row-major.
- Launch geometry never changes a result: a NumPy twin computes the whole range in one go and the
  CUDA twin uses grid-stride loops, so any grid covers all of it. Geometry affects only speed.
- A negative size is ``InvalidValue``; a size of 0 is a no-op that addresses no memory (as a
  grid-stride loop with nothing to do never dereferences its pointers).
- Outputs are computed in place into the output's device memory. Where NumPy has no fused
  operation, work goes in bounded chunks (``_CHUNK`` elements): host temporaries are not charged to
  the tenant's memory limit, so a full-size temporary would let a tenant use twice its share.
- ``x`` and ``y`` may be the same buffer for ``saxpy``, ``relu`` and ``softmax`` (in-place use);
  other overlaps are undefined, as on a GPU.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .base import arg_struct_format
from .errors import InvalidHandle, InvalidValue

__all__ = ["BUILTINS", "BUILTIN_MAX_BLOCKS", "BUSY_MAX_US", "Builtin", "KernelMemory", "lookup"]

_F32 = np.float32
# Elements per chunk of the chunked kernels: 1 MiB of float32, big enough to amortise the Python
# loop, small enough that the temporary stays negligible beside any tenant's share.
_CHUNK = 1 << 18
# The longest ``busy`` (10 s): a kernel cannot be pre-empted once it runs, so one launch must not be
# able to hold a GPU, and every tenant on it, for longer than a test could want.
BUSY_MAX_US = 10_000_000
# Built-ins walk their ranges with grid-stride loops, so more blocks than this only add empty
# blocks, which a GPU must still schedule: 2^62 of them would hold it for good.
BUILTIN_MAX_BLOCKS = 1 << 24
# ``busy`` sleeps until this close to its deadline, then spins: a sleep wakes up some 25 us late
# (with the worker's timer slack reduced; 75 us without), spinning on the clock is exact. The spin
# is kept short because it holds the GIL, which the server's event loop needs.
_SPIN_S = 50e-6


class KernelMemory(Protocol):
    """The device memory a kernel may address: the launching tenant's allocations, nothing else."""

    def view(self, ptr: int, dtype: npt.DTypeLike, count: int) -> np.ndarray:
        """A writable view of ``count`` elements of ``dtype`` at device address ``ptr``.

        Raises ``KernelFault`` ("illegal address ...") unless the whole range lies inside one of
        the tenant's allocations, as a GPU faults on an out-of-bounds access.
        """
        ...


# The device memory one launch addresses: (pointer, bytes) for each buffer it reads or writes.
Footprint = Callable[[tuple[Any, ...]], list[tuple[int, int]]]


@dataclass(frozen=True)
class Builtin:
    """One built-in kernel: what ``get_function(0, name)`` finds and ``launch`` runs.

    ``sizes`` and ``footprint`` describe a launch without running it, so that a GPU executor can
    refuse what the NumPy twin refuses (negative sizes, memory outside the tenant's allocations)
    before its CUDA twin runs, with the same errors, rather than faulting the tenant's context.
    """

    name: str
    arg_types: str
    run: Callable[[KernelMemory, tuple[Any, ...]], None]
    doc: str
    sizes: tuple[int, ...]  # positions of the arguments that are sizes (never negative)
    footprint: Footprint
    maxima: tuple[tuple[int, int, str], ...] = ()  # (position, largest, unit) of bounded ones
    layout: struct.Struct = field(init=False, repr=False)  # packs and unpacks the arguments

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", struct.Struct(arg_struct_format(self.arg_types)))

    def check(self, args: tuple[Any, ...]) -> list[tuple[int, int]]:
        """Raise ``InvalidValue`` for a negative size or an argument beyond its maximum; else the
        buffers the launch addresses."""
        for position in self.sizes:
            if args[position] < 0:
                raise InvalidValue(
                    f"{self._arg_name(position)} must not be negative, got {args[position]}"
                )
        for position, largest, unit in self.maxima:
            if args[position] > largest:
                raise InvalidValue(
                    f"{self._arg_name(position)} must be at most {largest} {unit}, "
                    f"got {args[position]} {unit}"
                )
        return self.footprint(args)

    def _arg_name(self, position: int) -> str:
        return self.doc.split("(", 1)[1].split(")", 1)[0].split(", ")[position]

    @staticmethod
    def check_grid(grid: tuple[int, int, int]) -> None:
        """Refuse more blocks than any built-in can use (see ``BUILTIN_MAX_BLOCKS``)."""
        if grid[0] * grid[1] * grid[2] > BUILTIN_MAX_BLOCKS:
            raise InvalidValue(
                f"launch: a built-in needs at most {BUILTIN_MAX_BLOCKS} blocks (its loops cover "
                f"any range with fewer), got grid {grid}"
            )


def _floats(*buffers: tuple[int, int]) -> list[tuple[int, int]]:
    """(pointer, float32 count) pairs as (pointer, bytes), leaving out empty ones."""
    return [(ptr, 4 * count) for ptr, count in buffers if count > 0]


def _check_sizes(**sizes: int) -> None:
    for name, size in sizes.items():
        if size < 0:
            raise InvalidValue(f"{name} must not be negative, got {size}")


def _saxpy(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    n, a, x, y = args
    _check_sizes(n=n)
    if n == 0:
        return
    xs = mem.view(x, _F32, n)
    ys = mem.view(y, _F32, n)
    scaled = np.empty(min(n, _CHUNK), _F32)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        # a*x is taken from this chunk before y's chunk is written, so x == y stays correct.
        part = np.multiply(xs[lo:hi], a, out=scaled[: hi - lo])
        np.add(ys[lo:hi], part, out=ys[lo:hi])


def _fill(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    n, value, out = args
    _check_sizes(n=n)
    if n == 0:
        return
    mem.view(out, _F32, n).fill(_F32(value))


def _gemm(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    m, n, k, alpha, a_ptr, b_ptr, beta, c_ptr = args
    _check_sizes(m=m, n=n, k=k)
    if m == 0 or n == 0:
        return
    c = mem.view(c_ptr, _F32, m * n).reshape(m, n)
    if k == 0:  # A@B is an empty sum: only the beta*C term is left, and A and B are not read.
        _scale_c(c, beta)
        return
    a = mem.view(a_ptr, _F32, m * k).reshape(m, k)
    b = mem.view(b_ptr, _F32, k * n).reshape(k, n)
    rows = max(1, _CHUNK // n)
    product = np.empty((min(rows, m), n), _F32)
    for lo in range(0, m, rows):
        hi = min(lo + rows, m)
        part = np.matmul(a[lo:hi], b, out=product[: hi - lo])
        part *= _F32(alpha)
        _scale_c(c[lo:hi], beta)
        c[lo:hi] += part


def _scale_c(c: np.ndarray, beta: float) -> None:
    # BLAS semantics: with beta == 0, C is write-only. Device memory is not zeroed on allocation,
    # so 0*C would turn leftover NaN/Inf bit patterns into NaN results.
    if beta == 0:
        c.fill(0)
    else:
        c *= _F32(beta)


def _relu(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    n, x, y = args
    _check_sizes(n=n)
    if n == 0:
        return
    # fmax, not maximum: CUDA's fmaxf(x, 0) maps NaN to 0, and the twins must agree.
    np.fmax(mem.view(x, _F32, n), _F32(0), out=mem.view(y, _F32, n))


def _softmax(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    rows, cols, x, y = args
    _check_sizes(rows=rows, cols=cols)
    if rows == 0 or cols == 0:
        return
    xs = mem.view(x, _F32, rows * cols).reshape(rows, cols)
    ys = mem.view(y, _F32, rows * cols).reshape(rows, cols)
    # The row max is taken before y is written, so x == y works; subtracting it keeps exp() from
    # overflowing for large inputs (the largest term becomes exp(0) = 1).
    row_max = xs.max(axis=1, keepdims=True)
    np.subtract(xs, row_max, out=ys)
    np.exp(ys, out=ys)
    row_sum = ys.sum(axis=1, dtype=np.float64, keepdims=True)
    np.divide(ys, row_sum.astype(_F32), out=ys)


def _reduce_sum(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    n, x, out = args
    _check_sizes(n=n)
    if n == 0:
        return
    # float64 accumulation: a float32 running sum loses the small terms of a long vector.
    total = np.add.reduce(mem.view(x, _F32, n), dtype=np.float64)
    mem.view(out, _F32, 1)[0] = total


def _busy(mem: KernelMemory, args: tuple[Any, ...]) -> None:
    (microseconds,) = args
    if microseconds < 0:
        raise InvalidValue(f"busy time must not be negative, got {microseconds} us")
    if microseconds > BUSY_MAX_US:
        raise InvalidValue(f"busy time must be at most {BUSY_MAX_US} us, got {microseconds} us")
    deadline = time.perf_counter() + microseconds * 1e-6
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        pass


BUILTINS: dict[str, Builtin] = {
    kernel.name: kernel
    for kernel in (
        Builtin(
            "saxpy",
            "ifPP",
            _saxpy,
            "saxpy(n, a, x, y): y[i] = a*x[i] + y[i]",
            (0,),
            lambda a: _floats((a[2], a[0]), (a[3], a[0])),
        ),
        Builtin(
            "fill",
            "ifP",
            _fill,
            "fill(n, value, out): out[i] = value",
            (0,),
            lambda a: _floats((a[2], a[0])),
        ),
        Builtin(
            "gemm",
            "iiifPPfP",
            _gemm,
            "gemm(m, n, k, alpha, A, B, beta, C): C = alpha*(A@B) + beta*C with A m*k, B k*n, "
            "C m*n, row-major; C is not read when beta == 0",
            (0, 1, 2),
            lambda a: (
                []
                if a[0] == 0 or a[1] == 0
                else _floats((a[4], a[0] * a[2]), (a[5], a[2] * a[1]), (a[7], a[0] * a[1]))
            ),
        ),
        Builtin(
            "relu",
            "iPP",
            _relu,
            "relu(n, x, y): y[i] = max(x[i], 0); NaN becomes 0",
            (0,),
            lambda a: _floats((a[1], a[0]), (a[2], a[0])),
        ),
        Builtin(
            "softmax",
            "iiPP",
            _softmax,
            "softmax(rows, cols, x, y): row-wise softmax of a rows*cols matrix, max-subtracted",
            (0, 1),
            lambda a: _floats((a[2], a[0] * a[1]), (a[3], a[0] * a[1])),
        ),
        Builtin(
            "reduce_sum",
            "iPP",
            _reduce_sum,
            "reduce_sum(n, x, out): out[0] = sum(x)",
            (0,),
            lambda a: _floats((a[1], a[0]), (a[2], 1 if a[0] > 0 else 0)),
        ),
        Builtin(
            "busy",
            "q",
            _busy,
            "busy(microseconds): occupy the device for that long (for scheduler tests)",
            (0,),
            lambda a: [],
            maxima=((0, BUSY_MAX_US, "us"),),
        ),
    )
}


def lookup(name: str, arg_types: str | None) -> Builtin:
    """The built-in ``name``; ``arg_types``, if given, must be its own (``get_function``'s rule)."""
    builtin = BUILTINS.get(name)
    if builtin is None:
        raise InvalidHandle(
            f"no built-in kernel {name!r}; available: {', '.join(sorted(BUILTINS))}"
        )
    if arg_types is not None and arg_types != builtin.arg_types:
        raise InvalidValue(
            f"built-in {name!r} takes arg_types {builtin.arg_types!r}, not {arg_types!r}"
        )
    return builtin
