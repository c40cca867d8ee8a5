"""``pycuda.gpuarray``: numpy-like arrays in remote device memory.

What needs no kernel works on every executor: ``to_gpu``, ``empty``, ``get``, ``set``,
``zeros``, ``fill`` of values whose bytes repeat (memsets), slicing, copies. What needs a kernel
uses the server's built-in kernels where one does it (float32 ``fill``, ``+``, ``-``, ``*`` by a
scalar, through ``fill`` and ``saxpy``), so it runs on the NumPy reference device too; the rest
compiles an elementwise kernel with ``SourceModule``, which needs a GPU executor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import driver as drv
from .tools import dtype_to_ctype

__all__ = [
    "GPUArray", "arange", "empty", "empty_like", "ones", "to_gpu", "to_gpu_async", "zeros",
    "zeros_like",
]  # fmt: skip

_BLOCK = 256
_GRID = 120  # the built-in and elementwise kernels stride over the whole array


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _builtin(name: str) -> drv.Function:
    from . import builtin

    return builtin(name)


class GPUArray:
    """A C-contiguous array in device memory."""

    def __init__(
        self,
        shape: Any,
        dtype: Any,
        allocator: Any = None,
        base: Any = None,
        gpudata: Any = None,
        strides: Any = None,
        order: str = "C",
    ) -> None:
        self.shape = _shape(shape)
        self.dtype = np.dtype(dtype)
        if order != "C" or (
            strides is not None and tuple(strides) != _c_strides(self.shape, self.dtype)
        ):
            raise drv.LogicError("only C-contiguous GPU arrays are supported over bitfusion-net")
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self.strides = _c_strides(self.shape, self.dtype)
        self.base = base
        if gpudata is None:
            allocate = allocator if allocator is not None else drv.mem_alloc
            gpudata = allocate(max(1, self.nbytes))
        self.gpudata = gpudata

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ptr(self) -> int:
        return int(self.gpudata)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        return repr(self.get())

    # -- host <-> device ------------------------------------------------------------------------
    def get(
        self,
        ary: np.ndarray | None = None,
        pagelocked: bool = False,
        async_: bool = False,
        stream: drv.Stream | None = None,
    ) -> np.ndarray:
        if ary is None:
            ary = (
                drv.pagelocked_empty(self.shape, self.dtype)
                if pagelocked
                else np.empty(self.shape, self.dtype)
            )
        elif ary.shape != self.shape or ary.dtype != self.dtype or not ary.flags.c_contiguous:
            raise TypeError("get(ary): ary must have this array's shape and dtype, contiguous")
        if self.nbytes:
            if async_:
                drv.memcpy_dtoh_async(ary, self.gpudata, stream)
            else:
                drv.memcpy_dtoh(ary, self.gpudata)
        return ary

    def get_async(
        self, stream: drv.Stream | None = None, ary: np.ndarray | None = None
    ) -> np.ndarray:
        return self.get(ary, async_=True, stream=stream)

    def set(self, ary: Any, async_: bool = False, stream: drv.Stream | None = None) -> None:
        ary = np.ascontiguousarray(ary, dtype=self.dtype)
        if ary.size != self.size:
            raise ValueError(f"set: {ary.size} elements for an array of {self.size}")
        if self.nbytes:
            if async_:
                drv.memcpy_htod_async(self.gpudata, ary, stream)
            else:
                drv.memcpy_htod(self.gpudata, ary)

    def set_async(self, ary: Any, stream: drv.Stream | None = None) -> None:
        self.set(ary, async_=True, stream=stream)

    def copy(self) -> GPUArray:
        result = GPUArray(self.shape, self.dtype)
        if self.nbytes:
            drv.memcpy_dtod(result.gpudata, self.gpudata, self.nbytes)
        return result

    # -- filling ---------------------------------------------------------------------------------
    def fill(self, value: Any, stream: drv.Stream | None = None) -> GPUArray:
        """Set every element to ``value``: a memset when its bytes repeat in 1, 2 or 4-byte
        units, the built-in ``fill`` for float32, else an elementwise kernel."""
        if not self.size:
            return self
        pattern = np.array(value, self.dtype).tobytes()
        for unit, setter in (
            (1, drv.memset_d8_async),
            (2, drv.memset_d16_async),
            (4, drv.memset_d32_async),
        ):
            if len(pattern) % unit == 0 and pattern == pattern[:unit] * (len(pattern) // unit):
                word = int.from_bytes(pattern[:unit], "little")
                setter(self.gpudata, word, self.nbytes // unit, stream)
                return self
        if self.dtype == np.float32:
            _builtin("fill")(
                np.int32(self.size),
                np.float32(value),
                self.gpudata,
                block=(_BLOCK, 1, 1),
                grid=(_GRID, 1),
                stream=stream,
            )
            return self
        _elementwise(
            f"z[i] = ({dtype_to_ctype(self.dtype)}) a",
            self,
            [],
            {"a": np.array(value, self.dtype)[()]},
        )
        return self

    # -- views -----------------------------------------------------------------------------------
    def __getitem__(self, index: Any) -> GPUArray:
        """Slices along the first axis with step 1 (a contiguous view of the same memory)."""
        if not isinstance(index, slice):
            index = (index,) if not isinstance(index, tuple) else index
            if len(index) != 1 or not isinstance(index[0], slice):
                raise drv.LogicError("only first-axis slices with step 1 are supported")
            index = index[0]
        if not self.shape:
            raise IndexError("a 0-d array cannot be sliced")
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise drv.LogicError("only slices with step 1 are supported (views stay contiguous)")
        stop = max(start, stop)
        row = self.strides[0] if self.shape else self.dtype.itemsize
        return GPUArray(
            (stop - start, *self.shape[1:]),
            self.dtype,
            base=self,
            gpudata=int(self.gpudata) + start * row,
        )

    def reshape(self, *shape: Any) -> GPUArray:
        new = _shape(shape[0] if len(shape) == 1 else shape)
        if -1 in new:
            known = int(np.prod([s for s in new if s != -1], dtype=np.int64))
            new = tuple(self.size // max(1, known) if s == -1 else s for s in new)
        if int(np.prod(new, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape an array of {self.size} elements into {new}")
        return GPUArray(new, self.dtype, base=self, gpudata=self.gpudata)

    def ravel(self) -> GPUArray:
        return self.reshape(self.size)

    # -- arithmetic ------------------------------------------------------------------------------
    def _same(self, other: GPUArray) -> None:
        if other.shape != self.shape or other.dtype != self.dtype:
            raise ValueError(f"arrays of {self.shape} {self.dtype} and {other.shape} {other.dtype}")

    def _axpy(self, a: float, x: GPUArray, y: GPUArray) -> None:
        """y += a*x with the built-in saxpy (float32 only)."""
        _builtin("saxpy")(
            np.int32(self.size),
            np.float32(a),
            x.gpudata,
            y.gpudata,
            block=(_BLOCK, 1, 1),
            grid=(_GRID, 1),
        )

    def _combine(self, other: Any, a: float, b: float, op: str) -> GPUArray:
        """a*self + b*other (other an array) or an elementwise ``op``."""
        if isinstance(other, GPUArray):
            self._same(other)
            if self.dtype == np.float32 and op in "+-":  # a*self + b*other, built-ins only
                result = zeros(self.shape, self.dtype)
                self._axpy(a, self, result)
                self._axpy(b, other, result)
                return result
            result = GPUArray(self.shape, self.dtype)
            _elementwise(f"z[i] = x[i] {op} y[i]", result, [self, other])
            return result
        scalar = np.array(other, self.dtype)[()]
        result = GPUArray(self.shape, self.dtype)
        if self.dtype == np.float32 and op in "+-":
            result.fill(float(b * float(scalar)))
            self._axpy(a, self, result)
            return result
        _elementwise(f"z[i] = x[i] {op} s", result, [self], {"s": scalar})
        return result

    def __add__(self, other: Any) -> GPUArray:
        return self._combine(other, 1.0, 1.0, "+")

    __radd__ = __add__

    def __sub__(self, other: Any) -> GPUArray:
        return self._combine(other, 1.0, -1.0, "-")

    def __rsub__(self, other: Any) -> GPUArray:
        return (-self) + other

    def __neg__(self) -> GPUArray:
        return self * -1

    def __mul__(self, other: Any) -> GPUArray:
        if not isinstance(other, GPUArray) and self.dtype == np.float32:
            result = zeros(self.shape, self.dtype)
            self._axpy(float(other), self, result)
            return result
        return self._combine(other, 1.0, 1.0, "*")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> GPUArray:
        if not isinstance(other, GPUArray) and self.dtype == np.float32:
            return self * (1.0 / float(other))
        return self._combine(other, 1.0, 1.0, "/")


def _c_strides(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[int, ...]:
    strides, step = [], dtype.itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= max(1, extent)
    return tuple(reversed(strides))


def _elementwise(
    body: str, z: GPUArray, inputs: Sequence[GPUArray], scalars: dict[str, Any] | None = None
) -> None:
    """z = body over every element, by a kernel compiled here (a GPU executor runs it)."""
    from .compiler import SourceModule

    scalars = scalars or {}
    ctype = dtype_to_ctype(z.dtype)
    names = ["x", "y"][: len(inputs)]
    params = [f"{ctype} *z"] + [
        f"const {dtype_to_ctype(a.dtype)} *{n}" for n, a in zip(names, inputs, strict=True)
    ]
    params += [f"{dtype_to_ctype(np.asarray(v).dtype)} {k}" for k, v in scalars.items()]
    source = (
        f"__global__ void elementwise({', '.join(params)}, unsigned long long n) {{\n"
        "  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;"
        " i < n; i += (unsigned long long)gridDim.x * blockDim.x) {\n"
        f"    {body};\n  }}\n}}\n"
    )
    kernel = SourceModule(source).get_function("elementwise")
    args = [z.gpudata, *(a.gpudata for a in inputs), *(np.asarray(v)[()] for v in scalars.values())]
    kernel(*args, np.uint64(z.size), block=(_BLOCK, 1, 1), grid=(_GRID, 1))


def to_gpu(ary: Any, allocator: Any = None) -> GPUArray:
    ary = np.ascontiguousarray(ary)
    result = GPUArray(ary.shape, ary.dtype, allocator)
    result.set(ary)
    return result


def to_gpu_async(ary: Any, allocator: Any = None, stream: drv.Stream | None = None) -> GPUArray:
    ary = np.ascontiguousarray(ary)
    result = GPUArray(ary.shape, ary.dtype, allocator)
    result.set_async(ary, stream)
    return result


def empty(shape: Any, dtype: Any, allocator: Any = None, order: str = "C") -> GPUArray:
    return GPUArray(shape, dtype, allocator, order=order)


def empty_like(other: GPUArray, dtype: Any = None) -> GPUArray:
    return GPUArray(other.shape, dtype or other.dtype)


def zeros(shape: Any, dtype: Any, allocator: Any = None, order: str = "C") -> GPUArray:
    result = GPUArray(shape, dtype, allocator, order=order)
    if result.nbytes:
        drv.memset_d8(result.gpudata, 0, result.nbytes)
    return result


def zeros_like(other: GPUArray, dtype: Any = None) -> GPUArray:
    return zeros(other.shape, dtype or other.dtype)


def ones(shape: Any, dtype: Any = np.float64, allocator: Any = None) -> GPUArray:
    return GPUArray(shape, dtype, allocator).fill(1)


def arange(*args: Any, dtype: Any = None, **kwargs: Any) -> GPUArray:
    """``numpy.arange``'s values, made here and copied to the device."""
    return to_gpu(np.arange(*args, dtype=dtype, **kwargs))
