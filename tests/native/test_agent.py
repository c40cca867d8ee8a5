"""The ``libcuda.so.1`` stand-in (native/libcuda, docs/AGENT.md) against a real NumPy-device
server on loopback: a C program that uses only ``cuda.h``, cuda-python under
``bitfusion-net run``, a lost server, and a program built with ``nvcc -cudart shared``.

The agent is built as ``bitfusion-net run`` builds it on first use (into a cache directory of
this test session), unless ``BITFUSION_NET_AGENT_LIB`` names a build to test instead: ``.ci/run``
points it at the AddressSanitizer/UBSan build (``make SANITIZE=1``) and sets
``BITFUSION_NET_AGENT_SANITIZED=1``, which builds the C programs with the sanitizers too and
preloads their runtime into the Python and nvcc-built programs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitfusion_net.cli import agent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from integration_support import CliServer, cli_server  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SANITIZED = os.environ.get("BITFUSION_NET_AGENT_SANITIZED") == "1"
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
RUN_S = 120

pytestmark = pytest.mark.timeout(600)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.environ.get(agent.AGENT_LIB_ENV):
        _need("gcc")
        _need("make")
        if agent.cuda_include() is None:
            pytest.skip("the CUDA toolkit headers (cudaTypedefs.h) are not installed")
    cache = tmp_path_factory.mktemp("cache")  # a build from scratch, as on a fresh machine
    old = os.environ.get(agent.AGENT_CACHE_ENV)
    os.environ[agent.AGENT_CACHE_ENV] = str(cache)
    try:
        return agent.agent_library_dir()
    finally:
        if old is None:
            os.environ.pop(agent.AGENT_CACHE_ENV, None)
        else:
            os.environ[agent.AGENT_CACHE_ENV] = old


def _sanitizer_env() -> dict[str, str]:
    """What a program not built with the sanitizers needs to load the sanitized agent."""
    if not SANITIZED:
        return {}
    runtime = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # Python and cudart leak by design at exit; the agent's own errors still abort the program
    return {"LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"}


def _env(agent_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITFUSION_NET_")}
    env.update(agent.agent_environment(agent_dir, env))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # 1 MiB payloads, so the programs' 3 MiB copies are split as PROTOCOL.md section 10 says
    with cli_server("--max-payload", "1MiB") as running:
        yield running.address


@pytest.fixture(scope="module")
def driver_program(agent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = _need("gcc")
    include = agent.cuda_include()
    assert include is not None
    out = tmp_path_factory.mktemp("c") / "driver_api"
    subprocess.run(
        [gcc, "-Wall", "-Wextra", "-Werror", *(SANITIZE_FLAGS if SANITIZED else []),
         f"-I{include}", "-o", str(out), str(HERE / "driver_api.c"), f"-L{agent_dir}", "-lcuda",
         "-pthread"],
        check=True, timeout=RUN_S,
    )  # fmt: skip
    return out


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=RUN_S, stdin=subprocess.DEVNULL
    )


def test_the_library_is_libcuda_so_1_and_exports_every_driver_symbol(agent_dir: Path) -> None:
    library = agent_dir / "libcuda.so.1"
    dynamic = subprocess.run(
        ["readelf", "-d", "-W", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "Library soname: [libcuda.so.1]" in dynamic
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in ("cuGetProcAddress_v2", "cuGetProcAddress", "cuInit", "cuMemAlloc_v2",
                 "cuMemAlloc", "cuMemcpyHtoD_v2_ptds", "cuCtxCreate_v4", "cuLaunchKernel",
                 "cuGetExportTable", "cuGraphCreate", "cuLibraryLoadData"):  # fmt: skip
        assert name in symbols, name
    # nothing of the agent's own leaks into the programs' namespace
    assert not [s for s in symbols if s.startswith("bf")]


def test_a_c_program_using_cuda_h(driver_program: Path, agent_dir: Path, server: str) -> None:
    env = _env(
        agent_dir,
        BITFUSION_NET_AGENT_SERVER=server,
        BITFUSION_NET_AGENT_FRACTION="0.5",
        **({"ASAN_OPTIONS": "abort_on_error=1"} if SANITIZED else {}),
    )
    result = _run([str(driver_program), "all"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "ok devices", "ok contexts", "ok memory", "ok copies", "ok memsets",
        "ok streams and events", "ok modules", "ok threads", "ok cuGetProcAddress", "ALL OK",
    ]  # fmt: skip
    # the PTX refusal names the server's reason; a call not forwarded is named once
    assert "the NumPy reference device runs only the built-in kernels" in result.stderr
    assert result.stderr.count("cuGraphCreate (version 10000) is not forwarded") == 1


def test_the_c_program_under_bitfusion_net_run(driver_program: Path, agent_dir: Path,
                                               server: str) -> None:  # fmt: skip
    """The lease reaches the agent through ``run``'s reservation file (an ATTACH)."""
    env = _env(agent_dir, **{agent.AGENT_LIB_ENV: str(agent_dir)})
    env.update({"ASAN_OPTIONS": "abort_on_error=1"} if SANITIZED else {})
    result = _run(
        [sys.executable, "-m", "bitfusion_net", "run", "-n", "1", "-p", "0.5", "--server_list",
         server.removeprefix("tcp://"), "--", str(driver_program), "all"],
        env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "ALL OK"


@pytest.mark.parametrize("per_thread_stream", ["0", "1"])
def test_cuda_python_under_bitfusion_net_run(
    agent_dir: Path, server: str, per_thread_stream: str
) -> None:
    """cuda-python resolves every call through cuGetProcAddress_v2; with its per-thread default
    stream switch it asks for the _ptds/_ptsz entry points instead."""
    pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings is not installed")
    env = _env(
        agent_dir,
        **{agent.AGENT_LIB_ENV: str(agent_dir)},
        CUDA_PYTHON_CUDA_PER_THREAD_DEFAULT_STREAM=per_thread_stream,
        **_sanitizer_env(),
    )
    result = _run(
        [sys.executable, "-m", "bitfusion_net", "run", "-n", "1", "-p", "0.5", "--server_list",
         server.removeprefix("tcp://"), "--", sys.executable,
         str(HERE / "cuda_python_program.py")],
        env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "ALL"))]
    assert lines == [
        "ok devices", "ok contexts", "ok memory", "ok copies", "ok memsets",
        "ok streams and events", "ok modules", "ALL OK",
    ], result.stdout + result.stderr  # fmt: skip


def test_a_lost_server_makes_every_later_call_device_unavailable(
    driver_program: Path, agent_dir: Path
) -> None:
    with cli_server() as running:
        env = _env(
            agent_dir,
            BITFUSION_NET_AGENT_SERVER=running.address,
            BITFUSION_NET_AGENT_FRACTION="0.5",
        )
        program = subprocess.Popen(
            [str(driver_program), "lost"], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert program.stdout is not None and program.stdin is not None
            assert program.stdout.readline() == "waiting\n"
            running.proc.kill()  # no goodbye: the connection just ends
            running.proc.wait()
            program.stdin.write("go\n")
            program.stdin.flush()
            out, err = program.communicate(timeout=RUN_S)
        finally:
            program.kill()
    assert program.returncode == 0, out + err
    assert out == "ok lost\n"
    assert "every CUDA call now fails with CUDA_ERROR_DEVICE_UNAVAILABLE" in err


@pytest.fixture(scope="module")
def runtime_program(agent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    nvcc = _need("nvcc")
    out = tmp_path_factory.mktemp("cudart") / "runtime_api"
    subprocess.run(
        [nvcc, "-cudart", "shared", "-o", str(out), str(HERE / "runtime_api.cu")],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def kernel_program(agent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    nvcc = _need("nvcc")
    out = tmp_path_factory.mktemp("cudart") / "runtime_kernel"
    subprocess.run(
        [nvcc, "-cudart", "shared", "-o", str(out), str(HERE / "runtime_kernel.cu")],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return out


def _run_runtime(program: Path, agent_dir: Path, server: str) -> subprocess.CompletedProcess[str]:
    env = _env(
        agent_dir,
        BITFUSION_NET_AGENT_SERVER=server,
        BITFUSION_NET_AGENT_FRACTION="0.5",
        BITFUSION_NET_AGENT_LOG="3",  # every lookup, for the record below
        **_sanitizer_env(),
    )
    return _run([str(program)], env)


RUNTIME_STEPS = [
    "cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaMemGetInfo", "cudaMalloc",
    "cudaMemcpy HtoD", "cudaMemcpy DtoH", "cudaMemset", "cudaDeviceSynchronize",
    "cudaStreamCreate", "cudaEventCreate", "cudaEventCreate", "cudaEventRecord",
    "cudaMemcpyAsync", "cudaEventRecord", "cudaStreamSynchronize", "cudaEventElapsedTime",
    "cudaPointerGetAttributes", "cudaEventDestroy", "cudaEventDestroy", "cudaStreamDestroy",
    "cudaFree", "cudaDeviceReset",
]  # fmt: skip
# What cudart looks up that the agent has no entry point for: the VDPAU interop calls (their
# header needs VDPAU's, which the toolkit does not ship) and an empty name it probes with.
UNRESOLVED = {"", "cuVDPAUGetDevice", "cuVDPAUCtxCreate", "cuGraphicsVDPAURegisterVideoSurface",
              "cuGraphicsVDPAURegisterOutputSurface"}  # fmt: skip


def test_a_cudart_program_through_the_agent(
    runtime_program: Path, agent_dir: Path, server: str
) -> None:
    """NVIDIA's runtime (``nvcc -cudart shared``) initialises on the agent: its entry points,
    its private tables (the integrity check included), its primary context, its lazily loaded
    fatbin (never sent: the program launches no kernel), then every call of the program."""
    result = _run_runtime(runtime_program, agent_dir, server)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.splitlines() == [f"ok {step}" for step in RUNTIME_STEPS] + ["ALL OK"]
    lookups = [line for line in result.stderr.splitlines() if "cuGetProcAddress(" in line]
    missing = {line.split("(")[1].split(",")[0] for line in lookups if line.endswith("unknown")}
    assert len(lookups) >= 400  # cudart resolves its whole table up front
    assert missing <= UNRESOLVED, missing
    for table in ("CUDART_INTERFACE", "CONTEXT_LOCAL_STORAGE", "CONTEXT_CHECKS",
                  "INTEGRITY_CHECK"):  # fmt: skip
        assert f"cuGetExportTable({table})" in result.stderr
    assert "not forwarded" not in result.stderr  # nothing it needed is missing


def test_a_cudart_kernel_on_the_numpy_device_fails_cleanly(
    kernel_program: Path, agent_dir: Path, server: str
) -> None:
    """cudart loads the program's fatbin lazily (cuLibraryLoadData); the launch sends it to the
    server, which cannot run it: the launch fails with cudaErrorNotSupported, saying why on
    stderr, and the program's other calls still work."""
    result = _run_runtime(kernel_program, agent_dir, server)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "cudaMalloc cudaSuccess",
        "launch cudaErrorNotSupported",
        "cudaDeviceSynchronize cudaSuccess",
        "cudaMemcpy cudaSuccess",
        "cudaFree cudaSuccess",
    ]
    assert "the NumPy reference device runs only the built-in kernels" in result.stderr


@pytest.fixture(scope="module")
def images_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = _need("gcc")
    out = tmp_path_factory.mktemp("images") / "images_check"
    subprocess.run(
        [gcc, "-Wall", "-Wextra", "-Werror", "-g", *(SANITIZE_FLAGS if SANITIZED else []),
         f"-I{REPO / 'native' / 'libcuda'}", "-o", str(out), str(HERE / "images_check.c"),
         str(REPO / "native" / "libcuda" / "images.c")],
        check=True, timeout=RUN_S,
    )  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("kind", "nvcc_args", "expected"),
    [
        # a cubin's EIATTR_KPARAM_INFO has sizes only: a float is an 'I', a pointer a 'Q';
        # an 8-byte struct by value is packed as its 8 bytes
        ("cubin", ["-cubin", "-arch=sm_80"],
         {"saxpy": "IIQQ", "mixed": "BHQQQ", "by_value": "QQ", "_Z6noargsv": ""}),
        # nvcc's default fatbin: cubins (read first) beside zstd-compressed PTX
        ("fatbin", ["-fatbin"],
         {"saxpy": "IIQQ", "mixed": "BHQQQ", "by_value": "QQ", "_Z6noargsv": ""}),
        # cubins compressed too (zstd, through the system's libzstd.so.1)
        ("fatbin-compressed", ["-fatbin", "-arch=sm_80", "-Xfatbin", "-compress-all"],
         {"saxpy": "IIQQ", "mixed": "BHQQQ", "by_value": "QQ", "_Z6noargsv": ""}),
        # PTX has the types; a struct by value is .b8 name[N], which has no argument code
        ("ptx", ["-ptx"],
         {"saxpy": "IfQQ", "mixed": "BHdQQ", "by_value": "!", "_Z6noargsv": ""}),
        # a fatbin of compressed PTX only: its PTX is decompressed and read
        ("fatbin-ptx-only", ["-fatbin", "--gpu-architecture=compute_80"],
         {"saxpy": "IfQQ", "mixed": "BHdQQ", "by_value": "!", "_Z6noargsv": ""}),
        # not an image: nothing to read (the agent then refuses the module's kernels)
        ("garbage", [], None),
    ],
)  # fmt: skip
def test_kernel_parameter_layouts_read_from_images(
    images_check: Path,
    tmp_path: Path,
    kind: str,
    nvcc_args: list[str],
    expected: dict[str, str] | None,
) -> None:
    """What cuModuleGetFunction packs launches by (docs/AGENT.md), read from images nvcc made;
    every truncation of each image is read too, without a crash (under the sanitizers in the
    sanitized run)."""
    if kind in ("fatbin-compressed", "fatbin-ptx-only"):
        import ctypes

        try:
            ctypes.CDLL("libzstd.so.1")
        except OSError:
            pytest.skip("libzstd.so.1 (zstd's runtime library) is not installed")
    image = tmp_path / f"kernels.{kind}"
    if nvcc_args:
        subprocess.run(
            [_need("nvcc"), *nvcc_args, "-o", str(image), str(HERE / "kernels.cu")],
            check=True, timeout=300, capture_output=True,
        )  # fmt: skip
    else:
        image.write_bytes(bytes(range(256)) * 4)
    result = _run([str(images_check), str(image)], {**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    if expected is None:
        assert lines[:-1] == ["none"]
    else:
        table = dict((line.split(" ", 1) + [""])[:2] for line in lines[:-1])
        assert {name: types.strip() for name, types in table.items()} == expected


def test_on_a_server_with_tokens_the_agent_presents_the_reservations_token(
    driver_program: Path, agent_dir: Path, tmp_path: Path
) -> None:
    """``run`` reserves with ``$BITFUSION_NET_TOKEN`` and writes the token into the reservation
    file; the agent AUTHENTICATEs with it before its ATTACH. Without one, cuInit finds no
    device and says why."""
    from bitfusion_net.server.tokens import TokenStore

    store = TokenStore(tmp_path)
    token, _ = store.create("alice")
    with cli_server("--state-dir", str(store.path.parent)) as running:
        env = _env(agent_dir, **{agent.AGENT_LIB_ENV: str(agent_dir)}, HOME=str(tmp_path))
        env.update({"ASAN_OPTIONS": "abort_on_error=1"} if SANITIZED else {})
        result = _run(
            [sys.executable, "-m", "bitfusion_net", "run", "-n", "1", "-p", "0.5",
             "--server_list", running.address.removeprefix("tcp://"), "--",
             str(driver_program), "all"],
            {**env, "BITFUSION_NET_TOKEN": token},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1] == "ALL OK"
        refused = _run(
            [str(driver_program), "all"],
            {**env, "BITFUSION_NET_AGENT_SERVER": running.address},
        )
    assert refused.returncode == 1
    assert "requires a token" in refused.stderr, refused.stderr
    assert "cuInit(0) = 100" in refused.stderr  # CUDA_ERROR_NO_DEVICE


def test_run_sets_the_agent_up_unless_told_not_to(
    agent_dir: Path, server: str, tmp_path: Path
) -> None:
    show = [sys.executable, "-c", "import os; print(os.environ.get('LD_LIBRARY_PATH', ''))"]
    address = server.removeprefix("tcp://")
    base = _env(agent_dir, LD_LIBRARY_PATH="/opt/mine")

    def run(*options: str, **extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "bitfusion_net", "run", *options, "-p", "0.25",
                "--server_list", address, "--", *show]  # fmt: skip
        return _run(argv, {**base, **extra})

    on = run(**{agent.AGENT_LIB_ENV: str(agent_dir)})
    assert on.returncode == 0, on.stderr
    assert on.stdout.splitlines()[-1] == f"{agent_dir}:/opt/mine"  # first, the rest kept
    off = run("--no-agent", **{agent.AGENT_LIB_ENV: str(agent_dir)})
    assert off.stdout.splitlines()[-1] == "/opt/mine"
    # no agent to be had: the command still runs, and run says why it has no agent
    missing = run(**{agent.AGENT_LIB_ENV: str(tmp_path)})
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.splitlines()[-1] == "/opt/mine"
    assert "CUDA driver-API programs will not reach the GPUs" in missing.stderr + missing.stdout
    assert "holds no libcuda.so.1" in missing.stderr + missing.stdout


# -- a lease over several servers -------------------------------------------------------------
@pytest.fixture
def two_servers() -> Iterator[list[CliServer]]:
    """Two servers of one NumPy GPU each: ``run -n 2`` must take one GPU on each."""
    with (
        cli_server("--max-payload", "1MiB") as first,
        cli_server("--max-payload", "1MiB") as second,
    ):
        yield [first, second]


def _run_on(servers: list[CliServer], agent_dir: Path, *command: str) -> list[str]:
    """``bitfusion-net run -n 2 -p 0.5 --server_list A,B -- COMMAND`` as an argv."""
    addresses = ",".join(s.address.removeprefix("tcp://") for s in servers)
    return [sys.executable, "-m", "bitfusion_net", "run", "-n", "2", "-p", "0.5", "--server_list",
            addresses, "--", *command]  # fmt: skip


def _pool_env(agent_dir: Path) -> dict[str, str]:
    env = _env(agent_dir, **{agent.AGENT_LIB_ENV: str(agent_dir)})
    env.update({"ASAN_OPTIONS": "abort_on_error=1"} if SANITIZED else {})
    return env


def test_a_lease_over_two_servers_is_two_devices(
    driver_program: Path, agent_dir: Path, two_servers: list[CliServer]
) -> None:
    """Each server's GPU is a device of the program (0, then 1, in the reservation file's
    order), reached through its own connection: memory, copies over several payloads, memsets,
    streams, events and the built-in saxpy on each; copies between them through this host;
    an asynchronous error reported by its own server only; both driven from two threads."""
    result = _run(
        _run_on(two_servers, agent_dir, str(driver_program), "pool"), _pool_env(agent_dir)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith(("ok", "ALL"))] == [
        "ok pool devices", "ok pool each device", "ok pool copies", "ok pool sticky errors",
        "ok pool threads", "ALL OK",
    ], result.stdout + result.stderr  # fmt: skip
    # one GPU from each server (each has only one), and no "uses the first server" any more
    assert "Locked 2 GPUs" in result.stderr + result.stdout
    assert "spans" not in result.stderr
    # device 1's memory passed to device 0's kernel is refused, saying why
    assert "which is on another server: it cannot be reached from this one" in result.stderr


@pytest.mark.parametrize("dead", [0, 1])
def test_a_lost_server_of_a_pool_fails_only_its_own_device(
    driver_program: Path, agent_dir: Path, two_servers: list[CliServer], dead: int
) -> None:
    """The server of device ``dead`` is killed under the program: calls on that device answer
    CUDA_ERROR_DEVICE_UNAVAILABLE (copies to or from it included), the other device's data is
    intact and every call on it still works, as the Python client keeps the other servers'
    devices working."""
    program = subprocess.Popen(
        _run_on(two_servers, agent_dir, str(driver_program), "pool-lost"), env=_pool_env(agent_dir),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert program.stdout is not None and program.stdin is not None
        waiting = program.stdout.readline()
        assert waiting.startswith("waiting "), waiting
        lease = json.loads(Path(waiting.split(" ", 1)[1].strip()).read_text())
        address = lease["servers"][dead]["address"]
        (victim,) = [s for s in two_servers if s.address == address]
        victim.proc.kill()  # no goodbye: the connection just ends
        victim.proc.wait()
        program.stdin.write(f"go {dead}\n")
        program.stdin.flush()
        out, err = program.communicate(timeout=RUN_S)
    finally:
        program.kill()
        program.wait()
    assert program.returncode == 0, out + err
    assert [line for line in out.splitlines() if line.startswith("ok")] == ["ok pool lost"]
    lost = f"the session with the server {address} (devices {dead}..{dead}) is over"
    assert lost in err, err
    assert "the other servers' devices keep working" in err


@pytest.mark.parametrize(
    "schemes",
    [["rdma"], ["tls"], ["tcp", "rdma"], ["tcp", "tls"], ["agent-server:tls"],
     ["agent-server:rdma"]],
)  # fmt: skip
def test_a_server_the_agent_cannot_speak_to_fails_cuinit_clearly(
    driver_program: Path, agent_dir: Path, tmp_path: Path, schemes: list[str]
) -> None:
    """The agent speaks plain TCP: a tls:// or rdma:// server (in the reservation file, even as
    its second server, or in BITFUSION_NET_AGENT_SERVER) fails cuInit with
    CUDA_ERROR_NO_DEVICE, naming the address and saying a tcp:// server is needed, at once and
    before connecting anywhere (a listening socket stands at every address: nothing may reach
    it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    env = _env(agent_dir, **({"ASAN_OPTIONS": "abort_on_error=1"} if SANITIZED else {}))
    if schemes[0].startswith("agent-server:"):
        bad = f"{schemes[0].split(':')[1]}://127.0.0.1:{port}"
        env["BITFUSION_NET_AGENT_SERVER"] = bad
        where = "BITFUSION_NET_AGENT_SERVER"
    else:
        lease_file = tmp_path / "lease.json"
        servers = [
            {"address": f"{scheme}://127.0.0.1:{port}", "server_id": f"server-{k}",
             "reservation": k + 1, "secret": "00ff" * 8, "idle_timeout": 0.0, "devices": []}
            for k, scheme in enumerate(schemes)
        ]  # fmt: skip
        lease_file.write_text(json.dumps({"format": "bitfusion-net reservation 1", "token": "",
                                          "servers": servers}))  # fmt: skip
        lease_file.chmod(0o600)
        env["BITFUSION_NET_LEASE"] = str(lease_file)
        bad = servers[-1]["address"]
        where = f"the reservation file {lease_file}"
    try:
        result = _run([str(driver_program), "all"], env)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected, not even to a tcp:// server of the lease
    finally:
        listener.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cuInit(0) = 100" in result.stderr  # CUDA_ERROR_NO_DEVICE
    scheme = bad.split(":", 1)[0].upper()
    assert (
        f"{where} names the server {bad}: the agent speaks plain TCP only and needs a "
        f"tcp://HOST:PORT server ({scheme} is not supported by the agent yet)"
    ) in result.stderr, result.stderr


@pytest.fixture(scope="module")
def runtime_pool_program(agent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    nvcc = _need("nvcc")
    out = tmp_path_factory.mktemp("cudart") / "runtime_pool"
    subprocess.run(
        [nvcc, "-cudart", "shared", "-o", str(out), str(HERE / "runtime_pool.cu")],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return out


def test_a_cudart_program_on_a_lease_over_two_servers(
    runtime_pool_program: Path, agent_dir: Path, two_servers: list[CliServer]
) -> None:
    """NVIDIA's runtime initialises on two devices of two servers (its integrity check covers
    each device's UUID and PCI location), works on each after cudaSetDevice and copies between
    them with cudaMemcpyPeer, through the agent alone."""
    env = _env(agent_dir, **{agent.AGENT_LIB_ENV: str(agent_dir)}, **_sanitizer_env())
    result = _run(_run_on(two_servers, agent_dir, str(runtime_pool_program)), env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "ALL OK", result.stdout + result.stderr[-3000:]
    assert "ok cudaMemcpyPeer" in lines
    assert not [line for line in lines if line.startswith("FAIL")]
    assert "not forwarded" not in result.stderr
