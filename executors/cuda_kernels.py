"""How a kernel's arguments go from the wire to CUDA.

On the wire they are packed little-endian with no padding (docs/PROTOCOL.md, section 7); CUDA
reads each at its natural alignment. The bytes are moved, never converted, so every value (a
float's NaN payload too) arrives exact.
"""

from __future__ import annotations

import struct
from typing import Any

from .base import arg_struct_format
from .builtins import Builtin


class Kernel:
    """A function a tenant may launch, and how its arguments go from the wire to CUDA."""

    def __init__(self, function: Any, module: int, arg_types: str, builtin: Builtin | None) -> None:
        self.function = function  # pycuda Function
        self.module = module
        self.arg_types = arg_types
        self.builtin = builtin
        # On the wire: little-endian, no padding. For CUDA: each at its natural alignment. The
        # bytes are moved, never converted, so every value (a float's NaN payload too) is exact.
        self.wire = struct.Struct(arg_struct_format(arg_types))
        self._moves: list[tuple[int, int, int]] = []  # (wire offset, native offset, size)
        wire_offset = native_offset = 0
        for code in arg_types:
            size = struct.calcsize(arg_struct_format(code))
            native_offset = -(-native_offset // size) * size  # scalars align to their size
            self._moves.append((wire_offset, native_offset, size))
            wire_offset += size
            native_offset += size
        self.native_size = native_offset  # C adds no padding after the last parameter

    def parameters(self, args: bytes) -> bytes:
        """The launch's parameter buffer as CUDA reads it, from the wire's packed ``args``."""
        buffer = bytearray(self.native_size)
        for wire, native, size in self._moves:
            buffer[native : native + size] = args[wire : wire + size]
        return bytes(buffer)
