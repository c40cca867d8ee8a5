"""``pycuda.gpuarray``: ``bitfusion_net.pycuda_compat.gpuarray`` itself (one module, one state)."""

import sys

from bitfusion_net.pycuda_compat import gpuarray as _module

sys.modules[__name__] = _module
