#!/usr/bin/env python3
"""Write the seed corpora in fuzz/corpus/<target>/ from real encoded frames, deterministically.

    python fuzz/make_corpus.py          # (re)write every seed; other files there are left alone
    python fuzz/make_corpus.py --clean  # also delete files that are not seeds (fuzzer finds)

Each seed is run through its target's one-input function before it is written, so a seed that
no longer runs cleanly (the input layout changed, say) stops this script instead of going stale.
Seeds are small on purpose: the fuzzer grows them; they only have to reach every phase.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fuzz_connections  # noqa: E402
import fuzz_decoder  # noqa: E402
import fuzz_server  # noqa: E402
import fuzz_support  # noqa: E402
from fuzz_values import FIRST_POINTER, REQUEST_TYPES, choices_for  # noqa: E402

from bitfusion_net.protocol import (  # noqa: E402
    RULES,
    DeviceGrant,
    Message,
    Opcode,
    Request,
    encode_reply,
    encode_request,
)
from bitfusion_net.protocol import messages as m  # noqa: E402

fuzz_support._AVOIDED = frozenset()  # seeds must pass, and regressions fail, with nothing avoided
CORPUS = HERE / "corpus"
P0 = FIRST_POINTER  # the first allocation of a fresh NumPy device 0
P1 = FIRST_POINTER + 4096  # the second, after one of 4096 bytes
SERVER_ID = "0b7d2c6e-5f1a-4e8b-9c3d-2a6f1e0d9b47"
TOKEN = "bfnet_5c2e9a417d03b8f6_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
SEED_TOKEN = "bfnet-seed-token"  # a connections seed's text is at most 23 bytes


def frames(*requests: Request | tuple[Request, bytes], first_id: int = 2) -> bytes:
    """Requests numbered from ``first_id`` (the harness's HELLO is #1), payloads after them."""
    out = bytearray()
    for request_id, item in enumerate(requests, first_id):
        request, payload = item if isinstance(item, tuple) else (item, b"")
        out += encode_request(request, request_id, len(payload)) + payload
    return bytes(out)


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# -- fuzz_decoder --------------------------------------------------------------------------------
def decoder_seeds() -> dict[str, bytes]:
    # Configuration: direction and sink bits, metadata and payload limits 65536, resting buffer
    # HEADER_SIZE + n, then the chunk plan.
    def seed(
        bits: int,
        stream: bytes,
        plan: bytes = b"",
        limits: tuple[int, int] = (7, 7),
        rest: int = 232,
    ) -> bytes:
        return bytes([bits, limits[0], limits[1], rest, len(plan)]) + plan + stream

    grant = DeviceGrant(0, 0, 2**34, 2**33, 0.5, 0.5, 0, "NumPy reference device", "numpy")
    hello_reply = m.HelloReply.with_devices(1, 4096, 65536, [grant])
    replies = (
        encode_reply(Opcode.HELLO, 1, hello_reply)
        + encode_reply(Opcode.MEM_ALLOC, 2, m.MemAllocReply(P0))
        + encode_reply(Opcode.MEMCPY_DTOH, 3, m.MemcpyDtoHReply(), 8) + b"01234567"
        + encode_reply(Opcode.KEEPALIVE, 0, m.Keepalive())
        + encode_reply(Opcode.GET_FUNCTION, 4, m.GetFunctionReply(1, "ifPP"))
        + encode_reply(Opcode.ERROR, 5, m.ErrorReply(4, m.ERROR_DEFERRED, 3, 1, "bad pointer"))
    )  # fmt: skip
    more_replies = (
        encode_reply(Opcode.MEM_GET_INFO, 6, m.MemGetInfoReply(100, 200))
        + encode_reply(Opcode.TENANT_STATS, 7, m.TenantStatsReply(1, 2, 3, 4, 5, 6))
        + encode_reply(Opcode.EVENT_ELAPSED, 8, m.EventElapsedReply(1.5))
        + encode_reply(Opcode.STREAM_CREATE, 9, m.HandleReply(2))
        + encode_reply(Opcode.SYNCHRONIZE, 10, m.Done())
        + encode_reply(Opcode.MODULE_LOAD, 11, m.ModuleLoadReply(1))
        + encode_reply(Opcode.ERROR, 0, m.ErrorReply(1, m.ERROR_FATAL, 0, 0, "protocol error"))
    )  # fmt: skip
    requests = frames(
        m.Hello(1, 1.0, 0, "fuzz"),
        m.MemAlloc(0, 4096),
        (m.MemcpyHtoD(0, P0), b"abcdefgh"),
        m.MemcpyDtoH(0, P0, 8),
        m.Launch(0, 1, (1, 1, 1), (32, 1, 1), 0, 0, struct.pack("<ifQ", 2, 1.0, P0)),
        m.GetFunction(0, 0, "fill", "ifP"),
        first_id=1,
    )
    more_requests = frames(
        m.MemFree(0, P0), m.MemGetInfo(0), m.MemcpyDtoD(0, P0, P0 + 8, 8), m.Memset(0, 4, 7, P0, 4),
        m.Synchronize(0), m.TenantStats(0), (m.ModuleLoad(0), b"\x7fELF"), m.ModuleUnload(0, 1),
        m.StreamCreate(0), m.StreamDestroy(0, 2), m.StreamSynchronize(0, 0), m.EventCreate(0),
        m.EventDestroy(0, 3), m.EventRecord(0, 3), m.EventSynchronize(0, 3), m.EventElapsed(0, 3, 4),
    )  # fmt: skip
    # Device attributes, module globals, stream and event queries, 16-bit memsets (PROTOCOL.md 6).
    cuda_requests = frames(
        m.DeviceAttributes(0), m.ModuleGetGlobal(0, 1, "table"), m.StreamQuery(0, 1),
        m.StreamWaitEvent(0, 1, 3), m.EventQuery(0, 3), m.Memset(0, 2, 0xABCD, P0, 8),
        first_id=1,
    )  # fmt: skip
    cuda_replies = (
        encode_reply(Opcode.DEVICE_ATTRIBUTES, 1, m.DeviceAttributesReply.from_dict({1: 1024, 75: 8, 76: 0, 134: -1}))
        + encode_reply(Opcode.MODULE_GET_GLOBAL, 2, m.ModuleGetGlobalReply(P0, 64))
        + encode_reply(Opcode.STREAM_QUERY, 3, m.QueryReply(1))
        + encode_reply(Opcode.EVENT_QUERY, 5, m.QueryReply(0))
    )  # fmt: skip
    # The control plane (PROTOCOL.md 5.5, 5.6): its requests, and the replies that answer them.
    control_requests = frames(
        m.Reserve(2, 0.5, 0, 0.0, m.MODE_CAP, m.HOLD_BY_IDLE_TIMEOUT, 600.0, "fuzz"),
        m.ServerInfo(m.INFO_FULL),
        m.Release(7, bytes(range(32))),
        m.Attach(7, bytes(range(32)), SERVER_ID, "fuzz"),
        m.Authenticate(TOKEN),
        first_id=1,
    )
    control_replies = (
        encode_reply(
            Opcode.RESERVE,
            1,
            m.ReserveReply(7, 600.0, bytes(range(32)), SERVER_ID, m.encode_grants([grant, grant])),
        )
        + encode_reply(Opcode.SERVER_INFO, 2, m.ServerInfoReply('{"server":{"protocol":3}}'))
        + encode_reply(Opcode.RELEASE, 3, m.Done())
        + encode_reply(Opcode.ATTACH, 4, hello_reply)
        + encode_reply(Opcode.AUTHENTICATE, 5, m.AuthenticateReply("alice"))
        + encode_reply(Opcode.ERROR, 5, m.ErrorReply(11, 0, 0, 0, "alice may hold 1 GPU(s)"))
        + encode_reply(Opcode.ERROR, 0, m.ErrorReply(10, m.ERROR_FATAL, 0, 0, "token revoked"))
        + encode_reply(Opcode.ERROR, 0, m.ErrorReply(9, m.ERROR_FATAL, 0, 0, "released"))
    )
    return {
        "requests-cuda-calls": seed(0b00000, cuda_requests),
        "requests-cuda-calls-cut": seed(0b01100, cuda_requests, plan=b"\x03\x0b"),
        "replies-cuda-calls": seed(0b00001, cuda_replies),
        "replies-cuda-calls-bytewise": seed(0b11011, cuda_replies, plan=b"\x00"),
        "requests-control-plane": seed(0b00000, control_requests),
        "requests-control-plane-bytewise": seed(0b11010, control_requests, plan=b"\x00"),
        "replies-control-plane": seed(0b00001, control_replies),
        "replies-control-plane-cut": seed(0b01101, control_replies, plan=b"\x05\x11"),
        "requests-whole": seed(0b00000, requests),
        "requests-bytewise-buffers": seed(0b11010, requests, plan=b"\x00"),
        "requests-cut-drop": seed(0b01100, requests, plan=b"\x16\x17\x00\x40"),
        "requests-all-opcodes": seed(0b10000, more_requests, plan=b"\x1f"),
        "requests-tiny-buffer": seed(0b01000, more_requests, plan=b"\x05\x30", rest=0),
        "requests-refused-payload": seed(0b00110, requests),
        "requests-small-limits": seed(0b00000, requests, limits=(4, 2)),
        "requests-truncated": seed(0b00000, requests[:-7]),
        "replies-whole": seed(0b00001, replies),
        "replies-bytewise": seed(0b11011, replies, plan=b"\x00"),
        "replies-cut-drop": seed(0b01101, replies + more_replies, plan=b"\x02\x17\x18"),
        "replies-refused-payload": seed(0b00111, replies),
        "replies-small-payload-limit": seed(0b00001, replies, limits=(7, 1)),
        "replies-more": seed(0b10001, more_replies, plan=b"\x0b"),
        "replies-tiny-buffer": seed(0b01001, more_replies, plan=b"\x63", rest=0),
        "bad-magic": seed(0b00000, b"BFNX" + requests[4:]),
        # A version-2 peer (PROTOCOL.md 12): refused at its first header.
        "bad-version": seed(0b00000, requests[:4] + b"\x02" + requests[5:]),
        "wrong-direction": seed(0b00001, requests),
        "unknown-opcode": seed(0b00000, requests[:5] + b"\x7f" + requests[6:]),
        "stray-metadata": seed(
            0b00000,
            encode_request(m.Synchronize(0), 1)[:12] + b"\x03\0\0\0" + b"\0" * 8 + b"\0\0\0",
        ),
    }


# -- fuzz_connections ----------------------------------------------------------------------------
class Script:
    """A script for fuzz_connections, written op by op the way its harness reads it."""

    def __init__(self, config: int, client_buffer: int = 3, server_buffer: int = 3) -> None:
        self.data = bytearray([config, client_buffer, server_buffer])

    def op(self, name: str) -> Script:
        self.data.append(fuzz_connections.OPERATIONS.index(name))
        return self

    def send(
        self, msg: Request, payload: int | None = None, into: str = "right", odd_length: int = 255
    ) -> Script:
        """``payload``: an index into the harness's payload lengths, for opcodes with one;
        ``odd_length`` below 24: an odd payload length instead (0: -1, 1: 2**64, else itself)."""
        self.op("client_send")
        self.data += bytes([REQUEST_TYPES.index(type(msg)), 255]) + choices_for(msg)
        self.data.append(odd_length)
        if odd_length >= 24 and type(msg).HAS_PAYLOAD:
            self.data.append(payload or 0)
        if isinstance(msg, m.MemcpyDtoH):
            self.data += {"none": b"\x00", "right": b"\xff\xff", "wrong": b"\xff\x00"}[into]
        return self

    def deliver(self, to: str, count: int = 7, whole: bool = True) -> Script:
        self.op(f"deliver_to_{to}")
        self.data += bytes([count, 1 if whole else 0])
        return self

    def events(self, side: str, count: int = 7) -> Script:
        self.op(f"{side}_events")
        self.data.append(count)
        return self

    def answer(
        self, *choices: int, message: Message | None = None, index: int | None = None
    ) -> Script:
        """``index``: which unanswered request (only when two or more wait); then ``how`` etc."""
        self.op("server_answer")
        if index is not None:
            self.data.append(index)
        self.data += bytes(choices)
        if message is not None:
            self.data += choices_for(message)
        return self

    def raw(self, *values: int) -> Script:
        self.data += bytes(values)
        return self

    def round_trip(
        self, msg: Request, *how: int, reply: Message | None = None, into: str = "right"
    ) -> Script:
        """Send, deliver, take the server's event, answer, deliver back, take the client's."""
        self.send(msg, into=into).deliver("server").events("server")
        return self.answer(*how, message=reply).deliver("client").events("client")

    def bytes(self) -> bytes:
        return bytes(self.data)


READY = 32  # configuration bit: the harness exchanges a HELLO first
AUTHED = 3 | 4  # configuration byte 1: ... an AUTHENTICATE before that (the largest buffer)
ATTACHED = READY | 64  # ... an ATTACH instead
CONTROL = READY | 128  # ... a RESERVE instead: a control connection
KEEP = 4  # the server's sink keeps payloads


def connection_seeds() -> dict[str, bytes]:
    hello = m.Hello(1, 1.0, 0, "seed")
    # Garbage ops take at most 47 bytes: one frame each.
    garbage_replies = encode_reply(Opcode.MEM_ALLOC, 2, m.MemAllocReply(P0))
    garbage_requests = frames(m.MemAlloc(0, 16))
    # A lie: the empty SYNCHRONIZE reply (no fields, so no choices follow) to a MEM_ALLOC.
    reply_classes = [rule.reply for rule in RULES.values() if rule.reply is not None]
    wrong_opcode = (sorted(RULES).index(Opcode.SYNCHRONIZE), reply_classes.index(m.Done))
    return {
        "handshake-by-ops": Script(0)
        .send(hello).deliver("server").events("server").answer(0, 1)
        .deliver("client").events("client").bytes(),
        "hello-refused": Script(0)
        .send(hello).deliver("server").events("server").answer(7, 1)
        .deliver("client").events("client").bytes(),
        "alloc-reply": Script(READY).round_trip(m.MemAlloc(0, 4096), 0, reply=m.MemAllocReply(P0)).bytes(),
        "copy-out-reply": Script(READY).round_trip(m.MemcpyDtoH(0, P0, 16), 0).bytes(),
        "copy-out-no-buffer": Script(READY).round_trip(m.MemcpyDtoH(0, P0, 0), 0, into="none").bytes(),
        "copy-in-kept": Script(READY | KEEP)
        .send(m.MemcpyHtoD(0, P0), payload=3).send(m.Synchronize(0)).deliver("server")
        .events("server").answer(0, message=m.Done()).deliver("client").events("client").bytes(),
        "deferred-error": Script(READY)
        .send(m.MemFree(0, 1)).send(m.Synchronize(0)).deliver("server").events("server")
        .answer(5, 1, 0, 3, 2).deliver("client").events("client").bytes(),
        "error-then-close": Script(READY)
        .round_trip(m.StreamCreate(0), 6, 0, 1, 4).op("client_end").raw(0).bytes(),
        "refuse-request": Script(READY).round_trip(m.TenantStats(0), 7, 1).bytes(),
        "two-pipelined": Script(READY)
        .send(m.MemGetInfo(0)).send(m.EventCreate(0)).deliver("server", 3).deliver("server")
        .events("server").answer(0, message=m.HandleReply(3), index=1)
        .answer(0, message=m.MemGetInfoReply(1, 2)).deliver("client", 1, whole=False)
        .deliver("client").events("client").bytes(),
        "keepalive-between": Script(READY)
        .send(m.Synchronize(0)).deliver("server").events("server").op("server_keepalive")
        .answer(0, message=m.Done()).deliver("client").events("client").bytes(),
        "abandon": Script(READY).send(m.MemAlloc(0, 1)).op("client_end").raw(1, 0).bytes(),
        "lost-mid-frame": Script(READY)
        .send(m.MemAlloc(0, 1)).deliver("server").events("server").answer(0, message=m.MemAllocReply(P0))
        .deliver("client", 3).op("client_end").raw(2).bytes(),
        "lie-wrong-opcode": Script(READY)
        .send(m.MemAlloc(0, 1)).op("server_lie").raw(0, *wrong_opcode, 0).deliver("client")
        .events("client").bytes(),
        "lie-keepalive-id": Script(READY)
        .send(m.MemAlloc(0, 1)).op("server_lie").raw(1).deliver("client").events("client").bytes(),
        "lie-connection-error": Script(READY)
        .send(m.MemFree(0, P0)).deliver("server").events("server").op("server_lie").raw(3)
        .deliver("client").events("client").bytes(),
        "garbage-frames-to-client": Script(READY)
        .send(m.MemAlloc(0, 1)).op("garbage").raw(len(garbage_replies)).raw(*garbage_replies).raw(1)
        .events("client").bytes(),
        "garbage-frames-to-server": Script(READY)
        .op("garbage").raw(len(garbage_requests)).raw(*garbage_requests).raw(0).events("server").bytes(),
        "queries": Script(READY)
        .round_trip(m.StreamQuery(0, 0), 0, reply=m.QueryReply(1))
        .round_trip(m.EventQuery(0, 3), 0, reply=m.QueryReply(0))
        .send(m.StreamWaitEvent(0, 1, 3)).send(m.StreamQuery(0, 1)).deliver("server").events("server")
        .answer(5, 1, 0, 3, 2).deliver("client").events("client").bytes(),
        "attributes-and-global": Script(READY)
        .round_trip(m.DeviceAttributes(0), 0, reply=m.DeviceAttributesReply.from_dict({75: 8, 76: 0}))
        .round_trip(m.ModuleGetGlobal(0, 1, "table"), 0, reply=m.ModuleGetGlobalReply(P0, 64))
        .round_trip(m.ModuleGetGlobal(0, 0, "nope"), 5, 0, 2, 0).bytes(),
        "drain-at-end": Script(READY | 8).send(m.MemAlloc(0, 1)).send(m.StreamCreate(0)).bytes(),
        "small-server-limits": Script(READY | 1)
        .send(m.MemcpyHtoD(0, P0), payload=5).deliver("server").events("server").bytes(),
        # The control plane (PROTOCOL.md 5.1, 5.5, 5.6).
        "attach-by-ops": Script(0)
        .send(m.Attach(3, b"secret", SERVER_ID[:20], "seed")).deliver("server").events("server")
        .answer(0, 1).deliver("client").events("client").bytes(),
        "attach-refused": Script(0)
        .send(m.Attach(3, b"wrong", SERVER_ID[:20])).deliver("server").events("server").answer(7, 0)
        .deliver("client").events("client").bytes(),
        "info-first": Script(0)
        .round_trip(m.ServerInfo(m.INFO_BRIEF), 0, reply=m.ServerInfoReply('{"server":{}}'))
        .send(m.Hello(1, 1.0, 0)).send(m.Reserve(1, 0.5, 0)).deliver("server").events("server").bytes(),
        "reserve-refused-then-again": Script(0)
        .send(m.Reserve(2, 1.0, 0)).deliver("server").events("server").answer(5, 0, 2, 0)
        .deliver("client").events("client")
        .round_trip(m.Reserve(1, 0.5, 0), 0, reply=m.ReserveReply(3, 60.0, b"secret", "id", b""))
        .bytes(),
        "control-release-pipelined": Script(CONTROL)
        .send(m.Release(3, b"secret")).send(m.ServerInfo(m.INFO_FULL)).send(m.MemAlloc(0, 1))
        .deliver("server").events("server").answer(6, 0, 8, 0, index=0)
        .answer(0, message=m.ServerInfoReply("{}")).deliver("client").events("client").bytes(),
        "attached-info-and-device": Script(ATTACHED)
        .send(m.ServerInfo(m.INFO_BRIEF)).send(m.MemAlloc(0, 64)).send(m.Release(3, b"s"))
        .deliver("server").events("server").answer(0, message=m.MemAllocReply(P0), index=1)
        .answer(0, message=m.ServerInfoReply("{}")).deliver("client").events("client").bytes(),
        "lease-ended": Script(ATTACHED)
        .send(m.Synchronize(0)).deliver("server").events("server").op("server_refuse").raw(0, 3)
        .deliver("client").events("client").bytes(),
        # AUTHENTICATE (PROTOCOL.md 5.1, 5.7). Byte 1 bit 2: the harness exchanges one first.
        "auth-then-hello": Script(0)
        .round_trip(m.Authenticate(SEED_TOKEN), 0, reply=m.AuthenticateReply("alice"))
        .send(hello).deliver("server").events("server").answer(0, 1)
        .deliver("client").events("client").send(m.MemAlloc(0, 64)).bytes(),
        "auth-then-reserve-pipelined": Script(0)
        .send(m.Authenticate(SEED_TOKEN)).send(m.Reserve(1, 0.5, 0)).send(m.ServerInfo(m.INFO_BRIEF))
        .deliver("server").events("server").answer(0, message=m.AuthenticateReply(""), index=0)
        .answer(0, message=m.ReserveReply(3, 60.0, b"secret", "id", b""), index=0)
        .deliver("client").events("client").bytes(),
        "auth-refused-hello-behind": Script(0)
        .send(m.Authenticate(SEED_TOKEN)).send(hello).deliver("server").events("server")
        .answer(7, 4, index=0).deliver("client").events("client").bytes(),
        "auth-twice": Script(0)
        .send(m.Authenticate(SEED_TOKEN)).send(m.Authenticate(SEED_TOKEN)).send(m.ServerInfo())
        .deliver("server").events("server").bytes(),
        "no-token-refused": Script(0)
        .send(m.Reserve(1, 0.5, 0)).deliver("server").events("server").answer(7, 4)
        .deliver("client").events("client").bytes(),
        "authenticated-then-device": Script(0, AUTHED)
        .send(m.Synchronize(0)).send(m.ServerInfo()).deliver("server").events("server").bytes(),
        "authenticated-ready-token-revoked": Script(READY, AUTHED)
        .send(m.Synchronize(0)).send(m.Authenticate(SEED_TOKEN)).deliver("server").events("server")
        .op("server_refuse").raw(0, 4).deliver("client").events("client").bytes(),
        "authenticated-control-quota": Script(CONTROL, AUTHED)
        .send(m.Reserve(2, 1.0, 0)).deliver("server").events("server").answer(5, 0, 10, 0)
        .deliver("client").events("client").bytes(),
    }  # fmt: skip


# -- fuzz_server ---------------------------------------------------------------------------------
def server_seeds() -> dict[str, bytes]:
    # Configuration byte 0: 1 the harness's HELLO, 2 linger, 4 abort, 8 probe, 16 stall check,
    # 32 instant devices.
    def seed(bits: int, stream: bytes, hello: int = 0, chunk: int = 0, limit: int = 0) -> bytes:
        return bytes([bits, hello, chunk, limit]) + stream

    AUTH = fuzz_server.WITH_AUTHENTICATE  # noqa: N806 - a bit of byte 1, like the others

    n = 16
    fill_args = struct.pack("<ifQ", n, 2.5, P0)
    saxpy_args = struct.pack("<ifQQ", n, 2.0, P0, P1)
    gemm_args = struct.pack("<iiifQQfQ", 2, 2, 2, 1.0, P0, P0 + 16, 0.0, P1)
    return {
        "alloc-info-sync": seed(3, frames(m.MemAlloc(0, 4096), m.MemGetInfo(0), m.Synchronize(0), m.TenantStats(0))),
        "copy-in-out-free": seed(3, frames(m.MemAlloc(0, 4096), (m.MemcpyHtoD(0, P0), floats(*range(16))), m.MemcpyDtoH(0, P0, 64), m.MemFree(0, P0), m.Synchronize(0))),
        "memset-fill": seed(3, frames(m.MemAlloc(0, 4096), m.Memset(0, 4, 7, P0, 16), m.GetFunction(0, 0, "fill", "ifP"), m.Launch(0, 1, (1, 1, 1), (32, 1, 1), 0, 0, fill_args), m.MemcpyDtoH(0, P0, 64))),
        "saxpy": seed(3, frames(m.MemAlloc(0, 4096), m.MemAlloc(0, 4096), m.GetFunction(0, 0, "saxpy"), m.Launch(0, 1, (1, 1, 1), (64, 1, 1), 0, 0, saxpy_args), m.Synchronize(0))),
        "gemm-dtod": seed(3, frames(m.MemAlloc(0, 4096), m.MemAlloc(0, 4096), m.GetFunction(0, 0, "gemm"), m.Launch(0, 1, (1, 1, 1), (4, 1, 1), 0, 0, gemm_args), m.MemcpyDtoD(0, P0, P1, 16), m.Synchronize(0))),
        "streams-events": seed(3, frames(m.StreamCreate(0), m.EventCreate(0), m.EventCreate(0), m.EventRecord(0, 2, 1), m.EventRecord(0, 3, 1), m.StreamSynchronize(0, 1), m.EventSynchronize(0, 3), m.EventElapsed(0, 2, 3), m.StreamDestroy(0, 1), m.EventDestroy(0, 2))),
        "sticky-error": seed(3, frames(m.MemFree(0, P0), m.Memset(0, 1, 0, P0, 8), m.Synchronize(0), m.MemGetInfo(0))),
        "modules": seed(3, frames((m.ModuleLoad(0), b"// PTX\n"), m.ModuleUnload(0, 1), m.GetFunction(0, 5, "k"), m.GetFunction(0, 0, "nope"), m.Synchronize(0))),
        "two-gpus": seed(3, frames(m.MemAlloc(1, 256), m.MemcpyDtoH(1, FIRST_POINTER + 2**40, 8), m.Synchronize(1)), hello=1),
        "by-memory-oom": seed(3, frames(m.MemAlloc(0, 2**21), m.MemAlloc(0, 2**19), m.MemGetInfo(0)), hello=2),
        "cap-busy-probe": seed(11, frames(m.GetFunction(0, 0, "busy"), m.Launch(0, 1, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<q", 300)), m.Synchronize(0)), hello=3),
        "own-hello": seed(2, frames(m.Hello(2, 0.5, 0, "own"), m.MemAlloc(0, 64), first_id=1)),
        "no-hello": seed(2, frames(m.MemAlloc(0, 64))),
        "hello-twice": seed(3, frames(m.Hello(1, 1.0, 0), m.Synchronize(0))),
        "foreign-device-no-reply": seed(3, frames(m.MemFree(5, P0), m.Synchronize(0))),
        "foreign-device-reply": seed(3, frames(m.MemAlloc(5, 64), m.Synchronize(0))),
        "copy-too-big": seed(3, frames(m.MemAlloc(0, 8192), m.MemcpyDtoH(0, P0, 8192)), limit=1),
        "payload-over-limit": seed(3, frames((m.MemcpyHtoD(0, P0), bytes(300))), limit=1),
        "flow-control": seed(3, frames(m.MemAlloc(0, 8192), m.MemcpyDtoH(0, P0, 256), m.MemcpyDtoH(0, P0, 256), m.MemcpyDtoH(0, P0, 256)), limit=1),
        "garbage-after-hello": seed(3, b"BFNT\x09" + bytes(19)),
        "stalled-mid-payload": seed(19, frames((m.MemcpyHtoD(0, P0), bytes(64)))[:-10]),
        "bytewise": seed(3, frames(m.MemAlloc(0, 256), (m.MemcpyHtoD(0, P0), b"12345678"), m.MemcpyDtoH(0, P0, 8)), chunk=1),
        "aborted": seed(7, frames(m.MemAlloc(0, 256), m.Synchronize(0))),
        "refused-hello": seed(3, frames(m.Synchronize(0)), hello=5),
        # Instant devices (bit 5): completions are always ahead of the loop.
        "instant-sticky-error": seed(35, frames(m.MemFree(0, P0), m.Memset(0, 1, 0, P0, 8), m.Synchronize(0), m.MemGetInfo(0))),
        "instant-copies": seed(35, frames(m.MemAlloc(0, 4096), (m.MemcpyHtoD(0, P0), b"12345678"), m.MemcpyDtoH(0, P0, 8), m.MemFree(0, P0))),
        "instant-flow-control": seed(35, frames(m.MemAlloc(0, 8192), m.MemcpyDtoH(0, P0, 256), m.MemcpyDtoH(0, P0, 256), m.MemcpyDtoH(0, P0, 256)), limit=1),
        "many-frames": seed(3, frames(*[m.Synchronize(0)] * 70)),
        # Device attributes, stream and event queries and waits, module globals, 16-bit memsets.
        "attributes-queries-waits": seed(3, frames(m.DeviceAttributes(0), m.StreamCreate(0), m.EventCreate(0), m.StreamQuery(0, 1), m.EventRecord(0, 2, 1), m.StreamWaitEvent(0, 0, 2), m.EventQuery(0, 2), m.StreamQuery(0, 0), m.DeviceAttributes(1), m.Synchronize(0)), hello=1),
        "instant-queries": seed(35, frames(m.StreamCreate(0), m.EventCreate(0), m.StreamQuery(0, 1), m.EventQuery(0, 2), m.DeviceAttributes(0), m.StreamWaitEvent(0, 1, 2), m.StreamQuery(0, 1), m.Synchronize(0))),
        "memset-d16": seed(3, frames(m.MemAlloc(0, 4096), m.Memset(0, 2, 0xABCD, P0, 16), m.MemcpyDtoH(0, P0, 32), m.Memset(0, 2, 1, P0 + 1, 1), m.Memset(0, 3, 1, P0, 1), m.Synchronize(0))),
        "bad-handles-and-globals": seed(3, frames(m.ModuleGetGlobal(0, 0, "table"), m.ModuleGetGlobal(0, 5, "table"), m.StreamQuery(0, 9), m.EventQuery(0, 9), m.StreamWaitEvent(0, 9, 9), m.StreamWaitEvent(0, 0, 9), m.Synchronize(0), m.MemGetInfo(0))),
        # The control plane (PROTOCOL.md 5.5, 5.6). Bit 6: reservation 1 waits (its secret is
        # fuzz_server.WAITING_SECRET); bit 7: sweep as if long after; greeting 8: an ATTACH to it.
        "control-connection": seed(2, frames(m.Reserve(1, 0.5, 0, client_name="seed"), m.ServerInfo(m.INFO_FULL), m.Reserve(2, 1.0, 0), m.Release(1, b"wrong"), m.ServerInfo(m.INFO_BRIEF), first_id=1)),
        "control-then-device": seed(2, frames(m.ServerInfo(m.INFO_BRIEF), m.MemAlloc(0, 64), first_id=1)),
        "control-then-hello": seed(2, frames(m.Reserve(1, 0.25, 0), m.Hello(1, 0.25, 0), first_id=1)),
        "hello-then-reserve": seed(3, frames(m.ServerInfo(m.INFO_FULL), m.Reserve(1, 0.5, 0))),
        "attach-waiting": seed(67, frames(m.MemAlloc(0, 4096), m.ServerInfo(m.INFO_FULL), (m.MemcpyHtoD(0, P0), b"12345678"), m.MemcpyDtoH(0, P0, 8), m.Synchronize(0)), hello=8),
        "attach-nothing": seed(3, frames(m.Synchronize(0)), hello=8),
        "attach-other-server": seed(66, frames(m.Attach(1, fuzz_server.WAITING_SECRET, "another-server"), first_id=1)),
        "attach-swept": seed(195, frames(m.MemAlloc(0, 64), m.Synchronize(0)), hello=8),
        "release-waiting-twice": seed(66, frames(m.Release(1, fuzz_server.WAITING_SECRET), m.Release(1, fuzz_server.WAITING_SECRET), m.ServerInfo(m.INFO_FULL), first_id=1)),
        "reserve-idle-swept": seed(130, frames(m.Reserve(1, 0.25, 0, 0.0, m.MODE_SHARE, m.HOLD_BY_IDLE_TIMEOUT, 5.0), m.ServerInfo(m.INFO_FULL), first_id=1)),
        "reserve-only-gpus": seed(2, frames(m.Reserve(1, 0.5, 0, only_gpus=m.Reserve.gpu_list([1])), m.Reserve(2, 0.5, 0, only_gpus=m.Reserve.gpu_list([1, 9])), m.Reserve(1, 0.5, 0, only_gpus=b"\x01"), m.ServerInfo(m.INFO_FULL), first_id=1)),
        "reserve-bad-values": seed(2, frames(m.Reserve(1, 0.5, 0, 0.0, 7), m.Reserve(1, 0.5, 0, idle_timeout=-1.0), m.Reserve(0, 0.5, 0), m.Reserve(1, 0.0, 0), first_id=1)),
        # AUTHENTICATE (PROTOCOL.md 5.7) on a server without tokens: anonymous. Byte 1 bit 7: the
        # harness writes one first (id fuzz_server.AUTH_ID), before its greeting.
        "auth-then-hello": seed(3, frames(m.MemAlloc(0, 64), m.ServerInfo(m.INFO_BRIEF), m.Synchronize(0)), hello=AUTH),
        "auth-then-attach": seed(67, frames(m.MemAlloc(0, 64), m.Synchronize(0)), hello=AUTH | 8),
        "auth-then-control": seed(2, frames(m.Reserve(1, 0.5, 0), m.ServerInfo(m.INFO_FULL), m.Release(1, b"wrong"), first_id=1), hello=AUTH),
        "auth-own-pipelined": seed(2, frames(m.Authenticate(TOKEN), m.Hello(1, 0.5, 0, "own"), m.MemAlloc(0, 64), m.Synchronize(0), first_id=1)),
        "auth-twice": seed(2, frames(m.Authenticate(TOKEN), first_id=1), hello=AUTH),
        "auth-after-hello": seed(3, frames(m.Authenticate(TOKEN), m.Synchronize(0))),
        "auth-after-control": seed(2, frames(m.ServerInfo(m.INFO_BRIEF), m.Authenticate(TOKEN), first_id=1)),
        "auth-then-device": seed(2, frames(m.MemAlloc(0, 64), first_id=1), hello=AUTH),
        "auth-alone-stalled": seed(18, b"", hello=AUTH),
    }  # fmt: skip


# -- regressions ---------------------------------------------------------------------------------
def connection_regressions() -> dict[str, tuple[bytes, str]]:
    """Hand-built reproductions of bugs the fuzzer found, each with what its failure says."""
    return {
        "negative-payload-length": (
            Script(READY).send(m.MemcpyHtoD(0, P0), odd_length=0).bytes(),
            "argument out of range",  # struct.error out of send_request, not ProtocolError
        ),
        "payload-length-2-64": (
            Script(READY).send(m.MemcpyHtoD(0, P0), odd_length=1).bytes(),
            "argument out of range",
        ),
        "hello-after-ready": (
            Script(READY).send(m.Hello(1, 1.0, 0)).bytes(),
            "Hello was sent in state READY",
        ),
        "get-buffer-after-garbage": (
            # Garbage into the client through get_buffer/buffer_updated, twice: the second
            # get_buffer() raises the first's ProtocolError.
            Script(READY)
            .op("garbage")
            .raw(4, *b"XXXX", 1, 0)
            .op("garbage")
            .raw(4, *b"XXXX", 1, 0)
            .bytes(),
            "get_buffer() raised",
        ),  # fmt: skip
        "copy-of-nothing-into-a-buffer": (
            # A copy of 0 bytes into a 1-byte buffer, answered honestly (no payload): the
            # client reports success with the buffer unfilled instead of refusing the request.
            Script(READY).round_trip(m.MemcpyDtoH(0, P0, 0), 0, into="wrong").bytes(),
            "did not fill its buffer",
        ),
        "copy-reply-without-payload": (
            Script(READY)
            .send(m.MemcpyDtoH(0, P0, 16))
            .op("server_lie")
            .raw(4, 0)
            .deliver("client")
            .events("client")
            .bytes(),
            "did not fill its buffer",
        ),  # fmt: skip
        "hello-pipelined-behind-authenticate": (
            # PROTOCOL.md 5.1: the opening request may follow AUTHENTICATE at once. The client,
            # GREETING then, takes the AuthenticateReply for the greeting's reply and asserts.
            Script(0)
            .send(m.Authenticate(SEED_TOKEN))
            .send(m.Hello(1, 1.0, 0, "seed"))
            .deliver("server")
            .events("server")
            .answer(0, message=m.AuthenticateReply("alice"), index=0)
            .deliver("client")
            .events("client")
            .bytes(),
            "ClientConnection.next_event() raised AssertionError()",
        ),  # fmt: skip
    }


def server_regressions() -> dict[str, tuple[bytes, str]]:
    # In one 4096-byte piece: two copies out that fill the staging budget (max_payload 256), so
    # the session stops reading, then garbage that breaks the decoder, then more bytes queued.
    # When the copies are answered the session resumes reading before it has seen the error.
    data = frames(m.MemcpyDtoH(0, P0, 256), m.MemcpyDtoH(0, P0, 256)) + b"XXXX" + bytes(5000)
    return {
        "query-overtakes-reply": (
            # Instant devices (bit 5): STREAM_CREATE's reply is posted to the loop, then the
            # SYNCHRONIZE behind it finds the device idle and is answered first, inline.
            bytes([35, 0, 0, 0]) + frames(m.StreamCreate(0), m.Synchronize(0)),
            "the answer to #2 came after the answer to #3",
        ),
        "resume-into-broken-decoder": (
            bytes([3, 0, 5, 1]) + data,
            "raised inside the event loop",  # ProtocolError out of ServerSession.get_buffer
        ),
    }


REGRESSIONS: dict[str, Callable[[], dict[str, tuple[bytes, str]]]] = {
    "connections": connection_regressions,
    "server": server_regressions,
}

TARGETS: dict[str, tuple[Callable[[], dict[str, bytes]], Callable[[bytes], None]]] = {
    "decoder": (decoder_seeds, fuzz_decoder.test_one_input),
    "connections": (connection_seeds, fuzz_connections.test_one_input),
    "server": (server_seeds, fuzz_server.test_one_input),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clean", action="store_true", help="delete files that are not seeds")
    parser.add_argument(
        "--regressions", action="store_true", help="also write fuzz/regressions/ (inputs that fail)"
    )
    args = parser.parse_args()
    if args.regressions:
        write_regressions()
    for target, (make, test_one_input) in TARGETS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        seeds = make()
        for name, data in seeds.items():
            test_one_input(data)  # a seed that fails is a bug here or there: stop
            (folder / name).write_bytes(data)
        if args.clean:
            for path in folder.iterdir():
                if path.name not in seeds:
                    path.unlink()
        print(f"{target}: {len(seeds)} seeds in {folder.relative_to(HERE.parent)}")


def write_regressions() -> None:
    for target, make in REGRESSIONS.items():
        folder = HERE / "regressions" / target
        folder.mkdir(parents=True, exist_ok=True)
        test_one_input = TARGETS[target][1]
        for name, (data, failure) in make().items():
            try:
                test_one_input(data)
            except Exception as exc:  # noqa: BLE001 - any failure; its text says which
                if failure not in str(exc):
                    raise SystemExit(
                        f"{target}/{name} fails otherwise than expected: {exc!r}"
                    ) from exc
            else:
                print(f"{target}/{name} passes now: its bug is fixed (keep it as a regression)")
            (folder / name).write_bytes(data)
        print(f"{target}: regressions in {folder.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
