"""Hostile and broken peers at the socket level: the server answers or hangs up, and survives.

PROTOCOL.md 3.5 and 9.4: a frame with bad magic, a wrong version, an unknown opcode, an oversize
length or malformed metadata gets an ERROR frame (code PROTOCOL, flag FATAL) and the connection is
closed; DESIGN.md: nothing a peer sends may crash the server or make it allocate unbounded memory.
After every case a well-behaved client must still be served and no lease may be left behind.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import time

import numpy as np
import pytest
from integration_support import (
    WAIT_S,
    ClientApi,
    MiB,
    RawPeer,
    cli_server,
    reset_hwm,
    run,
    serve,
    vm_hwm,
    wait_released,
    wait_tenants,
    wait_until,
)

import bitfusion_net as bf
from bitfusion_net.protocol import (
    ERROR_FATAL,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorCode,
    Frame,
    Opcode,
    encode_request,
)
from bitfusion_net.protocol import messages as m
from bitfusion_net.protocol.frames import HEADER

FLAG_REPLY = 0x0001


def header(
    opcode: int,
    meta_len: int,
    payload_len: int = 0,
    *,
    request_id: int = 1,
    flags: int = 0,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    return HEADER.pack(magic, version, opcode, flags, request_id, meta_len, payload_len)


def hello_meta(gpus: int = 1, fraction: float = 0.5, memory: int = 0, name: str = "raw") -> bytes:
    return m.Hello(gpus, fraction, memory, name).encode()


def assert_error(
    frame: Frame, code: ErrorCode, *, fatal: bool, request_id: int | None = None
) -> None:
    message = frame.message
    assert isinstance(message, m.ErrorReply), frame
    assert frame.opcode == Opcode.ERROR
    assert message.code == code, message
    assert bool(message.flags & ERROR_FATAL) == fatal, message
    assert message.message  # says why
    if request_id is not None:
        assert frame.request_id == request_id, frame


async def assert_fatal_protocol_error(peer: RawPeer, request_id: int | None = None) -> str:
    """The server ends with one PROTOCOL error frame, then closes. Returns its text.

    Replies to well-formed requests that came before the bad frame may precede it.
    """
    frames = await peer.until_closed()
    assert frames, "the server closed the connection without an ERROR frame"
    *before, last = frames
    assert not any(isinstance(f.message, m.ErrorReply) for f in before), frames
    assert_error(last, ErrorCode.PROTOCOL, fatal=True, request_id=request_id)
    return last.message.message  # type: ignore[union-attr]


async def assert_server_healthy(server: bf.Server) -> None:
    """No lease left behind, and a normal client is served as usual."""
    await wait_released(server)
    async with bf.connect(server.address, fraction=1.0) as session:
        device = session.devices[0]
        data = np.arange(4096, dtype=np.uint8)
        ptr = await device.mem_alloc(data.nbytes)
        await device.memcpy_htod(ptr, data)
        out = np.empty_like(data)
        await device.memcpy_dtoh(out, ptr)
        np.testing.assert_array_equal(out, data)
        assert await device.mem_get_info() == (device.memory_limit - 4096, device.memory_limit)
    await wait_released(server)


# -- malformed frames: ERROR (PROTOCOL, FATAL), then the connection closes ------------------------
def frame(opcode: int, meta: bytes, payload_len: int = 0, **fields: object) -> bytes:
    """A header announcing exactly ``meta`` (and ``payload_len``), then ``meta``."""
    return header(opcode, len(meta), payload_len, **fields) + meta  # type: ignore[arg-type]


HELLO_META = hello_meta()
HELLO_FIXED = HELLO_META[: m.Hello._struct.size]  # the fixed fields; then the length-prefixed name
NOT_UTF8 = struct.pack("<I", 2) + b"\xff\xfe"
HTOD_META = m.MemcpyHtoD(0, 0).encode()
ALLOC_META = m.MemAlloc(0, 8).encode()

CASES: dict[str, tuple[bytes, str]] = {
    # name: (bytes sent on a fresh connection, a word the error message must contain)
    "garbage": (b"GET / HTTP/1.1\r\nHost: gpu\r\n\r\n", "magic"),
    "bad_magic": (frame(Opcode.HELLO, HELLO_META, magic=b"XFNT"), "magic"),
    "wrong_version": (frame(Opcode.HELLO, HELLO_META, version=PROTOCOL_VERSION + 1), "version"),
    "version_zero": (frame(Opcode.HELLO, HELLO_META, version=0), "version"),
    "unknown_opcode": (header(0x7F, 0), "opcode"),
    "error_opcode_as_request": (header(Opcode.ERROR, 0), "opcode"),
    "reply_flag_on_a_request": (frame(Opcode.HELLO, HELLO_META, flags=FLAG_REPLY), "reply"),
    "unknown_flags": (frame(Opcode.HELLO, HELLO_META, flags=0x8000), "flags"),
    "oversize_metadata": (header(Opcode.HELLO, 2**20), "metadata"),
    "max_u32_metadata": (header(Opcode.HELLO, 2**32 - 1), "metadata"),
    "oversize_payload_2_40": (frame(Opcode.MEMCPY_HTOD, HTOD_META, 2**40), "payload"),
    "payload_on_no_payload_opcode": (frame(Opcode.MEM_ALLOC, ALLOC_META, 16), "payload"),
    "request_before_hello": (encode_request(m.MemAlloc(0, 4096), 1), "HELLO"),
    "synchronize_before_hello": (encode_request(m.Synchronize(0), 1), "HELLO"),
    "hello_with_stray_bytes": (frame(Opcode.HELLO, HELLO_META + b"\0\0"), "stray"),
    "hello_metadata_too_short": (frame(Opcode.HELLO, HELLO_META[:5]), "metadata"),
    "hello_without_name": (frame(Opcode.HELLO, HELLO_FIXED), "client_name"),
    "hello_name_overruns": (frame(Opcode.HELLO, HELLO_FIXED + struct.pack("<I", 99)), "overruns"),
    "hello_name_not_utf8": (frame(Opcode.HELLO, HELLO_FIXED + NOT_UTF8), "UTF-8"),
    "memalloc_metadata_too_short": (
        encode_request(m.Hello(1, 0.5, 0), 1) + frame(Opcode.MEM_ALLOC, b"\0\0\0", request_id=2),
        "metadata",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_first_frame_gets_a_fatal_protocol_error(case: str) -> None:
    data, word = CASES[case]
    # Frames that cannot be decoded answer no request: id 0. A decodable frame out of order
    # (anything before HELLO) is answered with its own id (PROTOCOL.md 9.4).
    request_id = 1 if case.endswith("_before_hello") else 0

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            peer.send(data)
            text = await assert_fatal_protocol_error(peer, request_id=request_id)
            assert word.lower() in text.lower(), text
            await peer.close()
            await assert_server_healthy(server)

    run(main())


def test_metadata_lengths_are_checked_before_they_arrive() -> None:
    """An oversize length fails at the header: the server does not wait for (or buffer) it."""

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            await peer.hello()
            peer.send(header(Opcode.MEMCPY_HTOD, 18, 2**40, request_id=2))  # and nothing more
            text = await assert_fatal_protocol_error(peer, request_id=0)
            assert "payload" in text
            await assert_server_healthy(server)

    run(main())


def test_malformed_frame_after_a_lease_releases_it() -> None:
    async def main() -> None:
        async with serve() as server:
            for bad in (
                b"\0" * 64,
                header(0x7F, 0, request_id=9),
                header(Opcode.MEM_ALLOC, 3) + b"abc",
            ):
                peer = await RawPeer.open(server.address)
                reply = await peer.hello(fraction=1.0)
                assert reply.devices[0].fraction == 1.0
                ptr = await peer.alloc(MiB)
                assert ptr
                assert server.gpus()[0]["tenants"] == 1
                peer.send(bad)
                await assert_fatal_protocol_error(peer, request_id=0)
                await assert_server_healthy(server)

    run(main())


def test_a_frame_before_a_malformed_one_is_still_answered() -> None:
    """PROTOCOL.md 9.4: frames *after* the offending one are discarded, not those before it.

    A HELLO and a frame with an unknown opcode in one write: the HELLO is answered (the lease is
    granted, then released when the connection closes), then the fatal ERROR comes.
    """

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            peer.send(encode_request(m.Hello(1, 0.5, 0, "raw"), 1) + header(0x7F, 0, request_id=2))
            frames = await peer.until_closed()
            assert [type(f.message) for f in frames] == [m.HelloReply, m.ErrorReply], frames
            assert frames[0].request_id == 1
            assert_error(frames[1], ErrorCode.PROTOCOL, fatal=True, request_id=0)
            await assert_server_healthy(server)

    run(main())


def test_request_before_hello_names_the_request() -> None:
    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            peer.send(encode_request(m.MemGetInfo(0), 77))
            text = await assert_fatal_protocol_error(peer, request_id=77)
            assert "MEM_GET_INFO" in text
            await assert_server_healthy(server)

    run(main())


def test_payload_before_hello_is_not_staged() -> None:
    """A copy from host before HELLO: its payload is read and dropped, then the error is sent."""

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            payload = bytes(2 * MiB)
            peer.send(encode_request(m.MemcpyHtoD(0, 0x1000), 5, len(payload)) + payload)
            await assert_fatal_protocol_error(peer, request_id=5)
            await assert_server_healthy(server)

    run(main())


def test_hello_twice() -> None:
    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            await peer.hello()
            peer.send_request(m.Hello(1, 0.5, 0, "again"))
            text = await assert_fatal_protocol_error(peer, request_id=2)
            assert "HELLO" in text
            await assert_server_healthy(server)

    run(main())


def test_truncated_header_then_close() -> None:
    async def main() -> None:
        async with serve() as server:
            hello = encode_request(m.Hello(1, 0.5, 0, "raw"), 1)
            # Before any lease, and holding one.
            for lead in (b"", hello):
                peer = await RawPeer.open(server.address)
                peer.send(lead)
                if lead:
                    frame = await peer.frame()
                    assert isinstance(frame.message, m.HelloReply)
                    await wait_tenants(server, 1)
                peer.send(hello[: HEADER_SIZE // 2])
                await peer.writer.drain()
                peer.writer.write_eof()  # half-close: the peer will never finish the header
                frames = await peer.until_closed()
                assert all(isinstance(f.message, m.ErrorReply) for f in frames), frames
                await peer.close()
                await assert_server_healthy(server)

    run(main())


def test_peer_vanishing_mid_payload_of_a_copy_from_host() -> None:
    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            await peer.hello(fraction=1.0)
            ptr = await peer.alloc(8 * MiB)
            peer.send(encode_request(m.MemcpyHtoD(0, ptr), peer.next_id(), 8 * MiB))
            peer.send(bytes(3 * MiB))  # of 8 MiB
            await peer.writer.drain()
            peer.abort()
            await assert_server_healthy(server)

            # The same with a clean close (FIN) instead of a reset.
            peer = await RawPeer.open(server.address)
            await peer.hello(fraction=1.0)
            ptr = await peer.alloc(8 * MiB)
            peer.send(encode_request(m.MemcpyHtoD(0, ptr), peer.next_id(), 8 * MiB) + bytes(MiB))
            await peer.close()
            await assert_server_healthy(server)

    run(main())


def test_peer_vanishing_with_replies_unread() -> None:
    async def main() -> None:
        async with serve(max_payload="1MiB") as server:
            peer = await RawPeer.open(server.address)
            await peer.hello(fraction=1.0)
            ptr = await peer.alloc(MiB)
            peer.send(b"".join(
                encode_request(m.MemcpyDtoH(0, ptr, MiB), peer.next_id()) for _ in range(16)
            ))  # fmt: skip
            await peer.writer.drain()
            peer.abort()
            await assert_server_healthy(server)

    run(main())


# -- errors that keep the connection open --------------------------------------------------------
def test_recoverable_errors_keep_the_connection() -> None:
    async def main() -> None:
        async with serve(max_payload="1MiB") as server:
            peer = await RawPeer.open(server.address)
            await peer.hello()
            # A device the session does not have, on a request that waits for a reply.
            request_id = peer.send_request(m.MemGetInfo(3))
            assert_error(
                await peer.frame(), ErrorCode.INVALID_VALUE, fatal=False, request_id=request_id
            )
            # A copy to host larger than one frame may carry.
            ptr = await peer.alloc(2 * MiB)
            request_id = peer.send_request(m.MemcpyDtoH(0, ptr, 2 * MiB))
            assert_error(
                await peer.frame(), ErrorCode.INVALID_VALUE, fatal=False, request_id=request_id
            )
            # A pointer that is nobody's.
            request_id = peer.send_request(m.MemcpyDtoH(0, 0xDEAD_0000, 16))
            assert_error(
                await peer.frame(), ErrorCode.INVALID_HANDLE, fatal=False, request_id=request_id
            )
            # A memset with an item size the protocol does not have: sticky, deferred.
            bad = peer.send_request(m.Memset(0, 3, 0, ptr, 1))
            request_id = peer.send_request(m.Synchronize(0))
            frame = await peer.frame()
            assert_error(frame, ErrorCode.INVALID_VALUE, fatal=False, request_id=request_id)
            assert frame.message.deferred_from == bad  # type: ignore[union-attr]
            # And the connection still works.
            request_id = peer.send_request(m.MemGetInfo(0))
            frame = await peer.frame()
            assert isinstance(frame.message, m.MemGetInfoReply) and frame.request_id == request_id
            await peer.close()
            await assert_server_healthy(server)

    run(main())


def test_no_reply_request_for_a_missing_device_is_fatal() -> None:
    """Nobody waits to hear about it, so the server treats the sender as broken."""

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            await peer.hello()
            peer.send_request(m.Memset(5, 1, 0, 0x1000, 1))
            await assert_fatal_protocol_error(peer, request_id=2)
            await assert_server_healthy(server)

    run(main())


def test_pipelined_frames_in_one_write_are_answered_in_order() -> None:
    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            frames = [encode_request(m.Hello(1, 0.5, 0, "pipelined"), 1)]
            frames += [encode_request(m.MemAlloc(0, 1024), i) for i in range(2, 202)]
            peer.send(b"".join(frames))
            replies = [await peer.frame() for _ in range(201)]
            assert [r.request_id for r in replies] == list(range(1, 202))
            assert isinstance(replies[0].message, m.HelloReply)
            ptrs = [r.message.ptr for r in replies[1:]]  # type: ignore[union-attr]
            assert len(set(ptrs)) == 200
            await peer.close()
            await assert_server_healthy(server)

    run(main())


@pytest.mark.parametrize("seed", range(12))
def test_random_garbage_never_hurts_the_server(seed: int) -> None:
    rng = np.random.default_rng(seed)

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            if seed % 2:  # half of them after a real HELLO, holding a lease
                await peer.hello()
            noise = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
            if seed % 3 == 0:  # a valid magic and version, then noise
                noise = MAGIC + bytes([PROTOCOL_VERSION]) + noise
            peer.send(noise)
            await peer.writer.drain()
            peer.writer.write_eof()  # noise that looks like the start of a long frame ends here
            frames = await peer.until_closed()
            assert all(isinstance(f.message, m.ErrorReply) for f in frames), frames
            await assert_server_healthy(server)

    run(main())


# -- lease requests a raw peer can make that the client library would refuse ----------------------
@pytest.mark.parametrize(
    ("gpus", "fraction", "memory"),
    [
        (0, 0.5, 0),  # no GPUs
        (2, 0.5, 0),  # more than the server has
        (1, 0.0, 0),  # neither fraction nor memory
        (1, 0.5, MiB),  # both
        (1, 1.5, 0),
        (1, -0.5, 0),
        (1, math.inf, 0),
        (1, math.nan, 0),
        (1, 0.001, 0),  # below the smallest slice
        (1, -0.5, MiB),  # a negative fraction is not "no fraction"
        (1, math.nan, MiB),
        (1, -math.inf, MiB),
    ],
)
def test_invalid_lease_requests_get_an_invalid_value_error(
    gpus: int, fraction: float, memory: int
) -> None:
    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            peer.send_request(m.Hello(gpus, fraction, memory, "raw"))
            frames = await peer.until_closed()
            assert len(frames) == 1, frames
            assert_error(frames[0], ErrorCode.INVALID_VALUE, fatal=True, request_id=1)
            await assert_server_healthy(server)

    run(main())


def test_zero_length_copy_from_host_is_a_no_op() -> None:
    """A MEMCPY_HTOD frame with an empty payload is a valid zero-byte copy (as cuMemcpyHtoD(0))."""

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            await peer.hello()
            ptr = await peer.alloc(4096)
            peer.send(encode_request(m.MemcpyHtoD(0, ptr), peer.next_id(), 0))
            request_id = peer.send_request(m.Synchronize(0))
            frame = await peer.frame()
            assert isinstance(frame.message, m.Done), frame
            assert frame.request_id == request_id
            await peer.close()
            await assert_server_healthy(server)

    run(main())


# -- memory a peer can make the server hold -------------------------------------------------------
def test_a_peer_that_does_not_read_cannot_make_the_server_stage_unbounded_replies(api: ClientApi) -> None:
    """600 copies to host of 1 MiB each, sent in one write, replies never read.

    The server's staging budget is one frame payload (1 MiB here) and above it the session stops
    reading; so however many requests the peer queues, the server holds about the budget plus what
    the socket buffers take, not 600 MiB.
    """
    requests = 600

    async def main(address: str, pid: int) -> tuple[int, int]:
        flood = await RawPeer.open(address)
        await flood.hello(fraction=0.5)
        ptr = await flood.alloc(MiB)
        reset_hwm(pid)
        before = vm_hwm(pid)
        flood.send(b"".join(
            encode_request(m.MemcpyDtoH(0, ptr, MiB), flood.next_id()) for _ in range(requests)
        ))  # fmt: skip
        await flood.writer.drain()
        # A second tenant's synchronize runs on the same device worker, after whatever part of
        # the flood the server has accepted by then: once it returns, that part has been staged.
        async with api.connect(address, fraction=0.5) as other:
            await other.devices[0].synchronize()
        after = vm_hwm(pid)
        flood.abort()
        # Its lease comes back (asynchronously): a whole GPU can be leased again.
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                async with api.connect(address, fraction=1.0):
                    break
            except bf.CapacityError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        return before, after

    with cli_server("--gpu-memory", "64MiB", "--max-payload", "1MiB") as server:
        before, after = run(main(server.address, server.pid))
        assert server.proc.poll() is None
    growth = after - before
    assert growth <= 64 * MiB, (
        f"the server's peak RSS grew by {growth / MiB:.0f} MiB for {requests} unread 1 MiB "
        f"replies ({before / MiB:.0f} -> {after / MiB:.0f} MiB)"
    )


# -- the client against broken servers ------------------------------------------------------------
async def _fake_server(answer: bytes | None) -> asyncio.Server:
    """Accepts, reads the HELLO, then sends ``answer`` and hangs up (None: says nothing, stays)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(HEADER_SIZE)
        if answer is None:
            await reader.read()  # until the client gives up
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", bf.ProtocolError),
        (header(Opcode.HELLO, 0, flags=FLAG_REPLY, request_id=99), bf.ProtocolError),
        # The reply to request #1 (the HELLO), but of another opcode (a MEM_ALLOC reply).
        (header(Opcode.MEM_ALLOC, 8, flags=FLAG_REPLY, request_id=1) + bytes(8), bf.ProtocolError),
        (header(Opcode.HELLO, 3, flags=FLAG_REPLY) + b"abc", bf.ProtocolError),  # malformed
        (header(Opcode.HELLO, 0, flags=0), bf.ProtocolError),  # a request sent to a client
        (b"", bf.ConnectionLostError),  # hangs up without a word
        (None, bf.ConnectionLostError),  # never answers: the connect timeout
    ],
    ids=[
        "http",
        "unknown_request_id",
        "reply_of_another_opcode",
        "malformed_hello_reply",
        "request_to_client",
        "hang_up",
        "silent",
    ],
)
def test_connect_to_a_broken_server_raises_a_typed_error(answer: bytes | None, error: type, api: ClientApi) -> None:
    async def main() -> None:
        fake = await _fake_server(answer)
        try:
            port = fake.sockets[0].getsockname()[1]
            with pytest.raises(error):
                await api.connect(f"tcp://127.0.0.1:{port}", fraction=0.5, timeout=1.0)
        finally:
            fake.close()
            await fake.wait_closed()

    run(main())


def test_frames_after_a_fatal_error_in_the_same_write_are_not_handled() -> None:
    """A MEM_ALLOC before HELLO is fatal; the HELLO pipelined behind it must not lease anything."""

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            peer.send(encode_request(m.MemAlloc(0, 64), 5) + encode_request(m.Hello(1, 0.5, 0), 6))
            frames = await peer.until_closed()
            assert [type(f.message) for f in frames] == [m.ErrorReply], frames
            assert_error(frames[0], ErrorCode.PROTOCOL, fatal=True, request_id=5)
            await assert_server_healthy(server)

    run(main())


def test_an_error_that_echoes_a_huge_name_still_fits_in_a_frame(api: ClientApi) -> None:
    """The error text quotes the unknown kernel name; the ERROR frame stays within the metadata
    limit, so the client hears InvalidHandleError instead of losing the connection."""

    async def main() -> None:
        async with serve() as server, api.connect(server.address, fraction=0.5) as session:
            device = session.devices[0]
            with pytest.raises(bf.InvalidHandleError):
                await device.builtin("k" * 65_000)
            assert (await device.mem_get_info())[1] == device.memory_limit

    run(main())


def test_request_id_zero_is_refused() -> None:
    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            peer.send(encode_request(m.Hello(1, 0.5, 0), 0))
            frames = await peer.until_closed()
            assert [type(f.message) for f in frames] == [m.ErrorReply], frames
            assert_error(frames[0], ErrorCode.PROTOCOL, fatal=True, request_id=0)
            await assert_server_healthy(server)

    run(main())


def test_a_client_that_pipelines_without_limit_is_held_back_not_buffered() -> None:
    """50,000 launches sent without waiting: the server stops reading once a lease has
    MAX_QUEUED_OPERATIONS queued, so its queue stays bounded whatever the client sends; when the
    client vanishes, its queued work is dropped and the lease comes back at once."""
    from bitfusion_net.server.flow import MAX_QUEUED_OPERATIONS, QUEUE_CHECK_EVERY

    # The server reads queue depths every QUEUE_CHECK_EVERY requests, and between two samples
    # here (10 ms, more on a loaded machine) the device drains about 50 kernels per 10 ms.
    near_limit = MAX_QUEUED_OPERATIONS - QUEUE_CHECK_EVERY - 500

    async def main() -> None:
        async with serve() as server:
            peer = await RawPeer.open(server.address)
            await peer.hello(fraction=0.5)
            peer.send_request(m.GetFunction(0, 0, "busy"))
            function = (await peer.frame()).message.function
            launch = m.Launch(0, function, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<q", 200))
            peer.send(b"".join(encode_request(launch, peer.next_id()) for _ in range(50_000)))
            most, samples_at_limit = 0, 0
            for _ in range(300):  # at most 3 s; the device runs about 5,000 kernels a second
                await asyncio.sleep(0.01)
                [lease] = [lease for s in server.sessions() for lease in s["leases"]]
                most = max(most, lease["queued"])
                samples_at_limit += most >= near_limit
                if samples_at_limit == 30:  # 0.3 s at the limit: enough to see it hold
                    break
            # The queue filled up to the limit (the flood arrived) and not beyond it, but for
            # one read's worth of frames that may arrive as the limit is crossed.
            assert near_limit <= most <= MAX_QUEUED_OPERATIONS + 256 * 1024 // 50, most
            # A reset (what a crashed host's kernel sends) is noticed while the server holds the
            # connection paused; a FIN would wait behind the unread flood until the queue drains.
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.abort()
            await assert_server_healthy(server)

    run(main())


def test_a_flooding_client_takes_turns_with_its_neighbours() -> None:
    """2,600 launches arrive in one read from one client, and one small request from another.
    Each connection handles at most FRAMES_PER_TURN requests per loop iteration, so the
    neighbour is answered while most of the flood is still waiting its turns, instead of after
    all of it (which held the loop for hundreds of ms under load)."""
    flood = 2600

    async def main() -> None:
        async with serve() as server, bf.connect(server.address, fraction=0.25) as neighbour:
            peer = await RawPeer.open(server.address)
            await peer.hello(fraction=0.5)
            peer.send_request(m.GetFunction(0, 0, "fill"))
            function = (await peer.frame()).message.function
            ptr = await peer.alloc(64)
            launch = m.Launch(0, function, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<ifQ", 1, 1.0, ptr))
            frames = b"".join(encode_request(launch, peer.next_id()) for _ in range(flood))
            flooder = next(s for s in server.sessions() if s["client"] == "raw-peer")["session"]

            def handled() -> int:  # requests of the flood the server has taken in so far
                [session] = [s for s in server.sessions() if s["session"] == flooder]
                [lease] = session["leases"]
                return lease["usage"]["operations"] + lease["queued"]

            before = handled()
            peer.send(frames)
            deadline = time.monotonic() + WAIT_S
            while handled() == before:  # loop iteration by loop iteration, so no turn is missed
                assert time.monotonic() < deadline, "the flood never arrived"
                await asyncio.sleep(0)
            await neighbour.devices[0].mem_get_info()
            seen = handled() - before
            assert seen <= flood // 2, seen  # the flood was not handled in one go
            await wait_until(lambda: handled() - before == flood, "the whole flood handled")
            await peer.close()

    run(main())
