"""Tokens and quotas on a real server: no token, a wrong, expired or revoked one (a live session
included), every quota refusal, one user's two sessions together past a quota, and a brute-force
loop being rate limited. The token store is a real SQLite file in the test's directory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from integration_support import MiB, run, serve, wait_released, wait_until

import bitfusion_net as bf
from bitfusion_net.server import auth
from bitfusion_net.server.tokens import TokenStore


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path)


def test_a_server_with_tokens_refuses_a_connection_without_one(store: TokenStore) -> None:
    store.create("alice")

    async def main() -> None:
        async with serve(gpus=1, state_dir=store.path.parent) as server:
            with pytest.raises(bf.AuthenticationError, match="requires a token"):
                await bf.connect(server.address, fraction=0.5)
            with pytest.raises(bf.AuthenticationError, match="requires a token"):
                await asyncio.to_thread(bf.connect_sync, server.address, fraction=0.5)

    run(main())


def test_a_good_token_works_and_bad_ones_are_refused_saying_why(store: TokenStore) -> None:
    token, _ = store.create("alice")
    expired, _ = store.create("bob", expires_in=60, now=time.time() - 120)
    revoked, record = store.create("carol")
    store.revoke(record.id)
    wrong = token[:-2] + ("AA" if not token.endswith("AA") else "BB")

    async def main() -> None:
        async with serve(gpus=1, state_dir=store.path.parent) as server:
            async with bf.connect(server.address, fraction=0.5, token=token) as session:
                await session.devices[0].synchronize()

            def blocking() -> None:  # the blocking API, off the server's event loop
                with bf.connect_sync(server.address, fraction=0.5, token=token) as session:
                    session.devices[0].synchronize()

            await asyncio.to_thread(blocking)
            for bad, why in ((wrong, "unknown token"), (expired, "expired"), (revoked, "revoked")):
                with pytest.raises(bf.AuthenticationError, match=why):
                    await bf.connect(server.address, fraction=0.5, token=bad)
            await wait_released(server)

    run(main())


def test_a_revoked_token_ends_its_live_session_within_seconds(store: TokenStore) -> None:
    token, record = store.create("alice")

    async def main() -> None:
        async with serve(gpus=1, state_dir=store.path.parent) as server:
            session = await bf.connect(server.address, fraction=0.5, token=token)
            gpu = session.devices[0]
            await gpu.synchronize()
            store.revoke(record.id)
            revoked_at = time.monotonic()
            with pytest.raises(bf.AuthenticationError, match="revoked"):
                while time.monotonic() - revoked_at < 5:
                    await gpu.synchronize()
                    await asyncio.sleep(0.05)
            assert time.monotonic() - revoked_at < 3
            await session.close()
            await wait_released(server)

    run(main())


@pytest.mark.parametrize(
    ("limits", "ask", "refusal"),
    [
        ({"max_gpus": 1}, {"gpus": 2, "fraction": 0.5}, r"may hold 1 GPU\(s\); 0 held, 2 more"),
        ({"max_fraction": 0.5}, {"fraction": 0.75}, "may hold 0.5 of a GPU in all"),
        ({"max_memory": 100 * MiB}, {"memory": "200MiB"}, "bytes of GPU memory"),
    ],
)
def test_each_quota_refuses_what_would_pass_it(
    store: TokenStore, limits: dict[str, int], ask: dict[str, object], refusal: str
) -> None:
    token, _ = store.create("alice", **limits)  # type: ignore[arg-type]

    async def main() -> None:
        async with serve(gpus=2, state_dir=store.path.parent) as server:
            with pytest.raises(bf.QuotaExceededError, match=refusal):
                await bf.connect(server.address, token=token, **ask)  # type: ignore[arg-type]
            await wait_released(server)

    run(main())


def test_a_users_sessions_together_count_against_the_quota(store: TokenStore) -> None:
    token, _ = store.create("alice", max_fraction=1.0)
    other, _ = store.create("bob", max_fraction=1.0)

    async def main() -> None:
        async with serve(gpus=2, state_dir=store.path.parent) as server:
            first = await bf.connect(server.address, fraction=0.75, token=token)
            with pytest.raises(bf.QuotaExceededError, match="0.75 held, 0.5 more asked"):
                await bf.connect(server.address, fraction=0.5, token=token)
            async with bf.connect(server.address, fraction=0.5, token=other):
                pass  # another user's quota is their own
            await first.close()
            async with bf.connect(server.address, fraction=0.5, token=token):
                pass  # what the first session held is free again
            await wait_released(server)

    run(main())


def test_guessing_tokens_is_rate_limited_per_address(store: TokenStore) -> None:
    token, _ = store.create("alice")

    async def main() -> None:
        async with serve(gpus=1, state_dir=store.path.parent) as server:
            for attempt in range(auth.MAX_FAILURES):
                guess = f"bfnet_{attempt:016x}_" + "A" * 43
                with pytest.raises(bf.AuthenticationError, match="unknown token"):
                    await bf.connect(server.address, fraction=0.5, token=guess)
            with pytest.raises(bf.AuthenticationError, match="too many failed attempts"):
                await bf.connect(server.address, fraction=0.5, token=token)  # even a good one

    run(main())


def test_a_loopback_server_without_tokens_takes_anyone_and_others_need_insecure(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with serve(gpus=1, state_dir=tmp_path) as server:  # no tokens.sqlite3 there
            async with bf.connect(server.address, fraction=0.5, token="ignored") as session:
                await session.devices[0].synchronize()
        with pytest.raises(ValueError, match="--insecure"):
            async with bf.Server("tcp://0.0.0.0:0", gpu_memory="1GiB", state_dir=tmp_path):
                pass
        async with bf.Server("tcp://0.0.0.0:0", gpu_memory="1GiB", insecure=True) as server:
            assert server.address

    run(main())


def test_attaching_to_another_users_reservation_is_as_if_it_did_not_exist(
    store: TokenStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitfusion_net.cli.control import ControlConnection
    from bitfusion_net.client.lease import LEASE_ENV, ReservationFile, ServerReservation
    from bitfusion_net.protocol import messages as m

    alice, _ = store.create("alice")
    bob, _ = store.create("bob")

    async def main() -> None:
        async with serve(gpus=1, state_dir=store.path.parent) as server:
            control = await asyncio.to_thread(ControlConnection, server.address, 5.0, token=alice)
            reply = await asyncio.to_thread(control.reserve, m.Reserve(1, 0.5, 0))
            path = tmp_path / "lease.json"
            part = ServerReservation(
                server.address, reply.server_id, reply.reservation, reply.secret, 0
            )
            ReservationFile([part], token=bob).save(path)
            monkeypatch.setenv(LEASE_ENV, str(path))
            with pytest.raises(bf.InvalidValueError, match="no reservation"):
                await bf.connect()
            ReservationFile([part], token=alice).save(path)
            async with bf.connect() as session:
                await session.devices[0].synchronize()
            await asyncio.to_thread(control.close)
            await wait_until(lambda: server.gpus()[0]["leased_fraction"] == 0, "released")

    run(main())


def test_the_cli_takes_its_token_from_the_environment_and_its_programs_inherit_it(
    store: TokenStore, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from integration_support import cli_server

    token, _ = store.create("alice", max_gpus=1)
    program = tmp_path / "program.py"
    program.write_text(
        "import bitfusion_net as bf\n"
        "with bf.connect_sync() as s:\n"
        "    s.devices[0].synchronize()\n"
        "    print('worked', flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_NET_")}
    env["HOME"] = str(tmp_path)
    with cli_server("--executor", "numpy", "--gpus", "2", "--gpu-memory", "1GiB",
                    "--state-dir", str(store.path.parent)) as server:  # fmt: skip
        address = server.address.removeprefix("tcp://")

        def run_cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "bitfusion_net", "run", "--server_list", address, *args],
                env={**env, **extra}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        done = run_cli("-p", "0.5", "--", sys.executable, str(program), BITFUSION_NET_TOKEN=token)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "worked\n"
        refused = run_cli("-p", "0.5", "--", "true")
        assert refused.returncode == 68 and "requires a token" in refused.stderr
        over = run_cli("-n", "2", "-p", "0.5", "--", "true", BITFUSION_NET_TOKEN=token)
        assert over.returncode == 69 and "may hold 1 GPU(s)" in over.stderr, over.stderr


def test_a_client_certificate_stands_for_its_users_token_under_mutual_tls(
    store: TokenStore, tmp_path: Path
) -> None:
    from tls_support import CLIENT_NAME, make_pki

    pki = make_pki(tmp_path / "pki")
    store.create(CLIENT_NAME, max_gpus=1)  # the certificate's commonName is this user
    mutual = bf.ServerTls(pki.server_cert, pki.server_key, pki.ca)
    certified = bf.ClientTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)

    async def main() -> None:
        async with serve(gpus=2, tls=mutual, state_dir=store.path.parent) as server:
            async with bf.connect(server.address, fraction=0.5, tls=certified) as session:
                await session.devices[0].synchronize()  # no token: the certificate is enough
                with pytest.raises(bf.QuotaExceededError, match="may hold 1 GPU"):
                    await bf.connect(server.address, fraction=0.5, tls=certified)
            await wait_released(server)

    run(main())
