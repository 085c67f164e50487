#!/usr/bin/env python3
"""Streaming benchmark from a source checkout: the same run as ``polystore bench``.

The code lives in ``polystore/apps/bench.py`` (so the installed ``polystore`` command has it too);
see its docstring for what is measured.

    python scripts/bench_stream.py            # full run (about a minute)
    python scripts/bench_stream.py --quick    # smoke run
    python scripts/bench_stream.py --json build/bench.json   # also save the figures
"""

from __future__ import annotations

import sys

from polystore.apps.bench import main

if __name__ == "__main__":
    sys.exit(main())
