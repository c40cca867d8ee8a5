"""The pyverbs binding on a real RDMA device: two RC QPs of one device connected to each other
(loopback), SEND into a posted receive, RDMA WRITE with immediate, RDMA READ, and a wrong rkey
refused as the verbs simulator refuses it. Skipped, naming which of pyverbs, its rdma-core
libraries or a device is missing, where RDMA cannot be used (as on this project's machines)."""

from __future__ import annotations

import pytest

from bitfusion_net.transport.verbs import api
from bitfusion_net.transport.verbs.pyverbs_backend import PyverbsProvider, unavailable

pytestmark = pytest.mark.rdma
DEPTH = 8


@pytest.fixture
def provider() -> PyverbsProvider:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"no RDMA here: {reason}")
    return PyverbsProvider()


def _drain(cq: api.CompletionQueue, count: int) -> list[api.WorkCompletion]:
    got: list[api.WorkCompletion] = []
    for _ in range(1_000_000):  # bounded busy poll: a real device answers in microseconds
        got += cq.poll(16)
        if len(got) >= count:
            return got
    raise AssertionError(f"{len(got)} of {count} completions arrived")


def test_loopback_send_write_read_and_a_refused_rkey(provider: PyverbsProvider) -> None:
    ctx = provider.open(None)
    pd = ctx.alloc_pd()
    cq = ctx.create_cq(4 * DEPTH)
    access = api.Access.LOCAL_WRITE | api.Access.REMOTE_WRITE | api.Access.REMOTE_READ
    a_mem, b_mem = bytearray(4096), bytearray(4096)
    a_mr, b_mr = pd.register(a_mem, access), pd.register(b_mem, access)
    a = pd.create_qp(cq, cq, DEPTH, DEPTH)
    b = pd.create_qp(cq, cq, DEPTH, DEPTH)
    a.connect(b.endpoint(psn=0x111))
    b.connect(a.endpoint(psn=0x222))
    try:
        b.post_recv(1, b_mr.sge(0, 64))
        a_mr.view[:5] = b"hello"
        a.post_send(2, api.WrOpcode.SEND, a_mr.sge(0, 5))
        done = {wc.wr_id: wc for wc in _drain(cq, 2)}
        assert done[1].ok and done[1].byte_len == 5 and bytes(b_mr.view[:5]) == b"hello"
        b.post_recv(3, None)
        a_mr.view[100:104] = b"data"
        a.post_send(4, api.WrOpcode.RDMA_WRITE_WITH_IMM, a_mr.sge(100, 4),
                    remote_addr=b_mr.addr + 200, rkey=b_mr.rkey, imm_data=0xC0FFEE)  # fmt: skip
        done = {wc.wr_id: wc for wc in _drain(cq, 2)}
        assert done[3].imm_data == 0xC0FFEE and bytes(b_mr.view[200:204]) == b"data"
        a.post_send(5, api.WrOpcode.RDMA_READ, a_mr.sge(300, 4), remote_addr=b_mr.addr + 200,
                    rkey=b_mr.rkey)  # fmt: skip
        (read,) = _drain(cq, 1)
        assert read.ok and bytes(a_mr.view[300:304]) == b"data"
        a.post_send(6, api.WrOpcode.RDMA_WRITE, a_mr.sge(0, 4), remote_addr=b_mr.addr,
                    rkey=b_mr.rkey ^ 0x5A5A)  # fmt: skip
        failures = [wc for wc in _drain(cq, 1) if wc.wr_id == 6]
        assert failures and failures[0].status is api.WcStatus.REM_ACCESS_ERR
    finally:
        for qp in (a, b):
            qp.close()
        for mr in (a_mr, b_mr):
            mr.deregister()
        cq.close()
        pd.close()
        ctx.close()
