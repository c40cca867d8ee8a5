#!/usr/bin/env python3
"""Generate the agent's entry-point tables from the CUDA toolkit's own headers.

Reads ``cudaTypedefs.h`` (every ``PFN_<name>_v<version>[_ptds|_ptsz]`` typedef: one driver entry
point as ``cuGetProcAddress`` hands it out, by base name, version and per-thread-stream flavour)
and ``cuda.h`` (preprocessed three ways: plain, per-thread default stream, and with
``__CUDA_API_VERSION_INTERNAL``, which declares the legacy symbols), and writes:

- ``entry_points.h``: a prototype ``bfpfn_<name>_v<version>[_ptds|_ptsz]`` for every typedef; the
  agent's sources define the ones it forwards, with exactly that prototype (the compiler checks);
- ``entry_points.c``: a weak definition of each of them that logs the name once and returns
  ``CUDA_ERROR_NOT_SUPPORTED`` (so an entry point the agent does not forward is never NULL), the
  table ``cuGetProcAddress`` searches, one exported function per symbol ``libcuda.so.1`` exports
  (``cuMemAlloc_v2``, ``cuMemAlloc``, ``cuMemcpyHtoD_v2_ptds``, ...) calling the entry point of
  the same ABI, and the ``CUresult`` name and description tables.

Which typedef a symbol has is decided by the compiler, not by us: a probe program asks gcc
(``__builtin_types_compatible_p``) which typedefs of the same base name have the symbol's type.

Usage: gen_entry_points.py CUDA_INCLUDE_DIR OUT_DIR [CC]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PFN_RE = re.compile(
    r"typedef\s+CUresult\s*\(\s*(?:CUDAAPI\s*)?\*\s*PFN_(cu\w+?)_v(\d+)(_ptds|_ptsz)?\s*\)\s*\((.*?)\)\s*;",
    re.S,
)
DECL_RE = re.compile(r"\bCUresult\s+(cu\w+)\s*\(([^;{]*?)\)\s*;", re.S)
ERROR_RE = re.compile(r"/\*\*(.*?)\*/\s*(CUDA_(?:SUCCESS|ERROR_\w+))\s*=\s*(\d+)", re.S)
SUFFIX_RE = re.compile(r"^(cu\w+?)(?:_v\d+)?(_ptds|_ptsz)?$")


@dataclass(frozen=True)
class EntryPoint:
    base: str
    version: int
    flavour: str  # "", "_ptds" or "_ptsz"
    params: str

    @property
    def pfn(self) -> str:
        return f"PFN_{self.base}_v{self.version}{self.flavour}"

    @property
    def impl(self) -> str:
        return f"bfpfn_{self.base}_v{self.version}{self.flavour}"


def split_params(params: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in params:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current.strip())
    return [] if out == ["void"] else out


def named(params: str) -> tuple[str, str]:
    """The parameter list with our own names a0, a1, ... and the argument list calling with them."""
    parts = split_params(" ".join(params.split()))
    decls, args = [], []
    for i, part in enumerate(parts):
        match = re.match(r"^(.*?[\s*])(\w+)(\s*(?:\[[^\]]*\])*)$", part)
        scalar = {"int", "char", "long", "short", "unsigned", "signed", "float", "double"}
        if match is None or not match.group(1).strip() or match.group(2) in scalar:
            decls.append(f"{part} a{i}")  # an unnamed parameter
        else:
            decls.append(f"{match.group(1)}a{i}{match.group(3)}")
        args.append(f"a{i}")
    return (", ".join(decls) or "void"), ", ".join(args)


# The typedef headers of the driver's entry points: the core, then the profiler and graphics
# interop ones (the real driver exports those too, and cudart asks for them). A header that is
# missing, or that needs headers this machine lacks (VDPAU's), is left out.
TYPEDEF_HEADERS = (
    "cudaTypedefs.h",
    "cudaProfilerTypedefs.h",
    "cudaGLTypedefs.h",
    "cudaEGLTypedefs.h",
    "cudaVDPAUTypedefs.h",
)


def usable_headers(cc: str, include: Path) -> list[str]:
    usable = []
    for header in TYPEDEF_HEADERS:
        if not (include / header).is_file():
            continue
        probe = subprocess.run(
            [cc, "-E", "-x", "c", f"-I{include}", "-D__CUDA_API_VERSION_INTERNAL", "-"],
            input=f"#include <cuda.h>\n#include <{header}>\n",
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if probe.returncode == 0:
            usable.append(header)
    return usable


HEADERS: list[str] = []


def includes() -> str:
    return "".join(f"#include <{h}>\n" for h in ["cuda.h", *HEADERS])


def preprocess(cc: str, include: Path, *defines: str) -> str:
    source = includes()
    result = subprocess.run(
        [cc, "-E", "-P", "-x", "c", f"-I{include}", *defines, "-"],
        input=source, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


def main() -> int:
    include, out = Path(sys.argv[1]), Path(sys.argv[2])
    cc = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("CC", "gcc")
    out.mkdir(parents=True, exist_ok=True)
    HEADERS[:] = usable_headers(cc, include)
    # preprocessed, so that a typedef for another platform (WGL's) is not taken for ours
    typedefs = preprocess(cc, include, "-D__CUDA_API_VERSION_INTERNAL")
    entries = [
        EntryPoint(m.group(1), int(m.group(2)), m.group(3) or "", " ".join(m.group(4).split()))
        for m in PFN_RE.finditer(typedefs)
    ]
    by_base: dict[str, list[EntryPoint]] = {}
    for entry in entries:
        by_base.setdefault(entry.base, []).append(entry)

    # Every symbol the driver exports: what cuda.h declares in each of its three modes.
    symbols: dict[str, str] = {}
    for defines in (
        [],
        ["-DCUDA_API_PER_THREAD_DEFAULT_STREAM"],
        ["-D__CUDA_API_VERSION_INTERNAL"],
    ):
        for m in DECL_RE.finditer(preprocess(cc, include, *defines)):
            symbols.setdefault(m.group(1), " ".join(m.group(2).split()))

    # Ask the compiler which entry points have each symbol's type.
    candidates: list[tuple[str, EntryPoint]] = []
    for symbol in sorted(symbols):
        match = SUFFIX_RE.match(symbol)
        assert match is not None
        base, flavour = match.group(1), match.group(2) or ""
        for entry in by_base.get(base, []):
            if entry.flavour == flavour:
                candidates.append((symbol, entry))
    probe = ["#include <stdio.h>", includes()]
    for symbol in sorted({s for s, _ in candidates}):
        probe.append(f"extern CUresult bfprobe_{symbol}({symbols[symbol]});")
    probe.append("int main(void) {")
    for symbol, entry in candidates:
        probe.append(
            f'  printf("%d\\n", __builtin_types_compatible_p(__typeof__(&bfprobe_{symbol}), {entry.pfn}));'
        )
    probe.append("  return 0;\n}")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text("\n".join(probe) + "\n")
        subprocess.run(
            [cc, "-D__CUDA_API_VERSION_INTERNAL", f"-I{include}", "-o", str(exe), str(src)],
            check=True,
        )
        answers = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    compatible: dict[str, list[EntryPoint]] = {}
    for (symbol, entry), answer in zip(candidates, answers.split(), strict=True):
        if answer == "1":
            compatible.setdefault(symbol, []).append(entry)
    exported: dict[str, EntryPoint | None] = {}
    for symbol in sorted(symbols):
        found = sorted(compatible.get(symbol, []), key=lambda e: e.version)
        # cuDeviceGetUuid and cuDeviceGetUuid_v2 share an ABI: the plain name is the oldest
        # version, a _vN name the newest.
        versioned = re.search(r"_v\d+(_ptds|_ptsz)?$", symbol) is not None
        exported[symbol] = (found[-1] if versioned else found[0]) if found else None
    for base, group in by_base.items():  # entry points cuda.h does not declare (cuProfiler*)
        if base not in exported and base not in symbols:
            plain = [e for e in group if not e.flavour]
            if plain:
                exported[base] = min(plain, key=lambda e: e.version)

    errors = [
        (m.group(2), int(m.group(3)), " ".join(m.group(1).replace("\\p", "").split()))
        for m in ERROR_RE.finditer((include / "cuda.h").read_text())
    ]

    header = [
        "/* Generated by gen_entry_points.py from cudaTypedefs.h: do not edit. */",
        "#ifndef BF_ENTRY_POINTS_H",
        "#define BF_ENTRY_POINTS_H",
        includes(),
        "typedef struct { const char *name; int version; int flavour; void *fn; } bf_entry_point;",
        "/* flavour: 0 plain, 1 _ptds, 2 _ptsz */",
        "extern const bf_entry_point bf_entry_points[];",
        "extern const int bf_entry_point_count;",
        "typedef struct { int code; const char *name; const char *text; } bf_error_name;",
        "extern const bf_error_name bf_error_names[];",
        "extern const int bf_error_name_count;",
        "CUresult bf_not_forwarded(const char *name, int version, const char *flavour);",
    ]
    for entry in entries:
        header.append(f"CUresult {entry.impl}({named(entry.params)[0]});")
    header.append("#endif")
    (out / "entry_points.h").write_text("\n".join(header) + "\n")

    body = [
        "/* Generated by gen_entry_points.py from cudaTypedefs.h and cuda.h: do not edit. */",
        '#include "entry_points.h"',
        '#define BF_EXPORT __attribute__((visibility("default")))',
        "#define BF_WEAK __attribute__((weak))",
    ]
    for entry in entries:
        decls, args = named(entry.params)
        # A per-thread-stream flavour with the ABI of a plain version runs that version unless
        # the agent defines it itself: the agent has one default stream per device either way.
        twin = [e for e in by_base[entry.base] if not e.flavour and e.params == entry.params]
        if entry.flavour and twin:
            body.append(
                f"BF_WEAK CUresult {entry.impl}({decls}) {{ return {twin[-1].impl}({args}); }}"
            )
            continue
        body.append(
            f"BF_WEAK CUresult {entry.impl}({decls}) {{ "
            + " ".join(f"(void)a{i};" for i in range(len(split_params(entry.params))))
            + f' return bf_not_forwarded("{entry.base}", {entry.version}, "{entry.flavour}"); }}'
        )
    flavour_code = {"": 0, "_ptds": 1, "_ptsz": 2}
    body.append("const bf_entry_point bf_entry_points[] = {")
    for entry in sorted(entries, key=lambda e: (e.base, e.version, e.flavour)):
        body.append(
            f'  {{"{entry.base}", {entry.version}, {flavour_code[entry.flavour]}, (void *){entry.impl}}},'
        )
    body.append("};")
    body.append(f"const int bf_entry_point_count = {len(entries)};")
    for symbol, found in sorted(exported.items()):
        if found is None:
            # A symbol cuda.h declares with no typedef: answered as not forwarded, whatever its
            # arguments (they are in registers or on the caller's stack; the callee ignores them).
            body.append(
                f'BF_EXPORT CUresult {symbol}(void) {{ return bf_not_forwarded("{symbol}", 0, ""); }}'
            )
            continue
        decls, args = named(found.params)
        body.append(f"BF_EXPORT CUresult {symbol}({decls}) {{ return {found.impl}({args}); }}")
    body.append("const bf_error_name bf_error_names[] = {")
    for name, code, text in errors:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
        body.append(f'  {{{code}, "{name}", "{text}"}},')
    body.append("};")
    body.append(f"const int bf_error_name_count = {len(errors)};")
    (out / "entry_points.c").write_text("\n".join(body) + "\n")
    unmatched = sorted(s for s, e in exported.items() if e is None)
    print(
        f"gen_entry_points: {len(entries)} entry points, {len(exported)} exported symbols "
        f"({len(unmatched)} without a typedef), {len(errors)} error codes, from "
        + ", ".join(HEADERS)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
