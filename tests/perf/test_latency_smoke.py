"""Smoke tests of the latency harness: ``perf/latency.py --quick`` runs end to end.

They check that every figure is produced (present and positive) and that the remote MLP computes
exactly what the in-process executor does. They never assert on speed: timings belong in perf/.
The optional benchmark packages (pyzmq, grpcio, matplotlib, tqdm) may be missing; the second test
hides them to prove the harness skips what it cannot run, with a note, and still succeeds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "perf" / "latency.py"
RUN_TIMEOUT_S = 100  # a quick run takes 5-20 s on a 2-core machine; pytest-timeout is 120 s
OPTIONAL = ("zmq", "grpc", "matplotlib", "tqdm")
QUICK_SIZES = 5


def run_harness(tmp_path: Path, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    output = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            "--quick",
            "--no-progress",
            "--output",
            str(output),
            "--build-dir",
            str(tmp_path / "build"),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"harness failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads((output / "latency.json").read_text(encoding="utf-8"))
    return results, done.stdout


def positive(tree: dict[str, Any], *path: str) -> float:
    node: Any = tree
    for key in path:
        assert isinstance(node, dict) and key in node, f"missing {'.'.join(path)}"
        node = node[key]
    assert isinstance(node, int | float) and not isinstance(node, bool), f"{path}: {node!r}"
    assert node > 0, f"{'.'.join(path)} is {node}"
    return float(node)


def check_latency(summary: dict[str, Any], what: str) -> None:
    for key in ("p50_us", "p99_us", "p999_us", "mean_us"):
        positive(summary, key)
    assert summary["p50_us"] <= summary["p99_us"] <= summary["p999_us"], what


def check_copies(series: list[dict[str, Any]], what: str) -> None:
    assert len(series) == QUICK_SIZES, what
    sizes = [entry["size"] for entry in series]
    assert sizes == sorted(sizes) and sizes[0] == 8 and sizes[-1] == 16 * 2**20, what
    for entry in series:
        positive(entry, "p50_us")
        positive(entry, "gbps")


def check_results(results: dict[str, Any], stdout: str) -> None:
    assert results["meta"]["quick"] is True
    check_latency(results["round_trip"]["async"], "async round trip")
    check_latency(results["round_trip"]["blocking"], "blocking round trip")
    check_copies(results["memcpy"]["htod"], "htod")
    check_copies(results["memcpy"]["dtoh"], "dtoh")
    for api in ("async", "blocking", "inprocess"):
        positive(results, "launches", api, "per_second")

    mlp = results["mlp"]
    for key in ("remote_step_ms", "inprocess_step_ms", "ratio"):
        positive(mlp, key)
    assert mlp["result_match"] is True, "the remote MLP must compute what the in-process one does"
    assert mlp["max_abs_diff_w2"] == 0

    base = results["baselines"]
    check_latency(base["uvloop"]["round_trip"], "uvloop echo")
    check_copies(base["uvloop"]["put"], "uvloop put")
    check_copies(base["uvloop"]["get"], "uvloop get")
    positive(base, "uvloop", "posts", "per_second")
    if shutil.which("cc") or shutil.which("gcc") or os.environ.get("CC"):
        check_latency(base["c"]["round_trip"], "C ping-pong")
        check_copies(base["c"]["put"], "C put")
        check_copies(base["c"]["get"], "C get")
        positive(base, "c", "posts", "per_second")
    else:
        assert base["c"]["skipped"]
    for kind in ("zmq", "grpc"):
        if "skipped" in base[kind]:
            assert isinstance(base[kind]["skipped"], str) and base[kind]["skipped"]
        else:
            check_latency(base[kind]["round_trip"], kind)

    check_latency(base["blocking_echo"]["round_trip"], "blocking echo")
    check_latency(base["raw_wire"]["round_trip"], "raw wire client")

    h2h = results["head_to_head"]
    for contender in ("ours", "blocking", "uvloop", "blocking_echo", "raw_wire"):
        positive(h2h, "round_trip_p50_us", contender)
    for copy in ("ours_htod", "ours_dtoh", "blocking_htod", "blocking_dtoh"):
        positive(h2h, "copy_gbps", copy)
    concurrent = results["concurrent"]
    assert concurrent["clients"] == 8 and concurrent["requests"] > 0
    positive(concurrent, "per_second")

    assert set(results["targets"]) >= {
        "round_trip_p50_vs_uvloop",
        "blocking_round_trip_p50_vs_blocking_echo",
        "round_trip_p99_over_p50_async",
        "round_trip_p99_over_p50_blocking",
        "round_trip_p50_below_zmq",
        "round_trip_p50_below_grpc",
        "launches_per_second_async",
        "launches_per_second_blocking",
        "mlp_ratio",
        "concurrent_requests_per_second",
    }
    for target in results["targets"].values():
        assert target["met"] in (True, False, None)  # reported, never asserted
    assert "targets (reported, not asserted)" in stdout
    assert "round trip mem_get_info, async API p50" in stdout


def test_help_describes_the_options() -> None:
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--server", "--quick", "--output", "--baselines-at"):
        assert option in done.stdout


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    results, stdout = run_harness(tmp_path)
    check_results(results, stdout)
    plot = tmp_path / "results" / "latency.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 0
    else:
        assert not plot.exists()


def test_quick_run_without_the_optional_packages(tmp_path: Path) -> None:
    """pyzmq, grpcio, matplotlib and tqdm hidden: skipped with notes, everything else runs."""
    blocker = tmp_path / "blocked"
    for name in OPTIONAL:
        package = blocker / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('{name} is hidden by the smoke test')\n", encoding="utf-8"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    results, stdout = run_harness(tmp_path, env)
    check_results(results, stdout)
    assert "pyzmq is not installed" in results["baselines"]["zmq"]["skipped"]
    assert "grpcio is not installed" in results["baselines"]["grpc"]["skipped"]
    assert not (tmp_path / "results" / "latency.png").exists()
    assert any("matplotlib is not installed" in note for note in results["notes"])


def test_the_rdma_run_on_the_simulator_is_labelled_simulated(tmp_path: Path) -> None:
    """``--transport rdma`` on the verbs simulator: every figure of both APIs, the results in
    their own file labelled simulated, never set beside TCP's, and no simulator fault."""
    output = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--transport", "rdma", "--rdma-provider", "simulator",
         "--quick", "--no-progress", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"harness failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "SIMULATED" in done.stdout
    assert not (output / "latency.json").exists()
    results = json.loads((output / "latency-rdma-simulated.json").read_text(encoding="utf-8"))
    assert results["meta"]["simulated"] is True and results["meta"]["provider"] == "simulator"
    assert "tcp" not in results and "ratios" not in results
    assert results["simulator"]["faults"] == 0 and results["simulator"]["writes"] > 0
    for api in ("async", "blocking"):
        positive(results, "rdma", api, "round_trip", "p50_us")
        positive(results, "rdma", api, "launches", "per_second")
        for direction in ("htod", "dtoh"):
            copies = results["rdma"][api]["memcpy"][direction]
            assert len(copies) == QUICK_SIZES and all(copy["gbps"] > 0 for copy in copies)
