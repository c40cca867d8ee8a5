"""The transport conformance suite (after trio's ``check_two_way_stream``).

Every ``Stream`` implementation passes the same cases: TCP over loopback on uvloop and the
in-memory pair and RDMA on the verbs simulator, through the ``open_pairs`` fixture.
``BlockingStream`` passes the same cases in its own terms, as a blocking client talking to an
event-loop server end, over TCP and over RDMA (``open_blocking``).

1. ordering: thousands of small writes of varied sizes arrive intact and in order, both ways;
2. 1-byte reads: an owner offering 1-byte buffers still receives everything;
3. payloads of 0 B to 256 MiB land bit-exact in an owner buffer the size of the payload;
4. back-pressure: a peer that stops reading makes ``writable`` False and ``drain()`` wait
   (a blocking ``send`` block) until it reads again, after which everything arrives;
5. closing: an orderly close delivers everything then ``connection_lost(None)`` once; an abort
   is a reset; a close mid-frame leaves exactly the bytes sent; a paused end learns of a close;
6. send completion: ``on_sent`` runs only once the payload is handed over (the payload may then
   be overwritten), never for a dropped write; writes after ``close()`` are dropped;
7. many connections: 100 pairs at once, each exchanging data.

Each test runs its own event loop, bounded by ``TIMEOUT_S``; blocking calls run in threads with a
socket timeout, so nothing outlives its test. Nothing waits by sleeping: tests await futures, poll
a condition with a deadline, or let the loop turn a few times to show that nothing happens.
"""

from __future__ import annotations

import asyncio
import functools
import random
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from itertools import pairwise
from typing import Any, ParamSpec, Protocol, cast

import numpy as np
import pytest

from bitfusion_net.transport import (
    BlockingStream,
    Stream,
    TcpAddress,
    connect,
    listen,
    loop_factory,
    memory_stream_pair,
    rdma_ring,
)
from bitfusion_net.transport.rdma import rdma_stream_pair
from bitfusion_net.transport.verbs import Fabric, SimulatedProvider
from bitfusion_net.transport.verbs.api import Provider
from bitfusion_net.transport.verbs.pyverbs_backend import PyverbsProvider, unavailable

KiB = 2**10
MiB = 2**20
TIMEOUT_S = 30  # the most one test may take, whatever happens
THREAD_TIMEOUT_S = 20  # socket timeout of a blocking end: a stuck thread ends before the test does
POLL_S = 0.001
READ_SIZE = 64 * KiB  # the scratch buffer an owner offers when it expects nothing in particular
QUEUE_LIMIT = 8 * MiB  # both transports' default send-queue limit
PAYLOAD_SIZES = [0, 1, 4 * KiB + 1, MiB, 64 * MiB, 256 * MiB]
HEAD = struct.Struct(">Q")  # the test's frame head: the payload's size

P = ParamSpec("P")


# -- the receiving side -------------------------------------------------------------------------
class RecordingOwner:
    """A ``StreamOwner`` (and a ``BlockingStream`` receiver) that records what it is given.

    Bytes fill the buffers handed to ``expect()`` first, in order, as a payload lands in the sink
    the protocol chose (the zero-copy path); after those, a ``read_size`` scratch buffer whose
    contents are appended to ``received``. Breaches of the ``StreamOwner`` contract are noted in
    ``violations`` (raising inside a transport callback would only be logged).
    """

    def __init__(self, stream: Stream | None, read_size: int = READ_SIZE) -> None:
        self.stream = cast(Stream, stream)  # None only as a blocking receiver
        self.count = 0  # bytes received in all
        self.received = bytearray()  # what arrived once the expected buffers were full
        self.lost: list[BaseException | None] = []  # connection_lost's arguments
        self.count_when_lost = -1
        self.after_update: Callable[[], None] | None = None  # runs at the end of buffer_updated
        self.violations: list[str] = []
        self._scratch = memoryview(bytearray(read_size))
        self._expected: deque[memoryview] = deque()
        self._offered: memoryview | None = None

    def expect(self, *buffers: bytearray | np.ndarray) -> None:
        for buffer in buffers:
            view = buffer.data if isinstance(buffer, np.ndarray) else memoryview(buffer)
            if len(view):  # get_buffer never offers an empty buffer
                self._expected.append(view.cast("B"))

    def expect_frame(self, size: int) -> tuple[bytearray, np.ndarray]:
        """Receive a head into one buffer and a ``size``-byte payload into a sink of its own."""
        head, sink = bytearray(HEAD.size), np.empty(size, np.uint8)
        self.expect(head, sink)
        return head, sink

    def get_buffer(self) -> memoryview:
        if self.lost:
            self.violations.append("get_buffer after connection_lost")
        self._offered = self._expected[0] if self._expected else self._scratch
        return self._offered

    def buffer_updated(self, nbytes: int) -> None:
        offered, self._offered = self._offered, None
        if self.lost:
            self.violations.append("buffer_updated after connection_lost")
        if offered is None or not 0 <= nbytes <= len(offered):
            self.violations.append(
                f"buffer_updated({nbytes}) for a buffer of {offered and len(offered)}"
            )
            return
        if offered is self._scratch:
            self.received += offered[:nbytes]
        elif nbytes == len(offered):
            self._expected.popleft()
        else:
            self._expected[0] = offered[nbytes:]
        self.count += nbytes
        if self.after_update is not None:
            self.after_update()

    def connection_lost(self, error: BaseException | None) -> None:
        if self.lost:
            self.violations.append(f"connection_lost({error!r}) again")
        self.lost.append(error)
        self.count_when_lost = self.count

    async def wait_for_bytes(self, count: int) -> None:
        await poll_until(lambda: self.count >= count or bool(self.lost), f"{count} bytes")
        assert self.count >= count, f"lost ({self.lost[0]!r}) after {self.count} of {count} bytes"


Pair = tuple[RecordingOwner, RecordingOwner]  # the two ends' owners; ``owner.stream`` is the end


class OnSent:
    """An ``on_sent`` callback that counts its calls, then runs ``hook`` (to reuse the payload)."""

    def __init__(self, hook: Callable[[], None] | None = None) -> None:
        self.calls = 0
        self.hook = hook

    def __call__(self) -> None:
        self.calls += 1
        if self.hook is not None:
            self.hook()


# -- waiting, data ------------------------------------------------------------------------------
def on_uvloop(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test on a fresh uvloop, within ``TIMEOUT_S``."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(TIMEOUT_S):
                await test(*args, **kwargs)

        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(bounded())

    return run


async def poll_until(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(f"waited {timeout} s for {what}") from None


async def loop_turns(count: int = 20) -> None:
    """Let the loop run ``count`` iterations, so that whatever can happen without the other side
    does (I/O included): how a test shows that something does *not* happen. Not a timed wait."""
    for _ in range(count):
        await asyncio.sleep(0)


def peer_gone(stream: Stream) -> bool:
    return stream.closed or not stream.peer_alive()


def pattern(size: int, seed: int = 0) -> np.ndarray:
    """``size`` bytes in which no two aligned 8-byte words are equal: a lost, repeated or misplaced
    piece shows. Cheap to make for hundreds of MiB, and to make again to compare with."""
    words = np.arange(size // 8 + 1, dtype=np.uint64)
    words += np.uint64((seed << 40) % 2**64)
    words *= np.uint64(0x9E3779B97F4A7C15)
    return words.view(np.uint8)[:size]


def same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit-exact comparison in 16 MiB steps (no 256 MiB temporary)."""
    step = 16 * MiB
    return len(got) == len(want) and all(
        np.array_equal(got[i : i + step], want[i : i + step]) for i in range(0, len(want), step)
    )


def small_chunks(seed: int, count: int, largest: int = 70_000) -> list[bytes]:
    """``count`` random chunks, mostly under 200 B, a few up to ``largest``."""
    rng = random.Random(seed)

    def size() -> int:
        roll = rng.random()
        if roll < 0.9 or largest <= 200:
            return rng.randint(1, min(200, largest))
        return rng.randint(201, 5000 if roll < 0.99 else largest)

    return [rng.randbytes(size()) for _ in range(count)]


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def numbered_blocks(count: int, block: np.ndarray) -> bytes:
    """What ``count`` writes of (number, ``block``) add up to."""
    return b"".join(HEAD.pack(i) + block.tobytes() for i in range(count))


async def write_chunks(stream: Stream, chunks: list[bytes], seed: int) -> list[int]:
    """Write each chunk as a head alone or as a head and a payload, flushing, yielding and
    draining now and then; returns the list the chunks' ``on_sent`` append their index to."""
    rng = random.Random(seed)
    completed: list[int] = []
    for index, chunk in enumerate(chunks):
        on_sent = functools.partial(completed.append, index)
        if rng.random() < 0.5:
            stream.write(chunk, None, on_sent)
        else:  # the payload part may be empty
            split = rng.randint(1, len(chunk))
            stream.write(chunk[:split], memoryview(chunk)[split:], on_sent)
        roll = rng.random()
        if roll < 0.05:
            stream.flush()
        elif roll < 0.07:
            await asyncio.sleep(0)  # let the loop deliver some before the next write
        if not stream.writable:
            await stream.drain()
    return completed


# -- pairs of connected ends --------------------------------------------------------------------
async def abort_all(owners: list[RecordingOwner]) -> None:
    for owner in owners:
        owner.stream.abort()
    for owner in owners:
        await owner.stream.wait_closed()


def check_contract(owners: list[RecordingOwner]) -> None:
    problems = [f"{owner.stream.peer}: {v}" for owner in owners for v in owner.violations]
    assert not problems, problems
    assert all(len(owner.lost) == 1 for owner in owners), "connection_lost not called exactly once"


@asynccontextmanager
async def tcp_pairs(
    count: int = 1,
    read_size: int = READ_SIZE,
    *,
    server_tls: Any = None,
    client_tls: Any = None,
) -> AsyncIterator[list[Pair]]:
    """``count`` loopback TCP connections on uvloop: (client end, server end) each; with
    ``server_tls`` (a ``ServerTls``) and ``client_tls`` (a ``ClientTls``), over TLS."""
    encrypted = server_tls is not None
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.startswith("uvloop"), f"TCP runs on uvloop, not {loop!r}"
    made: list[RecordingOwner] = []
    accepted: dict[str, asyncio.Future[RecordingOwner]] = {}

    def accepted_from(peer: str) -> asyncio.Future[RecordingOwner]:
        return accepted.setdefault(peer, loop.create_future())

    def new_owner(stream: Stream) -> RecordingOwner:
        made.append(RecordingOwner(stream, read_size))
        return made[-1]

    def server_owner(stream: Stream) -> RecordingOwner:
        assert stream.encrypted == encrypted
        owner = new_owner(stream)
        accepted_from(stream.peer).set_result(owner)
        return owner

    server = await listen(TcpAddress("127.0.0.1", 0), server_owner, tls=server_tls)
    try:
        address = TcpAddress("127.0.0.1", server.sockets[0].getsockname()[1], tls=encrypted)
        clients = await asyncio.gather(
            *(connect(address, new_owner, tls=client_tls) for _ in range(count))
        )
        pairs: list[Pair] = []
        for client in clients:
            assert client.transport is not None and client.encrypted == encrypted
            host, port = client.transport.get_extra_info("sockname")[:2]
            pairs.append(
                (cast(RecordingOwner, client.owner), await accepted_from(f"{host}:{port}"))
            )
        yield pairs
    finally:
        await abort_all(made)
        server.close()
        await server.wait_closed()
    check_contract(made)


@asynccontextmanager
async def started_pairs(
    make_pair: Callable[[], tuple[Any, Any]], count: int, read_size: int
) -> AsyncIterator[list[Pair]]:
    """``count`` pairs from ``make_pair``, each end started with a recording owner."""
    pairs: list[Pair] = []
    for _ in range(count):
        first, second = make_pair()
        pair = RecordingOwner(first, read_size), RecordingOwner(second, read_size)
        first.start(pair[0])
        second.start(pair[1])
        pairs.append(pair)
    made = [owner for pair in pairs for owner in pair]
    try:
        yield pairs
    finally:
        await abort_all(made)
    check_contract(made)


def memory_pairs(
    count: int = 1, read_size: int = READ_SIZE
) -> AbstractAsyncContextManager[list[Pair]]:
    """``count`` in-memory pairs, each end started with a recording owner."""
    return started_pairs(memory_stream_pair, count, read_size)


def rdma_device() -> Provider:
    """pyverbs on this host's RDMA device, or a skip saying what is missing."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"no RDMA here: {reason}")
    return PyverbsProvider()


@asynccontextmanager
async def rdma_pairs(
    count: int = 1, read_size: int = READ_SIZE, *, device: Provider | None = None
) -> AsyncIterator[list[Pair]]:
    """``count`` RDMA pairs on one simulated fabric (two devices, as two hosts would be), or
    with ``device`` two QPs of one real device (loopback). The simulator fails every RNR,
    access, length or overrun fault as hardware would; the transport must meet none of them in
    any case of the suite."""
    fabric = Fabric(devices=("sim0", "sim1")) if device is None else None
    provider = device or SimulatedProvider(fabric)  # type: ignore[arg-type]
    names: tuple[str | None, str | None] = ("sim0", "sim1") if device is None else (None, None)
    async with started_pairs(lambda: rdma_stream_pair(provider, names), count, read_size) as pairs:
        yield pairs
    if fabric is not None:
        assert fabric.stats.faults == 0, (fabric.stats.as_dict(), fabric.fault_log[:5])


class OpenPairs(Protocol):
    def __call__(
        self, count: int = 1, read_size: int = READ_SIZE
    ) -> AbstractAsyncContextManager[list[Pair]]: ...


@pytest.fixture(
    params=["tcp", "memory", "rdma", pytest.param("rdma-device", marks=pytest.mark.rdma)]
)
def open_pairs(request: pytest.FixtureRequest) -> OpenPairs:
    """Opens connected ``Stream`` pairs of one transport: ``async with open_pairs() as [(a, b)]``
    (``rdma``: on the verbs simulator; ``rdma-device``: on this host's device, else skipped)."""
    if request.param == "rdma-device":
        return cast(OpenPairs, functools.partial(rdma_pairs, device=rdma_device()))
    transports = {"tcp": tcp_pairs, "memory": memory_pairs, "rdma": rdma_pairs}
    return cast(OpenPairs, transports[request.param])


# == Stream: every event-loop transport =========================================================
@on_uvloop
async def test_small_writes_arrive_in_order_both_ways(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        to_b, to_a = small_chunks(1, 3000), small_chunks(2, 3000)
        sent_a, sent_b = await asyncio.gather(
            write_chunks(a.stream, to_b, seed=3), write_chunks(b.stream, to_a, seed=4)
        )
        await b.wait_for_bytes(sum(map(len, to_b)))
        await a.wait_for_bytes(sum(map(len, to_a)))
        assert b.received == b"".join(to_b)
        assert a.received == b"".join(to_a)
        await poll_until(lambda: len(sent_a) == len(to_b) and len(sent_b) == len(to_a), "on_sent")
        assert sent_a == list(range(len(to_b))) and sent_b == list(range(len(to_a)))  # in order


@on_uvloop
async def test_one_byte_reads_receive_everything(open_pairs: OpenPairs) -> None:
    async with open_pairs(read_size=1) as [(a, b)]:
        to_b, to_a = small_chunks(5, 300, largest=200), small_chunks(6, 300, largest=200)
        payload = pattern(5000, seed=1)
        await asyncio.gather(write_chunks(a.stream, to_b, 7), write_chunks(b.stream, to_a, 8))
        a.stream.write(b"head", payload.data)
        await b.wait_for_bytes(sum(map(len, to_b)) + 4 + len(payload))
        await a.wait_for_bytes(sum(map(len, to_a)))
        assert b.received == b"".join(to_b) + b"head" + payload.tobytes()
        assert a.received == b"".join(to_a)


@pytest.mark.parametrize("size", PAYLOAD_SIZES)
@on_uvloop
async def test_payload_lands_bit_exact_in_the_owners_buffer(
    open_pairs: OpenPairs, size: int
) -> None:
    async with open_pairs() as [(a, b)]:
        payload = pattern(size, seed=size)
        head, sink = b.expect_frame(size)
        on_sent = OnSent()
        a.stream.write(HEAD.pack(size), payload.data, on_sent)
        await b.wait_for_bytes(HEAD.size + size)
        await poll_until(lambda: on_sent.calls, "on_sent")
        assert HEAD.unpack(head) == (size,)
        assert same_bytes(sink, payload)
        assert b.count == HEAD.size + size and not b.received and on_sent.calls == 1


@on_uvloop
async def test_a_paused_reader_makes_the_writer_wait(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        b.stream.pause_reading()
        b.stream.pause_reading()  # idempotent
        block = pattern(MiB, seed=2)
        writes = 0
        while a.stream.writable:  # TCP: the kernel takes a few MiB, then the queue fills
            assert writes < 256, "256 MiB written and the writer is still writable"
            a.stream.write(HEAD.pack(writes), block.data)
            a.stream.flush()
            writes += 1
            await asyncio.sleep(0)  # let the loop hand what it can to the kernel
        assert writes * (HEAD.size + MiB) > QUEUE_LIMIT
        drained = asyncio.create_task(a.stream.drain())
        await loop_turns()
        assert not drained.done() and not a.stream.writable and b.count == 0
        b.stream.resume_reading()
        b.stream.resume_reading()
        await drained
        assert a.stream.writable
        expected = numbered_blocks(writes, block)
        await b.wait_for_bytes(len(expected))
        assert b.received == expected


@on_uvloop
async def test_pause_from_inside_buffer_updated_stops_delivery(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        paused_at: list[int] = []

        def pause_once() -> None:
            if not paused_at:
                b.stream.pause_reading()
                paused_at.append(b.count)

        b.after_update = pause_once
        data = random_bytes(MiB, seed=3)
        a.stream.write(data)
        a.stream.flush()
        await poll_until(lambda: paused_at, "the first read")
        await loop_turns()
        assert b.count == paused_at[0] < len(data)  # nothing more once paused
        b.stream.resume_reading()
        await b.wait_for_bytes(len(data))
        assert b.received == data


@on_uvloop
async def test_close_delivers_everything_then_connection_lost_once(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        data = random_bytes(12 * MiB, seed=4)  # more than the kernel and the queue limit hold
        view = memoryview(data)
        for start in range(0, len(data), MiB):
            a.stream.write(data[start : start + 10], view[start + 10 : start + MiB])
        a.stream.close()  # with everything still queued
        await b.stream.wait_closed()
        assert b.lost == [None] and b.count_when_lost == len(data) and b.received == data
        await a.stream.wait_closed()
        await loop_turns()
        assert a.lost == [None] and b.lost == [None]


@on_uvloop
async def test_abort_is_a_reset_for_the_peer(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        data = random_bytes(4 * MiB, seed=5)
        a.stream.write(data)
        a.stream.flush()
        await b.wait_for_bytes(1)
        a.stream.abort()
        await b.stream.wait_closed()
        assert len(b.lost) == 1 and isinstance(b.lost[0], ConnectionError), b.lost
        assert data.startswith(b.received)  # queued bytes dropped, never garbled
        await a.stream.wait_closed()
        assert b.stream.closed and a.stream.closed


@on_uvloop
async def test_close_in_the_middle_of_a_frame(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        size, sent = 2 * MiB, MiB + 1
        payload = pattern(size, seed=6)
        head, sink = b.expect_frame(size)
        a.stream.write(HEAD.pack(size), payload.data[:sent])
        a.stream.close()
        await b.stream.wait_closed()
        assert b.lost == [None] and b.count_when_lost == HEAD.size + sent
        assert HEAD.unpack(head) == (size,) and same_bytes(sink[:sent], payload[:sent])


@on_uvloop
async def test_a_paused_end_learns_that_its_peer_is_gone(open_pairs: OpenPairs) -> None:
    async with open_pairs(count=2) as [(a, b), (c, d)]:
        for writer, reader in ((a, b), (c, d)):
            writer.stream.write(b"last words")
            await reader.wait_for_bytes(10)
            reader.stream.pause_reading()
        a.stream.close()
        c.stream.abort()
        for reader in (b, d):
            await poll_until(functools.partial(peer_gone, reader.stream), "peer_alive() False")
            reader.stream.resume_reading()
            await reader.stream.wait_closed()
            assert reader.received == b"last words"
        assert b.lost == [None]
        assert isinstance(d.lost[0], ConnectionError), d.lost


@on_uvloop
async def test_on_sent_waits_until_the_payload_is_handed_over(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        size = 64 * MiB
        payload = pattern(size, seed=7)
        b.stream.pause_reading()
        _head, sink = b.expect_frame(size)
        on_sent = OnSent(hook=lambda: payload.fill(0))  # reuse the payload's memory at once
        a.stream.write(HEAD.pack(size), payload.data, on_sent)
        assert on_sent.calls == 0  # not inside write()
        a.stream.flush()
        await loop_turns()
        assert on_sent.calls == 0  # 64 MiB cannot be handed over while the peer does not read
        b.stream.resume_reading()
        await b.wait_for_bytes(HEAD.size + size)
        await poll_until(lambda: on_sent.calls, "on_sent")
        assert on_sent.calls == 1
        assert same_bytes(sink, pattern(size, seed=7))  # what was sent, not the zeros after


@on_uvloop
async def test_on_sent_never_runs_for_a_dropped_write(open_pairs: OpenPairs) -> None:
    async with open_pairs(count=3) as [(a, b), (c, d), (e, f)]:
        dropped = OnSent()
        b.stream.pause_reading()  # (a, b): 32 MiB, partly handed over, then an abort
        a.stream.write(HEAD.pack(32 * MiB), pattern(32 * MiB).data, dropped)
        a.stream.flush()
        a.stream.write(b"queued behind it", None, dropped)
        a.stream.abort()
        a.stream.write(b"after abort", None, dropped)
        a.stream.flush()
        c.stream.write(b"queued", None, dropped)  # (c, d): aborted before the loop sends it
        c.stream.abort()
        e.stream.close()  # (e, f): nothing queued, so the close begins at once
        e.stream.write(b"after close", None, dropped)
        e.stream.flush()
        b.stream.resume_reading()
        for owner in (a, b, c, d, e, f):
            await owner.stream.wait_closed()
        await loop_turns()
        assert dropped.calls == 0
        assert isinstance(b.lost[0], ConnectionError) and isinstance(d.lost[0], ConnectionError)
        assert d.count == 0 and f.count == 0 and f.lost == [None]


@on_uvloop
async def test_writes_after_close_are_dropped_and_closed_follows(open_pairs: OpenPairs) -> None:
    async with open_pairs() as [(a, b)]:
        closed = asyncio.create_task(a.stream.wait_closed())
        late = OnSent()
        a.stream.write(b"before close")
        a.stream.close()
        a.stream.write(b"after close", memoryview(b" with a payload"), late)  # dropped, no raise
        a.stream.flush()
        assert a.stream.closed is bool(a.lost)  # closed means connection_lost has run
        await closed
        assert a.stream.closed and a.lost == [None] and not a.stream.peer_alive()
        again = asyncio.create_task(a.stream.wait_closed())
        await asyncio.sleep(0)
        assert again.done()  # at once when closed
        await a.stream.drain()  # at once when closed
        a.stream.close()  # all harmless now
        a.stream.abort()
        a.stream.pause_reading()
        a.stream.resume_reading()
        a.stream.write(b"after closed", memoryview(b"payload"), late)
        a.stream.flush()
        await b.stream.wait_closed()
        await loop_turns()
        assert late.calls == 0 and b.received == b"before close" and b.lost == [None]
        assert b.stream.closed and a.lost == [None]


@on_uvloop
async def test_a_hundred_connections_at_once(open_pairs: OpenPairs) -> None:
    async with open_pairs(count=100) as pairs:
        sent = [
            (random_bytes(20 * KiB, 2 * i), random_bytes(30 * KiB, 2 * i + 1)) for i in range(100)
        ]
        for (a, b), (to_b, to_a) in zip(pairs, sent, strict=True):
            a.stream.write(to_b[:100], memoryview(to_b)[100:])
            b.stream.write(to_a)
        await asyncio.gather(
            *(b.wait_for_bytes(len(to_b)) for (_, b), (to_b, _) in zip(pairs, sent, strict=True)),
            *(a.wait_for_bytes(len(to_a)) for (a, _), (_, to_a) in zip(pairs, sent, strict=True)),
        )
        for (a, b), (to_b, to_a) in zip(pairs, sent, strict=True):
            assert b.received == to_b and a.received == to_a
            a.stream.close()
        for _, b in pairs:
            await b.stream.wait_closed()
            assert b.lost == [None]


# == BlockingStream: a blocking client against an event-loop server end =========================
Blocking = tuple[BlockingStream, RecordingOwner]  # the client, and the server end's owner


@asynccontextmanager
async def blocking_clients(
    count: int = 1, read_size: int = READ_SIZE, *, rdma: bool = False, simulated: bool = True
) -> AsyncIterator[list[Blocking]]:
    """``count`` blocking clients, each connected to a server end on this loop (a ``TcpStream``,
    or with ``rdma`` an ``RdmaStream`` on this process's simulated fabric). Call the clients only
    through ``asyncio.to_thread``; their timeout bounds every call."""
    simulator = rdma and simulated
    fabric = rdma_ring.default_provider().fabric if simulator else None  # type: ignore[attr-defined]
    made: list[RecordingOwner] = []
    accepted: asyncio.Queue[RecordingOwner] = asyncio.Queue()

    def server_owner(stream: Stream) -> RecordingOwner:
        made.append(RecordingOwner(stream, read_size))
        accepted.put_nowait(made[-1])
        return made[-1]

    server = await listen(TcpAddress("127.0.0.1", 0, rdma=rdma), server_owner)
    clients: list[BlockingStream] = []
    try:
        address = TcpAddress("127.0.0.1", server.sockets[0].getsockname()[1], rdma=rdma)
        pairs: list[Blocking] = []
        for _ in range(count):  # one at a time, so the n-th accepted end is the n-th client's
            clients.append(
                await asyncio.to_thread(BlockingStream.connect, address, THREAD_TIMEOUT_S)
            )
            clients[-1].settimeout(THREAD_TIMEOUT_S)
            assert clients[-1].peer == f"127.0.0.1:{address.port}"
            pairs.append((clients[-1], await accepted.get()))
        yield pairs
    finally:
        for client in clients:
            client.close()
        await abort_all(made)
        server.close()
        await server.wait_closed()
    check_contract(made)
    if fabric is not None:
        assert fabric.stats.faults == 0, (fabric.stats.as_dict(), fabric.fault_log[:5])


class OpenBlocking(Protocol):
    def __call__(
        self, count: int = 1, read_size: int = READ_SIZE
    ) -> AbstractAsyncContextManager[list[Blocking]]: ...


@pytest.fixture(params=["tcp", "rdma", pytest.param("rdma-device", marks=pytest.mark.rdma)])
def open_blocking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> OpenBlocking:
    """Opens blocking clients of one transport: ``async with open_blocking() as [(c, s)]``
    (``rdma``: on the verbs simulator; ``rdma-device``: on this host's device, else skipped)."""
    if request.param == "tcp":
        return cast(OpenBlocking, blocking_clients)
    if request.param == "rdma-device":
        rdma_device()
        monkeypatch.delenv(rdma_ring.PROVIDER_ENV, raising=False)
        return cast(OpenBlocking, functools.partial(blocking_clients, rdma=True, simulated=False))
    monkeypatch.setenv(rdma_ring.PROVIDER_ENV, "simulator")
    monkeypatch.setattr(rdma_ring, "_simulated", None)  # a fresh fabric for this test
    return cast(OpenBlocking, functools.partial(blocking_clients, rdma=True))


def receive_exactly(stream: BlockingStream, receiver: RecordingOwner, total: int) -> None:
    while receiver.count < total:
        if not stream.receive_into(receiver):
            raise AssertionError(f"EOF after {receiver.count} of {total} bytes")


def receive_until_eof(stream: BlockingStream, receiver: RecordingOwner) -> None:
    while stream.receive_into(receiver):
        pass


def send_chunks(stream: BlockingStream, chunks: list[bytes], seed: int) -> None:
    """Send each chunk as one to three buffers (some empty)."""
    rng = random.Random(seed)
    for chunk in chunks:
        cuts = sorted(rng.randint(0, len(chunk)) for _ in range(rng.randint(0, 2)))
        stream.send(*(memoryview(chunk)[i:j] for i, j in pairwise([0, *cuts, len(chunk)])))


@on_uvloop
async def test_blocking_small_sends_arrive_in_order_both_ways(open_blocking: OpenBlocking) -> None:
    async with open_blocking() as [(client, server)]:
        up, down = small_chunks(11, 3000), small_chunks(12, 3000)
        receiver = RecordingOwner(None)
        sent_down = await write_chunks(server.stream, down, seed=13)

        def talk() -> None:
            send_chunks(client, up, seed=14)
            receive_exactly(client, receiver, sum(map(len, down)))

        await asyncio.to_thread(talk)
        await server.wait_for_bytes(sum(map(len, up)))
        assert server.received == b"".join(up) and receiver.received == b"".join(down)
        await poll_until(lambda: len(sent_down) == len(down), "on_sent")
        assert sent_down == list(range(len(down)))


@on_uvloop
async def test_blocking_one_byte_reads_receive_everything(open_blocking: OpenBlocking) -> None:
    async with open_blocking(read_size=1) as [(client, server)]:
        up, down = small_chunks(15, 300, largest=200), small_chunks(16, 300, largest=200)
        receiver = RecordingOwner(None, read_size=1)
        await write_chunks(server.stream, down, seed=17)

        def talk() -> None:
            send_chunks(client, up, seed=18)
            receive_exactly(client, receiver, sum(map(len, down)))

        await asyncio.to_thread(talk)
        await server.wait_for_bytes(sum(map(len, up)))
        assert server.received == b"".join(up) and receiver.received == b"".join(down)


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("size", PAYLOAD_SIZES)
@on_uvloop
async def test_blocking_payload_lands_bit_exact(
    size: int, direction: str, open_blocking: OpenBlocking
) -> None:
    async with open_blocking() as [(client, server)]:
        payload = pattern(size, seed=size + 1)
        if direction == "up":  # the client sends
            head, sink = server.expect_frame(size)
            await asyncio.to_thread(client.send, HEAD.pack(size), payload.data)
            await server.wait_for_bytes(HEAD.size + size)
            assert not server.received
        else:
            receiver = RecordingOwner(None)
            head, sink = receiver.expect_frame(size)
            server.stream.write(HEAD.pack(size), payload.data)
            await asyncio.to_thread(receive_exactly, client, receiver, HEAD.size + size)
            assert receiver.count == HEAD.size + size and not receiver.received
        assert HEAD.unpack(head) == (size,) and same_bytes(sink, payload)


@on_uvloop
async def test_blocking_send_blocks_while_the_peer_does_not_read(
    open_blocking: OpenBlocking,
) -> None:
    async with open_blocking() as [(client, server)]:
        server.stream.pause_reading()
        block = pattern(MiB, seed=19).data
        client.settimeout(0.5)  # the documented way out of a send that cannot proceed
        with pytest.raises(TimeoutError):  # 256 MiB: more than the kernel holds
            await asyncio.to_thread(client.send, *[block] * 256)
        assert server.count == 0


@on_uvloop
async def test_blocking_reader_that_does_not_read_makes_the_server_wait(
    open_blocking: OpenBlocking,
) -> None:
    async with open_blocking() as [(client, server)]:
        block = pattern(MiB, seed=20)
        writes = 0
        while server.stream.writable:
            assert writes < 256, "256 MiB written and the server is still writable"
            server.stream.write(HEAD.pack(writes), block.data)
            server.stream.flush()
            writes += 1
            await asyncio.sleep(0)
        drained = asyncio.create_task(server.stream.drain())
        await loop_turns()
        assert not drained.done()  # the client has not read yet
        expected = numbered_blocks(writes, block)
        receiver = RecordingOwner(None)
        await asyncio.gather(
            asyncio.to_thread(receive_exactly, client, receiver, len(expected)), drained
        )
        assert server.stream.writable and receiver.received == expected


@on_uvloop
async def test_blocking_end_sees_eof_after_the_server_closes(open_blocking: OpenBlocking) -> None:
    async with open_blocking() as [(client, server)]:
        data = random_bytes(12 * MiB, seed=21)
        server.stream.write(data[:10], memoryview(data)[10:])
        server.stream.close()
        receiver = RecordingOwner(None)
        await asyncio.to_thread(receive_until_eof, client, receiver)
        assert receiver.received == data
        await server.stream.wait_closed()
        assert server.lost == [None]


@on_uvloop
async def test_blocking_end_sees_a_reset_after_the_server_aborts(
    open_blocking: OpenBlocking,
) -> None:
    async with open_blocking() as [(client, server)]:
        data = random_bytes(4 * MiB, seed=22)
        server.stream.write(data)
        server.stream.flush()
        receiver = RecordingOwner(None)
        await asyncio.to_thread(receive_exactly, client, receiver, 1)
        server.stream.abort()
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(receive_until_eof, client, receiver)
        assert data.startswith(receiver.received)


@on_uvloop
async def test_server_sees_everything_then_the_blocking_close(open_blocking: OpenBlocking) -> None:
    async with open_blocking(count=2) as [(client, server), (half_closer, server2)]:
        data = random_bytes(12 * MiB, seed=23)
        await asyncio.to_thread(client.send, data[:10], memoryview(data)[10:])
        client.close()
        client.close()  # idempotent
        assert client.closed
        await server.stream.wait_closed()
        assert server.lost == [None] and server.count_when_lost == len(data)
        assert server.received == data

        await asyncio.to_thread(half_closer.send, b"one way")  # then EOF; the server closes too
        half_closer.shutdown_write()
        await server2.stream.wait_closed()
        assert server2.lost == [None] and server2.received == b"one way"
        receiver = RecordingOwner(None)
        assert await asyncio.to_thread(half_closer.receive_into, receiver) == 0


@on_uvloop
async def test_blocking_close_in_the_middle_of_a_frame(open_blocking: OpenBlocking) -> None:
    async with open_blocking() as [(client, server)]:
        size, sent = 2 * MiB, MiB + 1
        payload = pattern(size, seed=24)
        head, sink = server.expect_frame(size)
        await asyncio.to_thread(client.send, HEAD.pack(size), payload.data[:sent])
        client.close()
        await server.stream.wait_closed()
        assert server.lost == [None] and server.count_when_lost == HEAD.size + sent
        assert HEAD.unpack(head) == (size,) and same_bytes(sink[:sent], payload[:sent])


@on_uvloop
async def test_blocking_send_returns_once_the_payload_may_be_reused(
    open_blocking: OpenBlocking,
) -> None:
    async with open_blocking() as [(client, server)]:
        size = 64 * MiB
        payload = pattern(size, seed=25)
        _head, sink = server.expect_frame(size)

        def send_then_reuse() -> None:
            client.send(HEAD.pack(size), payload.data)
            payload.fill(0)

        await asyncio.to_thread(send_then_reuse)
        await server.wait_for_bytes(HEAD.size + size)
        assert same_bytes(sink, pattern(size, seed=25))


@on_uvloop
async def test_a_hundred_blocking_clients_at_once(open_blocking: OpenBlocking) -> None:
    async with open_blocking(count=100) as pairs:
        sent = [
            (random_bytes(20 * KiB, 2 * i), random_bytes(30 * KiB, 2 * i + 1)) for i in range(100)
        ]
        receivers = [RecordingOwner(None) for _ in pairs]
        for (_, server), (_, down) in zip(pairs, sent, strict=True):
            server.stream.write(down)

        def talk() -> None:  # every connection is open; each sends, then each receives
            for (client, _), (up, _) in zip(pairs, sent, strict=True):
                client.send(up)
            for (client, _), (_, down), receiver in zip(pairs, sent, receivers, strict=True):
                receive_exactly(client, receiver, len(down))

        await asyncio.to_thread(talk)
        for (_, server), (up, down), receiver in zip(pairs, sent, receivers, strict=True):
            await server.wait_for_bytes(len(up))
            assert server.received == up and receiver.received == down
