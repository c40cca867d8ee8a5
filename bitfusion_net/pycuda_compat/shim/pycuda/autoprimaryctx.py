"""``pycuda.autoprimaryctx``: ``bitfusion_net.pycuda_compat.autoprimaryctx`` itself (one module, one state)."""

import sys

from bitfusion_net.pycuda_compat import autoprimaryctx as _module

sys.modules[__name__] = _module
