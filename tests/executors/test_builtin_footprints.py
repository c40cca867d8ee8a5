"""Each built-in's declared footprint (the memory a launch addresses) is exactly what its NumPy
twin touches. The GPU executor bounds-checks built-in launches with the footprint before the CUDA
twin runs, so a wrong footprint would either refuse valid launches or let one fault its context."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from executors import BUILTINS, InvalidValue
from executors.builtins import BUSY_MAX_US


class RecordingMemory:
    """KernelMemory that hands out scratch arrays and records every (pointer, bytes) viewed."""

    def __init__(self) -> None:
        self.touched: set[tuple[int, int]] = set()

    def view(self, ptr: int, dtype: npt.DTypeLike, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        self.touched.add((ptr, count * dt.itemsize))
        return np.zeros(count, dt)


X, Y, Z, W = 0x1000, 0x9000, 0x11000, 0x19000

CASES: list[tuple[str, tuple[Any, ...]]] = [
    ("saxpy", (5, 2.0, X, Y)),
    ("saxpy", (0, 2.0, X, Y)),
    ("fill", (7, 1.5, X)),
    ("gemm", (3, 4, 5, 1.0, X, Y, 0.0, Z)),
    ("gemm", (3, 4, 0, 1.0, X, Y, 2.0, Z)),
    ("gemm", (0, 4, 5, 1.0, X, Y, 2.0, Z)),
    ("relu", (9, X, Y)),
    ("softmax", (2, 3, X, Y)),
    ("softmax", (2, 0, X, Y)),
    ("reduce_sum", (6, X, W)),
    ("reduce_sum", (0, X, W)),
    ("busy", (0,)),
]


@pytest.mark.parametrize(("name", "args"), CASES, ids=lambda v: str(v))
def test_footprint_is_what_the_numpy_twin_touches(name: str, args: tuple[Any, ...]) -> None:
    builtin = BUILTINS[name]
    memory = RecordingMemory()
    builtin.run(memory, args)
    assert set(builtin.check(args)) == memory.touched


def test_every_builtin_has_a_case() -> None:
    assert {name for name, _ in CASES} == set(BUILTINS)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_a_negative_size_is_refused_before_launch(name: str) -> None:
    builtin = BUILTINS[name]
    for position in builtin.sizes:
        args = [1] * len(builtin.arg_types)
        args[position] = -1
        with pytest.raises(InvalidValue, match="must not be negative"):
            builtin.check(tuple(args))


def test_busy_is_bounded_on_both_twins() -> None:
    busy = BUILTINS["busy"]
    with pytest.raises(InvalidValue, match="at most 10000000 us"):
        busy.check((BUSY_MAX_US + 1,))
    with pytest.raises(InvalidValue, match="at most 10000000 us"):
        busy.run(RecordingMemory(), (BUSY_MAX_US + 1,))
    assert busy.check((BUSY_MAX_US,)) == []
