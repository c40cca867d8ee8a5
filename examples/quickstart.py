"""Quick start: a bitfusion-net server and a client doing real work on a remote (NumPy) GPU.

Starts a server in this process on a free loopback port with one 1 GiB NumPy reference device,
leases a quarter of it, runs a small two-layer network forward pass with the built-in kernels
(gemm, relu, softmax, reduce_sum, saxpy) on the remote device, and checks every result against
NumPy computed locally. Exits non-zero if any result differs.

    python examples/quickstart.py                       # embedded server
    python examples/quickstart.py tcp://HOST:PORT       # a server you started yourself
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np

import bitfusion_net as bf


async def run(address: str) -> bool:
    rng = np.random.default_rng(0)
    batch, n_in, n_hidden, n_out = 64, 256, 128, 10
    x = rng.standard_normal((batch, n_in), dtype=np.float32)
    w1 = (rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in)).astype(np.float32)
    w2 = (rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden)).astype(np.float32)

    async with bf.connect(address, fraction=0.25, client_name="quickstart") as session:
        gpu = session.devices[0]
        free, total = await gpu.mem_get_info()
        print(f"leased {gpu.fraction:g} of '{gpu.name}': {total / 2**20:.0f} MiB for this tenant")

        d_x, d_w1, d_w2 = [await gpu.mem_alloc(a.nbytes) for a in (x, w1, w2)]
        d_h = await gpu.mem_alloc(batch * n_hidden * 4)
        d_logits = await gpu.mem_alloc(batch * n_out * 4)
        d_probs = await gpu.mem_alloc(batch * n_out * 4)
        d_total = await gpu.mem_alloc(4)
        for dst, host in ((d_x, x), (d_w1, w1), (d_w2, w2)):
            await gpu.memcpy_htod(dst, host)

        gemm, relu = await gpu.builtin("gemm"), await gpu.builtin("relu")
        softmax, reduce_sum = await gpu.builtin("softmax"), await gpu.builtin("reduce_sum")
        saxpy = await gpu.builtin("saxpy")
        started = time.perf_counter()
        # h = relu(x @ w1); logits = h @ w2; probs = softmax(logits); total = sum(probs)
        # Each launch returns at once (no round trip); the copy back waits for all of them.
        await gemm.launch(64, 256, [batch, n_hidden, n_in, 1.0, d_x, d_w1, 0.0, d_h])
        await relu.launch(64, 256, [batch * n_hidden, d_h, d_h])
        await gemm.launch(64, 256, [batch, n_out, n_hidden, 1.0, d_h, d_w2, 0.0, d_logits])
        await softmax.launch(batch, 32, [batch, n_out, d_logits, d_probs])
        await reduce_sum.launch(1, 256, [batch * n_out, d_probs, d_total])
        # logits = 2 * probs + logits, in place on the device
        await saxpy.launch(64, 256, [batch * n_out, 2.0, d_probs, d_logits])

        probs = np.empty((batch, n_out), np.float32)
        logits = np.empty((batch, n_out), np.float32)
        total_sum = np.empty(1, np.float32)
        await gpu.memcpy_dtoh(probs, d_probs)
        await gpu.memcpy_dtoh(logits, d_logits)
        await gpu.memcpy_dtoh(total_sum, d_total)
        elapsed = time.perf_counter() - started

    ref_h = np.maximum(x @ w1, 0)
    ref_logits = ref_h @ w2
    ref_probs = np.exp(ref_logits - ref_logits.max(axis=1, keepdims=True))
    ref_probs /= ref_probs.sum(axis=1, keepdims=True)
    checks = {
        "softmax(relu(x @ w1) @ w2)": np.allclose(probs, ref_probs, rtol=1e-4, atol=1e-6),
        "reduce_sum(probs) == batch": np.isclose(total_sum[0], batch, rtol=1e-4),
        "saxpy(2, probs, logits)": np.allclose(
            logits, 2 * ref_probs + ref_logits, rtol=1e-4, atol=1e-5
        ),
    }
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"6 kernels and 3 copies back in {elapsed * 1e3:.1f} ms")
    return all(checks.values())


async def main(argv: list[str]) -> int:
    if len(argv) > 1:
        ok = await run(argv[1])
    else:
        async with bf.Server(
            "tcp://127.0.0.1:0", executor="numpy", gpus=1, gpu_memory="1GiB"
        ) as server:
            print(f"server listening on {server.address}")
            ok = await run(server.address)
    print("all results match NumPy" if ok else "results DIFFER from NumPy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv)))
