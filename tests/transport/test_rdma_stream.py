"""What the RDMA stream must do beyond the conformance suite (which runs it too, on the
simulator): credits that hold when both ends write and read at once, thousands of round trips
without starving either side, a peer that dies without a word, and a wrong configuration
refused. Every case checks that the simulator saw no fault (no RNR, no access or length error,
no CQ overrun): the transport is held to never triggering one."""

from __future__ import annotations

import asyncio

import pytest
from test_stream_conformance import (
    HEAD,
    RecordingOwner,
    on_uvloop,
    pattern,
    peer_gone,
    poll_until,
    same_bytes,
)

from bitfusion_net.transport.rdma import RingConfig, rdma_stream_pair
from bitfusion_net.transport.rdma_ring import SIGNAL_EVERY
from bitfusion_net.transport.verbs import Fabric, SimulatedProvider

MiB = 2**20


def _pair(config: RingConfig | None = None) -> tuple[Fabric, RecordingOwner, RecordingOwner]:
    fabric = Fabric(devices=("sim0", "sim1"))
    first, second = rdma_stream_pair(SimulatedProvider(fabric), ("sim0", "sim1"), config)
    a, b = RecordingOwner(first), RecordingOwner(second)
    first.start(a)
    second.start(b)
    return fabric, a, b


@on_uvloop
async def test_both_ends_writing_and_reading_at_once_never_deadlock_on_credits() -> None:
    fabric, a, b = _pair(RingConfig(slots=4, slot_size=4096, control=6, credit_batch=2))
    size = 8 * MiB  # 2048 slots each way through rings of four
    to_b, to_a = pattern(size, seed=1), pattern(size, seed=2)
    _, sink_b = b.expect_frame(size)
    _, sink_a = a.expect_frame(size)
    a.stream.write(HEAD.pack(size), to_b.data)
    b.stream.write(HEAD.pack(size), to_a.data)
    await asyncio.gather(b.wait_for_bytes(HEAD.size + size), a.wait_for_bytes(HEAD.size + size))
    assert same_bytes(sink_b, to_b) and same_bytes(sink_a, to_a)
    assert fabric.stats.faults == 0
    a.stream.close()
    await b.stream.wait_closed()
    assert b.lost == [None] and a.lost == [None]


@on_uvloop
async def test_one_send_in_signal_every_asks_for_a_completion() -> None:
    """A bulk stream polls one send completion per SIGNAL_EVERY writes (the CLOSE's too), and
    the unsignaled writes still free their send-queue slots: the simulator, which refuses a post
    to a full send queue, sees no fault."""
    fabric, a, b = _pair(RingConfig(slots=4, slot_size=4096, control=6, credit_batch=2))
    cq = a.stream._ring.end.send_cq
    polled: list[int] = []
    poll = cq.poll
    cq.poll = lambda n=16: polled.append(len(found := poll(n))) or found  # type: ignore[method-assign]
    size = 4 * MiB  # 1024 writes of a slot
    _, sink = b.expect_frame(size)
    a.stream.write(HEAD.pack(size), pattern(size, seed=3).data)
    await b.wait_for_bytes(HEAD.size + size)
    a.stream.close()
    await b.stream.wait_closed()
    # a's slot writes, one in SIGNAL_EVERY signaled; then its CLOSE (and any CREDIT it owed b)
    signaled = (HEAD.size + size + 4095) // 4096 // SIGNAL_EVERY
    assert signaled + 1 <= sum(polled) <= signaled + 8, (sum(polled), signaled)
    assert fabric.stats.faults == 0 and same_bytes(sink, pattern(size, seed=3))


@on_uvloop
async def test_thousands_of_round_trips_keep_their_credits() -> None:
    fabric, a, b = _pair(RingConfig(slots=2, slot_size=1024, control=4, credit_batch=1))
    for number in range(1000):
        a.stream.write(HEAD.pack(number))
        await b.wait_for_bytes(HEAD.size * (number + 1))
        b.stream.write(HEAD.pack(number))
        await a.wait_for_bytes(HEAD.size * (number + 1))
    assert a.received == b.received == b"".join(HEAD.pack(n) for n in range(1000))
    assert fabric.stats.faults == 0
    a.stream.abort()
    await b.stream.wait_closed()
    assert isinstance(b.lost[0], ConnectionError)


@on_uvloop
async def test_a_peer_that_dies_without_a_word_is_found_out() -> None:
    fabric, a, b = _pair()
    a.stream.write(b"hello")
    await b.wait_for_bytes(5)
    fabric.crash(a.stream._ring.end.ctx)  # its process died: nothing is sent, its QP is gone
    await poll_until(lambda: peer_gone(b.stream), "peer_alive() False")
    await b.stream.wait_closed()
    assert isinstance(b.lost[0], ConnectionError) and "peer is gone" in str(b.lost[0])
    assert fabric.stats.faults == 0  # a dead peer is not a transport fault
    a.stream.abort()


def test_configurations_that_could_deadlock_are_refused() -> None:
    with pytest.raises(ValueError, match="control receives"):
        RingConfig(control=2, credit_batch=4)
    with pytest.raises(ValueError, match="never repaid"):
        RingConfig(slots=2, credit_batch=4, control=8)


def test_rdma_addresses_parse_and_print_with_their_scheme() -> None:
    from bitfusion_net.transport import parse_address

    address = parse_address("rdma://[::1]:7000")
    assert address.rdma and not address.tls and str(address) == "rdma://[::1]:7000"
    assert not parse_address("tcp://h:1").rdma


@on_uvloop
async def test_set_ups_that_never_finish_hold_at_most_max_pending_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends its hello and never says ``ready`` holds a registered end on the
    server until the set-up times out; hellos beyond ``max_pending`` are refused at once, and a
    finished or timed-out set-up makes room again."""
    from bitfusion_net.transport import TcpAddress, rdma, rdma_ring

    monkeypatch.setattr(rdma, "SETUP_TIMEOUT_S", 1.0)
    fabric = Fabric(devices=("sim0", "sim1"))
    provider, config = (
        SimulatedProvider(fabric),
        RingConfig(slots=2, slot_size=1024, credit_batch=1),
    )
    accepted: list[RecordingOwner] = []
    server = await rdma.listen_rdma(
        TcpAddress("127.0.0.1", 0),
        lambda stream: accepted.append(RecordingOwner(stream)) or accepted[-1],
        provider=provider,
        config=config,
        max_pending=2,
    )
    port = server.sockets[0].getsockname()[1]
    ends = []

    async def hello() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        end = rdma_ring.RingEnd(provider, rdma_ring.DeviceSettings("sim1"), config)
        ends.append(end)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(rdma_ring.hello(end, config, 1))
        await writer.drain()
        return reader, writer, await asyncio.wait_for(reader.readline(), 5)

    try:
        first, second, third = [await hello() for _ in range(3)]
        assert first[2].startswith(b"{") and second[2].startswith(b"{")
        assert third[2] == b""  # refused: closed without a hello
        await asyncio.sleep(1.5)  # the two time out, their ends freed
        assert await first[0].read() == b"" and await second[0].read() == b""
        fourth = await hello()
        assert fourth[2].startswith(b"{")  # room again
        fourth[1].close()
        assert not accepted and fabric.stats.faults == 0
    finally:
        server.close()
        await server.wait_closed()
        for end in ends:
            end.close()
