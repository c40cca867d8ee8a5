"""The management endpoint of a real server with real tenants: the JSON API says what they hold,
tokens guard it, health and readiness tell the truth, and ``bitfusion-server status`` reads it."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from integration_support import MiB, cli_server, read_line, run
from tls_support import make_pki

import bitfusion_net as bf
from bitfusion_net.server.tokens import TokenStore
from bitfusion_net.transport import ServerTls

T = TypeVar("T")
HTTP_TIMEOUT_S = 10.0


def get(url: str, token: str | None = None, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    """GET ``url``: (status, headers, body), error statuses included."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, **kwargs) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, token: str | None = None) -> Any:
    status, _, body = get(url, token)
    assert status == 200, (url, status, body)
    return json.loads(body)


async def in_thread(work: Callable[[], T]) -> T:
    """Blocking clients and HTTP requests run off the server's event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, work)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await in_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


def test_the_json_api_says_what_each_tenant_holds_and_uses() -> None:
    async def main() -> None:
        async with bf.Server(gpus=2, gpu_memory="1GiB", manage="http://127.0.0.1:0") as server:
            base = server.manage_address + "/api/v1"
            client = await in_thread(lambda: bf.connect_sync(server.address, fraction=0.5))
            try:
                device = client.devices[0]
                held = await in_thread(lambda: device.mem_alloc(8 * MiB))
                host = np.ones(8 * MiB // 4, np.float32)
                await in_thread(lambda: device.memcpy_htod(held, host))
                doc = await in_thread(lambda: get_json(f"{base}/server"))
                assert doc["server"]["management"] == server.manage_address
                assert doc["server"]["address"] == server.address
                assert doc["server"]["connections"] == 1 and not doc["server"]["tokens_required"]
                gpus = (await in_thread(lambda: get_json(f"{base}/gpus")))["gpus"]
                used = {g["gpu"]: g["memory_used"] for g in gpus}
                assert sorted(used.values()) == [0, 8 * MiB]
                assert all(g["uuid"].startswith("GPU-") for g in gpus)
                (lease,) = (await in_thread(lambda: get_json(f"{base}/leases")))["leases"]
                assert lease["devices"][0]["fraction"] == 0.5
                assert lease["devices"][0]["memory_used"] == 8 * MiB and lease["user"] is None
                one = await in_thread(lambda: get_json(f"{base}/leases/{lease['id']}"))
                assert one["lease"]["id"] == lease["id"]
                status, _, body = await in_thread(lambda: get(f"{base}/leases/99999"))
                assert status == 404 and b"no lease 99999" in body
                (tenant,) = (await in_thread(lambda: get_json(f"{base}/tenants")))["tenants"]
                assert tenant["reservation"] == lease["id"] and tenant["received_bytes"] > 8 * MiB

                def sampled() -> bool:
                    samples = get_json(f"{base}/history")["samples"]
                    return any(entry["id"] == lease["id"] for s in samples for entry in s["leases"])

                await eventually(sampled, "a history sample with the lease")
                later = await in_thread(lambda: get_json(f"{base}/history?since={time.time()}"))
                assert later["samples"] == [] and later["interval"] == 1.0
                status, _, _ = await in_thread(lambda: get(f"{base}/history?since=yesterday"))
                assert status == 400
                await in_thread(lambda: device.mem_free(held))
            finally:
                await in_thread(client.close)

    run(main())


def test_health_and_readiness_follow_the_executors() -> None:
    async def main() -> None:
        async with bf.Server(gpus=2, manage="http://127.0.0.1:0") as server:
            base = server.manage_address
            assert await in_thread(lambda: get(f"{base}/healthz")[0]) == 200
            assert await in_thread(lambda: get(f"{base}/readyz")[0]) == 200
            health = await in_thread(lambda: get_json(f"{base}/api/v1/health"))
            assert health["status"] == "pass"
            assert {c["name"] for c in health["checks"]} >= {"executors", "event_loop", "memory"}
            server.executors()[1].close()  # its device worker stops, as a broken GPU's would
            status, _, body = await in_thread(lambda: get(f"{base}/readyz"))
            assert status == 503 and b"gpu 1" in body
            health = await in_thread(lambda: get_json(f"{base}/api/v1/health"))
            assert health["status"] == "fail"
            assert await in_thread(lambda: get(f"{base}/healthz")[0]) == 200  # still live

    run(main())


def test_tokens_guard_the_api_and_metrics_and_a_revoked_token_stops_working(
    tmp_path: Path,
) -> None:
    store = TokenStore(tmp_path)
    operator, operator_record = store.create("ops", operator=True)
    user, _ = store.create("alice")

    async def main() -> None:
        async with bf.Server(state_dir=tmp_path, manage="http://127.0.0.1:0") as server:
            api = server.manage_address + "/api/v1/server"
            status, headers, body = await in_thread(lambda: get(api))
            assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
            assert b"--operator" in body
            status, _, body = await in_thread(lambda: get(api, user))
            assert status == 403 and b"not an operator" in body
            status, _, _ = await in_thread(lambda: get(api, "bfnet_0123456789abcdef_" + "x" * 43))
            assert status == 401
            assert (await in_thread(lambda: get_json(api, operator)))["server"]["tokens_required"]
            metrics = server.manage_address + "/metrics"
            assert (await in_thread(lambda: get(metrics)))[0] == 401
            assert (await in_thread(lambda: get(metrics, operator)))[0] == 200
            assert (await in_thread(lambda: get(server.manage_address + "/healthz")))[0] == 200
            store.revoke(operator_record.id)
            await eventually(lambda: get(api, operator)[0] == 401, "the revoked token refused")
        async with bf.Server(
            state_dir=tmp_path, manage="http://127.0.0.1:0", open_metrics=True
        ) as server:
            assert (await in_thread(lambda: get(server.manage_address + "/metrics")))[0] == 200
            api = server.manage_address + "/api/v1/gpus"
            assert (await in_thread(lambda: get(api)))[0] == 401  # the API stays guarded

    run(main())


def test_https_serves_the_endpoint_with_the_servers_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca))

    async def main() -> None:
        async with bf.Server(
            listen="tls://127.0.0.1:0", tls=tls, manage="https://127.0.0.1:0"
        ) as server:
            assert server.manage_address.startswith("https://127.0.0.1:")
            import ssl

            context = ssl.create_default_context(cafile=str(pki.ca))
            # No client certificate: mutual TLS guards the data plane, not the dashboards.
            status, _, body = await in_thread(
                lambda: get(server.manage_address + "/healthz", context=context)
            )
            assert (status, body) == (200, b"ok\n")

    run(main())


def test_the_command_prints_the_management_address_and_status_reads_it(tmp_path: Path) -> None:
    status_cmd = [sys.executable, "-m", "bitfusion_net.server", "status"]
    with cli_server("--gpus", "2", "--manage", "http://127.0.0.1:0") as server:
        assert server.proc.stdout is not None
        line = read_line(server.proc.stdout, time.monotonic() + 20).decode().strip()
        assert line.startswith("management on http://127.0.0.1:"), line
        manage = line.removeprefix("management on ")
        with bf.connect_sync(server.address, fraction=0.25) as client:
            client.devices[0].mem_alloc(4 * MiB)
            done = subprocess.run(
                [*status_cmd, "--manage", manage], capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 0, done.stderr
            assert "health: pass" in done.stdout and "NumPy reference device" in done.stdout
            assert "leases: 1" in done.stdout and "gpu0@0.25 4 MiB/256 MiB" in done.stdout
            as_json = subprocess.run(
                [*status_cmd, "--manage", manage, "--json"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            documents = json.loads(as_json.stdout)
            assert documents["leases"]["leases"][0]["devices"][0]["memory_used"] == 4 * MiB
    unreachable = subprocess.run(
        [*status_cmd, "--manage", manage], capture_output=True, text=True, timeout=30
    )
    assert unreachable.returncode == 69 and "cannot read" in unreachable.stderr
    TokenStore(tmp_path).create("ops", operator=True)
    with cli_server("--manage", "http://127.0.0.1:0", "--state-dir", str(tmp_path)) as guarded:
        assert guarded.proc.stdout is not None
        line = read_line(guarded.proc.stdout, time.monotonic() + 20).decode().strip()
        refused = subprocess.run(
            [*status_cmd, "--manage", line.removeprefix("management on ")],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert refused.returncode == 77 and "401" in refused.stderr


@pytest.mark.parametrize("flag", [["--pool", "http://127.0.0.1:9"], ["--manage-open-metrics"]])
def test_management_options_without_an_endpoint_are_a_usage_error(flag: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bitfusion_net.server", *flag],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "need --manage" in done.stderr


def test_a_management_port_in_use_is_named_and_the_server_does_not_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "bitfusion_net.server", "--executor", "numpy",
             "--manage", f"http://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 1 and "listening on" not in done.stdout
    assert f"cannot serve the management endpoint on http://127.0.0.1:{port}" in done.stderr
