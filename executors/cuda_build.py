"""Compiling CUDA C with ``nvcc``, cached on disk.

The GPU executor compiles the built-in kernels (``executors/cuda/builtins.cu``) the first time a
device of a given architecture needs them, and keeps the result, keyed by the source, the compiler
version, the target and the flags, so later server starts load it straight from the cache. The test
suite uses the same function to compile every CUDA source to PTX on machines without a GPU.

The cache lives in ``$BITFUSION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/bitfusion-net``, else
``~/.cache/bitfusion-net``. Entries are written atomically, so concurrent servers may share it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = [
    "BUILTINS_SOURCE",
    "CUDA_SOURCES",
    "NvccError",
    "NvccNotFound",
    "builtins_image",
    "cache_dir",
    "compile_cuda",
    "find_nvcc",
    "find_ptxas",
    "ptx_to_cubin",
]

log = logging.getLogger(__name__)

CUDA_SOURCES = Path(__file__).with_name("cuda")
BUILTINS_SOURCE = CUDA_SOURCES / "builtins.cu"
# The oldest virtual architecture nvcc 12 and 13 both accept; PTX for it is JIT-compiled by the
# driver for any newer GPU, which is the fallback when nvcc does not know the GPU's own one.
PORTABLE_PTX_ARCH = "compute_75"
NVCC_FLAGS = ("-std=c++17", "-O3")
_FALLBACK_NVCC = Path("/usr/local/cuda/bin/nvcc")  # where the CUDA toolkit installs by default
_NVCC_TIMEOUT_S = 300
PTXAS_TIMEOUT_S = 60.0  # a tenant's module; the driver's JIT would have no limit at all


class NvccError(RuntimeError):
    """nvcc refused a source (or is missing); the message has nvcc's diagnostics."""


class NvccNotFound(NvccError):
    """No nvcc could be found; the message says where we looked and how to point us at one."""


def find_nvcc() -> str:
    """The nvcc to use: ``$NVCC``, else the one on ``PATH``, else the CUDA toolkit's.

    Raises ``NvccError`` naming every place it looked.
    """
    explicit = os.environ.get("NVCC")
    if explicit:
        if shutil.which(explicit):
            return explicit
        raise NvccNotFound(f"$NVCC is {explicit!r}, which is not an executable")
    found = shutil.which("nvcc")
    if found:
        return found
    roots = [os.environ.get(var) for var in ("CUDA_HOME", "CUDA_ROOT", "CUDA_PATH")]
    candidates = [Path(root) / "bin" / "nvcc" for root in roots if root]
    candidates.append(_FALLBACK_NVCC)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise NvccNotFound(
        "nvcc (the CUDA compiler) was not found: looked at $NVCC, PATH, "
        + ", ".join(str(c) for c in candidates)
        + ". Install the CUDA toolkit or point $NVCC or $CUDA_HOME at it."
    )


def find_ptxas() -> str | None:
    """The PTX assembler: ``$PTXAS``, the one beside nvcc, or the one on ``PATH``; None if none."""
    explicit = os.environ.get("PTXAS")
    if explicit:
        return explicit if shutil.which(explicit) else None
    try:
        beside = Path(find_nvcc()).resolve().with_name("ptxas")
    except NvccNotFound:
        beside = None
    if beside is not None and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("ptxas")


def ptx_to_cubin(ptx: bytes, arch: str, timeout: float = PTXAS_TIMEOUT_S) -> bytes:
    """Assemble ``ptx`` into machine code for ``arch`` (``sm_90``) with ptxas, in a subprocess.

    The GPU executor does this for tenants' PTX rather than leave it to the driver, whose JIT
    holds the Python interpreter's lock (PyCUDA does not release it) for as long as it runs, so
    a large or hostile module would stall the whole server; a subprocess stalls nobody and can
    be stopped. Raises ``NvccNotFound`` without ptxas and ``NvccError`` with ptxas's own
    diagnostics when it refuses the PTX or runs past ``timeout`` seconds.
    """
    ptxas = find_ptxas()
    if ptxas is None:
        raise NvccNotFound("ptxas (the PTX assembler) was not found beside nvcc or on PATH")
    with tempfile.TemporaryDirectory(prefix="bitfusion-ptxas-") as work:
        source, output = Path(work) / "module.ptx", Path(work) / "module.cubin"
        source.write_bytes(ptx.rstrip(b"\0"))
        try:
            result = subprocess.run(
                [ptxas, f"-arch={arch}", "-o", str(output), str(source)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise NvccError(f"ptxas took over {timeout:g} s on the module") from None
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
            raise NvccError(message.replace(str(source), "module.ptx"))
        return output.read_bytes()


@functools.cache
def _nvcc_version(nvcc: str) -> str:
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def cache_dir() -> Path:
    """Where compiled images are kept (see the module docstring)."""
    explicit = os.environ.get("BITFUSION_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bitfusion-net"


def compile_cuda(
    source: Path,
    target: str,
    arch: str,
    *,
    extra_flags: tuple[str, ...] = (),
    use_cache: bool = True,
) -> bytes:
    """Compile ``source`` with nvcc to ``target`` ("ptx" or "cubin") for ``arch``.

    ``arch`` is a virtual architecture for PTX (``compute_90``) or a real one for cubin
    (``sm_90``). Returns the image; PTX is NUL-terminated, as ``cuModuleLoadData`` wants it.
    Raises ``NvccError`` with nvcc's own diagnostics if the source does not compile.
    """
    if target not in ("ptx", "cubin"):
        raise ValueError(f"target must be 'ptx' or 'cubin', got {target!r}")
    nvcc = find_nvcc()
    flags = (*NVCC_FLAGS, *extra_flags, f"-arch={arch}", f"-{target}")
    code = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([code, _nvcc_version(nvcc).encode(), " ".join(flags).encode()])
    ).hexdigest()[:32]
    cached = cache_dir() / "cuda" / f"{source.stem}-{arch}-{key}.{target}"
    if use_cache and cached.is_file():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bitfusion-nvcc-") as work:
        output = Path(work) / f"out.{target}"
        command = [nvcc, *flags, "-o", str(output), str(source)]
        log.info("compiling %s for %s with %s", source.name, arch, nvcc)
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_NVCC_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise NvccError(f"nvcc took over {_NVCC_TIMEOUT_S} s on {source}") from None
        if result.returncode != 0:
            raise NvccError(
                f"nvcc failed on {source} for {arch} (exit {result.returncode}):\n"
                + (result.stderr or result.stdout).strip()
            )
        image = output.read_bytes()
    if target == "ptx" and not image.endswith(b"\0"):
        image += b"\0"
    if use_cache:
        _store(cached, image)
    return image


def _store(path: Path, image: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a unique name, then renamed: a concurrent reader sees all or nothing.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(image)
        os.replace(tmp.name, path)
    except OSError as exc:  # a read-only home is no reason to refuse to serve
        log.warning("could not cache %s: %s", path, exc)


def builtins_image(compute_capability: tuple[int, int]) -> bytes:
    """The built-in kernel library for a GPU of ``compute_capability``.

    Machine code (cubin) for that very architecture when this nvcc knows it, which needs no JIT
    and runs on any driver of the same CUDA major version; otherwise portable PTX, which the
    driver compiles at load.
    """
    major, minor = compute_capability
    try:
        return compile_cuda(BUILTINS_SOURCE, "cubin", f"sm_{major}{minor}")
    except NvccNotFound:
        raise
    except NvccError as exc:
        log.warning(
            "nvcc cannot build machine code for sm_%d%d; using %s PTX instead (%s)",
            major,
            minor,
            PORTABLE_PTX_ARCH,
            str(exc).splitlines()[0],
        )
        return compile_cuda(BUILTINS_SOURCE, "ptx", PORTABLE_PTX_ARCH)
