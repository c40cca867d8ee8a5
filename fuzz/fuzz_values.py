"""Messages built from fuzz choices, from each class's own ``FIXED``/``VARIABLE`` layout.

Valid values are the ones the wire can carry; a *broken* message has one field the wire cannot
carry (an integer out of its field's range, a tuple of the wrong length, text that is not
encodable as UTF-8), which the client must refuse with ``ProtocolError`` and nothing sent.
Values lean towards the interesting ones (0, the extremes, the NumPy device's first pointer).
"""

from __future__ import annotations

import struct
from typing import Any

from fuzz_support import Choices

from bitfusion_net.protocol import RULES, Message, Request

# Every request class, in opcode order so that a choice means the same class on every run.
REQUEST_TYPES: list[type[Request]] = [RULES[opcode].request for opcode in sorted(RULES)]

FIRST_POINTER = 0x0200_0000_0000_0000  # where the NumPy device's first allocation lands
_BITS = {"B": 8, "H": 16, "I": 32, "Q": 64}
_FAVOURITES: dict[str, tuple[int, ...]] = {
    "B": (0, 1, 4, 255),
    "H": (0, 0, 1, 65535),  # mostly device 0: the one a session has
    "I": (0, 1, 3, 2**32 - 1),
    "Q": (0, 1, 4096, FIRST_POINTER, 2**64 - 1),
}
_FLOATS = (0.0, 0.05, 0.5, 1.0, -1.0, float("nan"), float("inf"), 1e-300)
_TEXTS = ("", "saxpy", "fill", "relu", "ifPP", "P", "\u00e9t\u00e9", "x" * 70)


def fixed_value(choices: Choices, code: str) -> Any:
    """A value a fixed field of ``struct`` code ``code`` can carry (``3I``: a 3-tuple)."""
    if len(code) > 1:
        return tuple(fixed_value(choices, code[-1]) for _ in range(int(code[:-1])))
    if code == "d":
        if choices.flag():
            return choices.pick(_FLOATS)
        return struct.unpack("<d", choices.take(8).ljust(8, b"\0"))[0]
    if choices.byte() & 3:
        return choices.pick(_FAVOURITES[code])
    return choices.unsigned(_BITS[code] // 8)


def variable_value(choices: Choices, kind: str) -> Any:
    if choices.flag():
        text = choices.pick(_TEXTS)
        return text if kind == "str" else text.encode()
    raw = choices.take(choices.below(24))
    return raw.decode(errors="replace") if kind == "str" else raw


def message(choices: Choices, cls: type[Message]) -> Message:
    """A valid instance of ``cls``."""
    values: dict[str, Any] = {name: fixed_value(choices, code) for name, code in cls.FIXED}
    for name, kind in cls.VARIABLE:
        values[name] = variable_value(choices, kind)
    return cls(**values)


def broken_message(choices: Choices, cls: type[Message]) -> Message | None:
    """An instance of ``cls`` with one field the wire cannot carry; None if it has no fields."""
    fields = list(cls.FIXED) + list(cls.VARIABLE)
    if not fields:
        return None
    valid = message(choices, cls)
    name, code = fields[choices.below(len(fields))]
    if code == "bytes":
        if not cls.FIXED:
            return None
        name, code = cls.FIXED[0]  # bytes fields take any bytes: break a fixed field instead
    bad: Any
    if code == "str":
        bad = "\ud800"  # a lone surrogate: not encodable as UTF-8
    elif code == "d":
        bad = "not a float"  # the one way to break a float field: not a number at all
    elif len(code) > 1:
        bad = (0,) * (int(code[:-1]) - 1)  # one value short
    else:
        bad = choices.pick((-1, 2 ** _BITS[code]))
    return type(valid)(**{**vars(valid), name: bad})


def choices_for(msg: Message) -> bytes:
    """The choice bytes that make ``message`` build ``msg`` (for writing seed inputs): every
    field as raw bytes. Text and bytes fields must be at most 23 bytes long."""
    out = bytearray()
    for name, code in type(msg).FIXED:
        value = getattr(msg, name)
        for item in value if len(code) > 1 else (value,):
            kind = code[-1]
            out.append(0)  # not a favourite: the raw value follows
            out += struct.pack("<" + kind, item)
    for name, kind in type(msg).VARIABLE:
        value = getattr(msg, name)
        raw = value.encode() if kind == "str" else bytes(value)
        if len(raw) >= 24:
            raise ValueError(f"{name!r} of {msg!r} is too long for a seed")
        out += bytes([0, len(raw)]) + raw
    return bytes(out)
