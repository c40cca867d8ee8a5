"""executors.ptx: kernel signatures read from PTX, and declarations checked against them."""

from __future__ import annotations

import pytest

from executors import InvalidValue
from executors.ptx import check_arg_types, kernel_params

PTX = """
.version 8.8
.target sm_90
.address_size 64

.visible .entry scale(
\t.param .u32 scale_param_0,
\t.param .f32 scale_param_1,
\t.param .u64 .ptr .global .align 4 scale_param_2
)
{
\tret;
}
.visible .entry no_args()
{
\tret;
}
.visible .entry by_value(
\t.param .align 8 .b8 by_value_param_0[16],
\t.param .s64 by_value_param_1,
\t.param .f64 by_value_param_2
)
{
\tret;
}
"""


def test_reads_every_kernel_and_its_parameter_types() -> None:
    assert kernel_params(PTX) == {
        "scale": ["u32", "f32", "u64"],
        "no_args": [],
        "by_value": ["b8[]", "s64", "f64"],
    }


@pytest.mark.parametrize(
    ("name", "arg_types"),
    [("scale", "ifP"), ("scale", "IfQ"), ("no_args", ""), ("by_value", "")],
)
def test_matching_and_mismatching_declarations(name: str, arg_types: str) -> None:
    params = kernel_params(PTX)[name]
    if name == "by_value":  # a struct by value has no struct code: every declaration fails
        with pytest.raises(InvalidValue, match="takes 3 parameter"):
            check_arg_types(name, arg_types, params)
        with pytest.raises(InvalidValue, match=r"argument 0 .* \.b8\[\]"):
            check_arg_types(name, "Pqd", params)
        return
    check_arg_types(name, arg_types, params)


def test_a_wrong_type_names_the_argument_and_both_types() -> None:
    with pytest.raises(InvalidValue, match=r"argument 1 of kernel 'scale' is declared 'i'.*\.f32"):
        check_arg_types("scale", "iiP", kernel_params(PTX)["scale"])


def test_a_wrong_count_names_the_parameters() -> None:
    with pytest.raises(InvalidValue, match=r"takes 3 parameter\(s\) \(u32, f32, u64\).*'if'"):
        check_arg_types("scale", "if", kernel_params(PTX)["scale"])


@pytest.mark.parametrize(
    "crafted",
    [
        ".entry a(" * 200_000,  # no parameter list is ever closed
        ".entry a(" + ".param " * 200_000 + ")",  # a parameter list of qualifiers only
        ".entry a(" + ".param .u32 x," * 100_000 + ")",  # many real parameters
    ],
    ids=["unclosed", "qualifiers", "many-params"],
)
def test_crafted_ptx_of_megabytes_is_read_in_one_pass(crafted: str) -> None:
    # A client's PTX is read on the device's worker; a parser that backtracks (quadratic time)
    # would stall every tenant of the GPU for minutes on one such image.
    kernels = kernel_params(crafted)
    assert all(len(params) <= 200_000 for params in kernels.values())
