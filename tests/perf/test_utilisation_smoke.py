"""perf/utilisation.py runs a tiny simulation end to end, and its report holds together (the
figures themselves are benchmarks, not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PERF = Path(__file__).resolve().parents[2] / "perf"
SCRIPT = PERF / "utilisation.py"
FIELDS = ("gpus_needed", "utilisation", "allocation_rate", "slowdown_p50", "slowdown_p95",
          "slowdown_p99")  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("utilisation")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--gpus", "24", "--days", "0.25", "--warmup-days", "0.05",
         "--mix", "0", "--mix", "0.5", "--jobs", "1", "--real-rounds", "3", "--no-plot",
         "--output", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "target" in done.stdout and "validation" in done.stdout
    return json.loads((out / "utilisation.json").read_text())


def test_every_mix_and_policy_has_the_fields_other_tools_read(report: dict) -> None:
    assert set(report["mixes"]) == {"0.0", "0.5"}
    for policies in report["mixes"].values():
        assert set(policies) == {"static", "memory_only", "ours"}
        for result in policies.values():
            for name in FIELDS:
                assert isinstance(result[name], (int, float)), (name, result[name])
            assert isinstance(result["gpus_needed"], int) and result["gpus_needed"] >= 1


def test_each_run_conserves_work_and_never_overcommits_a_gpu(report: dict) -> None:
    for policies in report["mixes"].values():
        for result in policies.values():
            c = result["consistency"]
            assert c["work_conserved"] is True
            total = c["work_served_s"] + c["work_running_s"] + c["work_queued_s"]
            assert total == pytest.approx(c["work_submitted_s"], rel=1e-9, abs=1e-6)
            assert c["work_submitted_s"] + c["work_dedicated_s"] > 0
            assert c["memory_never_overcommitted"] is True
            assert 0 < c["max_memory_commit"] <= 1 and c["ledger_mismatches"] == 0
    assert report["validation"]["consistency"]["work_conserved"] is True
    # Fractional leases share GPUs: their work went through the real schedulers.
    for policy in ("memory_only", "ours"):
        assert report["mixes"]["0.5"][policy]["consistency"]["work_submitted_s"] > 0


def test_the_figures_are_consistent_with_each_other(report: dict) -> None:
    for policies in report["mixes"].values():
        for result in policies.values():
            assert 0 < result["utilisation"] <= 1 and 0 < result["allocation_rate"] <= 1
            # Nothing finishes sooner than on a dedicated GPU; percentiles are ordered.
            assert 1 - 1e-9 <= result["slowdown_p50"] <= result["slowdown_p95"]
            assert result["slowdown_p95"] <= result["slowdown_p99"]
            assert result["wait_p95_s"] <= 600
            # The answer is the smallest size simulated that met the wait target.
            met = [p["gpus"] for p in result["probes"] if p["meets"]]
            assert min(met) == result["gpus_needed"]
        # Only ours idle-releases.
        assert policies["static"]["idle_released"] == policies["memory_only"]["idle_released"] == 0
    assert report["mixes"]["0.5"]["ours"]["idle_released"] > 0
    assert report["mixes"]["0.0"]["ours"]["idle_released"] == 0  # no notebooks, no timeouts


def test_the_validation_ran_the_same_tenants_on_a_real_server(report: dict) -> None:
    bench = report["validation"]["scheduler_vs_real_server"]
    for kind in ("fair", "fifo"):
        assert set(bench[kind]["real_slowdown"]) == set(bench[kind]["simulated_slowdown"])
        assert all(s >= 1 - 1e-6 for s in bench[kind]["simulated_slowdown"].values())
        assert all(s > 0.9 for s in bench[kind]["real_slowdown"].values())
        assert isinstance(bench[kind]["agrees"], bool)
    assert (
        isinstance(report["targets"], dict)
        and "static_utilisation_below_15pct" in report["targets"]
    )
