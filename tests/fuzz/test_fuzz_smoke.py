"""The fuzz targets in fuzz/: each runs briefly under atheris, and their corpora replay as tests.

The smoke tests start each target as a subprocess on a copy of its corpus (libFuzzer adds what it
finds to the first corpus directory) for a few seconds and want exit status 0: the target still
starts, its seeds and a few thousand mutations break nothing. They need atheris and are skipped
without it. The replay tests run every seed in fuzz/corpus/<target>/ and every input in
fuzz/regressions/<target>/ through the target's one-input function in this process, without
atheris or instrumentation, so the corpora are a plain regression suite; a regression input
fails here until its bug is fixed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = ("decoder", "connections", "server")
SMOKE_SECONDS = 7  # per target: the three runs and the replays must fit in ~45 s on two cores
SMOKE_TIMEOUT_S = 60  # start-up (imports, instrumentation, the seeds) plus the run, with room
# Known bugs, not fixed yet, that the fuzzer finds within seconds: the smoke runs steer clear of
# them (FUZZ_AVOID, see fuzz/fuzz_support.py) so that they test everything else; their inputs in
# fuzz/regressions/ fail the replay tests until they are fixed. Remove a name with its fix.
KNOWN_UNFIXED: tuple[str, ...] = ()  # all five found so far are fixed


def _load(target: str) -> ModuleType:
    """Import fuzz/fuzz_<target>.py as a plain module (atheris is imported only as a script)."""
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))  # its helpers (fuzz_support, fuzz_values) by name
    name = f"fuzz_{target}"
    if name in sys.modules:
        return sys.modules[name]
    import fuzz_support

    fuzz_support._AVOIDED = frozenset()  # replays hold the targets to everything, FUZZ_AVOID or not
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _inputs(folder: str) -> list[tuple[str, Path]]:
    return [
        (target, path)
        for target in TARGETS
        for path in sorted((FUZZ / folder / target).glob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]


def _ids(cases: list[tuple[str, Path]]) -> list[str]:
    return [f"{target}/{path.name}" for target, path in cases]


SEEDS = _inputs("corpus")
REGRESSIONS = _inputs("regressions")


def test_every_target_has_a_corpus() -> None:
    for target in TARGETS:
        seeds = [case for case in SEEDS if case[0] == target]
        assert len(seeds) >= 10, (
            f"fuzz/corpus/{target}/ has {len(seeds)} seeds; run fuzz/make_corpus.py"
        )


@pytest.mark.parametrize(("target", "path"), SEEDS, ids=_ids(SEEDS))
def test_seed_replays_cleanly(target: str, path: Path) -> None:
    test_one_input: Callable[[bytes], None] = _load(target).test_one_input
    test_one_input(path.read_bytes())


@pytest.mark.parametrize(("target", "path"), REGRESSIONS, ids=_ids(REGRESSIONS))
def test_regression_input_replays_cleanly(target: str, path: Path) -> None:
    test_one_input: Callable[[bytes], None] = _load(target).test_one_input
    test_one_input(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_target_fuzzes_briefly(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris; Linux)")
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / target, corpus)
    command = [
        sys.executable, str(FUZZ / f"fuzz_{target}.py"),
        f"-max_total_time={SMOKE_SECONDS}", "-seed=1", "-timeout=20", "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/", str(corpus),
    ]  # fmt: skip
    env = {**os.environ, "FUZZ_AVOID": ",".join(KNOWN_UNFIXED)}
    env.pop("FUZZ_TRACE", None)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-4000:]
