"""The control plane end to end: ``bitfusion-net run`` / ``request_gpus`` / ``release_gpus`` as
subprocesses against real servers (``python -m bitfusion_net.server``) on 127.0.0.1 port 0, and
programs under them that attach with ``connect_sync()`` and no address.

What a server holds is read with SERVER_INFO (``control_support.server_info``); one test checks
``list_gpus --json`` shows the same.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from control_support import (
    bare,
    bfnet,
    cli_env,
    cli_process,
    cli_servers,
    closed_port,
    describe,
    is_free,
    leased,
    server_info,
    wait_free,
    write_worker,
)
from integration_support import CliServer, cli_server, poll_until, read_line, run

import bitfusion_net as bf

LOG_LINE = re.compile(r"^\[(INFO|WARN|ERROR)\] \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (.*)$")


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_server() -> Iterator[CliServer]:
    """One server of two 1 GiB GPUs for the tests that leave it empty again."""
    with cli_servers(1, "--gpus", "2") as servers:
        yield servers[0]


@pytest.fixture
def server(shared_server: CliServer) -> CliServer:
    """The shared server, checked empty (the previous test's reservations are over)."""
    assert shared_server.proc.poll() is None, shared_server.stderr_text()
    wait_free(shared_server.address)
    return shared_server


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path / "home", tmp_path / "tmp")


@pytest.fixture
def worker(tmp_path: Path) -> list[str]:
    return write_worker(tmp_path)


def log_lines(stderr: str) -> list[tuple[str, str]]:
    """(level, message) of each Bitfusion-shaped log line."""
    return [m.groups() for line in stderr.splitlines() if (m := LOG_LINE.match(line))]  # type: ignore[misc]


def index_of(lines: list[tuple[str, str]], pattern: str, after: int = -1) -> int:
    """The first log line past ``after`` whose message matches ``pattern``."""
    for index, (_, message) in enumerate(lines):
        if index > after and re.search(pattern, message):
            return index
    raise AssertionError(f"no log line matching {pattern!r} after line {after}: {lines}")


def events(stdout: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        if isinstance(fields, dict) and fields.get("event") == name:
            out.append(fields)
    return out


def leftover_reservation_files(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("bitfusion-net-*.json"))


# -- 1. run: a program attaches with no address, works, and run exits with its status ------------
@pytest.mark.parametrize("status", [0, 7])
def test_run_gives_the_program_its_gpus_and_exits_with_its_status(
    server: CliServer, env: dict[str, str], worker: list[str], tmp_path: Path, status: int
) -> None:
    result = bfnet(
        "run", "-n", "1", "-p", "0.25", "--server_list", bare(server.address),
        "--", *worker, "attach", "work", f"exit:{status}",
        env=env,
    )  # fmt: skip
    assert result.returncode == status, describe(result)

    (attached,) = events(result.stdout, "attached")
    (work,) = events(result.stdout, "work")
    assert attached["servers"] == [server.address]
    assert attached["lease_mode"] == "0o600"  # the file holds the reservation's secret
    assert work["results"] == [{"ok": True, "server": server.address}]
    assert "[INFO]" not in result.stdout  # the log goes to stderr, the program keeps stdout

    lines = log_lines(result.stderr)
    locked = index_of(lines, r"^Locked 1 GPUs with partial memory 0\.25, configuration saved to '")
    path = re.search(r"saved to '(.+)'", lines[locked][1]).group(1)  # type: ignore[union-attr]
    assert path == attached["lease"], "the program's BITFUSION_NET_LEASE is the saved file"
    running = index_of(lines, r"^Running client command '.*worker\.py attach work exit:\d'", locked)
    releasing = index_of(lines, rf"^Releasing GPUs from config file '{re.escape(path)}'", running)
    index_of(lines, r"^Released GPUs on 1 servers and removed generated config file", releasing)
    assert all(level == "INFO" for level, _ in lines), lines

    assert not Path(path).exists(), "run removes the reservation file"
    assert leftover_reservation_files(tmp_path / "tmp") == []
    wait_free(server.address)  # the capacity is back


def test_run_of_a_command_that_does_not_exist_exits_127_and_releases(
    server: CliServer, env: dict[str, str]
) -> None:
    result = bfnet(
        "run", "-p", "0.5", "--server_list", bare(server.address), "--", "/nonexistent/command",
        env=env,
    )  # fmt: skip
    assert result.returncode == 127, describe(result)
    assert "/nonexistent/command" in result.stderr
    wait_free(server.address)


# -- 2. signals sent to run reach the program ------------------------------------------------------
SIGNAL_CHILD = r"""
import signal, sys, time

def on_signal(signum, frame):
    print(f"child got {signal.Signals(signum).name}", flush=True)
    sys.exit({signal.SIGTERM: 42, signal.SIGHUP: 43}[signum])

signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGHUP, on_signal)
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner ignores it
try:  # "ready" inside the try: a SIGINT right after it still lands in the except
    print("ready", flush=True)
    time.sleep(30)
except KeyboardInterrupt:
    print("child got KeyboardInterrupt", flush=True)
    raise  # Python then ends itself with SIGINT: status -2, which run reports as 130
print("not signalled", flush=True)
"""


@pytest.mark.parametrize(
    ("signum", "status", "message"),
    [
        (signal.SIGTERM, 42, "child got SIGTERM"),
        (signal.SIGHUP, 43, "child got SIGHUP"),
        (signal.SIGINT, 128 + signal.SIGINT, "child got KeyboardInterrupt"),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_signals_sent_to_run_are_forwarded_to_the_program(
    server: CliServer, env: dict[str, str], tmp_path: Path, signum: int, status: int, message: str
) -> None:
    child = tmp_path / "child.py"
    child.write_text(SIGNAL_CHILD)
    with cli_process(
        "run", "-p", "0.05", "--server_list", bare(server.address), "--", sys.executable, str(child),
        env=env,
    ) as process:  # fmt: skip
        assert process.line() == "ready\n", process.stderr()
        assert leased(server.address) == [0.05, 0.0]
        process.proc.send_signal(signum)
        assert process.wait() == status, process.stderr()
        out = "".join(process.lines) + process.rest_of_stdout()
        assert message in out, (out, process.stderr())
        assert "not signalled" not in out
        assert "Released GPUs on 1 servers" in process.stderr()
    wait_free(server.address)


# -- 3. a pool of three servers, one of which dies -------------------------------------------------
def test_a_pool_spans_servers_and_survives_one_dying(
    env: dict[str, str], worker: list[str]
) -> None:
    with cli_servers(3, "--gpus", "1") as servers:
        addresses = [s.address for s in servers]
        pool = ",".join(bare(a) for a in addresses)
        with cli_process(
            "run", "-n", "3", "-p", "1", "--server_list", pool, "--", *worker, "attach", "stdin",
            env=env,
        ) as process:  # fmt: skip
            attached = process.event("attached")
            assert sorted(attached["servers"]) == sorted(addresses), "one GPU on each server"
            assert attached["server_gpus"] == [0, 0, 0]
            assert [leased(a) for a in addresses] == [[1.0], [1.0], [1.0]]
            process.send("work")
            assert all(r["ok"] for r in process.event("work")["results"])

            dead = servers[1]
            dead.proc.kill()  # SIGKILL: the server vanishes mid-run
            dead.proc.wait(10)
            process.send("work", "work")
            for round_ in (process.event("work"), process.event("work")):
                for result in round_["results"]:
                    if result["server"] == dead.address:
                        assert not result["ok"], result
                        assert "ConnectionLostError" in result["mro"], result
                    else:
                        assert result["ok"], (result, round_)
            process.send("exit:0")
            assert process.wait() == 0, process.stderr()

        alive = [s.address for s in servers if s is not dead]
        for address in alive:
            wait_free(address)
        result = bfnet(
            "run", "-n", "2", "-p", "1", "--server_list", pool, "--", *worker, "attach", "work",
            "exit:0",
            env=env,
        )  # fmt: skip
        assert result.returncode == 0, describe(result)
        (attached,) = events(result.stdout, "attached")
        assert sorted(attached["servers"]) == sorted(alive)
        (work,) = events(result.stdout, "work")
        assert all(r["ok"] for r in work["results"]), work
        warnings = [message for level, message in log_lines(result.stderr) if level == "WARN"]
        assert any(bare(dead.address) in w for w in warnings), result.stderr

        # Three GPUs no longer fit: no capacity, and the message says what is free where.
        result = bfnet("run", "-n", "3", "-p", "1", "--server_list", pool, "--", "true", env=env)
        assert result.returncode == 69, describe(result)
        assert all(bare(a) in result.stderr for a in alive), result.stderr
        for address in alive:
            wait_free(address)


# -- 4. --wait ------------------------------------------------------------------------------------
def test_wait_gets_capacity_once_it_is_free_and_fails_at_its_deadline(
    server: CliServer, env: dict[str, str], worker: list[str]
) -> None:
    pool = bare(server.address)
    holder_args = ["run", "-n", "2", "-p", "1", "--server_list", pool, "--", *worker]
    # The holder fills both GPUs until the test tells it to exit (on stdin), so the order of
    # events does not depend on how fast this machine is.
    with cli_process(*holder_args, "attach", "ready", "stdin", env=env) as holder:
        holder.event("ready")
        assert leased(server.address) == [1.0, 1.0]
        with cli_process(
            "run", "--wait", "10s", "-n", "1", "-p", "1", "--server_list", pool,
            "--", *worker, "attach", "work", "exit:0",
            env=env,
        ) as waiter:  # fmt: skip
            started = time.monotonic()
            failed = bfnet(
                "run", "--wait", "1s", "-n", "1", "-p", "1", "--server_list", pool, "--", "true",
                env=env,
            )  # fmt: skip
            took = time.monotonic() - started
            assert failed.returncode == 69, describe(failed)
            assert took >= 1.0, f"gave up after {took:.2f} s, before its --wait of 1 s"
            (level, message) = log_lines(failed.stderr)[-1]
            assert level == "ERROR", failed.stderr
            assert pool in message and "free" in message, failed.stderr
            assert "gpu0 0.00 free" in message and "gpu1 0.00 free" in message, message

            poll_until(lambda: "Waiting up to 10 s for capacity" in waiter.stderr(), "the waiter")
            assert waiter.proc.poll() is None, waiter.stderr()
            holder.send("exit:0")
            assert holder.wait() == 0, holder.stderr()
            holder_done = time.monotonic()
            assert waiter.wait() == 0, waiter.stderr()
            took = time.monotonic() - holder_done
            assert took < 5.0, f"the waiter took {took:.2f} s to get the freed GPU"
            out = "".join(waiter.lines) + waiter.rest_of_stdout()
            (work,) = events(out, "work")
            assert work["results"] == [{"ok": True, "server": server.address}], out
    wait_free(server.address)


# -- 5. request_gpus / release_gpus across commands ------------------------------------------------
def test_a_requested_reservation_serves_several_commands_until_released(
    server: CliServer, env: dict[str, str], worker: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "reservation.json"
    pool = bare(server.address)
    result = bfnet(
        "request_gpus", "-n", "1", "-p", "0.5", "--file", str(path), "--server_list", pool, env=env
    )
    assert result.returncode == 0, describe(result)
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    index_of(log_lines(result.stderr), rf"^Locked 1 GPUs with partial memory 0\.5, .*'{path}'")
    assert sorted(leased(server.address)) == [0.0, 0.5]

    for _ in range(2):  # two commands, one after the other, on the same reservation
        result = bfnet("run", "--reservation", str(path), "--", *worker, "attach", "work",
                       "exit:0", env=env)  # fmt: skip
        assert result.returncode == 0, describe(result)
        (attached,) = events(result.stdout, "attached")
        assert attached["lease"] == str(path.resolve())
        (work,) = events(result.stdout, "work")
        assert work["results"] == [{"ok": True, "server": server.address}]
        assert "Releasing" not in result.stderr, "run --reservation does not release"
        assert path.exists()
        time.sleep(0.3)  # past a sweep of the server: still reserved with no program attached
        info = server_info(server.address)
        assert sorted(leased(server.address)) == [0.0, 0.5]
        assert len(info["reservations"]) == 1, info["reservations"]

    with cli_process(
        "run", "--reservation", str(path), "--", *worker, "attach", "ready", "stdin", env=env
    ) as attached_program:
        attached_program.event("ready")
        result = bfnet("release_gpus", "-f", str(path), env=env)
        assert result.returncode == 0, describe(result)
        assert not path.exists(), "release_gpus removes the file"
        index_of(log_lines(result.stderr), r"^Released GPUs on 1 servers and removed config file")
        attached_program.send("work", "exit:0")
        (outcome,) = attached_program.event("work")["results"]
        assert not outcome["ok"], outcome
        assert outcome["type"] == "LeaseEndedError", outcome
        assert "ConnectionLostError" in outcome["mro"], outcome
        assert "released" in outcome["message"], outcome
        assert attached_program.wait() == 0, attached_program.stderr()
    wait_free(server.address)

    result = bfnet("release_gpus", "-f", str(path), env=env)  # the file is gone now
    assert result.returncode == 65, describe(result)


# -- 6. idle release --------------------------------------------------------------------------------
def test_an_idle_reservation_is_released_and_its_program_told_why(
    server: CliServer, env: dict[str, str], worker: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "idle.json"
    program_env = {**env, "BITFUSION_NET_LEASE": str(path)}
    # The program starts (numpy imported) before the reservation is made, so that it attaches
    # well within the 1 s idle timeout; it reads BITFUSION_NET_LEASE only when it attaches.
    proc = subprocess.Popen(
        [*worker, "ready", "stdin"],
        env=program_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(read_line(proc.stdout, time.monotonic() + 20))["event"] == "ready"
        result = bfnet(
            "request_gpus", "-n", "1", "-p", "0.5", "--idle-timeout", "1s", "--shell",
            "--file", str(path), "--server_list", bare(server.address),
            env=env,
        )  # fmt: skip
        assert result.returncode == 0, describe(result)
        assert shlex.split(result.stdout) == ["export", f"BITFUSION_NET_LEASE={path.resolve()}"]
        out, _ = proc.communicate(b"attach\nwork\nsleep:2.5\nwork\nexit:0\n", timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    first, second = (w["results"][0] for w in events(out.decode(), "work"))
    assert first["ok"], first
    assert not second["ok"], second
    assert second["type"] == "LeaseEndedError", second
    assert "idle" in second["message"] and "idle timeout of 1 s" in second["message"], second
    wait_free(server.address)

    # The file outlived it; releasing it says it is already over, and removes it.
    result = bfnet("release_gpus", "-f", str(path), env=env)
    assert result.returncode == 0, describe(result)
    assert any(level == "WARN" and "already over" in message
               for level, message in log_lines(result.stderr)), result.stderr  # fmt: skip
    assert not path.exists()


# -- 7. a SIGKILLed run leaks nothing ---------------------------------------------------------------
def test_a_killed_run_leaves_its_program_working_then_frees_everything(
    server: CliServer, env: dict[str, str], worker: list[str]
) -> None:
    pid = 0
    with cli_process(
        "run", "-p", "0.5", "--server_list", bare(server.address),
        "--", *worker, "attach", "ready", "stdin",
        env=env,
    ) as process:  # fmt: skip
        try:
            pid = process.event("ready")["pid"]
            process.proc.kill()  # SIGKILL: run cannot release anything
            assert process.wait() == -signal.SIGKILL
            os.kill(pid, 0)  # the program is still alive
            time.sleep(0.5)  # several server sweeps
            assert sorted(leased(server.address)) == [0.0, 0.5], "still held for its program"
            process.send("work")  # the program's stdin is still this pipe
            assert process.event("work")["results"][0]["ok"]

            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            poll_until(lambda: is_free(server.address), "the capacity back", timeout=3.0)
            took = time.monotonic() - killed
            assert took < 1.0, f"the capacity came back {took:.2f} s after the program died"
        finally:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# -- 8. connect() with no address -----------------------------------------------------------------
def test_connect_without_an_address_or_a_lease_says_how_to_get_one(
    server: CliServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BITFUSION_NET_LEASE", raising=False)
    with pytest.raises(bf.InvalidValueError, match="bitfusion-net run"):
        bf.connect_sync()

    async def connect_async() -> None:
        async with bf.connect():
            pass

    with pytest.raises(bf.InvalidValueError, match="bitfusion-net run"):
        run(connect_async())

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    monkeypatch.setenv("BITFUSION_NET_LEASE", str(garbage))
    with pytest.raises(bf.InvalidValueError, match="not a bitfusion-net reservation file"):
        bf.connect_sync()
    with pytest.raises(bf.InvalidValueError, match="reservation"):
        bf.connect_sync(gpus=2)  # sizes are the reservation's, not the caller's
    monkeypatch.delenv("BITFUSION_NET_LEASE")

    # An explicit address works as it always did.
    n = 1000
    x, y = np.arange(n, dtype=np.float32), np.ones(n, dtype=np.float32)
    with bf.connect_sync(server.address, fraction=0.25) as session:
        device = session.devices[0]
        assert device.server == server.address
        x_ptr, y_ptr = device.mem_alloc(x.nbytes), device.mem_alloc(y.nbytes)
        device.memcpy_htod(x_ptr, x)
        device.memcpy_htod(y_ptr, y)
        device.builtin("saxpy").launch(4, 256, [n, 2.0, x_ptr, y_ptr])
        out = np.empty_like(y)
        device.memcpy_dtoh(out, y_ptr)
        np.testing.assert_allclose(out, 2 * x + y)

    async def explicit() -> None:
        async with bf.connect(server.address, gpus=2, fraction=0.5) as session:
            assert [d.server for d in session.devices] == [server.address] * 2

    run(explicit())
    wait_free(server.address)


def test_lease_ended_error_is_public_and_a_connection_lost_error() -> None:
    assert issubclass(bf.LeaseEndedError, bf.ConnectionLostError)
    assert "LeaseEndedError" in bf.__all__


# -- 9. exit codes of our own failures --------------------------------------------------------------
def test_our_failures_have_their_exit_codes(server: CliServer, tmp_path: Path) -> None:
    empty = cli_env(tmp_path / "empty-home", tmp_path / "tmp")
    pool = bare(server.address)

    result = bfnet("run", "-n", "1", "--", "true", env=empty)
    assert result.returncode == 78, describe(result)
    assert "no servers configured" in result.stderr and "servers.conf" in result.stderr
    result = bfnet("request_gpus", "-n", "1", env=empty)
    assert result.returncode == 78, describe(result)

    port = closed_port()
    result = bfnet("run", "--server_list", f"127.0.0.1:{port}", "--", "true", env=empty)
    assert result.returncode == 68, describe(result)
    assert f"127.0.0.1:{port}" in result.stderr

    result = bfnet("run", "--server_list", pool, "--filter", "bogus.key=1", "--", "true", env=empty)
    assert result.returncode == 64, describe(result)
    assert "bogus.key" in result.stderr and "server.addr" in result.stderr  # names the known keys

    result = bfnet("run", "--server_list", pool, "-p", "2", "--", "true", env=empty)
    assert result.returncode == 64, describe(result)

    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not a reservation\n")
    result = bfnet("release_gpus", "-f", str(garbage), env=empty)
    assert result.returncode == 65, describe(result)
    assert str(garbage) in result.stderr
    assert garbage.exists(), "a file that is not a reservation is left alone"
    result = bfnet("run", "--reservation", str(garbage), "--", "true", env=empty)
    assert result.returncode == 65, describe(result)
    result = bfnet("release_gpus", env=empty)  # no -f and no BITFUSION_NET_LEASE
    assert result.returncode == 64, describe(result)

    for tail in ([], ["--"]):
        result = bfnet("run", "-n", "1", "--server_list", pool, *tail, env=empty)
        assert result.returncode == 64, describe(result)
        assert "command" in result.stderr
    wait_free(server.address)


# -- where the servers come from -------------------------------------------------------------------
def test_servers_come_from_a_file_the_environment_or_the_home_directory(
    server: CliServer, tmp_path: Path
) -> None:
    address = bare(server.address)
    conf = f"servers:\n  - addresses: [{address}]\n"
    servers_file = tmp_path / "servers.conf"
    servers_file.write_text(conf)
    home = tmp_path / "home"
    (home / ".bitfusion-net").mkdir(parents=True)
    (home / ".bitfusion-net" / "servers.conf").write_text(conf)
    program = ["--", sys.executable, "-c", "pass"]
    for how, env, args in [
        ("--servers", cli_env(tmp_path / "empty", tmp_path / "tmp"), ["--servers", str(servers_file)]),
        ("env", cli_env(tmp_path / "empty", tmp_path / "tmp", {"BITFUSION_NET_SERVERS": address}), []),
        ("home", cli_env(home, tmp_path / "tmp"), []),
    ]:  # fmt: skip
        result = bfnet("run", "-p", "0.1", *args, *program, env=env)
        assert result.returncode == 0, (how, describe(result))
        assert f"Server List: {address}" in result.stderr, (how, result.stderr)
    wait_free(server.address)


# -- list_gpus --json -------------------------------------------------------------------------------
def _leased_fractions(data: Any) -> list[float]:
    """Every ``leased_fraction`` anywhere in list_gpus' JSON, in order."""
    if isinstance(data, dict):
        found = [float(data["leased_fraction"])] if "leased_fraction" in data else []
        return found + [f for v in data.values() for f in _leased_fractions(v)]
    if isinstance(data, list):
        return [f for v in data for f in _leased_fractions(v)]
    return []


def test_list_gpus_json_shows_what_is_leased(
    server: CliServer, env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "r.json"
    pool = bare(server.address)
    result = bfnet("request_gpus", "-p", "0.5", "--file", str(path), "--server_list", pool, env=env)
    assert result.returncode == 0, describe(result)
    try:
        listing = bfnet("list_gpus", "--json", "--server_list", pool, env=env)
        assert listing.returncode == 0, describe(listing)
        assert sorted(_leased_fractions(json.loads(listing.stdout))) == [0.0, 0.5], listing.stdout
    finally:
        released = bfnet("release_gpus", "-f", str(path), env=env)
        assert released.returncode == 0, describe(released)
    listing = bfnet("list_gpus", "--json", "--server_list", pool, env=env)
    assert listing.returncode == 0, describe(listing)
    assert _leased_fractions(json.loads(listing.stdout)) == [0.0, 0.0], listing.stdout


# -- Bitfusion's quoted command form, and --filter choosing the GPU ---------------------------------
def test_a_quoted_command_runs_as_bitfusion_runs_it(server: CliServer, env: dict[str, str]) -> None:
    result = bfnet(
        "run", "--server_list", bare(server.address), "-p", "0.1", "echo quoted  form", env=env
    )
    assert result.returncode == 0, describe(result)
    assert result.stdout == "quoted form\n"


def test_a_device_filter_chooses_the_gpu_the_server_gives(
    tmp_path: Path, env: dict[str, str]
) -> None:
    show = tmp_path / "show.py"
    show.write_text(
        "import bitfusion_net as bf\n"
        "with bf.connect_sync() as s:\n"
        "    print(s.devices[0].server_gpu)\n"
    )
    with cli_server("--executor", "numpy", "--gpus", "2", "--gpu-memory", "1GiB") as two:
        address = bare(two.address)
        hold = bfnet("request_gpus", "--server_list", address, "-p", "0.5", env=env)
        assert hold.returncode == 0, describe(hold)  # best fit would now put a 0.5 on GPU 0 again
        result = bfnet(
            "run", "--server_list", address, "--filter", "device.id=1", "-p", "0.5",
            "--", sys.executable, str(show), env=env,
        )  # fmt: skip
        assert result.returncode == 0, describe(result)
        assert result.stdout.strip() == "1"
