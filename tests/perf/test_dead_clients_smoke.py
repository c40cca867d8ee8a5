"""perf/dead_clients.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "dead_clients.py"


def test_dead_clients_benchmark_writes_its_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--clients", "2", "--state", "running",
         "--state", "mid_copy", "--give-up", "20", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "dead_clients.json").read_text())
    for state in ("running", "mid_copy"):
        figures = report["states"][state]
        assert figures["clients"] == 2 and figures["capacity_back_s"] is not None
        assert 0 < figures["rss_idle_mib"] and 0 < figures["rss_after_mib"]
