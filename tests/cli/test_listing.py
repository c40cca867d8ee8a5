"""``bitfusion-net list_gpus`` and ``smi``: real servers on 127.0.0.1, the real command as a
subprocess, text and JSON, a server that does not answer, and the view from inside a ``run``."""

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from integration_support import cli_server  # noqa: E402

import bitfusion_net as bf  # noqa: E402
from bitfusion_net.cli.listing import (  # noqa: E402
    WIDTH,
    SmiGpu,
    SmiProcess,
    SmiView,
    _utilization,
    smi_table,
)
from bitfusion_net.protocol import PROTOCOL_VERSION  # noqa: E402

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]
COMMAND_S = 60  # the most one command may take
CLIENT_NAME = "listing-test"


def closed_port() -> str:
    """HOST:PORT of a port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def environment(home: Path, **extra: str) -> dict[str, str]:
    """This environment without the user's configuration or any reservation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_NET_")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def bitfusion(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bitfusion_net", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_S,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=env or environment(home),
    )


def bare(address: str) -> str:
    return address.removeprefix("tcp://")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def pool() -> Iterator[tuple[str, str]]:
    """Two servers of two 1 GiB GPUs each; a program holds 0.25 of one GPU of the first."""
    with cli_server("--gpus", "2") as first, cli_server("--gpus", "2") as second:
        session = bf.connect_sync(first.address, fraction=0.25, client_name=CLIENT_NAME)
        try:
            yield bare(first.address), bare(second.address)
        finally:
            session.close()


@pytest.fixture
def lone_server() -> Iterator[str]:
    """A server of two GPUs that no other test uses."""
    with cli_server("--gpus", "2") as server:
        yield bare(server.address)


# -- list_gpus --------------------------------------------------------------------------------------
def test_list_gpus_json_lists_every_gpu_and_the_server_that_did_not_answer(
    pool: tuple[str, str], home: Path
) -> None:
    first, second = pool
    dead = closed_port()
    result = bitfusion(home, "list_gpus", "--server_list", f"{first},{second},{dead}", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [s["address"] for s in listing["servers"]] == [first, second]
    assert listing["unreachable"] == [
        {"address": dead, "error": listing["unreachable"][0]["error"]}
    ]
    assert "refused" in listing["unreachable"][0]["error"].lower()
    assert re.search(
        rf"^\[WARN\] \S+Z Server {re.escape(dead)} did not answer: ", result.stderr, re.M
    )

    by_address = {s["address"]: s for s in listing["servers"]}
    for entry in listing["servers"]:
        assert entry["server"]["protocol"] == PROTOCOL_VERSION
        assert [g["gpu"] for g in entry["gpus"]] == [0, 1]
        for g in entry["gpus"]:
            assert g["total_memory"] == 1024 * MiB
            assert g["free_memory"] == g["total_memory"] - g["leased_memory"]
    leased = [g for g in by_address[first]["gpus"] if g["tenants"]]
    assert len(leased) == 1
    assert leased[0]["leased_fraction"] == pytest.approx(0.25)
    assert leased[0]["free_memory"] == 768 * MiB
    assert all(
        g["tenants"] == 0 and g["free_memory"] == 1024 * MiB for g in by_address[second]["gpus"]
    )
    assert [r["client"] for r in by_address[first]["reservations"]] == [CLIENT_NAME]


def test_list_gpus_text_table(pool: tuple[str, str], home: Path) -> None:
    first, second = pool
    dead = closed_port()
    result = bitfusion(home, "list_gpus", "--server_list", f"{first},{second},{dead}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "SERVER",
        "GPU",
        "NAME",
        "EXECUTOR",
        "MEMORY",
        "FREE",
        "LEASED",
        "TENANTS",
    ]
    rows = lines[1:5]
    assert [row.split()[0] for row in rows] == [first, first, second, second]
    assert all("NumPy reference device" in row and " numpy " in row for row in rows)
    assert sum(1 for row in rows if re.search(r"1024 MiB\s+768 MiB\s+0\.25\s+1$", row)) == 1
    assert sum(1 for row in rows if re.search(r"1024 MiB\s+1024 MiB\s+0\.00\s+0$", row)) == 3
    assert lines[5] == ""
    assert lines[6].split() == ["NOT", "ANSWERING", "WHY"]
    assert lines[7].startswith(dead) and "refused" in lines[7].lower()
    assert "[WARN]" in result.stderr and dead in result.stderr


def test_list_gpus_with_no_server_answering_exits_68(home: Path) -> None:
    dead = closed_port()
    result = bitfusion(home, "list_gpus", "--server_list", dead, "--json", "--timeout", "2s")
    assert result.returncode == 68, result.stderr
    listing = json.loads(result.stdout)
    assert listing["servers"] == [] and [u["address"] for u in listing["unreachable"]] == [dead]
    assert "[ERROR]" in result.stderr


def test_list_gpus_with_no_servers_configured_exits_78(home: Path) -> None:
    result = bitfusion(home, "list_gpus")
    assert result.returncode == 78
    assert "no servers configured" in result.stderr
    missing = bitfusion(home, "list_gpus", "--servers", str(home / "nowhere.conf"))
    assert missing.returncode == 78 and "cannot read" in missing.stderr


def test_list_gpus_reads_servers_from_the_environment(pool: tuple[str, str], home: Path) -> None:
    first, _ = pool
    result = bitfusion(
        home, "list_gpus", "--json", env=environment(home, BITFUSION_NET_SERVERS=first)
    )
    assert result.returncode == 0, result.stderr
    assert [s["address"] for s in json.loads(result.stdout)["servers"]] == [first]


# -- smi outside a run ------------------------------------------------------------------------------
def test_smi_text_has_nvidia_smi_geometry_and_lists_the_pool(
    pool: tuple[str, str], home: Path
) -> None:
    first, second = pool
    result = bitfusion(home, "smi", "--server_list", f"{first},{second}", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = [line for line in lines if line.startswith(("|", "+"))]
    assert table and all(len(line) == WIDTH for line in table), [
        line for line in table if len(line) != WIDTH
    ]
    assert lines[1].startswith(f"| bitfusion-net {bf.__version__}  Protocol: 3 ")
    assert "| Server " in lines[3] and "Memory-Usage" in lines[4] and "GPU-Util" in lines[4]
    blocks = [line for line in lines if re.match(r"^\|\s+\d+  NumPy reference device", line)]
    assert len(blocks) == 4
    assert [int(line.split()[1]) for line in blocks] == [0, 1, 2, 3]
    assert (
        sum(1 for line in lines if first in line) == 2
        and sum(1 for line in lines if second in line) == 2
    )
    assert sum(1 for line in lines if re.search(r"\b0MiB /\s+1024MiB \|", line)) == 4
    processes = lines[lines.index(next(line for line in lines if "Processes:" in line)) :]
    rows = [line for line in processes if CLIENT_NAME in line]
    assert len(rows) == 1 and re.match(
        r"^\|\s+[0-3]   N/A  N/A\s+\d+      C   listing-test\s+0MiB \|$", rows[0]
    )


def test_smi_json_outside_a_run(pool: tuple[str, str], home: Path) -> None:
    first, second = pool
    dead = closed_port()
    result = bitfusion(
        home, "smi", "--server_list", f"{first},{second},{dead}", "--json", "--interval", "0.1"
    )
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["lease"] is None and view["protocol"] == 3 and view["version"] == bf.__version__
    assert [(g["index"], g["server"], g["server_gpu"]) for g in view["gpus"]] == [
        (0, first, 0), (1, first, 1), (2, second, 0), (3, second, 1)
    ]  # fmt: skip
    assert all(g["memory_total"] == 1024 * MiB for g in view["gpus"])
    assert all(g["utilization"] is not None and 0 <= g["utilization"] <= 100 for g in view["gpus"])
    [process] = view["processes"]
    assert process["client"] == CLIENT_NAME and process["type"] == "C"
    assert view["gpus"][process["gpu"]]["tenants"] == 1
    assert [u["address"] for u in view["unreachable"]] == [dead]


def test_smi_measures_utilisation_over_the_interval(lone_server: str, home: Path) -> None:
    session = bf.connect_sync(f"tcp://{lone_server}", fraction=0.5, client_name="busy-one")
    try:
        busy = session.devices[0].builtin("busy")
        for _ in range(60):  # 6 s of work, queued at once: the device is busy for all of smi
            busy.launch(1, 1, [100_000])
        result = bitfusion(home, "smi", "--server_list", lone_server, "--json", "--interval", "0.5")
    finally:
        session.close()
    assert result.returncode == 0, result.stderr
    gpus = {g["server_gpu"]: g for g in json.loads(result.stdout)["gpus"]}
    busy_gpu = session.devices[0].server_gpu
    assert gpus[busy_gpu]["utilization"] > 50
    assert gpus[1 - busy_gpu]["utilization"] < 5


# -- smi inside a run -------------------------------------------------------------------------------
IN_RUN = """
import json, subprocess, sys
import bitfusion_net as bf

def smi(*args):
    r = subprocess.run([sys.executable, "-m", "bitfusion_net", "smi", "--interval", "0.1", *args],
                       capture_output=True, text=True, timeout=60)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}

out = {"before": smi("--json")}
with bf.connect_sync(client_name="in-run-program") as session:
    ptr = session.devices[0].mem_alloc(5 * 2**20)
    out["json"] = smi("--json")
    out["text"] = smi()
print("RESULT " + json.dumps(out))
"""


def _in_run(home: Path, servers: str, *sizing: str) -> dict[str, Any]:
    result = bitfusion(
        home, "run", "--server_list", servers, *sizing, "--", sys.executable, "-c", IN_RUN
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    out: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    for name, step in out.items():
        assert step["rc"] == 0, (name, step["stderr"])
    return out


def test_smi_inside_a_run_shows_only_the_runs_gpu(lone_server: str, home: Path) -> None:
    other = bf.connect_sync(f"tcp://{lone_server}", fraction=0.25, client_name="someone-else")
    try:
        out = _in_run(home, lone_server, "-n", "1", "-p", "0.25")
    finally:
        other.close()

    before = json.loads(out["before"]["stdout"])
    assert before["lease"] and before["processes"] == []  # nothing attached yet
    view = json.loads(out["json"]["stdout"])
    [gpu] = view["gpus"]
    assert gpu["index"] == 0 and gpu["server"] == lone_server
    assert gpu["share"] == pytest.approx(0.25) and gpu["mode"] == "share"
    assert gpu["memory_total"] == 256 * MiB and gpu["memory_used"] >= 5 * MiB
    assert gpu["reservation"] is not None
    [process] = view["processes"]  # the run's program only, not someone-else
    assert process["client"] == "in-run-program" and process["gpu"] == 0
    assert process["memory_used"] >= 5 * MiB
    assert view["unreachable"] == []

    lines = out["text"]["stdout"].splitlines()
    assert all(len(line) == WIDTH for line in lines if line.startswith(("|", "+")))
    assert len([line for line in lines if "NumPy reference device" in line]) == 1
    assert any(re.search(r"\b5MiB /\s+256MiB \|", line) for line in lines)
    assert any(
        re.match(r"^\|\s+0   N/A  N/A\s+\d+      C   in-run-program\s+5MiB \|$", line)
        for line in lines
    )
    assert "someone-else" not in out["text"]["stdout"]


def test_smi_inside_a_run_across_two_servers(
    pool: tuple[str, str], lone_server: str, home: Path
) -> None:
    _, second = pool
    servers = f"{second},{lone_server}"
    # Two whole GPUs of each server leave room only on both together.
    out = _in_run(home, servers, "-n", "4", "-p", "1")
    view = json.loads(out["json"]["stdout"])
    assert [g["index"] for g in view["gpus"]] == [0, 1, 2, 3]
    assert sorted({g["server"] for g in view["gpus"]}) == sorted([second, lone_server])
    assert all(g["memory_total"] == 1024 * MiB and g["share"] == 1 for g in view["gpus"])
    assert sorted(p["gpu"] for p in view["processes"]) == [0, 1, 2, 3]


def test_smi_with_an_unreadable_lease_shows_the_pool_and_warns(
    pool: tuple[str, str], home: Path
) -> None:
    first, _ = pool
    bad = home / "not-a-lease.json"
    bad.write_text("{}")
    env = environment(home, BITFUSION_NET_LEASE=str(bad), BITFUSION_NET_SERVERS=first)
    result = bitfusion(home, "smi", "--json", "--interval", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "[WARN]" in result.stderr and "BITFUSION_NET_LEASE" in result.stderr
    view = json.loads(result.stdout)
    assert view["lease"] is None and len(view["gpus"]) == 2
    assert all(g["utilization"] is None for g in view["gpus"])  # --interval 0: not measured


def test_smi_with_a_released_reservation_says_it_is_over(lone_server: str, home: Path) -> None:
    lease = home / "lease.json"
    kept = home / "lease-copy.json"
    made = bitfusion(
        home, "request_gpus", "--server_list", lone_server, "-n", "1", "-p", "0.5", "-f", str(lease)
    )
    assert made.returncode == 0, made.stderr
    kept.write_bytes(lease.read_bytes())
    released = bitfusion(home, "release_gpus", "-f", str(lease))
    assert released.returncode == 0, released.stderr
    result = bitfusion(home, "smi", "--json", env=environment(home, BITFUSION_NET_LEASE=str(kept)))
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["gpus"] == []
    [entry] = view["unreachable"]
    assert entry["address"] == lone_server and "is over" in entry["error"]
    assert "[WARN]" in result.stderr


# -- the table, without servers ---------------------------------------------------------------------
def _gpu(index: int, **changes: Any) -> SmiGpu:
    values: dict[str, Any] = dict(
        index=index, server="127.0.0.1:56001", server_gpu=index, name="NVIDIA H100 80GB HBM3",
        executor="pycuda", share=0.5, mode="share", weight=0.5, tenants=2,
        memory_used=3 * MiB + 1, memory_total=40 * 1024 * MiB, utilization=42.4,
        scheduling="fair", reservation=7,
    )  # fmt: skip
    values.update(changes)
    return SmiGpu(**values)


def test_smi_table_keeps_its_width_with_long_names() -> None:
    view = SmiView(lease=None, interval=0.5)
    view.gpus = [
        _gpu(0),
        _gpu(1, name="A very long GPU name that would never fit in its cell at all",
             server="a-very-long-host-name.example.internal:56001", server_gpu=12,
             memory_used=10**13, memory_total=10**13, utilization=None, mode=None, weight=None),
    ]  # fmt: skip
    view.processes = [
        SmiProcess(
            0, "127.0.0.1:56001", 0, 7, 3, "host pid 4242 train.py", "127.0.0.1:4000", 5 * MiB
        ),
        SmiProcess(1, "x", 12, 7, 10**20, "n" * 80, "p", None),
    ]
    text = smi_table(view)
    lines = text.splitlines()
    assert all(len(line) == WIDTH for line in lines if line), [
        line for line in lines if len(line) != WIDTH
    ]
    assert "|       4MiB /  40960MiB |     42%         Fair |" in text  # use rounds up
    assert "|   1  A very long GPU name tha... pycuda | ...e.internal:56001 12 |" in text
    assert "|   50%  N/A                          N/A |" in text
    assert re.search(
        r"^\|    0   N/A  N/A\s+3      C   host pid 4242 train.py\s+5MiB \|$", text, re.M
    )
    assert re.search(r"C   \.\.\.n+\s+N/A \|$", text, re.M)


def test_smi_table_with_nothing_running() -> None:
    text = smi_table(SmiView(lease=None, interval=0.5, gpus=[_gpu(0)]))
    assert "|  No running processes found" in text
    assert all(len(line) == WIDTH for line in text.splitlines() if line)


def test_utilisation_is_clamped() -> None:
    def info(time: float, busy: float) -> dict[str, Any]:
        return {"server": {"time": time}, "gpus": [{"gpu": 0, "busy_time": busy}]}

    assert _utilization(info(10, 1), info(11, 1.5), 0) == pytest.approx(50)
    assert _utilization(info(10, 1), info(11, 3), 0) == 100
    assert _utilization(info(10, 2), info(11, 1), 0) == 0
    assert _utilization(info(10, 1), info(10, 2), 0) is None
    assert _utilization(info(10, 1), info(11, 2), 5) is None
