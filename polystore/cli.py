"""``python -m polystore.cli``: the ``polystore`` command, whose code is `polystore.apps.cli`."""

import sys

from polystore.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
