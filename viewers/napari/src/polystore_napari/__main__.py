"""``python -m polystore_napari``: napari with the receiver docked and listening."""

import sys

from polystore_napari.launch import main

sys.exit(main())
