"""Kernel arguments given PyCUDA's way become the wire's typed arguments, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from bitfusion_net.client.calls import KernelCalls
from bitfusion_net.pycuda_compat import _args


class FakeArray:
    """What gpuarray.GPUArray offers a kernel call: ``gpudata``."""

    def __init__(self, address: int) -> None:
        self.gpudata = address


def _wire(args: list[object]) -> tuple[str, bytes]:
    codes, values = _args.typed(args)
    return codes, KernelCalls(0, "k", 1, codes).pack_args(values)


def test_numpy_scalars_and_pointers_pack_as_the_protocol_lays_them_out() -> None:
    codes, data = _wire(
        [np.int32(3), np.float32(2.0), FakeArray(0x0200_0000_0000_1000), np.uint64(7),
         np.int8(-1), np.float64(0.5), np.int16(-2), np.uint8(255), np.intp(9)]
    )  # fmt: skip
    assert codes == "ifPQbdhBq"
    golden = bytes.fromhex(
        "03000000"  # i 3
        "00000040"  # f 2.0
        "0010000000000002"  # P, a u64 address
        "0700000000000000"  # Q 7
        "ff"  # b -1, no padding before or after
        "000000000000e03f"  # d 0.5
        "feff"  # h -2
        "ff"  # B 255
        "0900000000000000"  # q 9 (intp)
    )
    assert data == golden


def test_the_cuda_array_interface_is_a_pointer() -> None:
    class Foreign:
        __cuda_array_interface__ = {"data": (0x1234, False), "shape": (1,), "typestr": "<f4"}

    assert _wire([Foreign()]) == ("P", (0x1234).to_bytes(8, "little"))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (3, "invalid type on parameter #0"),  # PyCUDA refuses plain Python numbers
        (1.5, "invalid type on parameter #0"),
        (np.float16(1), "half precision"),
        (np.complex64(1), "complex64"),
        (np.zeros(2, np.float32), "by value"),
        (np.zeros(1, dtype=[("a", "i4")])[0], "by-value struct"),
    ],
)
def test_what_the_protocol_cannot_carry_is_refused_never_sent_wrong(
    value: object, why: str
) -> None:
    with pytest.raises(TypeError, match=why):
        _args.typed([value])


def test_prepare_takes_letters_numpy_types_and_dtypes() -> None:
    assert _args.prepared_types("PPi") == "PPi"
    assert _args.prepared_types([np.intp, np.float32, np.dtype(np.int64), "P"]) == "qfqP"
    with pytest.raises(TypeError, match="half precision"):
        _args.prepared_types([np.float16])
    assert _args.prepared_values("ifP", [4, 2, FakeArray(16)]) == [4, 2.0, 16]
    with pytest.raises(TypeError, match="takes 3 argument"):
        _args.prepared_values("ifP", [4, 2])
