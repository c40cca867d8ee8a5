"""perf/soak.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "soak.py"


def test_soak_benchmark_writes_its_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "8", "--tenants", "4", "--kill-rate", "1",
         "--sample-period", "0.5", "--seed", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    summary, samples = report["summary"], report["samples"]
    assert report["config"]["tenants"] == 4 and report["config"]["duration"] == 8
    run = [s for s in samples if s["phase"] == "run"]
    assert len(run) >= 8 and [s["phase"] for s in samples].count("idle") == 1
    for sample in run:
        assert sample["rss_mib"] > 0 and sample["fds"] > 0 and sample["threads"] > 0
        assert sample["leases"] is not None and sample["leases"] >= 1  # the probe's, at least
    for key in ("rss_mib", "fds", "threads"):
        figure = summary[key]
        assert figure["warmup"] > 0 and figure["end"] > 0 and figure["max"] > 0
        assert isinstance(figure["slope_per_hour"], float)
    assert isinstance(summary["rss_mib"]["flat"], bool) and isinstance(summary["fds"]["flat"], bool)
    assert "flat" in summary["flat_rule"]
    probe = summary["probe"]
    assert probe["calls"] > 0 and 0 < probe["p50_ms"] <= probe["p99_ms"] <= probe["max_ms"]
    counts = summary["counts"]
    assert counts["tenants_killed"] > 0 and counts["reconnects"] > 0
    assert counts["tenants_started"] > 4 and counts["bytes_verified"] > 0
    assert counts["data_errors"] == 0 and counts["check_errors"] == 0
    assert counts["tenant_errors"] == 0 and counts["probe_errors"] == 0
    assert summary["broke"] is False
    drain = report["outcome"]["drain"]
    assert drain["leases_back_s"] is not None and drain["leases_left"] == 0
    shutdown = report["outcome"]["shutdown"]
    assert shutdown["server_exit"] == 0 and shutdown["leases_after_probe_closed"] == 0
    assert shutdown["after_probe_closed"]["rss_mib"] > 0
    assert (tmp_path / "soak.png").exists() or "matplotlib is not installed" in done.stdout
    assert "server RSS" in done.stdout and "probe mem_get_info" in done.stdout
