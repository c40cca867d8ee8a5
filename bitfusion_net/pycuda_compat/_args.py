"""Kernel arguments as PyCUDA takes them, turned into the wire's typed arguments.

PyCUDA packs each argument by its kind: a numpy scalar by its ``dtype.char``, a device
allocation, ``In``/``Out``/``InOut`` or a GPU array as a pointer; plain Python numbers are a
``TypeError`` (the kernel's parameter types are unknown, so PyCUDA will not guess). The wire
carries the same values typed by the protocol's codes (docs/PROTOCOL.md, section 7), without
padding; the server lays them out as the kernel's parameters. What the protocol cannot carry
(by-value structs and arrays, half precision, complex numbers) is refused here, never sent wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# numpy's dtype.char -> the protocol's code (``l``/``L`` are 64-bit on the LP64 hosts we run on).
_CODES = {
    "b": "b", "B": "B", "h": "h", "H": "H", "i": "i", "I": "I",
    "l": "q", "L": "Q", "q": "q", "Q": "Q", "f": "f", "d": "d", "P": "P",
    "p": "q", "?": "B",
}  # fmt: skip
_REFUSED = {
    "e": "half precision (float16)",
    "F": "complex64",
    "D": "complex128",
    "G": "complex256",
    "g": "long double",
    "V": "a by-value struct",
}


def protocol_code(char: str, where: str) -> str:
    """The protocol's code for a numpy ``dtype.char`` (or a PyCUDA ``prepare`` letter)."""
    code = _CODES.get(char)
    if code is None:
        what = _REFUSED.get(char, f"type code {char!r}")
        raise TypeError(
            f"{where}: {what} cannot be passed to a remote kernel (bitfusion-net carries "
            "integers, float32/float64 and pointers)"
        )
    return code


def prepared_types(arg_types: Any) -> str:
    """``Function.prepare``'s argument: a string such as ``"PPi"`` or a sequence of numpy
    dtypes, type objects or letters."""
    if isinstance(arg_types, str):
        letters = list(arg_types)
    else:
        letters = [t if isinstance(t, str) else np.dtype(t).char for t in arg_types]
    return "".join(protocol_code(c, f"prepare: parameter {i}") for i, c in enumerate(letters))


def device_pointer(value: Any) -> int | None:
    """The device address ``value`` stands for, or None if it is not a pointer argument."""
    from .driver import ArgumentHandler, DeviceAllocation

    if isinstance(value, DeviceAllocation):
        return int(value)
    if isinstance(value, ArgumentHandler):
        return int(value.device_pointer())
    gpudata = getattr(value, "gpudata", None)  # GPUArray, and look-alikes
    if gpudata is not None:
        return int(gpudata)
    interface = getattr(value, "__cuda_array_interface__", None)
    if interface is not None:
        return int(interface["data"][0])
    return None


def typed(args: Sequence[Any]) -> tuple[str, list[Any]]:
    """PyCUDA-style arguments -> (protocol codes, plain values), as ``Function.__call__`` takes
    them."""
    codes, values = [], []
    for position, arg in enumerate(args):
        pointer = device_pointer(arg)
        if pointer is not None:
            codes.append("P")
            values.append(pointer)
        elif isinstance(arg, np.generic):
            codes.append(protocol_code(arg.dtype.char, f"parameter #{position} (0-based)"))
            values.append(arg.item())
        elif isinstance(arg, np.ndarray):
            raise TypeError(
                f"parameter #{position} (0-based): a numpy array by value (a struct) cannot be "
                "passed to a remote kernel; pass drv.In/Out/InOut(array) or a device allocation"
            )
        else:
            raise TypeError(
                f"invalid type on parameter #{position} (0-based): {type(arg).__name__} (pass "
                "numpy scalars such as numpy.int32(n), as PyCUDA requires)"
            )
    return "".join(codes), values


def prepared_values(codes: str, args: Sequence[Any]) -> list[Any]:
    """Arguments of a ``prepared_call``: their types are ``codes``; Python numbers are fine."""
    if len(args) != len(codes):
        raise TypeError(f"the prepared kernel takes {len(codes)} argument(s), got {len(args)}")
    values: list[Any] = []
    for position, (code, arg) in enumerate(zip(codes, args, strict=True)):
        pointer = device_pointer(arg)
        if pointer is not None:
            values.append(pointer)
        elif isinstance(arg, np.generic):
            values.append(arg.item())
        elif code in "fd":
            values.append(float(arg))
        elif isinstance(arg, int | np.integer) or hasattr(arg, "__index__"):
            values.append(int(arg))
        else:
            raise TypeError(
                f"parameter #{position} (0-based): {type(arg).__name__} for a {code!r} parameter"
            )
    return values
