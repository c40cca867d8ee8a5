"""perf/control_plane.py runs end to end and writes its report (figures are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "control_plane.py"


def test_control_plane_benchmark_writes_its_report(tmp_path: Path) -> None:
    output = tmp_path / "control_plane.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(output.read_text())
    assert report["quick"] is True
    assert report["reserve"]["reserve_and_release"]["samples"] == 5
    assert report["attach"]["attach"]["median_ms"] > 0
    assert report["run"]["under_run"]["samples"] == 2
    assert report["killed_run"]["gpu_back_after_program_killed"]["samples"] == 2
    assert report["peer_copy"]["memcpy_peer_gb_s"] > 0
