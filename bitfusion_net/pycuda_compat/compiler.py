"""``pycuda.compiler``: CUDA C compiled here, with this machine's nvcc, for the remote GPU.

``SourceModule`` takes PyCUDA's arguments and environment variables: the source is wrapped in
``extern "C"`` (unless ``no_extern_c``), compiled with ``nvcc --cubin -arch sm_XY`` for the
compute capability the server reports for the current context's device, cached, and loaded onto
that device. ``PYCUDA_DEFAULT_NVCC_FLAGS`` adds flags; ``PYCUDA_CACHE_DIR`` moves the cache
(default: ``$XDG_CACHE_HOME/bitfusion-net/pycuda-compiler-cache``) and ``PYCUDA_DISABLE_CACHE``
turns it off. The cache key is the source, the options, the architecture and nvcc's version, so
an edit, a flag or another GPU compiles anew.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from ._errors import CompileError, LogicError
from .driver import Context, Module, module_from_buffer

__all__ = ["DEFAULT_NVCC_FLAGS", "SourceModule", "compile"]

DEFAULT_NVCC_FLAGS = [f for f in os.environ.get("PYCUDA_DEFAULT_NVCC_FLAGS", "").split() if f]
COMPILE_TIMEOUT_S = 300.0


def _find_nvcc(nvcc: str) -> str:
    found = shutil.which(nvcc)
    if found is None:
        for root in (os.environ.get("CUDA_ROOT"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if root and (candidate := Path(root) / "bin" / "nvcc").exists():
                return str(candidate)
        raise CompileError(
            f"{nvcc} not found: SourceModule compiles on this machine (install the CUDA "
            "toolkit, or set CUDA_ROOT)",
            [nvcc],
        )
    return found


@cache
def _nvcc_version(nvcc: str) -> str:
    done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout


def _cache_dir(cache_dir: str | os.PathLike[str] | None | bool) -> Path | None:
    if cache_dir is False or os.environ.get("PYCUDA_DISABLE_CACHE"):
        return None
    if cache_dir not in (None, True):
        return Path(cache_dir)  # type: ignore[arg-type]
    configured = os.environ.get("PYCUDA_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitfusion-net" / "pycuda-compiler-cache"


def _current_arch() -> str:
    major, minor = Context.get_device().compute_capability()
    return f"sm_{major}{minor}"


def compile(  # noqa: A001 - PyCUDA's name
    source: str,
    nvcc: str = "nvcc",
    options: Sequence[str] | None = None,
    keep: bool = False,
    no_extern_c: bool = False,
    arch: str | None = None,
    code: str | None = None,
    cache_dir: Any = None,
    include_dirs: Sequence[str] = (),
    target: str = "cubin",
) -> bytes:
    """The image (cubin by default) nvcc makes of ``source``, from the cache when it has it."""
    if not no_extern_c:
        source = f'extern "C" {{\n{source}\n}}\n'
    arch = arch or _current_arch()
    command = [_find_nvcc(nvcc), f"--{target}", "-arch", arch]
    if code is not None:
        command += ["-code", code]
    command += [*(options or DEFAULT_NVCC_FLAGS), *(f"-I{d}" for d in include_dirs)]
    key = hashlib.sha256(
        "\0".join([source, *command[1:], _nvcc_version(command[0])]).encode()
    ).hexdigest()
    directory = _cache_dir(cache_dir)
    cached = directory / f"{key}.{target}" if directory is not None else None
    if cached is not None and cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="pycuda-compat-") as work:
        source_file = Path(work) / "kernel.cu"
        source_file.write_text(source)
        output = Path(work) / f"kernel.{target}"
        done = subprocess.run(
            [*command, "-o", str(output), str(source_file)],
            capture_output=True,
            text=True,
            cwd=work,
            timeout=COMPILE_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise CompileError(
                "nvcc compilation of kernel.cu failed", command, done.stdout, done.stderr
            )
        image = output.read_bytes()
        if keep:
            kept = Path(tempfile.mkdtemp(prefix="pycuda-compat-kept-"))
            shutil.copy(source_file, kept)
            shutil.copy(output, kept)
            print(f"*** compiler output in {kept}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(image)
        partial.replace(cached)  # atomic: a concurrent compile never reads half a file
    return image


class SourceModule(Module):
    """CUDA C source compiled here and loaded onto the current context's device."""

    def __init__(
        self,
        source: str,
        nvcc: str = "nvcc",
        options: Sequence[str] | None = None,
        keep: bool = False,
        no_extern_c: bool = False,
        arch: str | None = None,
        code: str | None = None,
        cache_dir: Any = None,
        include_dirs: Sequence[str] = (),
    ) -> None:
        if Context.get_current() is None:
            raise LogicError("SourceModule needs a current context: 'import pycuda.autoinit' first")
        image = compile(
            source, nvcc, options, keep, no_extern_c, arch, code, cache_dir, include_dirs
        )
        module = module_from_buffer(image)
        super().__init__(module.device, module.remote)
