"""perf/idle_connections.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "idle_connections.py"


def test_idle_connections_benchmark_writes_its_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--connections", "30", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "idle_connections.json").read_text())
    assert report["connections"] == 30 and report["gpus"] == 2
    assert report["rss_base_mib"] > 0 and report["rss_leased_mib"] > 0
