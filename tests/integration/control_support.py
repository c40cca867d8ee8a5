"""Helpers of the control-plane tests: the ``bitfusion-net`` CLI as a subprocess, a scriptable
program to run under it, and what a server says it holds.

Every CLI process gets its own ``HOME`` and ``TMPDIR`` (so no user configuration leaks in, and
the reservation files ``run`` writes land where the test can see them) and none of the
``BITFUSION_NET_*`` variables of the environment the tests run in.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from integration_support import CliServer, poll_until, read_line

from bitfusion_net.cli.control import ControlConnection

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "bitfusion_net"]
CLI_TIMEOUT_S = 30.0  # the most one CLI command may take
LINE_S = 20.0  # the most a program may take to print its next line (imports numpy)

# A program to run under ``bitfusion-net run`` (or with BITFUSION_NET_LEASE set): it obeys the
# commands in its argv, in order, and with ``stdin`` goes on with one command a line from stdin.
# It reports in JSON lines on stdout.
#   attach      bitfusion_net.connect_sync() with no arguments (the reservation's GPUs)
#   work        saxpy on every device, checked with NumPy; each device's result or typed error
#   ready       print {"event": "ready"}
#   sleep:S     sleep S seconds
#   hang        sleep for an hour
#   exit:N      close the session and exit N
WORKER = r"""
import json, os, sys, time
import numpy as np
import bitfusion_net as bf

N = 4096


def emit(**fields):
    print(json.dumps(fields), flush=True)


def error(exc):
    return {
        "ok": False,
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
    }


def saxpy(device, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(N, dtype=np.float32)
    y = rng.standard_normal(N, dtype=np.float32)
    x_ptr = device.mem_alloc(x.nbytes)
    y_ptr = device.mem_alloc(y.nbytes)
    device.memcpy_htod(x_ptr, x)
    device.memcpy_htod(y_ptr, y)
    device.builtin("saxpy").launch((N + 255) // 256, 256, [N, 2.0, x_ptr, y_ptr])
    out = np.empty_like(y)
    device.memcpy_dtoh(out, y_ptr)
    device.mem_free(x_ptr)
    device.mem_free(y_ptr)
    np.testing.assert_allclose(out, 2.0 * x + y, rtol=1e-5, atol=1e-5)


def commands():
    for arg in sys.argv[1:]:
        if arg == "stdin":
            for line in sys.stdin:
                if line.strip():
                    yield line.strip()
        else:
            yield arg


session = None
for command in commands():
    name, _, value = command.partition(":")
    if name == "attach":
        lease = os.environ.get("BITFUSION_NET_LEASE")
        try:
            session = bf.connect_sync()
        except bf.BitfusionError as exc:
            emit(event="attach_failed", **error(exc))
            sys.exit(3)
        emit(
            event="attached",
            pid=os.getpid(),
            lease=lease,
            lease_mode=oct(os.stat(lease).st_mode & 0o777) if lease else None,
            servers=[d.server for d in session.devices],
            server_gpus=[d.server_gpu for d in session.devices],
        )
    elif name == "work":
        results = []
        for index, device in enumerate(session.devices):
            try:
                saxpy(device, index)
                results.append({"ok": True, "server": device.server})
            except bf.BitfusionError as exc:
                results.append({"server": device.server, **error(exc)})
        emit(event="work", results=results)
    elif name == "ready":
        emit(event="ready", pid=os.getpid())
    elif name == "sleep":
        time.sleep(float(value))
    elif name == "hang":
        time.sleep(3600)
    elif name == "exit":
        if session is not None:
            try:
                session.close()
            except bf.BitfusionError:
                pass
        sys.exit(int(value))
    else:
        emit(event="unknown_command", command=command)
        sys.exit(2)
"""


def write_worker(directory: Path) -> list[str]:
    """Write the worker into ``directory``; the command line that runs it."""
    path = directory / "worker.py"
    path.write_text(WORKER)
    return [sys.executable, str(path)]


# -- the CLI as a subprocess -----------------------------------------------------------------------
def cli_env(home: Path, tmp: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI process: its own HOME and TMPDIR, no BITFUSION_NET_* inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_NET_")}
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["TMPDIR"] = str(tmp)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def bfnet(
    *args: str, env: Mapping[str, str], timeout: float = CLI_TIMEOUT_S, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``bitfusion-net ARGS...`` to its end; fails the test if it runs past ``timeout``."""
    try:
        return subprocess.run(
            [*CLI, *args],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"bitfusion-net {' '.join(args)} ran past {timeout} s; stderr: {exc.stderr!r}"
        ) from None


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """A finished command for assertion messages."""
    return f"exit {result.returncode}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"


class CliProcess:
    """``bitfusion-net ARGS...`` running: its stdout read line by line (the program under
    ``run`` shares it), its stdin a pipe (the program shares that too), stderr kept."""

    def __init__(self, *args: str, env: Mapping[str, str], cwd: Path | None = None) -> None:
        self.args = args
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [*CLI, *args],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
        )
        self.lines: list[str] = []  # every stdout line read so far

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self, timeout: float = LINE_S) -> str:
        assert self.proc.stdout is not None
        try:
            text = read_line(self.proc.stdout, time.monotonic() + timeout).decode()
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stderr:\n{self.stderr()}") from None
        self.lines.append(text)
        return text

    def event(self, name: str, timeout: float = LINE_S) -> dict[str, Any]:
        """The next JSON line of the worker with this ``event`` (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.line(max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(ValueError):
                fields = json.loads(text)
                if isinstance(fields, dict) and fields.get("event") == name:
                    return fields
                if isinstance(fields, dict) and fields.get("event") == "attach_failed":
                    raise AssertionError(f"the program could not attach: {fields}")

    def send(self, *commands: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(c + "\n" for c in commands).encode())
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout: float = CLI_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"bitfusion-net {' '.join(self.args)} still running after {timeout} s; "
                f"stderr:\n{self.stderr()}"
            ) from None

    def rest_of_stdout(self) -> str:
        """What is left on stdout (call once the process and the program under it are done)."""
        assert self.proc.stdout is not None
        rest = self.proc.stdout.read().decode(errors="replace")
        self.lines.extend(rest.splitlines(keepends=True))
        return rest

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close_stdin()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@contextlib.contextmanager
def cli_process(
    *args: str, env: Mapping[str, str], cwd: Path | None = None
) -> Iterator[CliProcess]:
    process = CliProcess(*args, env=env, cwd=cwd)
    try:
        yield process
    finally:
        process.close()


# -- servers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_servers(count: int, *args: str) -> Iterator[list[CliServer]]:
    """``count`` listening CLI servers, started at once (NumPy devices of 1 GiB, INFO log)."""
    argv = [*args, "--executor", "numpy", "--gpu-memory", "1GiB", "--log-level", "INFO"]
    servers = [CliServer("--listen", "tcp://127.0.0.1:0", *argv) for _ in range(count)]
    try:
        for server in servers:
            server.wait_listening()
        yield servers
    finally:
        for server in servers:
            server.close()


def bare(address: str) -> str:
    """``tcp://HOST:PORT`` -> ``HOST:PORT``, as the CLI takes and prints addresses."""
    return address.removeprefix("tcp://")


def server_info(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """What the server answers SERVER_INFO (its GPUs' leased shares, its reservations)."""
    connection = ControlConnection(address, timeout)
    try:
        return connection.info()
    finally:
        connection.close()


def leased(address: str) -> list[float]:
    """``leased_fraction`` of each of the server's GPUs."""
    return [float(gpu["leased_fraction"]) for gpu in server_info(address)["gpus"]]


def is_free(address: str) -> bool:
    info = server_info(address)
    return not info["reservations"] and all(
        gpu["leased_fraction"] == 0 and gpu["leased_memory"] == 0 and gpu["tenants"] == 0
        for gpu in info["gpus"]
    )


def wait_free(address: str, timeout: float = 5.0) -> float:
    """Poll until the server holds nothing; returns how long that took."""
    started = time.monotonic()
    poll_until(lambda: is_free(address), f"{address} to hold no reservation", timeout=timeout)
    return time.monotonic() - started


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
