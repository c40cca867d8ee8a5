"""``pycuda.autoinit``: ``bitfusion_net.pycuda_compat.autoinit`` itself (one module, one state)."""

import sys

from bitfusion_net.pycuda_compat import autoinit as _module

sys.modules[__name__] = _module
