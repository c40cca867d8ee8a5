"""The ``libcuda.so.1`` stand-in (``native/libcuda``, docs/AGENT.md) that a command's CUDA
driver calls reach under ``bitfusion-net run``: where its sources are, building it once per
version of sources, toolkit headers and compiler, and the environment that puts it first."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

AGENT_LIB_ENV = "BITFUSION_NET_AGENT_LIB"  # a directory holding a libcuda.so.1 to use as it is
AGENT_CACHE_ENV = "BITFUSION_NET_AGENT_CACHE"  # where first-use builds go (default: see below)
AGENT_SONAME = "libcuda.so.1"
BUILD_TIMEOUT_S = 600


class AgentUnavailable(Exception):
    """The agent cannot be found or built here; the message says why and what to install."""


def agent_sources() -> Path | None:
    """``native/libcuda`` of a source checkout (an editable install), or the copy ``pip install``
    put under ``<prefix>/share/bitfusion-net`` (setup.py's data_files)."""
    import site

    for candidate in (
        Path(__file__).resolve().parents[2] / "native" / "libcuda",
        Path(sys.prefix) / "share" / "bitfusion-net" / "native" / "libcuda",
        Path(site.USER_BASE or "~/.local") / "share" / "bitfusion-net" / "native" / "libcuda",
    ):
        if (candidate / "Makefile").is_file() and (candidate / "gen_entry_points.py").is_file():
            return candidate
    return None


def cuda_include() -> Path | None:
    """The CUDA toolkit headers the agent is generated from (cuda.h, cudaTypedefs.h)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    for root in roots:
        if root and (Path(root) / "include" / "cudaTypedefs.h").is_file():
            return Path(root) / "include"
    return None


def _cache_root(sources: Path) -> Path:
    """``$BITFUSION_NET_AGENT_CACHE``; else a checkout's own ``native/libcuda/build/run`` (an
    editable install: one build for every user of the checkout, whatever their HOME, in the
    directory ``make`` builds in, which git ignores); else ``~/.cache/bitfusion-net/libcuda``."""
    given = os.environ.get(AGENT_CACHE_ENV)
    if given:
        return Path(given)
    if os.access(sources, os.W_OK):
        return sources / "build" / "run"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitfusion-net" / "libcuda"


def agent_library_dir() -> Path:
    """The directory holding the agent's ``libcuda.so.1``, building it on first use.

    The build happens once per version of the sources, toolkit headers and compiler, into
    ``<cache>/<key>/`` (``_cache_root``; made in a temporary directory, then renamed, so
    concurrent first runs do not see half a library). It needs gcc (``$CC``), make and the CUDA
    toolkit's headers; without them ``AgentUnavailable`` says what is missing."""
    given = os.environ.get(AGENT_LIB_ENV)
    if given:
        if not (Path(given) / AGENT_SONAME).is_file():
            raise AgentUnavailable(f"${AGENT_LIB_ENV}={given} holds no {AGENT_SONAME}")
        return Path(given)
    sources = agent_sources()
    if sources is None:
        raise AgentUnavailable("the agent's sources (native/libcuda) are not installed")
    include = cuda_include()
    if include is None:
        raise AgentUnavailable(
            "no CUDA toolkit headers (cudaTypedefs.h) under $CUDA_HOME, /usr/local/cuda or "
            "nvcc's toolkit: install the CUDA toolkit's headers to build the agent"
        )
    cc = os.environ.get("CC", "gcc")
    key = hashlib.sha256(cc.encode())
    for path in sorted(sources.iterdir()):
        if path.is_file() and path.suffix in (".c", ".h", ".py", "") and path.name != "README":
            key.update(path.name.encode() + b"\0" + path.read_bytes())
    for header in ("cuda.h", "cudaTypedefs.h"):
        key.update((include / header).read_bytes())
    target = _cache_root(sources) / key.hexdigest()[:16]
    if (target / AGENT_SONAME).is_file():
        return target
    if shutil.which("make") is None or shutil.which(cc) is None:
        raise AgentUnavailable(f"building the agent needs make and {cc}, which are not installed")
    try:
        return _build(sources, include, cc, target)
    except (OSError, subprocess.SubprocessError) as exc:
        raise AgentUnavailable(f"building the agent into {target} failed: {exc}") from None


def _build(sources: Path, include: Path, cc: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        result = subprocess.run(
            ["make", "-C", str(sources), f"BUILD={work}", f"CUDA_INCLUDE={include}",
             f"PYTHON={sys.executable}", f"CC={cc}"],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
            raise AgentUnavailable(f"building the agent failed:\n{tail}")
        for leftover in work.glob("*.o"):
            leftover.unlink()
        try:
            work.rename(target)
        except OSError:  # another run finished first: its library is as good as ours
            if not (target / AGENT_SONAME).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def agent_environment(library_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """What a command needs for its ``libcuda.so.1`` to be the agent: the library's directory
    first on ``LD_LIBRARY_PATH`` (the agent reads the reservation from ``BITFUSION_NET_LEASE``)."""
    path = env.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": f"{library_dir}:{path}" if path else str(library_dir)}
