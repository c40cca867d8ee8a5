"""``python -m bitfusion_net.pycuda_compat PROGRAM [ARGS...]``: run a PyCUDA program with this
layer as ``pycuda``, on the reservation in ``BITFUSION_NET_LEASE`` (what ``bitfusion-net run``
does for it, without reserving)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from . import SHIM_DIR


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(64 if len(sys.argv) < 2 else 0)
    sys.path.insert(0, str(SHIM_DIR))
    program, sys.argv = sys.argv[1], sys.argv[1:]
    if program == "-m":
        if len(sys.argv) < 2:
            sys.exit("-m needs a module name")
        module, sys.argv = sys.argv[1], sys.argv[1:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, str(Path(program).resolve().parent))
        runpy.run_path(program, run_name="__main__")


if __name__ == "__main__":
    main()
