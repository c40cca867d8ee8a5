"""perf/fairness.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "fairness.py"


def test_fairness_benchmark_writes_its_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--scenario", "ratio", "--scenario", "alone",
         "--duration", "2.5", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "fairness.json").read_text())
    ratio = report["scenarios"]["ratio"]
    assert ratio["achieved_ratio"] > 0 and isinstance(ratio["met"], bool)
    for mode in ("share", "cap"):
        assert 0 < report["scenarios"]["alone"][mode]["share_mean"] <= 1.05
    assert "targets met" in done.stdout
