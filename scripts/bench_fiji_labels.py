#!/usr/bin/env python3
"""Draw time of a labels composite in Fiji as a ratio of the same composite as images.

A labels frame with channels is drawn by the receiver's `LabelCompositeImage` (every channel
through the cycling glasbey colours, docs/fiji.md); the same frame as an image is drawn by
ImageJ's own `CompositeImage`. Both are streamed into one ImageJ GUI (through the Script
Editor harness, tests/fiji_helpers.ScriptEditor, on a virtual display); an ImageJ macro then
times `updateDisplay()` on each, in interleaved rounds so that other load hits both alike,
and the fastest round of each is reported with their ratio.

    python scripts/bench_fiji_labels.py [--size 2048] [--channels 3] [--stack debian|modern]

Without $DISPLAY the script re-runs itself under ``xvfb-run -a``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from display import rerun_without_display  # noqa: E402 (scripts/)

from polystore.streaming import FijiStreamingBackend  # noqa: E402
from tests.fiji_helpers import STACKS, ScriptEditor, free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--draws", type=int, default=10, help="draws per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stack", choices=list(STACKS), default="debian")
    args = parser.parse_args(argv)
    if (status := rerun_without_display(__file__, argv)) is not None:
        return status
    stack = STACKS[args.stack]
    if (why := stack.missing()) is not None:
        print(f"cannot run the {stack.name} stack: {why}")
        return 2
    scratch = tempfile.mkdtemp(prefix="polystore-bench-")  # never ~/.config's credential
    os.environ["POLYSTORE_CREDENTIAL"] = os.path.join(scratch, "credential.json")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    params = f'endpoint="{endpoint}"'
    if not stack.curve:
        os.environ["POLYSTORE_AUTH"] = "none"
        params += ",allow_unauthenticated=true"
    shape = (args.channels, args.size, args.size)
    ids = np.random.default_rng(0).integers(0, 5000, shape).astype(np.uint16)
    editor = ScriptEditor(stack, gui=True)
    try:
        started = editor.command(f"run {params}", timeout=600)
        if not started.startswith("listening"):
            print(editor.log[-4000:])
            return 1
        with FijiStreamingBackend(endpoint, timeout=60, connect_timeout=30) as fiji:
            fiji.save(ids, "labels.tif", stream="labels", axis_names=["c"], labels=True)
            fiji.save(ids, "image.tif", stream="image", axis_names=["c"])
            fiji.flush()
            fiji.request("report", timeout=60)

        def ms_per_draw(title: str) -> float:
            return float(editor.command(
                f'macro selectImage("{title}"); t0 = getTime(); '
                f'for (i = 0; i < {args.draws}; i++) updateDisplay(); '
                f'return "" + (getTime() - t0) / {args.draws};'))  # fmt: skip

        times: dict[str, list[float]] = {"labels": [], "image": []}
        for _ in range(args.rounds):
            for title in times:
                times[title].append(ms_per_draw(title))
        labels, image = min(times["labels"]), min(times["image"])
        load = os.getloadavg()[0]
        print(
            f"# {args.channels} x {args.size} x {args.size} uint16, {stack.name} stack, "
            f"GUI on a virtual display, load average {load:.2f}"
        )
        print("| composite | ms per draw, fastest round (all rounds) |")
        print("|---|---|")
        for title, best in (("labels", labels), ("image", image)):
            rounds = ", ".join(f"{t:.0f}" for t in times[title])
            print(f"| {title} | {best:.0f} ({rounds}) |")
        print(f"\nlabels / image: {labels / image:.2f}x")
        editor.command("stop", timeout=30)
    finally:
        editor.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
