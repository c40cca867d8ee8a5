"""The verbs simulator rejects what real verbs reject, and moves real bytes when they accept.

Every test joins two RC QPs, each on its own simulated device of one ``Fabric`` (two hosts), and
checks one rule: SEND/RECV and RDMA WRITE/READ data and completions; REM_ACCESS_ERR for a wrong
rkey, out of bounds, or a missing access flag, with both QPs in ERR; RNR when no receive is
posted; LOC_LEN_ERR for a receive too small; LOC_PROT_ERR for bad local SGEs; CQ overrun; flush
on ERR; a dead peer showing as RETRY_EXC_ERR; work-queue limits; the completion channel's
arming rules, on an event loop through ``loop.add_reader``; two threads posting at once.
Nothing touches a network; the thread and event-loop tests are bounded by ``TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import select
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from bitfusion_net.transport import loop_factory
from bitfusion_net.transport.verbs import (
    Access,
    CompletionChannel,
    CompletionQueue,
    DeviceContext,
    Fabric,
    MemoryRegion,
    ProtectionDomain,
    QpEndpoint,
    QpState,
    QueuePair,
    Sge,
    SimulatedProvider,
    VerbsError,
    WcOpcode,
    WcStatus,
    WorkCompletion,
    WrOpcode,
)

TIMEOUT_S = 20
BUF = 64 * 1024
EVERYTHING = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ


@dataclass
class Side:
    """One host's end: a context, PD, channel, one CQ for sends and receives, a QP and one
    registered 64 KiB buffer."""

    ctx: DeviceContext
    pd: ProtectionDomain
    channel: CompletionChannel
    cq: CompletionQueue
    qp: QueuePair
    buf: np.ndarray
    mr: MemoryRegion

    def close(self) -> None:
        self.qp.close()
        self.mr.deregister()
        self.cq.close()
        self.channel.close()
        self.pd.close()
        self.ctx.close()


def make_side(
    fabric: Fabric,
    device: str,
    *,
    cqe: int = 256,
    max_send_wr: int = 16,
    max_recv_wr: int = 16,
    access: Access = EVERYTHING,
) -> Side:
    ctx = SimulatedProvider(fabric).open(device)
    pd = ctx.alloc_pd()
    channel = ctx.create_comp_channel()
    cq = ctx.create_cq(cqe, channel)
    qp = pd.create_qp(cq, cq, max_send_wr=max_send_wr, max_recv_wr=max_recv_wr)
    buf = np.zeros(BUF, dtype=np.uint8)
    mr = pd.register(memoryview(buf), access)
    return Side(ctx, pd, channel, cq, qp, buf, mr)


def join(a: Side, b: Side, psn_a: int = 0x1234, psn_b: int = 0xABCDE) -> None:
    """What the transport does over its TCP control connection: swap endpoints, connect."""
    ea, eb = a.qp.endpoint(psn_a), b.qp.endpoint(psn_b)
    a.qp.connect(eb)
    b.qp.connect(ea)


@pytest.fixture
def fabric() -> Fabric:
    return Fabric(("sim0", "sim1"))


@pytest.fixture
def pair(fabric: Fabric) -> tuple[Side, Side]:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    join(a, b)
    return a, b


def poll_all(cq: CompletionQueue) -> list[WorkCompletion]:
    out: list[WorkCompletion] = []
    while wcs := cq.poll(4):
        out.extend(wcs)
    return out


def fill(side: Side, offset: int, data: bytes) -> None:
    side.buf[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)


def read(side: Side, offset: int, n: int) -> bytes:
    return side.buf[offset : offset + n].tobytes()


# -- data and completions -------------------------------------------------------------------------


def test_send_lands_in_the_posted_receive(pair: tuple[Side, Side], fabric: Fabric) -> None:
    a, b = pair
    b.qp.post_recv(7, b.mr.sge(1000, 100))
    fill(a, 0, b"hello, verbs")
    a.qp.post_send(42, WrOpcode.SEND, a.mr.sge(0, 12))

    assert read(b, 1000, 12) == b"hello, verbs"
    assert poll_all(b.cq) == [WorkCompletion(7, WcStatus.SUCCESS, WcOpcode.RECV, 12, b.qp.qpn)]
    assert poll_all(a.cq) == [WorkCompletion(42, WcStatus.SUCCESS, WcOpcode.SEND, 12, a.qp.qpn)]
    stats = fabric.stats
    assert (stats.sends, stats.bytes_sent, stats.faults) == (1, 12, 0)


def test_send_with_imm_and_zero_length_send(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.qp.post_recv(1, b.mr.sge(0, 16))
    b.qp.post_recv(2, None)  # a zero-length SEND needs no buffer
    fill(a, 0, b"abc")
    a.qp.post_send(10, WrOpcode.SEND_WITH_IMM, a.mr.sge(0, 3), imm_data=0xDEADBEEF)
    a.qp.post_send(11, WrOpcode.SEND, None)

    first, second = poll_all(b.cq)
    assert (first.wr_id, first.opcode, first.byte_len, first.imm_data) == (
        1,
        WcOpcode.RECV,
        3,
        0xDEADBEEF,
    )
    assert (second.wr_id, second.ok, second.byte_len, second.imm_data) == (2, True, 0, None)
    assert [wc.wr_id for wc in poll_all(a.cq)] == [10, 11]


def test_completions_come_in_post_order_and_unsignaled_sends_make_none(
    pair: tuple[Side, Side],
) -> None:
    a, b = pair
    for i in range(10):
        b.qp.post_recv(100 + i, b.mr.sge(i * 100, 100))
    for i in range(10):
        fill(a, i * 10, bytes([i]) * 10)
        a.qp.post_send(i, WrOpcode.SEND, a.mr.sge(i * 10, 10), signaled=i % 3 == 2)

    assert [wc.wr_id for wc in poll_all(b.cq)] == [100 + i for i in range(10)]
    assert [wc.wr_id for wc in poll_all(a.cq)] == [2, 5, 8]
    for i in range(10):
        assert read(b, i * 100, 10) == bytes([i]) * 10


def test_rdma_write_and_read_move_bytes_without_receives(
    pair: tuple[Side, Side], fabric: Fabric
) -> None:
    a, b = pair
    payload = os.urandom(5000)
    fill(a, 0, payload)
    a.qp.post_send(
        1,
        WrOpcode.RDMA_WRITE,
        a.mr.sge(0, 5000),
        remote_addr=b.mr.addr + 60000 - 5000,
        rkey=b.mr.rkey,
    )
    assert read(b, 55000, 5000) == payload

    fill(b, 100, b"remote bytes")
    a.qp.post_send(
        2, WrOpcode.RDMA_READ, a.mr.sge(9000, 12), remote_addr=b.mr.addr + 100, rkey=b.mr.rkey
    )
    assert read(a, 9000, 12) == b"remote bytes"

    assert [(wc.wr_id, wc.opcode, wc.byte_len) for wc in poll_all(a.cq)] == [
        (1, WcOpcode.RDMA_WRITE, 5000),
        (2, WcOpcode.RDMA_READ, 12),
    ]
    assert poll_all(b.cq) == []  # one-sided: the responder's CPU hears nothing
    stats = fabric.stats
    assert (stats.writes, stats.reads, stats.bytes_written, stats.bytes_read) == (1, 1, 5000, 12)


def test_write_with_imm_consumes_a_receive_and_reports_the_length(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.qp.post_recv(5, None)
    b.qp.post_recv(6, None)
    fill(a, 0, b"x" * 300)
    a.qp.post_send(
        1,
        WrOpcode.RDMA_WRITE_WITH_IMM,
        a.mr.sge(0, 300),
        remote_addr=b.mr.addr,
        rkey=b.mr.rkey,
        imm_data=77,
    )
    # Zero bytes: no rkey is checked (the IB rule), only the immediate data travels.
    a.qp.post_send(2, WrOpcode.RDMA_WRITE_WITH_IMM, None, imm_data=78)

    assert read(b, 0, 300) == b"x" * 300
    assert [(wc.wr_id, wc.opcode, wc.byte_len, wc.imm_data) for wc in poll_all(b.cq)] == [
        (5, WcOpcode.RECV_RDMA_WITH_IMM, 300, 77),
        (6, WcOpcode.RECV_RDMA_WITH_IMM, 0, 78),
    ]
    assert [wc.opcode for wc in poll_all(a.cq)] == [WcOpcode.RDMA_WRITE, WcOpcode.RDMA_WRITE]


def test_memory_region_is_the_buffer_itself() -> None:
    fabric = Fabric()
    side = make_side(fabric, "sim0")
    assert side.mr.addr == side.buf.ctypes.data
    assert side.mr.length == BUF
    side.mr.view[3] = 99
    assert side.buf[3] == 99
    assert side.mr.lkey != side.mr.rkey
    assert side.mr.sge(10, 5) == Sge(side.mr.addr + 10, 5, side.mr.lkey)
    with pytest.raises(ValueError):
        side.mr.sge(BUF - 1, 2)


# -- one-sided access rules: REM_ACCESS_ERR, both QPs to ERR --------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "wrong rkey",
        "an lkey for an rkey",
        "past the end",
        "before the start",
        "no REMOTE_WRITE",
        "no REMOTE_READ",
        "QP forbids",
    ],
)
def test_bad_one_sided_operations_fail_with_remote_access_error(case: str, fabric: Fabric) -> None:
    a = make_side(fabric, "sim0")
    b_access = {
        "no REMOTE_WRITE": Access.LOCAL_WRITE | Access.REMOTE_READ,
        "no REMOTE_READ": Access.LOCAL_WRITE | Access.REMOTE_WRITE,
    }.get(case, EVERYTHING)
    b = make_side(fabric, "sim1", access=b_access)
    ea, eb = a.qp.endpoint(1), b.qp.endpoint(2)
    a.qp.connect(eb)
    b.qp.connect(ea, access=Access.LOCAL_WRITE if case == "QP forbids" else EVERYTHING)
    b.qp.post_recv(9, b.mr.sge(0, 64))

    opcode = WrOpcode.RDMA_READ if case == "no REMOTE_READ" else WrOpcode.RDMA_WRITE
    addr, rkey, length = b.mr.addr, b.mr.rkey, 64
    if case == "wrong rkey":
        rkey ^= 1
    elif case == "an lkey for an rkey":
        rkey = b.mr.lkey
    elif case == "past the end":
        addr = b.mr.addr + BUF - 63
    elif case == "before the start":
        addr = b.mr.addr - 1
    b.buf[:] = 5
    a.qp.post_send(1, opcode, a.mr.sge(0, length), remote_addr=addr, rkey=rkey)

    [wc] = poll_all(a.cq)
    assert (wc.wr_id, wc.status) == (1, WcStatus.REM_ACCESS_ERR)
    assert a.qp.state is QpState.ERR and b.qp.state is QpState.ERR
    assert [(wc.wr_id, wc.status) for wc in poll_all(b.cq)] == [(9, WcStatus.WR_FLUSH_ERR)]
    assert (b.buf == 5).all()  # nothing was written
    assert fabric.stats.access_errors == 1
    assert any("remote access" in line for line in fabric.fault_log)


def test_rkey_of_another_protection_domain_is_refused(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    join(a, b)
    other_pd = b.ctx.alloc_pd()
    other = other_pd.register(bytearray(4096), EVERYTHING)
    a.qp.post_send(1, WrOpcode.RDMA_WRITE, a.mr.sge(0, 8), remote_addr=other.addr, rkey=other.rkey)
    assert poll_all(a.cq)[0].status is WcStatus.REM_ACCESS_ERR
    assert b.qp.state is QpState.ERR


# -- local SGE rules: LOC_PROT_ERR ----------------------------------------------------------------


def test_bad_local_sge_fails_with_local_protection_error(
    pair: tuple[Side, Side], fabric: Fabric
) -> None:
    a, b = pair
    a.qp.post_send(1, WrOpcode.SEND, Sge(a.mr.addr, 8, a.mr.lkey ^ 0x10))
    [wc] = poll_all(a.cq)
    assert wc.status is WcStatus.LOC_PROT_ERR
    assert a.qp.state is QpState.ERR
    assert b.qp.state is QpState.RTS  # nothing reached the peer
    assert fabric.stats.local_protection_errors == 1


def test_sge_outside_its_region_fails(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    a.qp.post_send(1, WrOpcode.RDMA_WRITE, Sge(a.mr.addr + BUF - 4, 8, a.mr.lkey), rkey=1)
    assert poll_all(a.cq)[0].status is WcStatus.LOC_PROT_ERR


def test_read_into_a_region_without_local_write_fails(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    join(a, b)
    readonly = a.pd.register(bytearray(64), Access.REMOTE_READ)
    a.qp.post_send(1, WrOpcode.RDMA_READ, readonly.sge(), remote_addr=b.mr.addr, rkey=b.mr.rkey)
    assert poll_all(a.cq)[0].status is WcStatus.LOC_PROT_ERR
    assert a.qp.state is QpState.ERR


def test_receive_into_a_region_without_local_write_errors_both_sides(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    join(a, b)
    readonly = b.pd.register(bytearray(64), Access(0))
    b.qp.post_recv(3, readonly.sge())
    a.qp.post_send(1, WrOpcode.SEND, a.mr.sge(0, 8))
    assert [(wc.wr_id, wc.status) for wc in poll_all(b.cq)] == [(3, WcStatus.LOC_PROT_ERR)]
    assert [(wc.wr_id, wc.status) for wc in poll_all(a.cq)] == [(1, WcStatus.REM_OP_ERR)]
    assert a.qp.state is QpState.ERR and b.qp.state is QpState.ERR


# -- RNR and receive length -----------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [WrOpcode.SEND, WrOpcode.RDMA_WRITE_WITH_IMM])
def test_message_with_no_receive_posted_is_an_rnr(
    opcode: WrOpcode, pair: tuple[Side, Side], fabric: Fabric
) -> None:
    a, b = pair
    imm = 1 if opcode.has_imm else None
    a.qp.post_send(1, opcode, a.mr.sge(0, 8), remote_addr=b.mr.addr, rkey=b.mr.rkey, imm_data=imm)
    [wc] = poll_all(a.cq)
    assert wc.status is WcStatus.RNR_RETRY_EXC_ERR
    assert a.qp.state is QpState.ERR
    assert b.qp.state is QpState.RTS  # the responder only said "not ready"
    assert fabric.stats.rnr_events == 1
    assert fabric.stats.faults == 1


def test_receive_too_small_is_a_length_error_on_both_sides(
    pair: tuple[Side, Side], fabric: Fabric
) -> None:
    a, b = pair
    b.qp.post_recv(1, b.mr.sge(0, 10))
    b.qp.post_recv(2, b.mr.sge(10, 100))
    a.qp.post_send(5, WrOpcode.SEND, a.mr.sge(0, 11))
    assert [(wc.wr_id, wc.status) for wc in poll_all(b.cq)] == [
        (1, WcStatus.LOC_LEN_ERR),
        (2, WcStatus.WR_FLUSH_ERR),
    ]
    assert [(wc.wr_id, wc.status) for wc in poll_all(a.cq)] == [(5, WcStatus.REM_INV_REQ_ERR)]
    assert a.qp.state is QpState.ERR and b.qp.state is QpState.ERR
    assert fabric.stats.length_errors == 1


# -- CQ overrun, flush, dead peer -----------------------------------------------------------------


def test_cq_overrun_errors_the_cq_and_its_qps(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0", cqe=2), make_side(fabric, "sim1")
    join(a, b)
    for i in range(3):
        b.qp.post_recv(i, b.mr.sge(0, 8))
    for i in range(3):  # the third completion has no room in a's 2-entry CQ
        a.qp.post_send(i, WrOpcode.SEND, a.mr.sge(0, 8))
    with pytest.raises(VerbsError, match="CQ overrun") as raised:
        a.cq.poll()
    assert raised.value.errno == errno.EOVERFLOW
    assert a.qp.state is QpState.ERR
    assert fabric.stats.cq_overruns == 1
    assert len(poll_all(b.cq)) == 3  # the peer's CQ is fine


def test_error_state_flushes_outstanding_and_later_work(
    pair: tuple[Side, Side], fabric: Fabric
) -> None:
    a, b = pair
    for i in range(3):
        a.qp.post_recv(i, a.mr.sge(i * 8, 8))
    a.qp.to_error()
    a.qp.post_recv(3, a.mr.sge(0, 8))
    a.qp.post_send(4, WrOpcode.SEND, a.mr.sge(0, 8), signaled=False)  # failures always complete
    wcs = poll_all(a.cq)
    assert [(wc.wr_id, wc.status) for wc in wcs] == [(i, WcStatus.WR_FLUSH_ERR) for i in range(5)]
    # Only wr_id, status and qp_num mean anything on an error completion: wr_id must say what
    # the WR was (a receive's flush does not say RECV).
    assert {(wc.qp_num, wc.opcode, wc.byte_len) for wc in wcs} == {(a.qp.qpn, WcOpcode.SEND, 0)}
    assert fabric.stats.flushed == 5
    assert fabric.stats.faults == 0
    # The peer was not told; it finds out when it sends.
    assert b.qp.state is QpState.RTS
    b.qp.post_send(9, WrOpcode.SEND, b.mr.sge(0, 8))
    assert poll_all(b.cq)[0].status is WcStatus.RETRY_EXC_ERR


def test_dead_peer_shows_as_retry_exceeded(pair: tuple[Side, Side], fabric: Fabric) -> None:
    a, b = pair
    a.qp.post_recv(1, a.mr.sge(0, 8))
    b.qp.close()
    assert a.qp.state is QpState.RTS  # an idle survivor learns nothing
    a.qp.post_send(2, WrOpcode.SEND, a.mr.sge(0, 8))
    assert [(wc.wr_id, wc.status) for wc in poll_all(a.cq)] == [
        (2, WcStatus.RETRY_EXC_ERR),
        (1, WcStatus.WR_FLUSH_ERR),
    ]
    assert a.qp.state is QpState.ERR
    assert fabric.stats.retry_exceeded == 1
    assert fabric.stats.faults == 0


def test_crashed_peer_process_shows_as_retry_exceeded(
    pair: tuple[Side, Side], fabric: Fabric
) -> None:
    a, b = pair
    fabric.crash(b.ctx)
    a.qp.post_send(1, WrOpcode.RDMA_WRITE, a.mr.sge(0, 8), remote_addr=b.mr.addr, rkey=b.mr.rkey)
    assert poll_all(a.cq)[0].status is WcStatus.RETRY_EXC_ERR
    with pytest.raises(VerbsError) as raised:
        b.qp.post_recv(1, None)
    assert raised.value.errno == errno.EBADF
    a.close()


@pytest.mark.parametrize("fault", ["peer in RESET", "PSN mismatch", "peer connected elsewhere"])
def test_sends_nobody_acknowledges_fail_with_retry_exceeded(fault: str, fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    ea, eb = a.qp.endpoint(10), b.qp.endpoint(20)
    a.qp.connect(eb)
    if fault == "PSN mismatch":
        b.qp.connect(QpEndpoint(ea.qpn, 11, ea.gid, ea.lid))
    elif fault == "peer connected elsewhere":
        c = make_side(fabric, "sim0")
        b.qp.connect(c.qp.endpoint(0))
    if b.qp.state is not QpState.RESET:
        b.qp.post_recv(1, b.mr.sge(0, 8))
    a.qp.post_send(1, WrOpcode.SEND, a.mr.sge(0, 8))
    assert poll_all(a.cq)[0].status is WcStatus.RETRY_EXC_ERR
    assert poll_all(b.cq) == []


# -- state and queue rules (synchronous VerbsError) -----------------------------------------------


def test_posting_in_the_wrong_state_raises(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    for post in (
        lambda: a.qp.post_send(1, WrOpcode.SEND, None),
        lambda: a.qp.post_recv(1, None),
    ):
        with pytest.raises(VerbsError, match="RESET") as raised:
            post()
        assert raised.value.errno == errno.EINVAL
    join(a, b)
    with pytest.raises(VerbsError, match="RESET"):
        a.qp.connect(b.qp.endpoint(0))


def test_connecting_to_a_missing_endpoint_raises(fabric: Fabric) -> None:
    a = make_side(fabric, "sim0")
    for endpoint in (
        QpEndpoint(0x7777, 0, a.ctx.gid(), 0),
        QpEndpoint(a.qp.qpn, 0, bytes(16), 0),
    ):
        with pytest.raises(VerbsError) as raised:
            a.qp.connect(endpoint)
        assert raised.value.errno == errno.ENOENT
    assert a.qp.state is QpState.RESET


def test_send_queue_slots_are_freed_only_by_polling_a_signaled_completion(
    fabric: Fabric,
) -> None:
    a, b = make_side(fabric, "sim0", max_send_wr=4), make_side(fabric, "sim1")
    join(a, b)
    for i in range(4):
        a.qp.post_send(i, WrOpcode.RDMA_WRITE, None, signaled=False)
    with pytest.raises(VerbsError, match="send queue") as raised:
        a.qp.post_send(4, WrOpcode.RDMA_WRITE, None)
    assert raised.value.errno == errno.ENOMEM
    assert poll_all(a.cq) == []  # unsignaled: nothing to poll, so nothing is freed

    c, d = make_side(fabric, "sim0", max_send_wr=4), make_side(fabric, "sim1")
    join(c, d)
    for i in range(4):
        c.qp.post_send(i, WrOpcode.RDMA_WRITE, None, signaled=i == 3)
    with pytest.raises(VerbsError):
        c.qp.post_send(4, WrOpcode.RDMA_WRITE, None)  # completed, not yet polled
    assert [wc.wr_id for wc in poll_all(c.cq)] == [3]
    for i in range(4):  # polling the signaled one freed all four
        c.qp.post_send(10 + i, WrOpcode.RDMA_WRITE, None)


def test_receive_queue_limit(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1", max_recv_wr=2)
    join(a, b)
    b.qp.post_recv(1, None)
    b.qp.post_recv(2, None)
    with pytest.raises(VerbsError, match="receive queue") as raised:
        b.qp.post_recv(3, None)
    assert raised.value.errno == errno.ENOMEM
    a.qp.post_send(1, WrOpcode.SEND, None)
    with pytest.raises(VerbsError):
        b.qp.post_recv(3, None)  # consumed, but its completion is not yet polled
    assert len(poll_all(b.cq)) == 1
    b.qp.post_recv(3, None)


def test_argument_checks_raise_value_error(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="imm_data"):
        a.qp.post_send(1, WrOpcode.SEND_WITH_IMM, None)
    with pytest.raises(ValueError, match="imm_data"):
        a.qp.post_send(1, WrOpcode.SEND, None, imm_data=3)
    with pytest.raises(ValueError, match="wr_id"):
        a.qp.post_send(-1, WrOpcode.SEND, None)
    with pytest.raises(ValueError, match="psn"):
        a.qp.endpoint(1 << 24)
    with pytest.raises(ValueError, match="inline"):
        a.qp.post_send(1, WrOpcode.RDMA_READ, a.mr.sge(0, 4), inline=True)
    with pytest.raises(VerbsError, match="max_inline"):
        a.qp.post_send(1, WrOpcode.SEND, a.mr.sge(0, 4), inline=True)


def test_inline_send_copies_at_post_time(fabric: Fabric) -> None:
    a, b = make_side(fabric, "sim0"), make_side(fabric, "sim1")
    qp = a.pd.create_qp(a.cq, a.cq, 4, 4, max_inline=64)
    ea, eb = qp.endpoint(0), b.qp.endpoint(0)
    qp.connect(eb)
    b.qp.connect(ea)
    b.qp.post_recv(1, b.mr.sge(0, 64))
    scratch = ctypes.create_string_buffer(b"unregistered", 12)
    qp.post_send(1, WrOpcode.SEND, Sge(ctypes.addressof(scratch), 12, 0), inline=True)
    assert read(b, 0, 12) == b"unregistered"


# -- registration and teardown rules --------------------------------------------------------------


def test_registration_rules(fabric: Fabric) -> None:
    side = make_side(fabric, "sim0")
    with pytest.raises(VerbsError, match="REMOTE_WRITE requires LOCAL_WRITE"):
        side.pd.register(bytearray(8), Access.REMOTE_WRITE)
    with pytest.raises(ValueError, match="read-only"):
        side.pd.register(bytes(8), Access.LOCAL_WRITE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        side.pd.register(bytearray(), Access.LOCAL_WRITE)
    with pytest.raises(ValueError):
        side.pd.register(memoryview(np.zeros((4, 4))[:, 1]), Access.LOCAL_WRITE)


def test_teardown_order_is_enforced(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.qp.post_recv(1, b.mr.sge(0, 8))
    with pytest.raises(VerbsError, match="posted receives") as raised:
        b.mr.deregister()
    assert raised.value.errno == errno.EBUSY
    for close in (b.pd.close, b.cq.close, b.channel.close, b.ctx.close):
        with pytest.raises(VerbsError) as raised:
            close()
        assert raised.value.errno == errno.EBUSY
    b.qp.to_error()
    assert poll_all(b.cq)[0].status is WcStatus.WR_FLUSH_ERR
    b.close()
    b.close()  # closing twice does nothing
    with pytest.raises(VerbsError) as raised:
        _ = b.mr.view
    assert raised.value.errno == errno.EBADF
    a.close()


def test_closing_a_qp_drops_its_unpolled_completions(pair: tuple[Side, Side]) -> None:
    a, b = pair
    a.qp.post_send(1, WrOpcode.RDMA_WRITE, None)
    a.qp.close()
    assert a.cq.poll() == []


def test_provider_names_missing_devices() -> None:
    with pytest.raises(VerbsError, match="no RDMA device") as raised:
        SimulatedProvider(Fabric(())).open()
    assert raised.value.errno == errno.ENODEV
    with pytest.raises(VerbsError, match="'mlx5_0'"):
        SimulatedProvider(Fabric()).open("mlx5_0")
    assert SimulatedProvider(Fabric(("a", "b"))).devices() == ["a", "b"]


# -- the completion channel -----------------------------------------------------------------------


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_an_armed_cq_signals_once_per_arming(pair: tuple[Side, Side]) -> None:
    a, b = pair
    fd = a.channel.fd
    a.qp.post_send(1, WrOpcode.RDMA_WRITE, None)  # not armed: no event
    assert not readable(fd)
    with pytest.raises(BlockingIOError):
        a.channel.get_event()

    a.cq.req_notify()
    assert not readable(fd)  # the completion already queued does not signal: poll after arming
    a.qp.post_send(2, WrOpcode.RDMA_WRITE, None)
    a.qp.post_send(3, WrOpcode.RDMA_WRITE, None)  # the arming is spent: still one event
    assert readable(fd)
    assert a.channel.get_event() is a.cq
    assert not readable(fd)
    assert [wc.wr_id for wc in poll_all(a.cq)] == [1, 2, 3]
    a.qp.close()
    with pytest.raises(VerbsError, match="unacknowledged") as raised:
        a.cq.close()  # ibv_destroy_cq would wait for the ack forever
    assert raised.value.errno == errno.EBUSY
    a.cq.ack_events(1)
    with pytest.raises(ValueError):
        a.cq.ack_events(1)
    a.cq.close()


def test_solicited_only_arming(pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.cq.req_notify(solicited_only=True)
    for i in range(3):
        b.qp.post_recv(i, b.mr.sge(0, 8))
    a.qp.post_send(1, WrOpcode.SEND, a.mr.sge(0, 8))
    assert not readable(b.channel.fd)
    a.qp.post_send(2, WrOpcode.SEND, a.mr.sge(0, 8), solicited=True)
    assert readable(b.channel.fd)
    assert b.channel.get_event() is b.cq
    b.cq.ack_events(1)


def test_one_cq_per_channel(pair: tuple[Side, Side]) -> None:
    a, _ = pair
    with pytest.raises(VerbsError, match="one CQ per channel"):
        a.ctx.create_cq(4, a.channel)
    plain = a.ctx.create_cq(4)
    with pytest.raises(VerbsError, match="without a channel"):
        plain.req_notify()


def test_event_loop_drives_completions_through_add_reader(fabric: Fabric) -> None:
    """The transport's pattern: add_reader on the fd; on wake-up get_event, ack, re-arm, then
    drain with poll. A thread posts while the loop waits; every completion is seen, in order,
    and no wake-up is lost between draining and re-arming."""
    a, b = make_side(fabric, "sim0", max_send_wr=64), make_side(fabric, "sim1", max_recv_wr=64)
    join(a, b)
    total = 2000
    credits = threading.Semaphore(64)  # never more sends in flight than receives posted

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        seen: list[int] = []
        done = loop.create_future()
        wakeups = 0

        def on_readable() -> None:
            nonlocal wakeups
            wakeups += 1
            try:
                cq = b.channel.get_event()
            except BlockingIOError:
                return
            cq.ack_events(1)
            cq.req_notify()
            for wc in poll_all(cq):
                assert wc.ok, wc
                seen.append(wc.wr_id)
                if wc.wr_id + 64 < total:
                    b.qp.post_recv(wc.wr_id + 64, b.mr.sge(0, 8))
                    credits.release()  # the sender may use the receive just posted
            if len(seen) == total and not done.done():
                done.set_result(None)

        loop.add_reader(b.channel.fd, on_readable)
        b.cq.req_notify()
        for i in range(64):
            b.qp.post_recv(i, b.mr.sge(0, 8))

        def sender() -> None:
            for i in range(total):
                if not credits.acquire(timeout=TIMEOUT_S):
                    return
                a.qp.post_send(i, WrOpcode.SEND, a.mr.sge(0, 8), signaled=i % 16 == 15)
                poll_all(a.cq)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            await asyncio.wait_for(done, TIMEOUT_S)
        finally:
            loop.remove_reader(b.channel.fd)
            await asyncio.to_thread(thread.join, TIMEOUT_S)
        assert wakeups >= 1
        return seen

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        seen = runner.run(main())
    assert seen == list(range(total))
    assert fabric.stats.faults == 0


# -- threads ----------------------------------------------------------------------------------------


def test_two_threads_post_at_once_without_loss(fabric: Fabric) -> None:
    # Each CQ holds every receive completion the peer's thread may leave while this one is done.
    a = make_side(fabric, "sim0", cqe=1024, max_send_wr=32, max_recv_wr=512)
    b = make_side(fabric, "sim1", cqe=1024, max_send_wr=32, max_recv_wr=512)
    join(a, b)
    per_thread = 500
    for side in (a, b):
        for i in range(per_thread):
            side.qp.post_recv(i, side.mr.sge(32000 + i * 8, 8))
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=TIMEOUT_S)

    def sender(src: Side, dst: Side, tag: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                src.buf[i * 8 : i * 8 + 8] = np.frombuffer(
                    bytes([tag]) + i.to_bytes(7, "little"), np.uint8
                )
                src.qp.post_send(i, WrOpcode.SEND, src.mr.sge(i * 8, 8), signaled=i % 8 == 7)
                src.qp.post_send(
                    10_000 + i, WrOpcode.RDMA_WRITE, src.mr.sge(i * 8, 8),
                    remote_addr=dst.mr.addr + 16000 + i * 8, rkey=dst.mr.rkey, signaled=i % 8 == 7,
                )  # fmt: skip
                if i % 8 == 7:
                    while src.cq.poll(64):
                        pass
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=sender, args=(a, b, 0xA)),
        threading.Thread(target=sender, args=(b, a, 0xB)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors and not any(t.is_alive() for t in threads)
    for side, tag in ((a, 0xB), (b, 0xA)):
        for i in range(per_thread):
            want = bytes([tag]) + i.to_bytes(7, "little")
            assert read(side, 32000 + i * 8, 8) == want
            assert read(side, 16000 + i * 8, 8) == want
    stats = fabric.stats
    assert (stats.sends, stats.writes, stats.faults) == (2 * per_thread, 2 * per_thread, 0)
