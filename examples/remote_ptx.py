"""Bring your own CUDA code: compile a kernel to PTX here, run it on a remote GPU.

Compiles ``examples/kernels/scale_rows.cu`` to PTX on this (client) machine with nvcc, leases a
quarter of a GPU, loads the PTX there with ``module_load``, runs the kernel on a random matrix and
checks the result against NumPy computed locally. The client needs nvcc (found through ``$NVCC``,
then ``PATH``, then ``$CUDA_HOME/bin``, ``$CUDA_ROOT/bin`` and ``/usr/local/cuda/bin``) but no GPU;
the PTX targets ``compute_75``, so the server's driver JIT-compiles it for any current GPU.

    python -m bitfusion_net.server --executor pycuda     # on a GPU host; prints its address
    python examples/remote_ptx.py tcp://HOST:PORT        # anywhere with nvcc

    python examples/remote_ptx.py                        # embedded server, as in quickstart.py

Without an address it starts a server in this process as quickstart.py does; on the NumPy
reference device that cannot load modules, so the example explains that and exits with status 2.
Exit status: 0 the result matches NumPy, 1 it differs or nvcc failed, 2 the server's device
cannot load modules.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bitfusion_net as bf

KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "scale_rows.cu"
KERNEL_NAME = "scale_rows"
# scale_rows(int rows, int cols, float alpha, const float *scale, const float *x, float *y)
KERNEL_ARG_TYPES = "iifPPP"
# The oldest virtual architecture nvcc 13 still targets: its PTX JIT-compiles on every newer GPU.
PTX_ARCH = "compute_75"
NVCC_TIMEOUT_S = 60.0

NO_MODULES_EXIT = 2
NO_MODULES_MESSAGE = (
    "This example runs your own CUDA code, which needs a server whose devices can load PTX "
    "modules, but the device it leased ({device!r}) cannot ({error}). Start a server with a GPU "
    "executor on a host with an NVIDIA GPU, `python -m bitfusion_net.server --executor pycuda "
    "--listen tcp://0.0.0.0:7000`, and pass its address: `python examples/remote_ptx.py "
    "tcp://HOST:7000`. (Without an address the example embeds a server that uses the NumPy "
    "reference device, which runs only the built-in kernels.)"
)


class NvccError(RuntimeError):
    """nvcc is missing or failed to compile the kernel."""


def find_nvcc() -> str:
    """The nvcc to use: ``$NVCC``, then ``PATH``, then the usual CUDA toolkit locations."""
    explicit = os.environ.get("NVCC")
    if explicit:
        # A set $NVCC is a deliberate choice: falling back to another nvcc would hide the typo.
        found = shutil.which(explicit)
        if found is None:
            raise NvccError(f"$NVCC is {explicit!r}, which is not an executable nvcc")
        return found
    on_path = shutil.which("nvcc")
    if on_path is not None:
        return on_path
    candidates = [
        Path(root) / "bin" / "nvcc"
        for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_ROOT"))
        if root
    ]
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise NvccError(
        "nvcc not found: this example compiles its kernel to PTX on the client. Install the CUDA "
        "toolkit (no GPU needed) or point $NVCC at nvcc; looked in $NVCC, PATH, "
        + ", ".join(str(candidate) for candidate in candidates)
    )


def compile_ptx(source: Path, arch: str = PTX_ARCH) -> bytes:
    """PTX for ``source``, compiled by nvcc for the virtual architecture ``arch``."""
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory(prefix="bitfusion-ptx-") as tmp:
        output = Path(tmp) / f"{source.stem}.ptx"
        command = [nvcc, "-ptx", f"-arch={arch}", "-o", str(output), str(source)]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NvccError(f"cannot run {' '.join(command)}: {exc}") from None
        if result.returncode != 0:
            raise NvccError(
                f"{' '.join(command)} failed with status {result.returncode}:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        # The driver's JIT expects a NUL-terminated PTX string.
        return output.read_bytes() + b"\0"


async def run(address: str, ptx: bytes) -> int:
    """Run scale_rows on the server at ``address``; returns the example's exit status."""
    rng = np.random.default_rng(0)
    rows, cols, alpha = 1000, 333, 0.5  # cols odd: rows do not line up with blocks
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    scale = rng.uniform(0.5, 2.0, rows).astype(np.float32)

    async with bf.connect(address, fraction=0.25, client_name="remote_ptx") as session:
        gpu = session.devices[0]
        print(f"leased {gpu.fraction:g} of '{gpu.name}' ({gpu.executor})")
        try:
            module = await gpu.module_load(ptx)
        except bf.UnsupportedError as exc:
            # Not a failure of the example: the server was started without a GPU executor.
            print(NO_MODULES_MESSAGE.format(device=gpu.name, error=exc), file=sys.stderr)
            return NO_MODULES_EXIT
        try:
            kernel = await module.get_function(KERNEL_NAME, KERNEL_ARG_TYPES)
            d_scale, d_x, d_y = [await gpu.mem_alloc(a.nbytes) for a in (scale, x, x)]
            await gpu.memcpy_htod(d_scale, scale)
            await gpu.memcpy_htod(d_x, x)
            started = time.perf_counter()
            # Fewer threads than elements on purpose: each thread loops over several of them.
            await kernel.launch(grid=64, block=256, args=[rows, cols, alpha, d_scale, d_x, d_y])
            y = np.empty_like(x)
            await gpu.memcpy_dtoh(y, d_y)  # waits for the launch, raising any kernel error
            elapsed = time.perf_counter() - started
            for ptr in (d_scale, d_x, d_y):
                await gpu.mem_free(ptr)
        finally:
            await module.unload()

    expected = (np.float32(alpha) * scale)[:, None] * x
    error = float(np.max(np.abs(y - expected)))
    ok = bool(np.allclose(y, expected, rtol=1e-6, atol=0.0))
    print(
        f"  {'ok  ' if ok else 'FAIL'} {KERNEL_NAME}({rows}x{cols}) from PTX: "
        f"max |error| {error:.3g}, launch and copy back in {elapsed * 1e3:.1f} ms"
    )
    print("result matches NumPy" if ok else "result DIFFERS from NumPy")
    return 0 if ok else 1


async def run_with_server(argv: list[str], ptx: bytes) -> int:
    if len(argv) > 1:
        return await run(argv[1], ptx)
    # The same embedded server as quickstart.py, so both examples behave alike without a GPU.
    async with bf.Server(
        "tcp://127.0.0.1:0", executor="numpy", gpus=1, gpu_memory="1GiB"
    ) as server:
        print(f"server listening on {server.address}")
        return await run(server.address, ptx)


def main(argv: list[str]) -> int:
    try:
        # Compiled before connecting, so that no lease is held while nvcc runs or if it fails.
        ptx = compile_ptx(KERNEL_SOURCE)
    except NvccError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"compiled {KERNEL_SOURCE.name} to {len(ptx)} bytes of PTX ({PTX_ARCH})")
    return asyncio.run(run_with_server(argv, ptx))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
