"""``python -m bitfusion_net.server``: help, start-up line, clean shutdown, bad arguments."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from integration_support import CliServer, GiB, MiB, cli_server, poll_until, run

import bitfusion_net as bf

SERVER = [sys.executable, "-m", "bitfusion_net.server"]


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVER, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def test_help() -> None:
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--listen", "--gpus", "--gpu-memory", "--min-fraction", "--max-payload"):
        assert option in result.stdout


def test_starts_on_port_zero_serves_and_exits_cleanly_on_sigterm() -> None:
    server = CliServer("--listen", "tcp://127.0.0.1:0", "--executor", "numpy", "--gpus", "2",
                       "--gpu-memory", "512MiB", "--max-payload", "1MiB")  # fmt: skip
    try:
        address = server.wait_listening()
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536

        async def use() -> None:
            async with bf.connect(address, gpus=2, fraction=0.5) as session:
                assert session.max_payload == MiB
                assert sorted(d.server_gpu for d in session.devices) == [0, 1]
                assert all(d.total_memory == 512 * MiB for d in session.devices)
                data = np.arange(3 * MiB + 5, dtype=np.uint8)  # split into 1 MiB frames
                ptr = await session.devices[1].mem_alloc(data.nbytes)
                await session.devices[1].memcpy_htod(ptr, data)
                out = np.empty_like(data)
                await session.devices[1].memcpy_dtoh(out, ptr)
                np.testing.assert_array_equal(out, data)

        run(use())
        # SIGTERM with a client still connected: it is dropped and the server exits 0.
        client = bf.connect_sync(address, fraction=0.5)
        try:
            assert server.terminate(timeout=10) == 0, server.stderr_text()
        finally:
            client.close()
        assert "Traceback" not in server.stderr_text()
    finally:
        server.close()


def test_sigint_also_shuts_down_cleanly() -> None:
    server = CliServer("--gpu-memory", "64MiB")
    try:
        server.wait_listening()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(10) == 0, server.stderr_text()
    finally:
        server.close()


@pytest.mark.parametrize("value", ["lots", "-1GiB", "12XB", "", "1 GiB extra"])
def test_bad_gpu_memory_exits_non_zero_with_a_message(value: str) -> None:
    result = _run_cli(f"--gpu-memory={value}")
    assert result.returncode != 0
    assert "--gpu-memory" in result.stderr
    assert "not a size" in result.stderr
    assert result.stdout == ""  # never claimed to be listening


def test_zero_gpu_memory_exits_non_zero_with_a_message() -> None:
    result = _run_cli("--gpu-memory", "0")
    assert result.returncode != 0
    assert "memory" in result.stderr and "positive" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "--gpus"),
        (["--gpus", "two"], "--gpus"),
        (["--max-payload", "huge"], "--max-payload"),
        (["--executor", "cuda-magic"], "--executor"),
        (["--listen", "http://127.0.0.1:0"], "tcp://"),
        (["--listen", "tcp://127.0.0.1"], "port"),
        (["--min-fraction", "0"], "min_fraction"),
        (["--min-fraction", "nan"], "min_fraction"),
        (["--stall-timeout", "0"], "--stall-timeout"),
        (["--max-connections", "0"], "--max-connections"),
        (["--gil-switch-interval", "0"], "--gil-switch-interval"),
        (["--gil-switch-interval", "nan"], "--gil-switch-interval"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(args: list[str], message: str) -> None:
    result = _run_cli(*args, "--gpu-memory", "64MiB")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_port_in_use_exits_non_zero_with_a_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_cli("--listen", f"tcp://127.0.0.1:{port}", "--gpu-memory", "64MiB")
    assert result.returncode != 0
    assert "error" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_cli_device_memory_is_what_was_asked() -> None:
    with cli_server("--gpu-memory", "1.5GiB", "--min-fraction", "0.25") as server:

        async def main() -> None:
            with pytest.raises(bf.InvalidValueError):
                await bf.connect(server.address, fraction=0.05)
            async with bf.connect(server.address, fraction=0.25) as session:
                device = session.devices[0]
                assert device.total_memory == 3 * GiB // 2
                assert device.memory_limit == 3 * GiB // 8

        run(main())


def test_sigusr1_logs_every_tenants_lease_and_usage() -> None:
    with cli_server("--gpu-memory", "1GiB", "--log-level", "INFO") as server:
        with bf.connect_sync(
            server.address, fraction=0.25, mode="cap", client_name="reporter"
        ) as s:
            gpu = s.devices[0]
            gpu.mem_alloc(MiB)
            gpu.builtin("busy").launch(1, 1, [1000])
            gpu.synchronize()
            server.proc.send_signal(signal.SIGUSR1)
            poll_until(lambda: " kernels, " in server.stderr_text(), "the tenants report")
        report = server.stderr_text()
        assert "gpu0: 0.25 leased to 1 tenant(s)" in report
        assert "reporter gpu0 0.25 cap weight 0.25" in report
        assert "1 kernels" in report and "1 MiB" in report
        assert server.terminate() == 0


def test_the_default_executor_is_auto_and_says_what_it_chose() -> None:
    # Started without --executor: on a machine without a usable GPU, auto serves NumPy devices
    # and logs why; with one, it serves the GPU with PyCUDA. Either way the log says which.
    server = CliServer("--listen", "tcp://127.0.0.1:0", "--gpus", "2", "--gpu-memory", "1GiB")
    try:
        server.wait_listening()
        text = server.stderr_text()
        if "no usable GPU, serving NumPy reference devices: " in text:
            assert "serving 2 numpy GPU(s)" in text
            assert "gpu1: NumPy reference device (numpy executor), 1 GiB for tenants" in text
        else:
            assert "serving it with the PyCUDA executor" in text, text
            assert "pycuda GPU(s)" in text, text
        assert server.terminate() == 0
    finally:
        server.close()
