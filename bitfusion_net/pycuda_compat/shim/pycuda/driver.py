"""``pycuda.driver``: ``bitfusion_net.pycuda_compat.driver`` itself (one module, one state)."""

import sys

from bitfusion_net.pycuda_compat import driver as _module

sys.modules[__name__] = _module
