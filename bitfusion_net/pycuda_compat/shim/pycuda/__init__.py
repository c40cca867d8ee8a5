"""``pycuda`` for programs run by ``bitfusion-net run``: bitfusion-net's PyCUDA-compatible layer
(``bitfusion_net.pycuda_compat``), on remote GPUs. This directory is on the module search path
only under ``run`` (or ``python -m bitfusion_net.pycuda_compat``)."""

VERSION = (2025, 1, 0)
VERSION_STATUS = "bitfusion-net"
VERSION_TEXT = "2025.1.0 (bitfusion-net PyCUDA-compatible layer)"
