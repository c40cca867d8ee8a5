"""Reservations on a real server: held apart from connections, attached to with a secret, ended
on release, holder death or idleness, with the program told why; pools spanning servers.

Control connections are the CLI's own (``cli.control.ControlConnection``, blocking, run in a
thread); programs use the public API with ``BITFUSION_NET_LEASE`` naming a reservation file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from integration_support import MiB, run, serve, wait_released, wait_until

import bitfusion_net as bf
from bitfusion_net.cli.control import ControlConnection
from bitfusion_net.client.lease import LEASE_ENV, ReservationFile, ServerReservation
from bitfusion_net.protocol import LeaseEndedError
from bitfusion_net.protocol import messages as m


def reserve(
    address: str,
    gpus: int = 1,
    fraction: float = 0.5,
    hold: int = m.HOLD_BY_CONNECTION,
    idle_timeout: float = 0.0,
) -> tuple[ControlConnection, m.ReserveReply]:
    control = ControlConnection(address, 5.0)
    return control, control.reserve(
        m.Reserve(gpus, fraction, 0, hold=hold, idle_timeout=idle_timeout)
    )


def lease_file(path: Path, *parts: tuple[str, m.ReserveReply]) -> Path:
    ReservationFile(
        [
            ServerReservation(address, r.server_id, r.reservation, r.secret, r.idle_timeout)
            for address, r in parts
        ]
    ).save(path)
    return path


def leases(server: bf.Server) -> list[dict[str, object]]:
    return [lease for session in server.sessions() for lease in session["leases"]]


@pytest.fixture
def lease_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "lease.json"
    monkeypatch.setenv(LEASE_ENV, str(path))
    return path


async def saxpy_roundtrip(gpu: bf.RemoteDevice) -> None:
    x = np.arange(256, dtype=np.float32)
    ptr = await gpu.mem_alloc(x.nbytes)
    await gpu.memcpy_htod(ptr, x)
    await (await gpu.builtin("saxpy")).launch(1, 256, [x.size, 2.0, ptr, ptr])
    out = np.empty_like(x)
    await gpu.memcpy_dtoh(out, ptr)
    np.testing.assert_array_equal(out, 3 * x)


def test_a_reservation_outlives_its_programs_and_ends_with_its_holder(lease_path: Path) -> None:
    async def main() -> None:
        async with serve(gpus=1) as server:
            control, reply = await asyncio.to_thread(reserve, server.address)
            lease_file(lease_path, (server.address, reply))
            for _ in range(2):  # one program after another
                async with bf.connect() as session:
                    assert [d.fraction for d in session.devices] == [0.5]
                    await saxpy_roundtrip(session.devices[0])
                await wait_until(
                    lambda: not server.sessions() or len(server.sessions()) == 1, "detach"
                )
                assert server.gpus()[0]["leased_fraction"] == 0.5  # still reserved
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_attaching_needs_the_secret_and_a_live_reservation(lease_path: Path) -> None:
    async def main() -> None:
        async with serve(gpus=1) as server:
            control, reply = await asyncio.to_thread(reserve, server.address)
            wrong = m.ReserveReply(reply.reservation, 0, b"x" * 32, reply.server_id, b"")
            lease_file(lease_path, (server.address, wrong))
            with pytest.raises(bf.InvalidValueError, match="no reservation"):
                await bf.connect()
            restarted = m.ReserveReply(reply.reservation, 0, reply.secret, "another-server", b"")
            lease_file(lease_path, (server.address, restarted))
            with pytest.raises(LeaseEndedError, match="restarted"):
                await bf.connect()
            lease_file(lease_path, (server.address, reply))
            await asyncio.to_thread(control.release, reply.reservation, reply.secret)
            with pytest.raises(LeaseEndedError, match="released"):
                await bf.connect()
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_release_ends_attached_programs_with_the_reason(lease_path: Path) -> None:
    async def main() -> None:
        async with serve(gpus=1) as server:
            control, reply = await asyncio.to_thread(
                reserve, server.address, hold=m.HOLD_BY_IDLE_TIMEOUT
            )
            await asyncio.to_thread(control.close)  # not held by it: it lives on
            lease_file(lease_path, (server.address, reply))
            session = await bf.connect()
            gpu = session.devices[0]
            await gpu.synchronize()
            other = await asyncio.to_thread(ControlConnection, server.address, 5.0)
            await asyncio.to_thread(other.release, reply.reservation, reply.secret)
            with pytest.raises(LeaseEndedError, match="released by"):
                for _ in range(100):
                    await gpu.synchronize()
                    await asyncio.sleep(0.01)
            await session.close()
            await asyncio.to_thread(other.close)
            await wait_released(server)

    run(main())


def test_an_idle_reservation_is_released_and_its_program_told_why(lease_path: Path) -> None:
    async def main() -> None:
        async with serve(gpus=1) as server:
            control, reply = await asyncio.to_thread(
                reserve, server.address, hold=m.HOLD_BY_IDLE_TIMEOUT, idle_timeout=0.5
            )
            assert reply.idle_timeout == 0.5
            await asyncio.to_thread(control.close)
            lease_file(lease_path, (server.address, reply))
            session = await bf.connect()
            await saxpy_roundtrip(session.devices[0])
            await asyncio.sleep(1.2)
            with pytest.raises(
                LeaseEndedError, match=r"idle for \d+\.\d s, past its idle timeout of 0.5 s"
            ):
                await session.devices[0].synchronize()
            await session.close()
            await wait_released(server)

    run(main())


def test_the_servers_maximum_bounds_the_idle_timeout_a_client_asks_for() -> None:
    async def main() -> None:
        async with serve(gpus=1, max_idle_timeout=5.0) as server:
            for asked, granted in ((0.0, 5.0), (100.0, 5.0), (2.0, 2.0)):
                control, reply = await asyncio.to_thread(
                    reserve, server.address, fraction=0.1, idle_timeout=asked
                )
                assert reply.idle_timeout == granted
                await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_a_refused_reservation_leaves_the_control_connection_usable() -> None:
    async def main() -> None:
        async with serve(gpus=1) as server:
            control, _ = await asyncio.to_thread(reserve, server.address, fraction=0.75)
            with pytest.raises(bf.CapacityError):
                await asyncio.to_thread(control.reserve, m.Reserve(1, 0.5, 0))
            smaller = await asyncio.to_thread(control.reserve, m.Reserve(1, 0.25, 0))
            assert smaller.devices[0].fraction == 0.25
            info = await asyncio.to_thread(control.info)
            assert info["gpus"][0]["leased_fraction"] == 1.0
            assert {r["id"] for r in info["reservations"]} == {1, 2}
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_programs_attached_at_once_share_the_reservations_memory(lease_path: Path) -> None:
    async def main() -> None:
        async with serve(gpus=1, gpu_memory=f"{400 * MiB}") as server:
            control, reply = await asyncio.to_thread(reserve, server.address, fraction=0.5)
            lease_file(lease_path, (server.address, reply))
            async with bf.connect() as first, bf.connect() as second:
                a, b = first.devices[0], second.devices[0]
                # ... and its compute weight: two programs never get more than one would
                assert [lease["weight"] for lease in leases(server)] == [0.25, 0.25]
                ptr = await a.mem_alloc(120 * MiB)
                free, total = await b.mem_get_info()
                assert (free, total) == (80 * MiB, 200 * MiB)
                with pytest.raises(bf.OutOfMemoryError):
                    await b.mem_alloc(100 * MiB)
                await b.mem_alloc(80 * MiB)
                await b.mem_free(ptr)  # not its own: each program has its own context
                with pytest.raises(bf.InvalidHandleError):
                    await b.synchronize()
            async with bf.connect() as third:  # the first two's memory was freed with them
                assert await third.devices[0].mem_get_info() == (200 * MiB, 200 * MiB)
                assert [lease["weight"] for lease in leases(server)] == [0.5]
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_a_pool_session_spans_servers_and_one_servers_death_fails_only_its_devices(
    lease_path: Path,
) -> None:
    async def main() -> None:
        async with serve(gpus=1) as one, serve(gpus=1) as two:
            control_one, r1 = await asyncio.to_thread(reserve, one.address)
            control_two, r2 = await asyncio.to_thread(reserve, two.address)
            lease_file(lease_path, (one.address, r1), (two.address, r2))
            session = await bf.connect()
            a, b = session.devices
            assert (a.index, b.index) == (0, 1) and (a.server, b.server) == (
                one.address,
                two.address,
            )
            data = np.arange(1 << 16, dtype=np.float32)
            src, dst = await a.mem_alloc(data.nbytes), await b.mem_alloc(data.nbytes)
            await a.memcpy_htod(src, data)
            await session.memcpy_peer(1, dst, 0, src, data.nbytes)
            out = np.empty_like(data)
            await b.memcpy_dtoh(out, dst)
            np.testing.assert_array_equal(out, data)
            await two.close()
            with pytest.raises(LeaseEndedError, match="the server shut down"):
                await b.synchronize()
            await saxpy_roundtrip(a)  # the other server's device goes on
            await session.close()
            for control in (control_one, control_two):
                await asyncio.to_thread(control.close)
            await wait_released(one)

    run(main())


def test_without_an_address_or_a_lease_connect_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(LEASE_ENV, raising=False)
    with pytest.raises(bf.InvalidValueError, match="bitfusion-net run"):
        bf.connect_sync()
    with pytest.raises(bf.InvalidValueError, match="bitfusion-net run"):
        bf.connect()
    monkeypatch.setenv(LEASE_ENV, "/nonexistent/lease.json")
    with pytest.raises(bf.InvalidValueError, match="cannot read the reservation file"):
        bf.connect_sync()


def test_a_reservation_may_be_kept_to_named_gpus(lease_path: Path) -> None:
    async def main() -> None:
        async with serve(gpus=2) as server:
            control = await asyncio.to_thread(ControlConnection, server.address, 5.0)
            only_one = m.Reserve(1, 0.5, 0, only_gpus=m.Reserve.gpu_list([1]))
            for _ in range(2):  # best fit would put the second on GPU 0's neighbour otherwise
                reply = await asyncio.to_thread(control.reserve, only_one)
                assert [g.server_gpu for g in reply.devices] == [1]
            with pytest.raises(bf.CapacityError, match=r"among GPUs \[1\]"):
                await asyncio.to_thread(control.reserve, only_one)
            lease_file(lease_path, (server.address, reply))
            async with await bf.connect() as session:  # a Session is its own context manager
                assert session.devices[0].server_gpu == 1
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_server_info_lists_what_fits_the_clients_limit_and_counts_the_rest() -> None:
    async def main() -> None:
        async with serve(gpus=1, min_fraction=0.05) as server:
            control = await asyncio.to_thread(ControlConnection, server.address, 5.0)
            name = "x" * 4000  # long client names make each reservation's entry large
            for _ in range(20):
                await asyncio.to_thread(control.reserve, m.Reserve(1, 0.05, 0, client_name=name))
            info = await asyncio.to_thread(control.info)
            assert 0 < len(info["reservations"]) < 20
            assert len(info["reservations"]) + info["reservations_omitted"] == 20
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())


def test_only_the_secret_hears_why_a_reservation_ended_and_bad_holds_are_refused() -> None:
    async def main() -> None:
        async with serve(gpus=1) as server:
            control, reply = await asyncio.to_thread(reserve, server.address)
            await asyncio.to_thread(control.release, reply.reservation, reply.secret)
            with pytest.raises(LeaseEndedError, match="released by"):
                await asyncio.to_thread(control.release, reply.reservation, reply.secret)
            with pytest.raises(bf.InvalidValueError, match="no reservation"):
                await asyncio.to_thread(control.release, reply.reservation, b"\0" * 32)
            with pytest.raises(bf.InvalidValueError, match="unknown hold 5"):
                await asyncio.to_thread(control.reserve, m.Reserve(1, 0.5, 0, hold=5))
            with pytest.raises(bf.InvalidValueError, match="only_gpus"):
                await asyncio.to_thread(control.reserve, m.Reserve(1, 0.5, 0, only_gpus=b"\1"))
            assert control.alive  # every refusal was non-fatal
            await asyncio.to_thread(control.close)
            await wait_released(server)

    run(main())
