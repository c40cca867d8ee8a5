#!/usr/bin/env python3
"""Fuzz target: ``FrameDecoder`` fed arbitrary bytes, cut at fuzzer-chosen points.

Run it for real (an hour, say, from the repository root; new inputs go into the corpus):

    python fuzz/fuzz_decoder.py -max_total_time=3600 -timeout=10 fuzz/corpus/decoder

and in CI for seconds (``tests/fuzz/test_fuzz_smoke.py`` does this on a copy of the corpus):

    python fuzz/fuzz_decoder.py -max_total_time=8 -timeout=10 COPY_OF_CORPUS

Replay one input without fuzzing: ``python fuzz/fuzz_decoder.py FILE`` (libFuzzer runs a file
argument once).

The input: a 5-byte configuration, then a chunk plan, then the stream.

- byte 0: bit 0 the direction (set: a client's decoder, which receives replies); bits 1-2 the
  payload sink (0 the decoder's own, 1 exact buffers, 2 drop payloads, 3 refuse payloads with
  ``ProtocolError`` as the client does for one it did not ask for); bit 3 feed through
  ``get_buffer``/``buffer_updated`` instead of ``receive_data``; bit 4 drain frames after every
  chunk instead of at the end.
- byte 1: ``max_metadata``, byte 2: ``max_payload`` (indexes into small tables below).
- byte 3: the receive buffer's resting size, ``HEADER_SIZE`` plus this many bytes.
- byte 4: the chunk plan's length n (mod 16), then n bytes: chunk sizes (each + 1), cycled.

What must hold (docs/PROTOCOL.md section 3): the only exception is ``ProtocolError``; once
raised, the decoder raises that same error from every later call; each frame is the bytes it came
from (header fields, metadata that re-encodes to the same bytes, the payload) and within the
limits; a payload sink is only asked for lengths within ``max_payload``; the frames and whether
the stream fails do not depend on how the bytes were cut; and without an error, ``in_frame``
says whether bytes of an unfinished frame are held.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Fuzzing: the project's modules are instrumented for coverage as they are imported here; the
    # imports below then find them loaded. Replaying (tests) imports them plainly.
    import atheris

    with atheris.instrument_imports(include=["bitfusion_net"]):
        import bitfusion_net.protocol  # noqa: F401

from dataclasses import dataclass, field  # noqa: E402

from fuzz_support import Choices, InvariantBroken, check  # noqa: E402

from bitfusion_net.protocol import (  # noqa: E402
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    REPLIES,
    REQUESTS,
    Frame,
    FrameDecoder,
    Limits,
    Message,
    PayloadSink,
    ProtocolError,
)
from bitfusion_net.protocol.frames import FLAG_REPLY, HEADER  # noqa: E402

# Small limits make the "too long" checks reachable with short inputs; 65536 is the real value.
METADATA_LIMITS = (1, 8, 18, 27, 64, 256, 4096, 65536)
PAYLOAD_LIMITS = (1, 2, 16, 255, 256, 1024, 4096, 65536)
SINKS = ("default", "buffers", "drop", "refuse")


@dataclass
class Config:
    receives_replies: bool
    sink: str
    buffered: bool  # feed like asyncio.BufferedProtocol rather than with receive_data
    drain_each_chunk: bool
    limits: Limits
    buffer_size: int
    plan: list[int]  # chunk sizes, cycled

    @classmethod
    def read(cls, choices: Choices) -> Config:
        bits = choices.byte()
        limits = Limits(
            max_metadata=METADATA_LIMITS[choices.byte() % len(METADATA_LIMITS)],
            max_payload=PAYLOAD_LIMITS[choices.byte() % len(PAYLOAD_LIMITS)],
        )
        buffer_size = HEADER_SIZE + choices.byte()
        plan = [size + 1 for size in choices.take(choices.byte() % 16)]
        return cls(
            receives_replies=bool(bits & 1),
            sink=SINKS[(bits >> 1) & 3],
            buffered=bool(bits & 8),
            drain_each_chunk=bool(bits & 16),
            limits=limits,
            buffer_size=buffer_size,
            plan=plan,
        )


@dataclass
class SinkLog:
    """A payload sink of the configured kind that checks and records what it is asked for."""

    kind: str
    limits: Limits
    lengths: list[int] = field(default_factory=list)

    def __call__(
        self, opcode: int, request_id: int, message: Message, length: int
    ) -> memoryview | None:
        if not 0 < length <= self.limits.max_payload:
            raise InvariantBroken(f"payload sink asked for {length} bytes, limit {self.limits}")
        self.lengths.append(length)
        if self.kind == "refuse":
            raise ProtocolError(f"unexpected payload for request #{request_id}")
        if self.kind == "drop":
            return None
        return memoryview(bytearray(length))


@dataclass
class Outcome:
    """What a decoder made of a stream: its frames as bytes, and whether it failed."""

    frames: list[tuple[int, int, bytes, bytes | None]]  # opcode, request id, metadata, payload
    failed: bool


def _sink_for(config: Config) -> tuple[PayloadSink | None, SinkLog]:
    log = SinkLog(config.sink, config.limits)
    return (None if config.sink == "default" else log), log


def _new_decoder(config: Config) -> tuple[FrameDecoder, SinkLog]:
    sink, log = _sink_for(config)
    decoder = FrameDecoder(
        receives_replies=config.receives_replies,
        limits=config.limits,
        payload_sink=sink,
        buffer_size=config.buffer_size,
    )
    return decoder, log


def _chunks(stream: bytes, plan: list[int]) -> list[bytes]:
    if not plan:
        return [stream]
    out, offset, index = [], 0, 0
    while offset < len(stream):
        size = plan[index % len(plan)]
        out.append(stream[offset : offset + size])
        offset += size
        index += 1
    return out


def _feed(decoder: FrameDecoder, chunk: bytes, config: Config) -> None:
    """One chunk in, by ``receive_data`` or the way a BufferedProtocol transport writes."""
    if not config.buffered:
        decoder.receive_data(chunk)
        return
    view = memoryview(chunk)
    largest = max(
        config.buffer_size, HEADER_SIZE + config.limits.max_metadata, config.limits.max_payload
    )
    while view:
        target = decoder.get_buffer()
        if not 0 < len(target) <= largest:
            raise InvariantBroken(
                f"get_buffer() offered {len(target)} bytes (largest sane {largest})"
            )
        count = min(len(target), len(view))
        target[:count] = view[:count]
        view = view[count:]
        decoder.buffer_updated(count)


class FrameChecker:
    """Holds each decoded frame to the bytes of the stream it came from."""

    def __init__(self, stream: bytes, config: Config) -> None:
        self._stream = stream
        self._config = config
        self.consumed = 0  # the stream's bytes the checked frames account for
        self.frames: list[tuple[int, int, bytes, bytes | None]] = []

    def take(self, decoder: FrameDecoder, fed: int) -> None:
        while (frame := decoder.next_frame()) is not None:
            self._check(frame, fed)

    def _check(self, frame: Frame, fed: int) -> None:
        config, offset = self._config, self.consumed
        if offset + HEADER_SIZE > fed:
            raise InvariantBroken(f"a frame at offset {offset} before its header was received")
        magic, version, opcode, flags, request_id, meta_len, payload_len = HEADER.unpack_from(
            self._stream, offset
        )
        table = REPLIES if config.receives_replies else REQUESTS
        check(magic == MAGIC and version == PROTOCOL_VERSION, "a frame with a bad magic/version")
        check(
            flags == (FLAG_REPLY if config.receives_replies else 0), f"frame with flags {flags:#x}"
        )
        check(frame.opcode == opcode and frame.request_id == request_id, "frame != its header")
        check(frame.is_reply == config.receives_replies, "frame.is_reply is the wrong direction")
        check(
            type(frame.message) is table.get(opcode),
            f"opcode {opcode:#x} decoded as {type(frame.message).__name__}",
        )
        check(meta_len <= config.limits.max_metadata, f"metadata of {meta_len} bytes let through")
        check(
            payload_len <= config.limits.max_payload, f"payload of {payload_len} bytes let through"
        )
        check(
            not payload_len or type(frame.message).HAS_PAYLOAD, "a payload on an opcode without one"
        )
        meta = self._stream[offset + HEADER_SIZE : offset + HEADER_SIZE + meta_len]
        if frame.message.encode() != meta:
            raise InvariantBroken(
                f"{frame.message!r} re-encodes differently from its metadata {meta!r}"
            )
        start = offset + HEADER_SIZE + meta_len
        end = start + payload_len
        check(end <= fed, "a frame delivered before its payload was received")
        payload = None if frame.payload is None else bytes(frame.payload)
        if config.sink in ("default", "buffers") and payload_len:
            check(payload == self._stream[start:end], "the payload is not the stream's bytes")
        else:
            check(payload is None, "a payload where none was kept")
        self.consumed = end
        self.frames.append((opcode, request_id, meta, payload))


def decode(stream: bytes, config: Config, chunks: list[bytes]) -> Outcome:
    """Decode ``stream`` fed as ``chunks``, checking everything on the way."""
    decoder, _log = _new_decoder(config)
    checker = FrameChecker(stream, config)
    fed = 0
    error: ProtocolError | None = None
    for chunk in chunks:
        try:
            _feed(decoder, chunk, config)
        except ProtocolError as exc:
            error = exc
        # What a failed feed took in is unknown; frames are held to what was offered so far.
        fed += len(chunk)
        if error is not None:
            break
        if config.drain_each_chunk:
            checker.take(decoder, fed)
    checker.take(decoder, fed)
    if error is not None:
        _check_stays_broken(decoder, error)
    elif decoder.in_frame != (checker.consumed < fed):
        raise InvariantBroken(
            f"in_frame is {decoder.in_frame} with {fed - checker.consumed} unparsed bytes held"
        )
    return Outcome(checker.frames, error is not None)


def _check_stays_broken(decoder: FrameDecoder, error: ProtocolError) -> None:
    """After a ``ProtocolError`` every way in raises that error again, and nothing comes out."""
    attempts = (
        ("get_buffer()", decoder.get_buffer),
        ("buffer_updated(1)", lambda: decoder.buffer_updated(1)),
        ("receive_data()", lambda: decoder.receive_data(MAGIC)),
    )
    for name, attempt in attempts:
        try:
            attempt()
        except ProtocolError as again:
            check(again is error, f"{name} of a broken decoder raised another error: {again}")
        else:
            raise InvariantBroken(f"{name} of a broken decoder did not raise")
    check(decoder.next_frame() is None, "a broken decoder produced a frame after its error")


def test_one_input(data: bytes) -> None:
    choices = Choices(data)
    config = Config.read(choices)
    stream = choices.rest()
    outcome = decode(stream, config, _chunks(stream, config.plan))
    # How the bytes were cut must not matter: the stream in one piece decodes the same.
    if config.plan:
        whole = decode(stream, config, [stream])
        if (whole.frames, whole.failed) != (outcome.frames, outcome.failed):
            raise InvariantBroken(
                f"cut as {config.plan}: {len(outcome.frames)} frame(s), failed={outcome.failed}; "
                f"in one piece: {len(whole.frames)} frame(s), failed={whole.failed}"
            )


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
