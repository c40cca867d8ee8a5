"""``import pycuda.autoprimaryctx``: device 0's primary context, made current, popped at exit."""

from __future__ import annotations

import atexit

from . import driver as cuda

cuda.init()
device = cuda.Device(0)
_primary = device.retain_primary_context()
_primary.push()
context: cuda.Context | None = _primary


def _finish_up() -> None:
    global context
    if context is not None:
        context.pop()
        context = None


atexit.register(_finish_up)
