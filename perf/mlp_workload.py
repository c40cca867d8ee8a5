"""The real workload of ``perf/latency.py``: SGD steps of a small MLP with the built-in kernels.

The same step (``mlp_step``) runs through two drivers that differ only in the path to the device:
``RemoteDriver`` uses the async client API on a leased remote device; ``LocalDriver`` submits the
same operations straight to an executor in this process (a ``NumpyExecutor``, or a
``PycudaExecutor`` when the server measured runs on a GPU), exactly as the server submits the
frames it receives (no-reply work with ``wants_reply=False``, waits through ``on_done``). Both do
the same copies and kernel launches in the same order, so their results must be identical.

``resolve_executor`` and ``new_executor`` are the perf harnesses' shared way to pick and build an
in-process executor of a given kind (``perf/latency.py``, ``perf/fairness.py``).

The model is a two-layer perceptron whose hidden layer is a fixed random projection and whose
output layer is trained by SGD on the cross-entropy gradient (random-features training). The
built-in kernels have no transpose, so the hidden activations are also computed transposed (from
transposed copies of the inputs and of W1) for the weight gradient ``h^T @ (p - y)``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

import bitfusion_net as bf
from executors import Executor, GpuUnavailable, NumpyExecutor, PycudaExecutor, Tenant
from executors.base import arg_struct_format
from executors.pycuda_device import gpu_count

T = TypeVar("T")
GiB = 2**30
BLOCK = 256
KERNELS = ("gemm", "relu", "softmax", "saxpy", "reduce_sum")
LAUNCHES_PER_STEP = 11
COPIES_PER_STEP = {"htod": 3, "dtoh": 1}


@dataclass(frozen=True)
class MlpShape:
    batch: int
    inputs: int
    hidden: int
    classes: int
    batches: int = 4  # distinct data batches, cycled
    learning_rate: float = 0.5


class Driver(Protocol):
    """What an MLP step needs from a device; one implementation per path (remote, in-process)."""

    async def alloc(self, nbytes: int) -> int: ...
    async def free(self, ptr: int) -> None: ...
    async def load(self, name: str) -> None: ...
    async def htod(self, ptr: int, array: np.ndarray) -> None: ...
    async def launch(self, name: str, n: int, args: list[Any]) -> None: ...
    async def dtoh(self, array: np.ndarray, ptr: int) -> None: ...
    async def synchronize(self) -> None: ...


def grid_for(n: int) -> int:
    """A grid covering ``n`` elements with BLOCK threads each (geometry never changes a result)."""
    return max(1, min(65535, -(-n // BLOCK)))


class RemoteDriver:
    """The async client API on a leased remote device."""

    def __init__(self, gpu: bf.RemoteDevice) -> None:
        self.gpu = gpu
        self.kernels: dict[str, bf.Function] = {}

    async def alloc(self, nbytes: int) -> int:
        return int(await self.gpu.mem_alloc(nbytes))

    async def free(self, ptr: int) -> None:
        await self.gpu.mem_free(ptr)

    async def load(self, name: str) -> None:
        self.kernels[name] = await self.gpu.builtin(name)

    async def htod(self, ptr: int, array: np.ndarray) -> None:
        await self.gpu.memcpy_htod(ptr, array)

    async def launch(self, name: str, n: int, args: list[Any]) -> None:
        await self.kernels[name].launch(grid_for(n), BLOCK, args)

    async def dtoh(self, array: np.ndarray, ptr: int) -> None:
        await self.gpu.memcpy_dtoh(array, ptr)

    async def synchronize(self) -> None:
        await self.gpu.synchronize()


class LocalDriver:
    """The same operations submitted to an executor in this process (no network).

    No-reply operations are submitted with ``wants_reply=False``, as the server submits the frames
    of the remote path; calls that wait block on the completion callback. Its coroutines never
    suspend, so they run under any event loop, or without one through ``drive``.
    """

    def __init__(self, executor: Executor, tenant: Tenant) -> None:
        self.executor = executor
        self.tenant = tenant
        self.kernels: dict[str, tuple[int, struct.Struct]] = {}

    def _call(self, op: Callable[[], Any]) -> Any:
        return self.executor.call(self.tenant, op)

    def _post(self, op: Callable[[], Any]) -> None:
        self.executor.submit(self.tenant, op, wants_reply=False)

    async def alloc(self, nbytes: int) -> int:
        tenant = self.tenant
        return int(self._call(lambda: tenant.mem_alloc(nbytes)))

    async def free(self, ptr: int) -> None:
        tenant = self.tenant
        self._post(lambda: tenant.mem_free(ptr))

    async def load(self, name: str) -> None:
        tenant = self.tenant
        info = self._call(lambda: tenant.get_function(0, name, None))
        self.kernels[name] = (info.handle, struct.Struct(arg_struct_format(info.arg_types)))

    async def htod(self, ptr: int, array: np.ndarray) -> None:
        tenant, view = self.tenant, array.data.cast("B")
        self._post(lambda: tenant.memcpy_htod(ptr, view, 0))

    async def launch(self, name: str, n: int, args: list[Any]) -> None:
        handle, layout = self.kernels[name]
        tenant, packed, grid = self.tenant, layout.pack(*args), (grid_for(n), 1, 1)
        self._post(lambda: tenant.launch(handle, grid, (BLOCK, 1, 1), 0, 0, packed))

    async def dtoh(self, array: np.ndarray, ptr: int) -> None:
        tenant, view = self.tenant, array.data.cast("B")
        self._call(lambda: tenant.memcpy_dtoh(view, ptr, 0))

    async def synchronize(self) -> None:
        self._call(self.tenant.synchronize)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the in-process driver's) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("the coroutine suspended; drive() runs only ones that do not")


# -- executor kinds ------------------------------------------------------------------------------
EXECUTOR_CHOICES = ("numpy", "pycuda", "auto")


def resolve_executor(kind: str) -> str:
    """The executor kind an ``--executor`` choice means here: "numpy" or "pycuda".

    "auto" is "pycuda" when a GPU is usable, else "numpy" (as ``create_executors`` decides).
    "pycuda" without a usable GPU raises ``GpuUnavailable``, saying what is missing, so that a
    benchmark fails at once rather than after starting its servers.
    """
    if kind == "numpy":
        return kind
    if kind not in EXECUTOR_CHOICES:
        raise ValueError(f"unknown executor kind {kind!r}; one of {', '.join(EXECUTOR_CHOICES)}")
    try:
        gpu_count()
    except GpuUnavailable:
        if kind == "auto":
            return "numpy"
        raise
    return "pycuda"


def new_executor(kind: str, memory: int, name: str = "in-process NumPy device") -> Executor:
    """An in-process executor of ``kind`` ("numpy" or "pycuda": GPU 0, ``memory`` a cap)."""
    if kind == "pycuda":
        return PycudaExecutor(0, memory)
    if kind != "numpy":
        raise ValueError(f"no in-process executor of kind {kind!r}")
    return NumpyExecutor(0, memory, name)


def describe_executor(executor: Executor) -> dict[str, Any]:
    """What a report records of a device: its executor kind, name and memory offered."""
    properties = executor.properties
    info: dict[str, Any] = {
        "executor": properties.executor,
        "name": properties.name,
        "total_memory": properties.total_memory,
    }
    capability = getattr(executor, "compute_capability", None)
    if capability is not None:
        info["compute_capability"] = ".".join(str(part) for part in capability)
    return info


# A tenant of the PyCUDA executor is charged for its own CUDA context (hundreds of MiB on big
# GPUs), so its lease needs that much more than the data it holds.
LOCAL_MEMORY = {"numpy": (2 * GiB, GiB), "pycuda": (4 * GiB, 2 * GiB)}  # (device, tenant)


@contextlib.contextmanager
def local_driver(kind: str = "numpy") -> Iterator[LocalDriver]:
    """A fresh in-process device of ``kind`` with one tenant, closed afterwards: NumPy, 2 GiB
    with a 1 GiB tenant; PyCUDA, GPU 0 capped at 4 GiB with a 2 GiB tenant."""
    device_memory, tenant_memory = LOCAL_MEMORY[kind]
    executor = new_executor(kind, device_memory)
    try:
        yield LocalDriver(executor, executor.open_tenant(tenant_memory, 1.0))
    finally:
        executor.close()


class MlpProblem:
    """Host data: a few batches of a synthetic classification task, and the initial weights."""

    def __init__(self, shape: MlpShape, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        b, d, h, c = shape.batch, shape.inputs, shape.hidden, shape.classes
        self.shape = shape
        self.w1 = (rng.standard_normal((d, h)) / math.sqrt(d)).astype(np.float32)
        self.w1t = np.ascontiguousarray(self.w1.T)
        self.w2 = (rng.standard_normal((h, c)) * 0.01).astype(np.float32)
        teacher = rng.standard_normal((d, c)).astype(np.float32)
        self.x: list[np.ndarray] = []
        self.xt: list[np.ndarray] = []
        self.y: list[np.ndarray] = []
        for _ in range(shape.batches):
            x = rng.standard_normal((b, d)).astype(np.float32)
            y = np.zeros((b, c), np.float32)
            y[np.arange(b), np.argmax(x @ teacher, axis=1)] = 1.0
            self.x.append(x)
            self.xt.append(np.ascontiguousarray(x.T))
            self.y.append(y)


@dataclass
class MlpBuffers:
    """Device addresses of the model, one batch and the intermediates."""

    x: int
    xt: int
    y: int
    w1: int
    w1t: int
    w2: int
    h: int
    ht: int
    logits: int
    probs: int
    dw2: int
    stats: int  # two floats: the loss, the sum of the gradient


async def mlp_setup(d: Driver, p: MlpProblem) -> MlpBuffers:
    """Allocate, look up the kernels, upload the initial weights."""
    s = p.shape
    b, n_in, n_h, n_c = s.batch, s.inputs, s.hidden, s.classes
    sizes = {
        "x": b * n_in, "xt": b * n_in, "y": b * n_c, "w1": n_in * n_h, "w1t": n_in * n_h,
        "w2": n_h * n_c, "h": b * n_h, "ht": b * n_h, "logits": b * n_c, "probs": b * n_c,
        "dw2": n_h * n_c, "stats": 2,
    }  # fmt: skip
    buffers = MlpBuffers(**{name: await d.alloc(4 * count) for name, count in sizes.items()})
    for name in KERNELS:
        await d.load(name)
    await d.htod(buffers.w1, p.w1)
    await d.htod(buffers.w1t, p.w1t)
    await d.htod(buffers.w2, p.w2)
    return buffers


async def mlp_step(d: Driver, p: MlpProblem, m: MlpBuffers, step: int, stats: np.ndarray) -> None:
    """One SGD step: 3 copies in (a batch), 11 kernels, 1 copy back (loss and gradient sum)."""
    s = p.shape
    b, n_in, n_h, n_c = s.batch, s.inputs, s.hidden, s.classes
    i = step % s.batches
    await d.htod(m.x, p.x[i])
    await d.htod(m.xt, p.xt[i])
    await d.htod(m.y, p.y[i])
    # forward: h = relu(x @ W1) (and h^T), logits = h @ W2, probs = softmax(logits)
    await d.launch("gemm", b * n_h, [b, n_h, n_in, 1.0, m.x, m.w1, 0.0, m.h])
    await d.launch("relu", b * n_h, [b * n_h, m.h, m.h])
    await d.launch("gemm", b * n_h, [n_h, b, n_in, 1.0, m.w1t, m.xt, 0.0, m.ht])
    await d.launch("relu", b * n_h, [b * n_h, m.ht, m.ht])
    await d.launch("gemm", b * n_c, [b, n_c, n_h, 1.0, m.h, m.w2, 0.0, m.logits])
    await d.launch("softmax", b, [b, n_c, m.logits, m.probs])
    # backward: g = probs - y (the cross-entropy gradient), dW2 = h^T @ g / batch
    await d.launch("saxpy", b * n_c, [b * n_c, -1.0, m.y, m.probs])
    await d.launch("gemm", n_h * n_c, [n_h, n_c, b, 1.0 / b, m.ht, m.probs, 0.0, m.dw2])
    # SGD update: W2 -= lr * dW2
    await d.launch("saxpy", n_h * n_c, [n_h * n_c, -s.learning_rate, m.dw2, m.w2])
    # the loss (mean squared error of the probabilities: a 1 x N by N x 1 gemm) and sum(dW2)
    await d.launch("gemm", 1, [1, 1, b * n_c, 1.0 / b, m.probs, m.probs, 0.0, m.stats])
    await d.launch("reduce_sum", n_h * n_c, [n_h * n_c, m.dw2, m.stats + 4])
    await d.dtoh(stats, m.stats)


async def compare_remote_local(
    gpu: bf.RemoteDevice,
    shape: MlpShape,
    warmup: int,
    rounds: int,
    steps: int,
    executor: str = "numpy",
) -> dict[str, Any]:
    """Median step time remote and in-process, timed in alternating rounds; results must match.

    ``executor`` is the kind of the in-process device ("numpy" or "pycuda"): the one the remote
    server runs, so that the only difference is the network path.
    """
    problem = MlpProblem(shape)
    with local_driver(executor) as local:
        drivers: dict[str, Driver] = {"remote": RemoteDriver(gpu), "inprocess": local}
        buffers = {name: await mlp_setup(d, problem) for name, d in drivers.items()}
        stats = {name: np.zeros(2, np.float32) for name in drivers}
        losses: dict[str, list[float]] = {name: [] for name in drivers}
        done = dict.fromkeys(drivers, 0)
        per_step: dict[str, list[float]] = {name: [] for name in drivers}

        async def run(name: str, count: int, timed: bool) -> None:
            d, m, out = drivers[name], buffers[name], stats[name]
            started = time.perf_counter()
            for _ in range(count):
                await mlp_step(d, problem, m, done[name], out)
                done[name] += 1
                losses[name].append(float(out[0]))
            if timed:
                per_step[name].append((time.perf_counter() - started) / count)

        for name in drivers:
            await run(name, warmup, timed=False)
        gc.collect()
        for round_ in range(rounds):
            order = ("remote", "inprocess") if round_ % 2 == 0 else ("inprocess", "remote")
            for name in order:
                await run(name, steps, timed=True)
        weights = {name: np.empty((shape.hidden, shape.classes), np.float32) for name in drivers}
        for name, d in drivers.items():
            await d.dtoh(weights[name], buffers[name].w2)
        for name, d in drivers.items():
            for address in asdict(buffers[name]).values():
                await d.free(address)
        await drivers["inprocess"].synchronize()
        local_device = describe_executor(local.executor)
    remote_ms = statistics.median(per_step["remote"]) * 1e3
    local_ms = statistics.median(per_step["inprocess"]) * 1e3
    return {
        "remote_step_ms": remote_ms,
        "inprocess_step_ms": local_ms,
        "ratio": remote_ms / local_ms,
        "remote_rounds_ms": [t * 1e3 for t in per_step["remote"]],
        "inprocess_rounds_ms": [t * 1e3 for t in per_step["inprocess"]],
        "result_match": bool(
            np.array_equal(weights["remote"], weights["inprocess"])
            and losses["remote"] == losses["inprocess"]
        ),
        "max_abs_diff_w2": float(np.max(np.abs(weights["remote"] - weights["inprocess"]))),
        "loss_first": losses["remote"][0],
        "loss_last": losses["remote"][-1],
        "steps_timed": rounds * steps,
        "kernels_per_step": LAUNCHES_PER_STEP,
        "copies_per_step": COPIES_PER_STEP,
        "bytes_in_per_step": 4 * (2 * shape.batch * shape.inputs + shape.batch * shape.classes),
        "shape": asdict(shape),
        "inprocess_device": local_device,
    }
