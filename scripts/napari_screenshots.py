"""Screenshots of the napari plugin for docs/images: the same scenes as Fiji's.

Opens napari with the receiver widget docked (listening on a free port), streams the four
scenes of scripts/scenes.py with NapariStreamingBackend from a sender thread, and saves the
window after each (canvas, layer list, sliders and widget), as scripts/fiji_screenshots.py
does for Fiji:

    docs/images/napari_channels.png  a 3-channel time series (three additive layers)
    docs/images/napari_labels.png    a labels image with 400 objects
    docs/images/napari_rois.png      ROIs on an image (a Shapes layer above it)
    docs/images/napari_rgb.png       an RGB stream

    python scripts/napari_screenshots.py [--out docs/images]

Without $DISPLAY the script re-runs itself under ``xvfb-run -a``. Each scene gets its own
napari process, so that no scene's layers (or their removal: see "A napari crash" in
docs/napari.md) affect the next picture. The widget's saved settings and the streaming
credential go to a temporary folder, not the user's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from display import rerun_without_display
from scenes import SCENES

ROOT = Path(__file__).resolve().parents[1]


def pump(app, seconds: float) -> None:
    """Run Qt's event loop for `seconds` (the display timer puts frames into layers)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def stream_scene(app, backend, scene) -> None:
    """Stream one scene from a thread while this (the Qt) thread keeps napari drawing."""
    failed: list[BaseException] = []

    def send() -> None:
        try:
            scene(backend)
            backend.flush()
        except BaseException as exc:  # noqa: BLE001 - raised again below, in this thread
            failed.append(exc)

    sender = threading.Thread(target=send, name="scene sender")
    sender.start()
    while sender.is_alive():
        pump(app, 0.05)
    if failed:
        raise failed[0]
    pump(app, 1.0)  # the last frames reach their layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--scenes", default=",".join(SCENES), help="which, in this order")
    parser.add_argument("--canvas-too", action="store_true",
                        help="also save each canvas alone, as napari_<scene>_canvas.png")
    args = parser.parse_args(argv)
    if (status := rerun_without_display(__file__, argv)) is not None:
        return status
    scenes = args.scenes.split(",")
    if unknown := [name for name in scenes if name not in SCENES]:
        parser.error(f"unknown scene(s) {', '.join(unknown)}: choose from {', '.join(SCENES)}")
    if len(scenes) > 1:  # one napari process per scene (see above)
        one = [sys.executable, __file__, "--out", str(args.out),
               *(["--canvas-too"] if args.canvas_too else []), "--scenes"]
        failed = [name for name in scenes if subprocess.call([*one, name])]
        if failed:
            print(f"napari_screenshots: scene(s) {', '.join(failed)} failed")
        return 1 if failed else 0
    scratch = tempfile.mkdtemp(prefix="polystore-screenshots-")
    os.environ["POLYSTORE_CREDENTIAL"] = os.path.join(scratch, "credential.json")
    os.environ.pop("POLYSTORE_NAPARI_ENDPOINT", None)

    import napari
    from imageio.v3 import imwrite
    from polystore_napari.widget import ReceiverWidget
    from qtpy.QtCore import QSettings
    from qtpy.QtWidgets import QApplication

    from polystore.streaming import NapariStreamingBackend

    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, os.path.join(scratch, "settings"))
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 800)
    widget = ReceiverWidget(viewer, endpoint="tcp://127.0.0.1:0", auto_start=False)
    viewer.window.add_dock_widget(widget, name="polystore receiver", area="right")
    widget.start()
    app = QApplication.instance()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with NapariStreamingBackend(widget.endpoint, timeout=60, connect_timeout=30) as backend:
            stream_scene(app, backend, SCENES[scenes[0]])
            viewer.reset_view()
            pump(app, 0.5)
            path = args.out / f"napari_{scenes[0]}.png"
            imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
            if args.canvas_too:
                imwrite(args.out / f"napari_{scenes[0]}_canvas.png",
                        viewer.screenshot(canvas_only=True, flash=False))
            print(f"{path}: layers {[layer.name for layer in viewer.layers]}")
    finally:
        widget.stop()
        viewer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
