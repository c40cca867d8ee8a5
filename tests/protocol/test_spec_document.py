"""docs/PROTOCOL.md is normative: its tables and hex dumps must match the reference codec.

The document marks what is checked with HTML comments (``<!-- layout: Name -->``,
``<!-- opcode-table -->``, ``<!-- error-table -->``, ``<!-- example: name -->``), so editing the prose
is free but a wrong offset, opcode value or example byte fails here.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import fields
from pathlib import Path

import pytest
from wire_strategies import all_message_classes

from bitfusion_net.protocol import (
    ERROR_DEFERRED,
    ERROR_FATAL,
    PROTOCOL_VERSION,
    REPLIES,
    RULES,
    DeviceGrant,
    ErrorCode,
    ErrorReply,
    Opcode,
    Phase,
    encode_reply,
    encode_request,
)
from bitfusion_net.protocol import messages as m
from bitfusion_net.protocol.frames import HEADER

SPEC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
TYPE_NAMES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "i": "i32", "d": "f64", "3I": "u32[3]"}
GiB = 2**30

# The worked example of section 13, built with the real encoder.
EXAMPLE_SECRET = bytes(range(32))  # a real secret is 32 random bytes
EXAMPLE_SERVER_ID = "0b7d2c6e-5f1a-4e8b-9c3d-2a6f1e0d9b47"
# A token as an operator hands it out (made up; to a client it is an opaque string).
EXAMPLE_TOKEN = "bfnet_5c2e9a417d03b8f6_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
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
    "mem-alloc-reply": encode_reply(Opcode.MEM_ALLOC, 2, m.MemAllocReply(0x0200_0000_0000_1000)),
    "mem-free-request": encode_request(m.MemFree(0, 0x0200_0000_0000_2000), 3),
    "synchronize-request": encode_request(m.Synchronize(0), 4),
    "deferred-error-reply": encode_reply(
        Opcode.ERROR,
        4,
        ErrorReply(ErrorCode.INVALID_HANDLE, ERROR_DEFERRED, 3, 0, "not allocated"),
    ),
    # Section 13.2: a reservation made on a control connection, a program attached to it.
    "reserve-request": encode_request(
        m.Reserve(
            1, 0.25, 0, 0.0, m.MODE_SHARE, m.HOLD_BY_IDLE_TIMEOUT, 3600.0, "demo", b"\x01\x00"
        ),
        1,
    ),
    "reserve-reply": encode_reply(
        Opcode.RESERVE,
        1,
        m.ReserveReply(
            3,
            3600.0,
            EXAMPLE_SECRET,
            EXAMPLE_SERVER_ID,
            m.encode_grants(
                [
                    DeviceGrant(
                        0, 1, 16 * GiB, 4 * GiB, 0.25, 0.25, 0, "NumPy reference device", "numpy"
                    )
                ]
            ),
        ),
    ),
    "server-info-request": encode_request(m.ServerInfo(m.INFO_BRIEF), 2),
    "attach-request": encode_request(m.Attach(3, EXAMPLE_SECRET, EXAMPLE_SERVER_ID, "job"), 1),
    "lease-ended-error": encode_reply(
        Opcode.ERROR,
        0,
        ErrorReply(ErrorCode.LEASE_ENDED, ERROR_FATAL, 0, 0, "reservation 3 has ended: released"),
    ),
    # Section 13.3: a server that uses tokens.
    "authenticate-request": encode_request(m.Authenticate(EXAMPLE_TOKEN), 1),
    "authenticate-reply": encode_reply(Opcode.AUTHENTICATE, 1, m.AuthenticateReply("alice")),
    "token-revoked-error": encode_reply(
        Opcode.ERROR,
        0,
        ErrorReply(
            ErrorCode.AUTH,
            ERROR_FATAL,
            0,
            0,
            "the token of alice was revoked; the session is over",
        ),
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
    # The records of a DeviceAttributesReply (section 6.1).
    out["DeviceAttribute"] = (
        tuple(
            zip(("attribute", "value"), m.DEVICE_ATTRIBUTE_RECORD.format.lstrip("<"), strict=True)
        ),
        (),
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
        value, name, phase, reply, request_payload, reply_meta, reply_payload = table[opcode]
        assert name == opcode.name
        if opcode in (Opcode.ERROR, Opcode.KEEPALIVE):  # sent by the server, answering nothing
            assert reply_meta == REPLIES[opcode].__name__
            assert (phase, reply, request_payload, reply_payload) == ("-", "-", "-", "none"), name
            continue
        rule = RULES[opcode]
        assert phase == rule.phase.value, name
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


def test_the_phase_table_matches_the_rules(spec: str) -> None:
    """Section 5.1 names the requests of each phase; every other request is a device request."""
    rows = _table_after(spec, "<!-- phase-table -->")
    documented = {row[0]: row[1] for row in rows}
    assert set(documented) == {phase.value for phase in Phase}
    for phase in Phase:
        named = {
            int(value, 16)
            for value in re.findall(r"\(`(0x[0-9A-Fa-f]{2})`\)", documented[phase.value])
        }
        if phase is Phase.DEVICE:
            assert not named and "every other request" in documented[phase.value]
            continue
        assert named == {op for op, rule in RULES.items() if rule.phase is phase}, phase
        for opcode in named:
            assert Opcode(opcode).name in documented[phase.value], phase


def _info_keys(spec: str, name: str) -> set[str]:
    return {row[0] for row in _table_after(spec, f"<!-- info-keys: {name} -->")}


def test_the_server_info_example_has_exactly_the_documented_keys(spec: str) -> None:
    """Section 5.6: the JSON example parses and each of its objects has the keys of its table."""
    block = spec[spec.index("<!-- info-example -->") :].split("```")[1]
    assert block.startswith("json\n")
    info = json.loads(block[len("json\n") :])
    assert set(info) == {"server", "gpus", "reservations"}
    assert set(info["server"]) == _info_keys(spec, "server")
    assert info["server"]["protocol"] == PROTOCOL_VERSION
    for gpu in info["gpus"]:
        assert set(gpu) == _info_keys(spec, "gpus")
    assert info["reservations"]
    for reservation in info["reservations"]:
        assert set(reservation) == _info_keys(spec, "reservations")
        assert reservation["held_by"] in ("connection", "idle timeout")
        for device in reservation["devices"]:
            assert set(device) == _info_keys(spec, "devices")
        for session in reservation["sessions"]:
            assert set(session) == _info_keys(spec, "sessions")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_within_the_document_has_its_heading(spec: str) -> None:
    anchors = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", spec, flags=re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", spec))
    assert links and links <= anchors, sorted(links - anchors)


def test_the_pointer_as_u64_rule_is_the_same_in_the_protocol_and_the_executors() -> None:
    """Section 7 is stated once per package (the protocol and the executors may not import each
    other); both statements must pack every code alike."""
    from executors.base import ARG_TYPE_CODES, arg_struct_format

    for code in sorted(ARG_TYPE_CODES):
        assert m.kernel_args_format(code) == arg_struct_format(code), code
    assert struct.calcsize(m.kernel_args_format("P")) == 8
    assert "`P`  | device pointer, as a `u64`" in SPEC.read_text(encoding="utf-8")
