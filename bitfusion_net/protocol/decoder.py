"""Incremental, I/O-free frame decoder that lets the receiver choose where a payload lands.

Small frames are parsed out of one internal receive buffer, many per read. The buffer rests at
``buffer_size`` and grows only for a frame whose metadata does not fit, back to its resting size
once that frame is parsed: an idle connection costs little. When a frame carries a
bulk payload, the decoder asks the *payload sink* for a destination buffer (a staging buffer, or
the very array a ``memcpy_dtoh`` fills) and from then on hands that buffer out in ``get_buffer()``,
so the transport reads straight into it: the payload is never copied or concatenated in Python.

Drive it like ``asyncio.BufferedProtocol``: write into ``get_buffer()``, report with
``buffer_updated(n)``, then drain ``next_frame()``. ``receive_data(bytes)`` does the same for tests.
Every length is checked against ``Limits`` before anything is allocated for it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ProtocolError
from .frames import (
    DEFAULT_LIMITS,
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAGIC,
    PROTOCOL_VERSION,
    Limits,
)
from .messages import Message, Opcode
from .rules import REPLIES, REQUESTS


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is the sink's buffer, or None when there was none."""

    opcode: int
    request_id: int
    is_reply: bool
    message: Message
    payload: memoryview | None = None


# Called with (opcode, request id, message, payload length); returns a writable buffer of exactly
# that length to receive the payload, or None to have the decoder read and drop it.
PayloadSink = Callable[[int, int, Message, int], "memoryview | None"]


def _default_sink(opcode: int, request_id: int, message: Message, length: int) -> memoryview:
    return memoryview(bytearray(length))


class FrameDecoder:
    """Turns a byte stream into ``Frame`` objects.

    ``receives_replies``: True on a client (every frame must carry the REPLY flag), False on a
    server (none may). After a ``ProtocolError`` the decoder is broken and raises it again.
    """

    def __init__(
        self,
        *,
        receives_replies: bool,
        limits: Limits = DEFAULT_LIMITS,
        payload_sink: PayloadSink | None = None,
        buffer_size: int = 256 * 1024,
    ) -> None:
        if buffer_size < HEADER_SIZE:
            raise ValueError(f"buffer_size must hold a header ({HEADER_SIZE} bytes)")
        self._receives_replies = receives_replies
        self._limits = limits
        self._sink = payload_sink or _default_sink
        self._resting_size = buffer_size
        self._needed = 0  # the bytes the frame being parsed needs in the buffer, when more
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._start = 0  # first unparsed byte in the buffer
        self._end = 0  # end of received bytes in the buffer
        self._frames: deque[Frame] = deque()
        # The frame whose payload is arriving: its parts, the destination, bytes still to come.
        self._pending: tuple[int, int, Message] | None = None
        self._destination: memoryview | None = None
        self._filled = 0
        self._remaining = 0
        self._error: ProtocolError | None = None

    # -- the BufferedProtocol side --------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next received bytes should be written (never empty)."""
        if self._error is not None:
            raise self._error
        if self._remaining and self._destination is not None and self._start == self._end:
            return self._destination[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buffer) > self._resting_size:
                self._resize(self._resting_size)
        elif self._needed > len(self._buffer) - self._start:
            self._resize(max(self._needed, self._resting_size))
        elif self._end == len(self._buffer):
            # Move the unparsed tail to the front; it is shorter than one header plus metadata.
            tail = self._end - self._start
            self._buffer[:tail] = self._view[self._start : self._end]
            self._start, self._end = 0, tail
        return self._view[self._end :]

    def _resize(self, size: int) -> None:
        """A buffer of ``size`` bytes holding the unparsed bytes at its start."""
        tail = self._end - self._start
        buffer = bytearray(size)
        buffer[:tail] = self._view[self._start : self._end]
        self._buffer, self._view = buffer, memoryview(buffer)
        self._start, self._end = 0, tail

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``."""
        if self._error is not None:
            raise self._error
        if self._remaining and self._destination is not None and self._start == self._end:
            self._filled += nbytes
            self._remaining -= nbytes
            if not self._remaining:
                self._finish_payload()
        else:
            self._end += nbytes
        try:
            self._parse()
        except ProtocolError as exc:
            self._error = exc
            raise

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes by copying them in; convenient for tests and in-memory pairs."""
        data = memoryview(data).cast("B")
        while data:
            target = self.get_buffer()
            count = min(len(target), len(data))
            target[:count] = data[:count]
            data = data[count:]
            self.buffer_updated(count)

    def discard(self) -> None:
        """Drop every frame not yet taken and the payload being received: the stream is gone.
        (Their buffers, staging memory among them, go now, not when a cycle collection finds
        the owner.)"""
        self._frames.clear()
        self._pending = self._destination = None
        self._filled = self._remaining = self._needed = 0
        self._start = self._end = 0
        if len(self._buffer) > self._resting_size:
            self._resize(self._resting_size)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        return self._frames.popleft() if self._frames else None

    @property
    def in_frame(self) -> bool:
        """True when some bytes of an unfinished frame were received (a close now truncates it)."""
        return self._remaining > 0 or self._end > self._start

    # -- parsing --------------------------------------------------------------------------------
    def _parse(self) -> None:
        view = self._view
        while True:
            available = self._end - self._start
            if self._remaining:
                if not available:
                    return
                count = min(available, self._remaining)
                if self._destination is not None:
                    self._destination[self._filled : self._filled + count] = view[
                        self._start : self._start + count
                    ]
                    self._filled += count
                self._start += count
                self._remaining -= count
                if self._remaining:
                    return
                self._finish_payload()
                continue
            if available < HEADER_SIZE:
                # Fail garbage at its first bytes instead of waiting for a whole header.
                prefix = min(available, len(MAGIC))
                if view[self._start : self._start + prefix] != MAGIC[:prefix]:
                    raise ProtocolError("bad magic: not a bitfusion-net peer")
                return
            magic, version, opcode, flags, request_id, meta_len, payload_len = HEADER.unpack_from(
                view, self._start
            )
            self._check_header(magic, version, opcode, flags, meta_len, payload_len)
            if available < HEADER_SIZE + meta_len:
                self._needed = HEADER_SIZE + meta_len
                return
            self._needed = 0
            meta_start = self._start + HEADER_SIZE
            message = self._decode_message(
                opcode, bool(flags & FLAG_REPLY), view[meta_start : meta_start + meta_len]
            )
            self._start = meta_start + meta_len
            if not payload_len:
                self._frames.append(Frame(opcode, request_id, self._receives_replies, message))
                continue
            self._pending = (opcode, request_id, message)
            self._destination = self._sink(opcode, request_id, message, payload_len)
            if self._destination is not None and len(self._destination) != payload_len:
                raise ValueError("payload sink returned a buffer of the wrong size")
            self._filled = 0
            self._remaining = payload_len

    def _check_header(
        self, magic: bytes, version: int, opcode: int, flags: int, meta_len: int, payload_len: int
    ) -> None:
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}: not a bitfusion-net peer")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
            )
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"unknown flags 0x{flags & ~KNOWN_FLAGS:04x}")
        if bool(flags & FLAG_REPLY) != self._receives_replies:
            raise ProtocolError(
                "a reply sent to a server" if flags & FLAG_REPLY else "a request sent to a client"
            )
        table = REPLIES if self._receives_replies else REQUESTS
        cls = table.get(opcode)
        if cls is None:
            raise ProtocolError(f"unknown opcode 0x{opcode:02x}")
        if meta_len > self._limits.max_metadata:
            raise ProtocolError(
                f"metadata of {meta_len} bytes exceeds the limit of {self._limits.max_metadata}"
            )
        if payload_len and not cls.HAS_PAYLOAD:
            raise ProtocolError(
                f"{Opcode(opcode).name} carries no payload, got {payload_len} bytes"
            )
        if payload_len > self._limits.max_payload:
            raise ProtocolError(
                f"payload of {payload_len} bytes exceeds the limit of {self._limits.max_payload}"
            )

    def _decode_message(self, opcode: int, is_reply: bool, meta: memoryview) -> Message:
        cls = (REPLIES if is_reply else REQUESTS)[opcode]
        try:
            return cls.decode(meta)
        except struct.error as exc:
            raise ProtocolError(f"malformed {cls.__name__} metadata: {exc}") from None

    def _finish_payload(self) -> None:
        assert self._pending is not None
        opcode, request_id, message = self._pending
        self._frames.append(
            Frame(opcode, request_id, self._receives_replies, message, self._destination)
        )
        self._pending = None
        self._destination = None
        self._filled = 0
