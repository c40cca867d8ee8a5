"""``pycuda.tools``: ``bitfusion_net.pycuda_compat.tools`` itself (one module, one state)."""

import sys

from bitfusion_net.pycuda_compat import tools as _module

sys.modules[__name__] = _module
