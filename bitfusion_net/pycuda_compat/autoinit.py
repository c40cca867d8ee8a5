"""``import pycuda.autoinit``: a context on the first device, popped at exit (PyCUDA's way)."""

from __future__ import annotations

import atexit

from . import driver as cuda
from .tools import clear_context_caches, make_default_context

cuda.init()
_made = make_default_context()
device = _made.get_device()
context: cuda.Context | None = _made


def _finish_up() -> None:
    global context
    if context is not None:
        context.pop()
        context = None
    clear_context_caches()


atexit.register(_finish_up)
