"""What the server counts for its operators: requests and their latency, errors, refused
greetings, connections and bytes (exported by the management endpoint, docs/OBSERVABILITY.md).

Plain numbers, written on the event loop only, so counting costs a list index per request.
"""

from __future__ import annotations

from collections import Counter

from executors.histogram import Histogram

from ..protocol import ErrorCode

OPCODES = 256  # opcodes are one byte

# Why a greeting (HELLO, ATTACH, AUTHENTICATE) was refused, by the error it was refused with.
_REFUSAL_REASONS = {
    ErrorCode.CAPACITY: "no_room",
    ErrorCode.QUOTA: "quota",
    ErrorCode.AUTH: "auth",
    ErrorCode.PROTOCOL: "protocol",
}


def refusal_reason(code: ErrorCode) -> str:
    return _REFUSAL_REASONS.get(code, code.name.lower())


class ServerStats:
    """Counters of one server since it started."""

    def __init__(self) -> None:
        self.requests = [0] * OPCODES  # handled, by opcode
        self.latency: list[Histogram | None] = [None] * OPCODES  # handled to replied, by opcode
        self.errors: Counter[ErrorCode] = Counter()  # error frames sent, by code
        self.refused: Counter[str] = Counter()  # greetings refused, by ``refusal_reason``
        self.accepted = 0  # connections accepted
        # Bytes of connections that have closed (open ones count their own).
        self.closed_received_bytes = 0
        self.closed_sent_bytes = 0

    def replied(self, opcode: int, seconds: float) -> None:
        histogram = self.latency[opcode]
        if histogram is None:
            histogram = self.latency[opcode] = Histogram()
        histogram.observe(seconds)
