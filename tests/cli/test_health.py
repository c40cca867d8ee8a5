"""``bitfusion-net health``: a line per check, JSON, exit statuses; and each check's verdicts."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bitfusion_net as bf
from bitfusion_net.cli import health as h
from bitfusion_net.protocol import PROTOCOL_VERSION

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from integration_support import cli_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMAND_S = 60
LINE = re.compile(r"^\[(PASS|WARN|FAIL)\] ([a-zA-Z ]+?)(?: (\S+:\d+))?: (.+)$")
PER_SERVER = ["reachable", "version", "executor", "round trip", "clock", "MTU"]


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def bitfusion(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_NET_")}
    env["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "bitfusion_net", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_S,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with cli_server("--gpus", "2") as running:
        session = bf.connect_sync(running.address, fraction=0.25, client_name="health-test")
        try:
            yield running.address.removeprefix("tcp://")
        finally:
            session.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def parse(stdout: str) -> list[tuple[str, str, str | None, str]]:
    lines = stdout.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, match in zip(lines, parsed, strict=True) if not match]
    return [m.groups() for m in parsed if m]  # type: ignore[misc]


# -- the command ------------------------------------------------------------------------------------
def test_health_text_with_one_server_up_and_one_down(server: str, home: Path) -> None:
    dead = closed_port()
    result = bitfusion(home, "health", "--server_list", f"{server},{dead}", "--samples", "50")
    assert result.returncode == 1, result.stdout + result.stderr  # the dead server fails
    checks = parse(result.stdout)
    assert [c[1] for c in checks[:3]] == ["client version", "open files", "servers"]
    assert checks[0][0] == "PASS" and bf.__version__ in checks[0][3]
    assert checks[2] == ("PASS", "servers", None, "2 configured (from --server_list)")
    mine = {c[1]: c for c in checks if c[2] == server}
    assert list(mine) == PER_SERVER
    assert mine["reachable"][0] == "PASS" and mine["version"][0] == "PASS"
    assert mine["executor"][0] == "WARN" and "NumPy reference device" in mine["executor"][3]
    assert mine["round trip"][0] in ("PASS", "WARN")
    assert re.match(r"p50 \d+ us, p99 \d+ us over 50 queries", mine["round trip"][3])
    assert mine["clock"][0] == "PASS"
    assert mine["MTU"][0] == "PASS" and int(mine["MTU"][3].split()[0]) >= 1500  # loopback
    down = [c for c in checks if c[2] == dead]
    assert len(down) == 1 and down[0][:2] == ("FAIL", "reachable")
    assert "refused" in down[0][3].lower()


def test_health_json_passes_with_a_healthy_server(server: str, home: Path) -> None:
    result = bitfusion(home, "health", "--server_list", server, "--samples", "20", "--json")
    assert result.returncode == 0, result.stdout + result.stderr  # numpy and loopback only WARN
    checks = json.loads(result.stdout)
    assert all(set(c) == {"status", "check", "detail", "server", "values"} for c in checks)
    assert all(c["status"] in ("PASS", "WARN") for c in checks)
    assert [c["check"] for c in checks if c["server"] is None] == [
        "client version",
        "open files",
        "servers",
    ]
    assert [c["check"] for c in checks if c["server"] == server] == PER_SERVER
    by_name = {c["check"]: c for c in checks}
    assert by_name["client version"]["values"] == {
        "version": bf.__version__,
        "protocol": PROTOCOL_VERSION,
    }
    trip = by_name["round trip"]["values"]
    assert trip["samples"] == 20 and 0 < trip["p50_us"] <= trip["p99_us"]
    assert abs(by_name["clock"]["values"]["skew_s"]) < 1
    assert by_name["executor"]["values"]["gpus"] == 2
    assert by_name["MTU"]["values"]["mtu"] >= 1500


def test_health_with_no_server_answering_exits_68(home: Path) -> None:
    dead = closed_port()
    result = bitfusion(home, "health", "--server_list", dead, "--json")
    assert result.returncode == 68
    checks = json.loads(result.stdout)
    assert [(c["status"], c["check"], c["server"]) for c in checks][-1] == (
        "FAIL",
        "reachable",
        dead,
    )


def test_health_without_servers_exits_78(home: Path) -> None:
    result = bitfusion(home, "health")
    assert result.returncode == 78 and "no servers configured" in result.stderr


# -- each check -------------------------------------------------------------------------------------
def _server_info(**changes: Any) -> dict[str, Any]:
    server = {"version": bf.__version__, "protocol": PROTOCOL_VERSION, "executor": "numpy"}
    server.update(changes)
    return server


def test_versions() -> None:
    assert h.check_version("s:1", _server_info()).status == "PASS"
    newer = h.check_version("s:1", _server_info(version="9.9.9"))
    assert newer.status == "WARN" and "9.9.9" in newer.detail
    other = h.check_version("s:1", _server_info(protocol=PROTOCOL_VERSION + 1))
    assert other.status == "FAIL" and "protocol" in other.detail


def test_executors() -> None:
    gpu = {"gpu": 0, "name": "NVIDIA H200", "executor": "pycuda"}
    assert (
        h.check_executor("s:1", {"server": _server_info(executor="pycuda"), "gpus": [gpu]}).status
        == "PASS"
    )
    numpy = {"gpu": 0, "name": "NumPy reference device", "executor": "numpy"}
    assert h.check_executor("s:1", {"server": _server_info(), "gpus": [numpy]}).status == "WARN"
    assert h.check_executor("s:1", {"server": _server_info(), "gpus": []}).status == "FAIL"


@pytest.mark.parametrize(
    ("trips_us", "status"), [([30] * 99 + [900], "PASS"), ([80] * 100, "WARN"), ([], "FAIL")]
)
def test_round_trips(trips_us: list[float], status: str) -> None:
    timing = h.Timing([t * 1e-6 for t in trips_us], 0.0, "" if trips_us else "connection lost")
    check = h.check_round_trip("s:1", timing)
    assert check.status == status
    if trips_us:
        assert check.values["p99_us"] == pytest.approx(30 if status == "PASS" else 80)


def test_a_connection_lost_while_timing_fails() -> None:
    check = h.check_round_trip("s:1", h.Timing([40e-6] * 3, 0.0, "the server went away"))
    assert check.status == "FAIL" and "went away" in check.detail


@pytest.mark.parametrize(
    ("skew", "status"),
    [(0.002, "PASS"), (-0.5, "PASS"), (5.0, "WARN"), (-30, "WARN"), (61, "FAIL"), (-3600, "FAIL")],
)
def test_clock_skew(skew: float, status: str) -> None:
    check = h.check_clock("s:1", h.Timing([1e-4], skew))
    assert check is not None and check.status == status
    assert ("ahead of" if skew > 0 else "behind") in check.detail


def test_open_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    low = h.check_open_files()
    assert low.status == "WARN" and "ulimit -n 4096" in low.detail
    monkeypatch.setattr(resource, "getrlimit", lambda which: (65536, 65536))
    assert h.check_open_files().status == "PASS"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="IP_MTU is Linux's")
def test_route_mtu_of_loopback_sends_nothing_and_reads_the_interface_mtu() -> None:
    assert h.route_mtu(f"tcp://{closed_port()}") >= 1500  # lo: 65536 (or 65535 here and there)
    assert h.check_mtu("x", "tcp://127.0.0.1:9").status == "PASS"


def test_small_mtu_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h, "route_mtu", lambda address: 1400)
    assert h.check_mtu("s:1", "tcp://10.0.0.1:56001").status == "WARN"
    monkeypatch.setattr(h, "route_mtu", lambda address: 1500)
    ok = h.check_mtu("s:1", "tcp://10.0.0.1:56001")
    assert ok.status == "PASS" and "4096..9000" in ok.detail


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert h.percentile(values, 0.99) == 99 and h.percentile(values, 0.5) == 50
    assert h.percentile([7.0], 0.99) == 7
