"""``python -m polystore``: the ``polystore`` command, whose code is `polystore.apps.cli`."""

import sys

from polystore.apps.cli import main

sys.exit(main())
