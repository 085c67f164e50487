"""A display for the scripts that open napari or ImageJ windows: without one, run again
under ``xvfb-run`` (a virtual X display; ``apt install xvfb``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: set in the re-run, so that it never re-runs itself again
_AGAIN = "POLYSTORE_BENCH_XVFB"


def rerun_without_display(script: str, argv: list[str] | None = None) -> int | None:
    """None when there is a display (go on); otherwise the exit status of `script` run again
    with the same arguments under ``xvfb-run -a`` (2 when xvfb-run is missing)."""
    if os.environ.get("DISPLAY") or os.environ.get(_AGAIN):
        return None
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        print(f"{Path(script).name}: no $DISPLAY and no xvfb-run: install xvfb or run under a "
              "display", file=sys.stderr)
        return 2
    again = [sys.executable, script, *(sys.argv[1:] if argv is None else argv)]
    return subprocess.call([xvfb, "-a", "-s", "-screen 0 1600x1000x24", *again],
                           env=dict(os.environ, **{_AGAIN: "1"}))
