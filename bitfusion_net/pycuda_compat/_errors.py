"""PyCUDA's exception classes, and our errors translated onto them.

PyCUDA raises ``pycuda.driver.MemoryError`` for out-of-memory, ``LogicError`` for what the
program got wrong (an invalid handle or value), ``LaunchError`` for a kernel that faulted and
``RuntimeError`` for the rest; all derive from ``pycuda.driver.Error``. Ours keep their message
and are chained (``__cause__``), so nothing of what the server said is lost.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ..protocol import (
    BitfusionError,
    InvalidHandleError,
    InvalidValueError,
    KernelError,
    OutOfMemoryError,
)

F = TypeVar("F", bound=Callable[..., Any])


class Error(Exception):
    """Base of PyCUDA's errors."""


class MemoryError(Error, builtins.MemoryError):  # noqa: A001 - PyCUDA's name
    """Out of device memory (a tenant's memory limit is its device's memory)."""


class LogicError(Error):
    """An invalid handle, value or state: the program's mistake."""


class LaunchError(Error):
    """A kernel failed while running."""


class RuntimeError(Error, builtins.RuntimeError):  # noqa: A001 - PyCUDA's name
    """Anything else: unsupported here, the connection lost, the lease ended."""


class CompileError(Error):
    """nvcc refused a ``SourceModule``; ``stdout``/``stderr`` say why."""

    def __init__(self, msg: str, command_line: list[str], stdout: str = "", stderr: str = ""):
        super().__init__(msg)
        self.command_line, self.stdout, self.stderr = command_line, stdout, stderr

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n[command: {' '.join(self.command_line)}]\n{self.stderr}".rstrip()


def translate(error: BitfusionError) -> Error:
    """The PyCUDA error that stands for ``error``."""
    if isinstance(error, OutOfMemoryError):
        return MemoryError(str(error))
    if isinstance(error, InvalidHandleError | InvalidValueError):
        return LogicError(str(error))
    if isinstance(error, KernelError):
        return LaunchError(str(error))
    return RuntimeError(str(error))


@contextmanager
def translated() -> Iterator[None]:
    """Raise our errors as PyCUDA's."""
    try:
        yield
    except BitfusionError as exc:
        raise translate(exc) from exc


def translating(function: F) -> F:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with translated():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
