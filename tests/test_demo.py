"""`polystore demo`, the main job, end to end as a user runs it; and its image processing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from polystore.apps.demo import (
    CellSimulation,
    label_components,
    otsu_threshold,
    rois_and_measurements,
    segment,
    smooth,
    write_png,
)
from polystore.streaming.orphans import pid_alive
from tests import needs

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def no_display_env() -> dict:
    """The environment of a machine without a display (pytest-xvfb gives us one)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}  # fmt: skip


def napari_segments() -> set[str]:
    """napari_ segments whose owner has exited (the demo's, once it has finished); live
    owners are other programs streaming on this machine."""
    if not os.path.isdir("/dev/shm"):
        return set()
    names = {n for n in os.listdir("/dev/shm") if n.startswith("napari_")}
    return {n for n in names if not pid_alive(int(n.split("_")[1]))}


def check_outputs(out: Path, time_points: int) -> dict:
    """The files a demo run wrote are there and readable; returns summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["stats"]
    assert stats["time_points"] == time_points
    assert stats["frames_streamed"] == 7 * time_points  # 3 raw + 3 smooth + 1 labels
    assert stats["roi_sets_streamed"] == time_points
    assert stats["files_written"] == 5 * time_points
    assert stats["dropped"] == 0
    assert summary["received_frames"] == stats["frames_streamed"]
    assert summary["received_roi_sets"] == time_points

    last = f"t{time_points - 1:03d}"
    raw = tifffile.imread(out / "raw" / f"{last}.tif")
    smoothed = tifffile.imread(out / "smooth" / f"{last}.tif")
    labels = tifffile.imread(out / "labels" / f"{last}.tif")
    assert raw.shape == smoothed.shape == (3, 256, 256) and raw.dtype == np.uint16
    assert labels.shape == (256, 256) and 5 <= labels.max() <= 20
    rois = json.loads((out / "rois" / f"{last}.json").read_text())
    assert {r["kind"] for r in rois} <= {"polygon", "rectangle"}
    polygons = [r for r in rois if r["kind"] == "polygon"]
    assert len(polygons) == labels.max() and all(len(r["coords"]) >= 3 for r in polygons)
    table = (out / "measurements" / f"{last}.csv").read_text().splitlines()
    assert table[0].startswith("label,area,centroid_row,centroid_col")
    assert len(table) == labels.max() + 1
    return summary


def run_demo_cli(args: list[str], cwd: Path, env: dict, timeout: float = 120):
    t0 = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=timeout)
    return result, time.monotonic() - t0


@pytest.mark.skipif(shutil.which("polystore") is None, reason="console script not installed")
def test_readme_main_job_runs_headless_with_default_settings(tmp_path):
    """`polystore demo` exactly as the README says, on a machine without a display."""
    before = napari_segments()
    result, seconds = run_demo_cli(["polystore", "demo"], tmp_path, no_display_env())
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "polystore_demo_output"
    summary = check_outputs(out, time_points=60)
    assert "polystore demo: done" in result.stdout
    for label in ("viewer", "pipeline", "streamed", "received", "written", "outputs"):
        assert re.search(rf"^  {label}\s+: ", result.stdout, re.MULTILINE), label
    assert "420 frames + 60 ROI sets to napari_stream" in result.stdout
    assert "dropped: 0" in result.stdout
    assert str(out) in result.stdout
    # it says which viewer it used, and leaves the matching image
    if summary["viewer"] == "virtual":
        assert "on a virtual display" in result.stdout
        assert (out / "screenshot.png").read_bytes()[:8] == PNG_SIGNATURE
    else:
        assert "headless receiver" in result.stdout
        assert (out / "preview.png").read_bytes()[:8] == PNG_SIGNATURE
    assert seconds < 50, f"the default demo took {seconds:.0f} s"
    assert napari_segments() <= before, "the demo left shared-memory segments behind"


def test_headless_flag_runs_real_napari_on_a_virtual_display(tmp_path):
    needs.program("Xvfb")
    needs.module("napari")
    needs.module("polystore_napari")
    before = napari_segments()
    out = tmp_path / "out"
    result, _ = run_demo_cli([sys.executable, "-m", "polystore.cli", "demo", "--headless",
                              "--frames", "5", "--out", str(out), "-q"], tmp_path,
                             dict(os.environ))  # a display is there: --headless must win
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running napari on a virtual display (Xvfb)" in result.stdout
    summary = check_outputs(out, time_points=5)
    assert summary["viewer"] == "virtual"
    screenshot = out / "screenshot.png"
    assert screenshot.read_bytes()[:8] == PNG_SIGNATURE
    assert screenshot.stat().st_size > 20_000  # a real window, not an empty image
    assert f"image      : {screenshot}" in result.stdout
    assert napari_segments() <= before


def test_no_napari_streams_to_a_headless_receiver(tmp_path):
    before = napari_segments()
    out = tmp_path / "out"
    result, _ = run_demo_cli([sys.executable, "-m", "polystore.cli", "demo", "--no-napari",
                              "--frames", "4", "--out", str(out), "-q"], tmp_path,
                             no_display_env())  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "headless receiver (--no-napari); no napari window" in result.stdout
    summary = check_outputs(out, time_points=4)
    assert summary["viewer"] == "receiver"
    assert (out / "preview.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "not a napari screenshot" in result.stdout
    assert napari_segments() <= before


def test_a_demo_that_cannot_start_leaves_no_folder_and_a_rerun_names_earlier_files(tmp_path):
    """With its port in use the demo failed, but had already made an empty output folder;
    a second run into a folder of an earlier, longer one kept that run's files without a
    word while its summary counted only its own."""
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    out = tmp_path / "new" / "out"
    try:
        result, _ = run_demo_cli([sys.executable, "-m", "polystore.cli", "demo", "--no-napari",
                                  "--frames", "2", "--out", str(out), "-q", "--endpoint",
                                  f"tcp://127.0.0.1:{busy.getsockname()[1]}"], tmp_path,
                                 no_display_env())  # fmt: skip
    finally:
        busy.close()
    assert result.returncode != 0 and "in use" in result.stdout + result.stderr
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    (out / "from-before.txt").write_text("kept")
    result, _ = run_demo_cli([sys.executable, "-m", "polystore.cli", "demo", "--no-napari",
                              "--frames", "2", "--out", str(out), "-q"], tmp_path,
                             no_display_env())  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already holds 1 file(s)" in result.stdout
    assert (out / "from-before.txt").read_text() == "kept"


def test_with_a_display_the_demo_opens_napari_and_waits_for_it(tmp_path):
    needs.display()
    needs.module("napari")
    out = tmp_path / "out"
    demo = subprocess.Popen([sys.executable, "-m", "polystore.cli", "demo", "--frames", "4",
                             "--fps", "0", "--out", str(out), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    napari_pid = None
    try:
        for line in demo.stdout:
            lines.append(line)
            match = re.search(r"napari window \(pid (\d+)\)", line)
            if match:
                napari_pid = int(match[1])
            if "close its window to finish" in line:
                break
        assert napari_pid is not None, "".join(lines)
        summary = check_outputs(out, time_points=4)
        assert summary["viewer"] == "window"
        os.kill(napari_pid, signal.SIGTERM)  # the user closes napari: the demo ends
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if napari_pid is not None:
            try:
                os.kill(napari_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert demo.returncode == 0, "".join(lines) + rest


# -- the pipeline's pieces ---------------------------------------------------------------------


def test_label_components_matches_scipy():
    ndimage = needs.module("scipy.ndimage")
    rng = np.random.default_rng(3)
    for density in (0.2, 0.45, 0.6):
        mask = rng.random((70, 90)) < density
        ours = label_components(mask)
        theirs, n = ndimage.label(mask, structure=np.ones((3, 3)))
        assert ours.max() == n
        # the same partition: a one-to-one mapping between the two labellings
        pairs = set(zip(ours.ravel().tolist(), theirs.ravel().tolist()))
        assert len(pairs) == n + 1


def test_label_components_long_snake_and_min_size():
    mask = np.zeros((40, 40), bool)
    rows = list(range(1, 39, 4))            # ten horizontal bars...
    for i, row in enumerate(rows):
        mask[row, 1:39] = True
        if i + 1 < len(rows):               # ...joined alternately right and left: one snake
            mask[row : row + 4, 38 if i % 2 == 0 else 1] = True
    labels = label_components(mask)
    assert labels.max() == 1 and (labels[mask] == 1).all() and (labels[~mask] == 0).all()
    dots = np.zeros((10, 10), bool)
    dots[1, 1] = True
    dots[5:8, 5:8] = True
    assert label_components(dots, min_size=4).max() == 1


def test_segmentation_finds_the_simulated_cells():
    sim = CellSimulation(size=256, n=12, seed=0)
    image = sim.image(0)
    labels = segment(smooth(image)[0])
    assert 9 <= labels.max() <= 12  # touching cells may merge
    rois, table = rois_and_measurements(labels, image)
    assert sum(r["kind"] == "polygon" for r in rois) == labels.max()
    assert all(isinstance(v, float) for r in rois for point in r["coords"] for v in point)
    assert len(table.splitlines()) == labels.max() + 1


def test_smooth_and_threshold():
    image = np.zeros((32, 32), np.uint16)
    image[16, 16] = 1000
    blurred = smooth(image, sigma=2.0)
    assert blurred.dtype == np.float32 and abs(blurred.sum() - 1000) < 1
    assert blurred[16, 16] == blurred.max() < 100
    two = np.concatenate([np.full(100, 10.0), np.full(100, 90.0)])
    assert 10 < otsu_threshold(two) < 90


def test_write_png(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    write_png(tmp_path / "x.png", rgb, scale=1)
    data = (tmp_path / "x.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and b"IHDR" in data and data.endswith(b"IEND\xaeB`\x82")
    matplotlib_image = needs.module("matplotlib.image")
    back = matplotlib_image.imread(tmp_path / "x.png")
    assert back.shape == (4, 5, 3) and back[..., 0].min() == 1.0


def test_napari_screenshots_show_the_shared_scenes(tmp_path):
    """scripts/napari_screenshots.py (docs/images) streams the scenes of scripts/scenes.py into
    real napari and saves what the canvas shows: the colours each scene must show are there."""
    needs.program("xvfb-run")
    needs.module("napari")
    needs.module("polystore_napari")
    from imageio.v3 import imread

    before = napari_segments()
    # without $DISPLAY, as for docs/images: the script starts its own 24-bit screen large
    # enough for the window (pytest-xvfb's is 800 x 600 at 16 bits)
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "napari_screenshots.py"),
                             "--out", str(tmp_path), "--canvas-too"], capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3-channel series [c2]" in result.stdout and "'ROIs ROIs'" in result.stdout
    names = ("channels", "labels", "rois", "rgb")
    for name in names:  # the pictures of docs/images: the whole window, canvas inside it
        window = imread(tmp_path / f"napari_{name}.png")
        canvas = imread(tmp_path / f"napari_{name}_canvas.png")
        assert window.shape[0] > canvas.shape[0] and window.shape[1] > canvas.shape[1], name
    # what each scene must show, checked on the canvas alone (the window's own widgets and
    # the layer list's thumbnails have colours of their own)
    shots = {name: imread(tmp_path / f"napari_{name}_canvas.png")[..., :3].astype(int)
             for name in names}
    r, g, b = (shots["channels"][..., i] for i in range(3))
    assert ((g > 150) & (r < 80) & (b < 80)).any(), "no green channel"
    assert ((r > 150) & (b > 150) & (g < 80)).any(), "no magenta channel"
    assert ((g > 150) & (b > 150) & (r < 80)).any(), "no cyan channel"
    colours = np.unique(shots["labels"].reshape(-1, 3), axis=0)
    assert len(colours) > 40  # napari's cycle of label colours, not one grey
    r, g, b = (shots["rois"][..., i] for i in range(3))
    assert ((r > 150) & (g > 150) & (b < 80)).any(), "no yellow ROI outline"
    assert len(np.unique(shots["rgb"].reshape(-1, 3), axis=0)) > 10_000  # colour gradients
    assert napari_segments() <= before
