"""A demo sender: ``python -m polystore_napari.demo [--endpoint ...] [--frames N]``.

Streams what a small imaging pipeline would: a t/c/z volume placed by axes, a live 2D camera
image (``replace``), a labels mask, and ROIs and points keyed to the camera stream. Start the
receiver first (``polystore napari``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from polystore.streaming import NapariStreamingBackend

SIZE = 384


def blobs(t: float, size: int = SIZE, n: int = 12, seed: int = 1) -> tuple[np.ndarray, list]:
    """A uint16 image of `n` Gaussian cells drifting with time `t`, and their centres."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.15, 0.85, (n, 2)) * size
    phase = rng.uniform(0, 2 * np.pi, n)
    centres = base + 18 * np.stack([np.sin(t + phase), np.cos(0.7 * t + phase)], axis=1)
    radii = rng.uniform(10, 22, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.zeros((size, size), np.float32)
    for (cy, cx), r in zip(centres, radii, strict=True):
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    noise = np.random.default_rng(int(t * 1000)).normal(0, 0.03, image.shape)
    image = np.clip(image + noise + 0.05, 0, None) * 20000
    return image.astype(np.uint16), list(zip(centres.tolist(), radii.tolist(), strict=True))


def stream_demo(endpoint: str | None = None, frames: int = 30, fps: float = 20.0) -> None:
    with NapariStreamingBackend(endpoint) as backend:
        # a t/c/z volume placed by its axes: one t/z layer per channel, each in its colour
        for t in range(3):
            for c in range(2):
                for z in range(5):
                    plane, _ = blobs(t + 0.3 * z, seed=2 + c)
                    backend.save(plane, f"volume/t{t}_c{c}_z{z}.tif", stream="volume",
                                 axes={"t": t, "c": c, "z": z}, axis_names=["t", "c", "z"],
                                 colormap=("green", "magenta")[c])
        # the live camera, its labels and ROIs
        for i in range(frames):
            t0 = time.perf_counter()
            image, cells = blobs(i / 10)
            backend.save(image, f"camera/t{i:04d}.tif", colormap="gray")
            mask = np.zeros(image.shape, np.uint16)
            yy, xx = np.mgrid[0:SIZE, 0:SIZE]
            for k, ((cy, cx), r) in enumerate(cells, start=1):
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.8 * r) ** 2] = k
            backend.save(mask, f"nuclei/t{i:04d}.tif", labels=True, opacity=0.4)
            rois = []
            for k, ((cy, cx), r) in enumerate(cells[:6]):
                kind = ("ellipse", "rectangle", "polygon")[k % 3]
                if kind == "polygon":
                    coords = [[cy + 1.3 * r * np.sin(a), cx + 1.3 * r * np.cos(a)]
                              for a in np.linspace(0, 2 * np.pi, 7)[:-1]]
                else:
                    coords = [[cy - 1.3 * r, cx - 1.3 * r], [cy + 1.3 * r, cx + 1.3 * r]]
                rois.append({"kind": kind, "coords": coords, "label": f"cell {k + 1}"})
            rois.append({"kind": "line", "coords": [cells[0][0], cells[1][0]]})
            rois += [{"kind": "point", "coords": [c]} for c, _ in cells[6:]]
            backend.save(rois, f"camera/t{i:04d}.roi.zip", stream="camera")
            time.sleep(max(0.0, 1 / fps - (time.perf_counter() - t0)))
        backend.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="receiver endpoint (default: the napari default)")
    parser.add_argument("--frames", type=int, default=100, help="camera frames to send")
    parser.add_argument("--fps", type=float, default=20.0, help="camera frame rate")
    args = parser.parse_args(argv)
    stream_demo(args.endpoint, args.frames, args.fps)


if __name__ == "__main__":
    main()
