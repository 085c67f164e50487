"""Screenshots of the Fiji receiver for docs/images (Fiji's GUI path on a virtual display).

Runs viewers/fiji/polystore_receiver.groovy with ImageJ's GUI under xvfb-run (through the
Script Editor harness, tests/fiji_helpers.ScriptEditor), streams the four scenes of
scripts/scenes.py (the same data as napari's screenshots) with FijiStreamingBackend and
saves the screen after each:

    docs/images/fiji_channels.png  a 3-channel time series (green/magenta/cyan composite)
    docs/images/fiji_labels.png    a labels image with 400 objects
    docs/images/fiji_rois.png      ROIs on an image (overlay and ROI Manager)
    docs/images/fiji_rgb.png       an RGB stream

    python scripts/fiji_screenshots.py [--stack modern|debian] [--out docs/images]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scenes import SCENES  # noqa: E402 (scripts/, shared with napari_screenshots.py)

from polystore.streaming import FijiStreamingBackend  # noqa: E402
from tests.fiji_helpers import STACKS, ScriptEditor, free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=list(STACKS), default="modern")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    stack = STACKS[args.stack]
    if (why := stack.missing()) is not None:
        print(f"cannot run the {stack.name} stack: {why}")
        return 2
    credential_dir = tempfile.mkdtemp(prefix="polystore-screenshots-")  # never ~/.config's
    os.environ["POLYSTORE_CREDENTIAL"] = os.path.join(credential_dir, "credential.json")
    params = f'endpoint="tcp://127.0.0.1:{free_port()}"'
    if not stack.curve:
        os.environ["POLYSTORE_AUTH"] = "none"
        params += ",allow_unauthenticated=true"
    editor = ScriptEditor(stack, gui=True)
    try:
        started = editor.command(f"run {params}", timeout=600)
        if not started.startswith("listening"):
            print(editor.log)
            return 1
        endpoint = params.split('"')[1]
        args.out.mkdir(parents=True, exist_ok=True)
        with FijiStreamingBackend(endpoint, timeout=60, connect_timeout=30) as fiji:
            for name, scene in SCENES.items():
                fiji.request("clear")
                scene(fiji)
                fiji.flush()
                fiji.request("report")  # drawn
                time.sleep(1.5)
                print(editor.command(f"screenshot {args.out / ('fiji_' + name + '.png')}"))
        editor.command("stop", timeout=30)
    except Exception:
        print(editor.log[-6000:])
        raise
    finally:
        editor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
