"""docs/PROTOCOL.md is normative: its tables and hex dumps must match the reference codec.

The document marks what is checked with HTML comments (``<!-- layout: Name -->``,
``<!-- opcode-table -->``, ``<!-- error-table -->``, ``<!-- example: name -->``), so editing the prose
is free but a wrong offset, opcode value or example byte fails here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import fields
from pathlib import Path

import pytest
from wire_strategies import all_message_classes

from bitfusion_net.protocol import (
    ERROR_DEFERRED,
    REPLIES,
    RULES,
    DeviceGrant,
    ErrorCode,
    ErrorReply,
    Opcode,
    encode_reply,
    encode_request,
)
from bitfusion_net.protocol import messages as m
from bitfusion_net.protocol.frames import HEADER

SPEC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
TYPE_NAMES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "d": "f64", "3I": "u32[3]"}
GiB = 2**30

# The worked example of section 13, built with the real encoder.
EXAMPLES = {
    "hello-request": encode_request(m.Hello(1, 0.5, 0, "demo"), 1),
    "hello-reply": encode_reply(
        Opcode.HELLO,
        1,
        m.HelloReply.with_devices(
            7,
            64 * 2**20,
            64 * 1024,
            [DeviceGrant(0, 0, 16 * GiB, 8 * GiB, 0.5, 0.5, 0, "NumPy reference device", "numpy")],
        ),
    ),
    "mem-alloc-request": encode_request(m.MemAlloc(0, 4096), 2),
    "mem-alloc-reply": encode_reply(Opcode.MEM_ALLOC, 2, m.MemAllocReply(0x7F00_0000_1000)),
    "mem-free-request": encode_request(m.MemFree(0, 0x7F00_0000_2000), 3),
    "synchronize-request": encode_request(m.Synchronize(0), 4),
    "deferred-error-reply": encode_reply(
        Opcode.ERROR,
        4,
        ErrorReply(ErrorCode.INVALID_HANDLE, ERROR_DEFERRED, 3, 0, "not allocated"),
    ),
}


@pytest.fixture(scope="module")
def spec() -> str:
    return SPEC.read_text(encoding="utf-8")


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`").strip() for cell in line.strip().strip("|").split("|")]


def _table_after(text: str, marker: str) -> list[list[str]]:
    """Rows (header and separator dropped) of the first Markdown table after ``marker``."""
    start = text.index(marker) + len(marker)
    lines = text[start:].splitlines()
    while lines and not lines[0].startswith("|"):
        lines.pop(0)
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    assert len(rows) >= 2, f"no table after {marker}"
    return rows[2:]


def _expected_layout(
    fixed: tuple[tuple[str, str], ...], variable: tuple[tuple[str, str], ...]
) -> list[tuple[str, str, str]]:
    rows, offset = [], 0
    for name, code in fixed:
        rows.append((str(offset), TYPE_NAMES[code], name))
        offset += struct.calcsize("<" + code)
    for index, (name, kind) in enumerate(variable):
        rows.append((str(offset) if index == 0 else "-", kind, name))
    return rows


def _layouts() -> dict[str, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]]:
    out = {cls.__name__: (cls.FIXED, cls.VARIABLE) for cls in all_message_classes()}
    names = [f.name for f in fields(DeviceGrant)]
    codes = DeviceGrant._FIXED.format.lstrip("<")
    out["DeviceGrant"] = (
        tuple(zip(names, codes, strict=False)),
        tuple((name, "str") for name in names[len(codes) :]),
    )
    return out


def test_every_layout_is_documented_with_the_right_offsets(spec: str) -> None:
    documented = set(re.findall(r"<!-- layout: (\w+) -->", spec))
    layouts = _layouts()
    assert documented == set(layouts)
    for name, (fixed, variable) in sorted(layouts.items()):
        marker = f"<!-- layout: {name} -->"
        if not fixed and not variable:
            following = spec[spec.index(marker) :][:200]
            assert "no fields" in following and "`metadata_length` 0" in following, name
            continue
        rows = [tuple(row[:3]) for row in _table_after(spec, marker)]
        assert rows == _expected_layout(fixed, variable), name


def test_the_opcode_table_matches_the_codec(spec: str) -> None:
    rows = _table_after(spec, "<!-- opcode-table -->")
    table = {int(row[0], 16): row for row in rows}
    assert set(table) == {int(op) for op in Opcode}
    for opcode in Opcode:
        value, name, reply, request_payload, reply_meta, reply_payload = table[opcode]
        assert name == opcode.name
        if opcode in (Opcode.ERROR, Opcode.KEEPALIVE):  # sent by the server, answering nothing
            assert reply_meta == REPLIES[opcode].__name__
            assert (reply, request_payload, reply_payload) == ("-", "-", "none"), name
            continue
        rule = RULES[opcode]
        assert reply == ("no-reply" if rule.no_reply else "yes"), name
        assert (request_payload != "none") == rule.request.HAS_PAYLOAD, name
        if rule.no_reply:
            assert (reply_meta, reply_payload) == ("-", "-"), name
        else:
            assert reply_meta == REPLIES[opcode].__name__, name
            assert (reply_payload != "none") == REPLIES[opcode].HAS_PAYLOAD, name


def test_the_error_table_matches_the_codes(spec: str) -> None:
    rows = _table_after(spec, "<!-- error-table -->")
    assert {(int(row[0]), row[1]) for row in rows} == {(int(c), c.name) for c in ErrorCode}


def test_the_header_table_matches_the_header_struct(spec: str) -> None:
    rows = _table_after(spec, "### 3.1 Header")
    offsets = [(int(row[0]), int(row[1])) for row in rows]
    sizes = [struct.calcsize("<" + code) for code in re.findall(r"\d*[a-zA-Z]", HEADER.format[1:])]
    expected, offset = [], 0
    for size in sizes:
        expected.append((offset, size))
        offset += size
    assert offsets == expected
    assert f"`{HEADER.format}`" in spec


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_worked_example_bytes(spec: str, name: str) -> None:
    marker = f"<!-- example: {name} -->"
    assert spec.count(marker) == 1
    block = spec[spec.index(marker) :].split("```")[1]
    data = bytearray()
    for line in block.strip().splitlines():
        offset, hex_part = int(line[:4], 16), line[6 : 6 + 47]
        assert offset == len(data), f"{name}: line offset {line[:4]}"
        data += bytes.fromhex(hex_part)
    assert bytes(data) == EXAMPLES[name]


def test_every_example_in_the_document_is_checked(spec: str) -> None:
    assert set(re.findall(r"<!-- example: ([\w-]+) -->", spec)) == set(EXAMPLES)


def test_the_pointer_as_u64_rule_is_the_same_in_the_protocol_and_the_executors() -> None:
    """Section 7 is stated once per package (the protocol and the executors may not import each
    other); both statements must pack every code alike."""
    from executors.base import ARG_TYPE_CODES, arg_struct_format

    for code in sorted(ARG_TYPE_CODES):
        assert m.kernel_args_format(code) == arg_struct_format(code), code
    assert struct.calcsize(m.kernel_args_format("P")) == 8
    assert "`P`  | device pointer, as a `u64`" in SPEC.read_text(encoding="utf-8")
