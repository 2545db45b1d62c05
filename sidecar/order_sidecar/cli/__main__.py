"""``python -m order_sidecar.cli``: the ``order-sidecar`` command."""

import sys

from order_sidecar.cli import main

sys.exit(main())
