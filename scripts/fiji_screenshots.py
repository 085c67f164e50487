"""Screenshots of the Fiji receiver for docs/images (Fiji's GUI path on a virtual display).

Runs viewers/fiji/polystore_receiver.groovy with ImageJ's GUI under xvfb-run (through the
Script Editor harness, tests/fiji_helpers.ScriptEditor), streams four scenes with
FijiStreamingBackend and saves the screen after each:

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polystore.streaming import FijiStreamingBackend  # noqa: E402
from tests.fiji_helpers import STACKS, ScriptEditor, free_port  # noqa: E402


def blobs(shape: tuple[int, int], centres: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian spots at `centres` (rows, columns), as a microscope might see cells."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, np.float32)
    for r, c in centres:
        image += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * radius**2))
    return image


def scene_channels(fiji: FijiStreamingBackend) -> None:
    rng = np.random.default_rng(1)
    centres = [rng.uniform(20, 280, (25, 2)) for _ in range(3)]
    for t in range(5):
        for c, colormap in enumerate(["green", "magenta", "cyan"]):
            drift = np.array([3.0 * t, 2.0 * t])
            plane = blobs((300, 300), centres[c] + drift, 6 + 2 * c) * 3000
            plane += rng.normal(200, 30, plane.shape)
            pixels = plane.clip(0, 65535).astype(np.uint16)
            fiji.save(pixels, f"series/t{t}c{c}.tif", stream="3-channel series",
                      axes={"t": t, "c": c}, colormap=colormap)  # fmt: skip


def scene_labels(fiji: FijiStreamingBackend) -> None:
    rng = np.random.default_rng(2)
    labels = np.zeros((400, 400), np.uint16)
    label = 0
    for r in range(20):
        for c in range(20):  # 400 touching cells of varied sizes
            label += 1
            h, w = rng.integers(12, 21, 2)
            labels[r * 20 : r * 20 + h, c * 20 : c * 20 + w] = label
    fiji.save(labels, "labels/cells.tif", stream="400 labels", labels=True)


def scene_rois(fiji: FijiStreamingBackend) -> None:
    rng = np.random.default_rng(3)
    centres = rng.uniform(40, 260, (12, 2))
    image = (blobs((300, 300), centres, 9) * 2500 + rng.normal(300, 40, (300, 300)))
    fiji.save(image.clip(0, 65535).astype(np.uint16), "rois/img.tif", stream="ROIs")
    rois = [{"kind": "ellipse", "coords": [[r - 14, c - 14], [r + 14, c + 14]],
             "label": f"cell {k}"} for k, (r, c) in enumerate(centres)]  # fmt: skip
    rois.append({"kind": "rectangle", "coords": [[10, 10], [60, 120]], "label": "region"})
    rois.append({"kind": "polygon", "coords": [[200, 30], [280, 60], [250, 140]],
                 "label": "area"})  # fmt: skip
    rois.append({"kind": "line", "coords": [[290, 10], [290, 290]], "label": "scale"})
    fiji.save(rois, "rois/cells.roi.zip", stream="ROIs")


def scene_rgb(fiji: FijiStreamingBackend) -> None:
    rows, cols = np.mgrid[:240, :320]
    for t in range(10):
        rgb = np.stack([(cols + 8 * t) % 256, (rows * 255 // 239), 255 - cols * 255 // 319],
                       axis=-1).astype(np.uint8)  # fmt: skip
        fiji.save(rgb, f"rgb/frame{t:03d}.tif", stream="RGB stream")


SCENES = {"fiji_channels": scene_channels, "fiji_labels": scene_labels,
          "fiji_rois": scene_rois, "fiji_rgb": scene_rgb}  # fmt: skip


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
                print(editor.command(f"screenshot {args.out / (name + '.png')}"))
        editor.command("stop", timeout=30)
    except Exception:
        print(editor.log[-6000:])
        raise
    finally:
        editor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
