"""perf/flood.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "flood.py"


def test_flood_benchmark_writes_its_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "flood.json").read_text())
    assert report["neighbour_calls"] > 0 and report["flood_launches_sent"] > 0
    assert 0 < report["neighbour_p50_ms"] <= report["neighbour_p99_ms"] <= report["neighbour_max_ms"]
