"""The one table of what each opcode is: its request, its reply (or none), where it may be answered.

Everything that asks "does this request get a reply?", "which class is the reply?" or "may the
server answer it without the device worker?" reads ``RULES``: the client and server connections,
the decoder, the server's dispatch and the test that holds docs/PROTOCOL.md's opcode table to it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import messages as m
from .messages import Opcode


class Phase(enum.Enum):
    """Where in a connection a request may be sent (docs/PROTOCOL.md, section 5)."""

    AUTH = "auth"  # before anything else, once, where the server uses tokens: AUTHENTICATE
    GREETING = "greeting"  # the first frame of a device session: HELLO or ATTACH
    CONTROL = "control"  # on a control connection, which holds no GPUs: RESERVE, RELEASE
    ANY = "any"  # on any connection, first or later: SERVER_INFO
    DEVICE = "device"  # on a device session, after its greeting was accepted


@dataclass(frozen=True, slots=True)
class OpcodeRule:
    """What one request opcode is on the wire and in the server."""

    opcode: Opcode
    request: type[m.Request]
    # The reply's metadata class; None for a no-reply request: success is silent, and a failure is
    # sticky, reported by the next request that has a reply (docs/PROTOCOL.md, section 9.3).
    reply: type[m.Reply] | None
    # The request only reads the lease's state or waits for its work: when nothing of the lease is
    # queued or running, the server may answer it on the event loop instead of the device worker.
    query: bool = False
    phase: Phase = Phase.DEVICE

    @property
    def no_reply(self) -> bool:
        return self.reply is None


def _rule(
    request: type[m.Request],
    reply: type[m.Reply] | None,
    query: bool = False,
    phase: Phase = Phase.DEVICE,
) -> OpcodeRule:
    return OpcodeRule(request.OPCODE, request, reply, query, phase)


RULES: dict[int, OpcodeRule] = {
    rule.opcode: rule
    for rule in (
        _rule(m.Hello, m.HelloReply, phase=Phase.GREETING),
        _rule(m.Reserve, m.ReserveReply, phase=Phase.CONTROL),
        _rule(m.Attach, m.HelloReply, phase=Phase.GREETING),
        _rule(m.Release, m.Done, phase=Phase.CONTROL),
        _rule(m.ServerInfo, m.ServerInfoReply, phase=Phase.ANY),
        _rule(m.Authenticate, m.AuthenticateReply, phase=Phase.AUTH),
        _rule(m.MemAlloc, m.MemAllocReply),
        _rule(m.MemFree, None),
        _rule(m.MemGetInfo, m.MemGetInfoReply, query=True),
        _rule(m.MemcpyHtoD, None),
        _rule(m.MemcpyDtoH, m.MemcpyDtoHReply),
        _rule(m.MemcpyDtoD, None),
        _rule(m.Memset, None),
        _rule(m.Synchronize, m.Done, query=True),
        _rule(m.TenantStats, m.TenantStatsReply, query=True),
        _rule(m.DeviceAttributes, m.DeviceAttributesReply, query=True),
        _rule(m.ModuleLoad, m.ModuleLoadReply),
        _rule(m.ModuleUnload, None),
        _rule(m.GetFunction, m.GetFunctionReply),
        _rule(m.Launch, None),
        _rule(m.ModuleGetGlobal, m.ModuleGetGlobalReply),
        _rule(m.StreamCreate, m.HandleReply),
        _rule(m.StreamDestroy, None),
        _rule(m.StreamSynchronize, m.Done, query=True),
        _rule(m.StreamQuery, m.QueryReply, query=True),
        _rule(m.StreamWaitEvent, None),
        _rule(m.EventCreate, m.HandleReply),
        _rule(m.EventDestroy, None),
        _rule(m.EventRecord, None),
        _rule(m.EventSynchronize, m.Done, query=True),
        _rule(m.EventElapsed, m.EventElapsedReply),
        _rule(m.EventQuery, m.QueryReply, query=True),
    )
}

for _rule_entry in RULES.values():
    _rule_entry.request.RULE = _rule_entry
del _rule_entry

# The decoder's tables: the metadata class of each opcode a server receives, and a client receives.
REQUESTS: dict[int, type[m.Request]] = {opcode: rule.request for opcode, rule in RULES.items()}
REPLIES: dict[int, type[m.Reply]] = {
    Opcode.ERROR: m.ErrorReply,
    Opcode.KEEPALIVE: m.Keepalive,
    **{opcode: rule.reply for opcode, rule in RULES.items() if rule.reply is not None},
}
