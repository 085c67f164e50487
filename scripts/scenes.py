"""The scenes both viewers' screenshots show (docs/images): the same data in napari and Fiji.

Each scene streams through any `StreamingBackend` (napari's or Fiji's); the screenshot scripts
take one picture after each:

* ``channels``: a 3-channel time series (green/magenta/cyan), 5 time points;
* ``labels``: a labels image with 400 touching objects of varied sizes;
* ``rois``: an image with ROIs of every kind (ellipses, a rectangle, a polygon, a line);
* ``rgb``: an RGB stream.

Used by scripts/fiji_screenshots.py and scripts/napari_screenshots.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from polystore.streaming import StreamingBackend


def blobs(shape: tuple[int, int], centres: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian spots at `centres` (rows, columns), as a microscope might see cells."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, np.float32)
    for r, c in centres:
        image += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * radius**2))
    return image


def scene_channels(backend: StreamingBackend) -> None:
    rng = np.random.default_rng(1)
    centres = [rng.uniform(20, 280, (25, 2)) for _ in range(3)]
    for t in range(5):
        for c, colormap in enumerate(["green", "magenta", "cyan"]):
            drift = np.array([3.0 * t, 2.0 * t])
            plane = blobs((300, 300), centres[c] + drift, 6 + 2 * c) * 3000
            plane += rng.normal(200, 30, plane.shape)
            pixels = plane.clip(0, 65535).astype(np.uint16)
            backend.save(pixels, f"series/t{t}c{c}.tif", stream="3-channel series",
                      axes={"t": t, "c": c}, colormap=colormap)  # fmt: skip


def scene_labels(backend: StreamingBackend) -> None:
    rng = np.random.default_rng(2)
    labels = np.zeros((400, 400), np.uint16)
    label = 0
    for r in range(20):
        for c in range(20):  # 400 touching cells of varied sizes
            label += 1
            h, w = rng.integers(12, 21, 2)
            labels[r * 20 : r * 20 + h, c * 20 : c * 20 + w] = label
    backend.save(labels, "labels/cells.tif", stream="400 labels", labels=True)


def scene_rois(backend: StreamingBackend) -> None:
    rng = np.random.default_rng(3)
    centres = rng.uniform(40, 260, (12, 2))
    image = blobs((300, 300), centres, 9) * 2500 + rng.normal(300, 40, (300, 300))
    backend.save(image.clip(0, 65535).astype(np.uint16), "rois/img.tif", stream="ROIs")
    rois = [{"kind": "ellipse", "coords": [[r - 14, c - 14], [r + 14, c + 14]],
             "label": f"cell {k}"} for k, (r, c) in enumerate(centres)]  # fmt: skip
    rois.append({"kind": "rectangle", "coords": [[10, 10], [60, 120]], "label": "region"})
    rois.append({"kind": "polygon", "coords": [[200, 30], [280, 60], [250, 140]],
                 "label": "area"})  # fmt: skip
    rois.append({"kind": "line", "coords": [[290, 10], [290, 290]], "label": "scale"})
    backend.save(rois, "rois/cells.roi.zip", stream="ROIs")


def scene_rgb(backend: StreamingBackend) -> None:
    rows, cols = np.mgrid[:240, :320]
    for t in range(10):
        rgb = np.stack([(cols + 8 * t) % 256, (rows * 255 // 239), 255 - cols * 255 // 319],
                       axis=-1).astype(np.uint8)  # fmt: skip
        backend.save(rgb, f"rgb/frame{t:03d}.tif", stream="RGB stream")


SCENES: dict[str, Callable[[StreamingBackend], None]] = {
    "channels": scene_channels,
    "labels": scene_labels,
    "rois": scene_rois,
    "rgb": scene_rgb,
}
