"""``pycuda.compiler``: ``bitfusion_net.pycuda_compat.compiler`` itself (one module, one state)."""

import sys

from bitfusion_net.pycuda_compat import compiler as _module

sys.modules[__name__] = _module
