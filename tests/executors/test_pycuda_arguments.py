"""Kernel arguments from the wire (packed, little-endian) to CUDA's parameter buffer (each at its
natural alignment): byte for byte, for every struct code. Pure Python: no GPU needed."""

from __future__ import annotations

import struct

import pytest

from executors.cuda_driver import classify_cuda_error
from executors.cuda_kernels import Kernel

VALUES = {
    "b": -3, "B": 200, "h": -300, "H": 60000, "i": -7, "I": 7, "q": -(2**40), "Q": 2**60,
    "f": 1.5, "d": 2.25, "P": 0x7000_0000_1234,
}  # fmt: skip


@pytest.mark.parametrize(
    "arg_types", ["iiifPPfP", "bhBfP", "idPPq", "ifPP", "q", "", "bd", "hqbP", "bBhHiIqQfdP"]
)
def test_parameters_sit_where_cuda_reads_them(arg_types: str) -> None:
    values = [VALUES[code] for code in arg_types]
    codes = arg_types.replace("P", "Q")
    kernel = Kernel(None, 0, arg_types, None)
    # C's layout of these scalars on x86-64 and AArch64 is CUDA's parameter layout.
    assert kernel.parameters(struct.pack("<" + codes, *values)) == struct.pack("@" + codes, *values)


def test_float_bits_go_through_untouched() -> None:
    signalling_nan = b"\x01\x00\x80\x7f"  # a float32 NaN that a round trip through Python quiets
    kernel = Kernel(None, 0, "if", None)
    assert kernel.parameters(struct.pack("<i", 5) + signalling_nan)[4:] == signalling_nan


@pytest.mark.parametrize(
    ("text", "kind", "lost"),
    [
        ("cuLaunchKernel failed: an illegal memory access was encountered", "DeviceError", True),
        ("cuCtxSynchronize failed: unspecified launch failure", "DeviceError", True),
        ("cuMemAlloc failed: out of memory", "DeviceOutOfMemory", False),
        ("cuLaunchKernel failed: too many resources requested for launch", "InvalidValue", False),
        ("cuModuleLoadData failed: invalid argument - ptxas: illegal address", "InvalidValue", False),
        ("cuSomething failed: unknown error", "DeviceError", False),
    ],
)
def test_cuda_errors_are_classified_for_the_tenant(text: str, kind: str, lost: bool) -> None:
    """A fault loses the context; the JIT log after " - " is the tenant's text, never a verdict."""
    error, context_lost = classify_cuda_error("op", text, out_of_memory=False)
    assert type(error).__name__ == kind and context_lost is lost
    assert str(error).startswith("op: ")
