"""Reading kernel signatures out of PTX, to check declared argument types against them.

A kernel's arguments travel as bytes packed by the types the client declares; CUDA itself cannot
tell whether they match what the kernel reads. PTX states every kernel's parameter types, so for a
PTX module the GPU executor checks each declaration when the function is looked up, and a wrong
one is a clear ``InvalidValue`` instead of a kernel reading garbage. (cubin and fatbin images carry
no such text; their declarations are trusted.) The test suite uses the same reader to check the
built-in kernels' CUDA twins against their NumPy twins' declarations.
"""

from __future__ import annotations

import re

from .errors import InvalidValue

__all__ = ["PTX_TYPES", "check_arg_types", "kernel_params"]

# The PTX parameter types that may hold an argument of each struct code (same width; integers may
# be declared signed, unsigned or untyped bits).
PTX_TYPES: dict[str, frozenset[str]] = {
    "b": frozenset({"s8", "u8", "b8"}),
    "B": frozenset({"s8", "u8", "b8"}),
    "h": frozenset({"s16", "u16", "b16"}),
    "H": frozenset({"s16", "u16", "b16"}),
    "i": frozenset({"s32", "u32", "b32"}),
    "I": frozenset({"s32", "u32", "b32"}),
    "q": frozenset({"s64", "u64", "b64"}),
    "Q": frozenset({"s64", "u64", "b64"}),
    "P": frozenset({"u64", "b64", "s64"}),
    "f": frozenset({"f32", "b32"}),
    "d": frozenset({"f64", "b64"}),
}
_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$]*)\s*\(([^)]*)\)")
# ".param .u64 .ptr .global .align 4 name" or ".param .align 8 .b8 name[16]": the type is the
# first .<letter><bits> after .param; a trailing [n] makes it an aggregate, which no code matches.
_PARAM = re.compile(r"\.param\b.*?\.([busf]\d+)\b[^,\[]*(\[\d*\])?")


def kernel_params(ptx: str) -> dict[str, list[str]]:
    """Every kernel (``.entry``) in ``ptx``: its name and its parameters' PTX types, in order.

    An aggregate parameter (a struct passed by value) appears as its element type with ``[]``.
    """
    kernels: dict[str, list[str]] = {}
    for entry in _ENTRY.finditer(ptx):
        types = []
        for param in entry.group(2).split(","):
            if not param.strip():
                continue
            found = _PARAM.search(param)
            types.append(
                "?" if found is None else found.group(1) + ("[]" if found.group(2) else "")
            )
        kernels[entry.group(1)] = types
    return kernels


def check_arg_types(name: str, arg_types: str, params: list[str]) -> None:
    """Raise ``InvalidValue`` unless ``arg_types`` fits the PTX parameter types ``params``."""
    if len(arg_types) != len(params):
        raise InvalidValue(
            f"kernel {name!r} takes {len(params)} parameter(s) ({', '.join(params) or 'none'}), "
            f"but {len(arg_types)} argument type(s) were declared ({arg_types!r})"
        )
    for position, (code, ptx_type) in enumerate(zip(arg_types, params, strict=True)):
        if ptx_type not in PTX_TYPES.get(code, frozenset()):
            raise InvalidValue(
                f"argument {position} of kernel {name!r} is declared {code!r}, "
                f"but the kernel's parameter is .{ptx_type}"
            )
