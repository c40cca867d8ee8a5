"""What the fuzz targets share: reading an input as choices, and saying an invariant broke.

atheris's ``FuzzedDataProvider`` would do this, but the targets' one-input functions must also run
without atheris (the corpus replay in ``tests/fuzz``), and must make the very same choices there,
so the input is read by this small class instead. Choices come from the front of the input, one
or two bytes each; once the input is used up every choice is 0, so a target's loops end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

# Fuzzing on past a known bug that is not fixed yet: FUZZ_AVOID=name,name makes the targets stop
# generating the inputs that reach it (each target lists its names). Unset, nothing is avoided, so
# the regression inputs keep failing until the bug is fixed.
_AVOIDED = frozenset(filter(None, os.environ.get("FUZZ_AVOID", "").split(",")))


_TRACING = bool(os.environ.get("FUZZ_TRACE"))


def trace(*what: object) -> None:
    """With FUZZ_TRACE=1, say what a target does (to read how a crash input got there)."""
    if _TRACING:
        print("fuzz:", *what, file=sys.stderr)


def avoiding(name: str) -> bool:
    """Whether the known bug ``name`` is to be kept out of reach (``FUZZ_AVOID``)."""
    return name in _AVOIDED


class InvariantBroken(AssertionError):
    """A target saw the code under test break one of its promises: a crash for the fuzzer."""


def check(condition: bool, message: str) -> None:
    """Raise ``InvariantBroken`` with ``message`` unless ``condition`` holds (not ``assert``:
    the checks must survive ``python -O``)."""
    if not condition:
        raise InvariantBroken(message)


class Choices:
    """A cursor over a fuzz input: ``below``, ``flag``, ``pick``, ``take`` and ``rest``."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return len(self._data) - self._position

    def byte(self) -> int:
        """The next byte, or 0 when the input is used up."""
        if self._position >= len(self._data):
            return 0
        value = self._data[self._position]
        self._position += 1
        return value

    def below(self, bound: int) -> int:
        """A number in ``range(bound)``, from as few bytes as can hold it (little-endian)."""
        if bound <= 1:
            return 0
        value, span = 0, 1
        while span < bound:
            value |= self.byte() * span
            span <<= 8
        return value % bound

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def unsigned(self, nbytes: int) -> int:
        """An unsigned integer of ``nbytes`` bytes, little-endian (zeros past the end)."""
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def take(self, count: int) -> bytes:
        """The next ``count`` bytes (fewer at the end of the input)."""
        chunk = self._data[self._position : self._position + count]
        self._position += len(chunk)
        return chunk

    def rest(self) -> bytes:
        """Everything not yet read."""
        return self.take(self.remaining)
