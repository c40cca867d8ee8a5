"""Screenshots of the management endpoint's dashboards, for the README.

Starts a pool of two servers (``python -m bitfusion_net.server`` with two 1 GiB NumPy GPUs each
and ``--manage http://127.0.0.1:0``; the second with ``--pool`` naming the first), connects a few
tenants that hold memory and keep their GPUs busy with a load that rises and falls (so that the
charts have something to show), lets the servers record WARMUP seconds of history, and takes
three screenshots with headless Chromium from the second server's endpoint:

    docs/images/dashboard-cluster.png   #/cluster: both servers, their GPUs, pool-wide charts
    docs/images/dashboard-server.png    #/server: health, per-GPU charts, leases, tenants
    docs/images/dashboard-lease.png     #/lease/ID: a two-GPU lease's devices and charts

Everything stays on loopback. Needs ``chromium`` (Debian's package) on PATH; exits 2 without it.

    python perf/dashboard_screenshots.py
    python perf/dashboard_screenshots.py --warmup 90 --output /tmp/shots
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bitfusion_net as bf

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
START_S = 30.0  # the most a server may take to print its two lines
CHROMIUM_S = 60.0
VIRTUAL_MS = 3000  # the page's scripts run this long (virtual time) before the screenshot
PERIOD_S = 40.0  # one rise and fall of a tenant's load
SLICE_US = 20_000  # a tenant's work comes in busy kernels of 20 ms


class PoolServer:
    """A server subprocess; ``address`` (data) and ``manage`` (management URL) once started."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bitfusion_net.server",
             "--listen", "tcp://127.0.0.1:0", "--manage", "http://127.0.0.1:0",
             "--executor", "numpy", "--gpus", "2", "--gpu-memory", "1GiB",
             "--state-dir", str(state_dir), "--log-level", "WARNING", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, bufsize=0, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + START_S
        self.address = self._line(deadline).removeprefix("listening on ")
        self.manage = self._line(deadline).removeprefix("management on ")
        if not self.manage.startswith("http://"):
            raise RuntimeError(f"unexpected management line {self.manage!r}")

    def _line(self, deadline: float) -> str:
        assert self.proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            remaining = max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], remaining)[0]:
                raise RuntimeError(f"the server printed {line!r} in {START_S} s")
            chunk = os.read(self.proc.stdout.fileno(), 1)  # byte by byte: never past the line
            if not chunk:
                raise RuntimeError(f"the server exited (status {self.proc.wait()})")
            line += chunk
        return line.decode().strip()

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.manage}/api/v1/{path}", timeout=10) as response:
            return json.load(response)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Tenant(threading.Thread):
    """A client on ``gpus`` GPUs holding ``memory`` MiB on each, plus up to ``grow`` MiB more that
    it allocates and frees with its load; its load (share of time busy) follows a sine wave."""

    def __init__(
        self, address: str, name: str, gpus: int, fraction: float, memory: int, grow: int,
        phase: float,
    ) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.session = bf.connect_sync(address, gpus=gpus, fraction=fraction, client_name=name)
        for device in self.session.devices:
            device.mem_alloc(memory * MiB)
        self.grow = grow
        self.phase = phase
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def load(self, t: float) -> float:
        return 0.5 + 0.4 * math.sin(2 * math.pi * t / PERIOD_S + self.phase)

    def run(self) -> None:
        devices = self.session.devices
        kernels = [device.builtin("busy") for device in devices]
        extra: list[list[int]] = [[] for _ in devices]
        started = time.monotonic()
        try:
            while not self.stopping.is_set():
                load = self.load(time.monotonic() - started)
                for device, kernel, held in zip(devices, kernels, extra, strict=True):
                    kernel.launch(1, 1, [SLICE_US])
                    want = round(load * self.grow / 16)  # in chunks of 16 MiB
                    while len(held) < want:
                        held.append(device.mem_alloc(16 * MiB))
                    while len(held) > want:
                        device.mem_free(held.pop())
                for device in devices:
                    device.synchronize()
                self.stopping.wait(SLICE_US * 1e-6 * (1 - load) / load)
        except (bf.BitfusionError, OSError) as exc:
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.session.close()
        if self.error is not None:
            raise RuntimeError(f"tenant {self.name} failed: {self.error!r}")


def screenshot(chromium: str, url: str, png: Path, height: int, profile: Path) -> None:
    subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--disable-background-networking",
         f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_MS}",
         f"--window-size=1280,{height}", f"--screenshot={png}", url],
        check=True, timeout=CHROMIUM_S, capture_output=True,
    )  # fmt: skip
    print(f"wrote {png} ({png.stat().st_size // 1024} KiB)")


@contextlib.contextmanager
def pool(state: Path) -> Iterator[tuple[PoolServer, PoolServer]]:
    a = PoolServer(state / "a")
    try:
        b = PoolServer(state / "b", "--pool", a.manage)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of history before the screenshots"
    )
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("no 'chromium' on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, pool(Path(tmp)) as (a, b):
        tenants: list[Tenant] = []
        try:
            for spec in (
                (b.address, "resnet-train", 2, 0.25, 96, 96, 0.0),
                (b.address, "bert-finetune", 1, 0.5, 160, 64, 2.0),
                (a.address, "inference-api", 1, 0.25, 64, 48, 4.0),
                (a.address, "notebook", 1, 0.8, 200, 128, 1.0),  # no room left on gpu0
            ):
                tenants.append(Tenant(*spec))
                tenants[-1].start()
            print(f"pool: {a.manage} and {b.manage}; {args.warmup:g} s of history...")
            time.sleep(args.warmup)
            lease = next(
                lease["id"] for lease in b.api("leases")["leases"] if len(lease["devices"]) == 2
            )
            for name, route, height in (
                ("cluster", "#/cluster", 760),
                ("server", "#/server", 1400),
                ("lease", f"#/lease/{lease}", 840),
            ):
                png = args.output / f"dashboard-{name}.png"
                screenshot(chromium, f"{b.manage}/{route}", png, height, Path(tmp) / name)
        finally:
            for tenant in tenants:
                tenant.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
