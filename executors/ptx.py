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
_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$]*)\s*\(")
_TYPE = re.compile(r"\.[busf]\d+")


def kernel_params(ptx: str) -> dict[str, list[str]]:
    """Every kernel (``.entry``) in ``ptx``: its name and its parameters' PTX types, in order.

    A parameter is ``.param [qualifiers] .<type> name`` (e.g. ``.param .u64 .ptr .global .align 4
    x``); its type is the first ``.<letter><bits>`` token. An aggregate (a struct passed by value,
    ``.param .align 8 .b8 x[16]``) appears as its element type with ``[]``; one whose type cannot
    be read as ``?``. Linear in the size of the text: a client's PTX is parsed on the device's
    worker, which must not be held up by a crafted image.
    """
    kernels: dict[str, list[str]] = {}
    position = 0
    while (entry := _ENTRY.search(ptx, position)) is not None:
        close = ptx.find(")", entry.end())
        if close < 0:
            break  # an unterminated parameter list: the driver refuses such PTX anyway
        types = []
        for param in ptx[entry.end() : close].split(","):
            tokens = param.split()
            if not tokens:
                continue
            found = next((t for t in tokens[1:] if _TYPE.fullmatch(t)), None)
            if tokens[0] != ".param" or found is None:
                types.append("?")
            else:
                types.append(found[1:] + ("[]" if "[" in param else ""))
        kernels[entry.group(1)] = types
        position = close + 1
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
