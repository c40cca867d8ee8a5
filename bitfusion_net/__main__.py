"""``python -m bitfusion_net``: the ``bitfusion-net`` command (``run``, ``request_gpus``, ...)."""

import sys

from .cli import main

sys.exit(main())
