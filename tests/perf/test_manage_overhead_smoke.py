"""perf/manage_overhead.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "manage_overhead.py"


def test_manage_overhead_benchmark_writes_its_report(tmp_path: Path) -> None:
    output = tmp_path / "manage_overhead.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(output.read_text())
    assert report["quick"] is True
    for side in ("without_management", "with_management"):
        assert report["round_trip"][side]["samples"] == 200
    assert report["scrape"]["samples"] >= 1 and report["scrape"]["bytes"] > 1000
    assert report["accounting_ns_per_request"] > 0
