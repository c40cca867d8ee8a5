"""A PyCUDA-compatible layer over bitfusion-net: programs written for PyCUDA run unchanged on
remote GPU fractions.

It appears as ``pycuda`` only when asked: ``bitfusion-net run`` (unless ``--no-pycuda``) and
``python -m bitfusion_net.pycuda_compat PROGRAM`` put ``SHIM_DIR`` first on the module search
path, so ``import pycuda.autoinit`` and ``import pycuda.driver`` find this package; anywhere else
the real PyCUDA, where installed, is what ``import pycuda`` gets. Covered, and not: README.md,
"Running PyCUDA programs unchanged".

One extension of PyCUDA's API: ``builtin(name)``, a server's built-in kernel (``saxpy``,
``fill``, ``gemm``, ...) as a PyCUDA ``Function``, so that PyCUDA-style programs run real
kernels on the NumPy reference device, which loads no CUDA modules.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .driver import Function

SHIM_DIR = Path(__file__).resolve().parent / "shim"  # holds the ``pycuda`` package


def python_path(existing: str = "") -> str:
    """A ``PYTHONPATH`` with the shim first (and ``existing`` after it)."""
    parts = [str(SHIM_DIR), *(p for p in existing.split(os.pathsep) if p and p != str(SHIM_DIR))]
    return os.pathsep.join(parts)


def builtin(name: str) -> Function:
    """The current context's device's built-in kernel ``name``, callable PyCUDA's way:
    ``builtin("saxpy")(numpy.int32(n), numpy.float32(a), x_gpu, y_gpu, block=(256, 1, 1))``,
    or ``prepare("ifPP")`` and ``prepared_call``."""
    from .driver import Module, current_device

    return Module(current_device(), None).get_function(name)
