"""``polystore demo``: a synthetic live microscopy pipeline, saved to disk and streamed to napari.

Everything is generated here with NumPy (no download): cells drifting over time in three
channels, a smoothing step, a segmentation into labels (threshold + connected components)
and ROIs around every cell. Each step is saved with the ``disk`` backend and streamed with
the ``napari_stream`` backend through one :class:`~polystore.FileManager`.

Where the frames go:

* ``window``    -- a display is available: napari opens (``polystore napari`` in a
  subprocess) and the pipeline streams into it live;
* ``virtual``   -- no display (or ``--headless``) but napari and Xvfb are installed: real
  napari on a virtual display, in this process; ends with a real screenshot PNG;
* ``receiver``  -- otherwise (or ``--no-napari``): a headless `polystore.streaming.Receiver`
  in a thread; ends with a preview PNG rendered from the frames it received.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_OUT", "DemoResult", "run_demo", "segment", "label_components", "smooth"]

DEFAULT_OUT = "polystore_demo_output"
STREAM = "napari_stream"
CHANNELS = ("nuclei", "membrane", "marker")
LIMITS = (150.0, 3200.0)  # display range of the synthetic images


# -- synthetic data ----------------------------------------------------------------------------


def _gaussian_1d(coords: np.ndarray, centres: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """exp(-(x - c)^2 / 2 sigma^2) for each centre: shape (n, len(coords))."""
    return np.exp(-((coords[None, :] - centres[:, None]) ** 2) / (2 * sigma[:, None] ** 2))


class CellSimulation:
    """`n` cells drifting and bouncing in a `size` x `size` field, imaged in three channels:
    nuclei (a Gaussian blob), membrane (a ring: a wide blob minus a narrow one) and a marker
    that only some cells express, blinking over time. Separable Gaussians keep it fast."""

    def __init__(self, size: int = 256, n: int = 12, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size, self.n = size, n
        self.rng = rng
        self.pos = rng.uniform(0.15 * size, 0.85 * size, (n, 2))
        speed = rng.uniform(0.6, 1.6, n)
        angle = rng.uniform(0, 2 * np.pi, n)
        self.vel = np.stack([speed * np.sin(angle), speed * np.cos(angle)], axis=1)
        self.radius = rng.uniform(5.0, 8.0, n)
        self.marker = rng.random(n) < 0.5
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.coords = np.arange(size, dtype=np.float32)

    def step(self) -> None:
        self.vel += self.rng.normal(0, 0.15, self.vel.shape)
        self.pos += self.vel
        low, high = 10.0, self.size - 10.0
        for axis in range(2):
            out = (self.pos[:, axis] < low) | (self.pos[:, axis] > high)
            self.vel[out, axis] *= -1
            self.pos[:, axis] = np.clip(self.pos[:, axis], low, high)

    def _blobs(self, weights: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        gy = _gaussian_1d(self.coords, self.pos[:, 0], sigma) * weights[:, None]
        gx = _gaussian_1d(self.coords, self.pos[:, 1], sigma)
        return (gy.T @ gx).astype(np.float32)  # sum over cells of outer(gy_i, gx_i)

    def image(self, t: int) -> np.ndarray:
        """The (3, size, size) uint16 image at time point `t` (after `t` steps)."""
        r = self.radius
        ones = np.ones(self.n)
        nuclei = self._blobs(ones, 0.6 * r)
        membrane = self._blobs(ones, 1.5 * r) - 0.8 * self._blobs(ones, 1.1 * r)
        blink = self.marker * (0.6 + 0.4 * np.sin(0.3 * t + self.phase))
        marker = self._blobs(blink, 0.9 * r)
        stack = np.stack([nuclei, np.clip(membrane, 0, None), marker])
        scale = np.array([3000.0, 2500.0, 2000.0], np.float32)[:, None, None]
        noise = self.rng.normal(0, 60, stack.shape).astype(np.float32)
        return np.clip(stack * scale + 200 + noise, 0, 65535).astype(np.uint16)


# -- image processing (NumPy only) -------------------------------------------------------------


def smooth(image: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Gaussian smoothing of the last two axes (separable, reflected edges), as float32."""
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    out = image.astype(np.float32)
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        acc = np.zeros_like(out)
        for i, weight in enumerate(kernel):
            acc += weight * np.take(padded, np.arange(i, i + length), axis=axis)
        out = acc
    return out


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of `image`'s histogram."""
    hist, edges = np.histogram(image, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight - mean * total) ** 2 / (weight * (total - weight))
    return float(centres[np.nanargmax(between[:-1])])


def label_components(mask: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Connected components (8-connected) of a 2D boolean mask, numbered 1..K in raster
    order of their first pixel; components smaller than `min_size` pixels become 0.

    Every foreground pixel starts with its own index; each round takes the minimum over the
    3x3 neighbourhood and then follows the labels as pointers (pointer jumping), so a
    component settles in a few rounds rather than one round per pixel of its diameter.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"label_components takes a 2D mask, got shape {mask.shape}")
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        lowest = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(lowest, padded[dy : dy + h, dx : dx + w], out=lowest)
        lowest[~mask] = big
        flat = np.append(lowest.ravel(), big)  # index `big` (background) points to itself
        jumped = flat[lowest]
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    roots, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = (roots != big) & (counts >= min_size)
    numbering = np.zeros(len(roots), np.int32)
    numbering[keep] = np.arange(1, int(keep.sum()) + 1)
    return numbering[inverse.reshape(h, w)]


def segment(nuclei: np.ndarray, min_size: int = 12) -> np.ndarray:
    """Labels of the bright objects of a smoothed nuclei image (Otsu threshold)."""
    return label_components(nuclei > otsu_threshold(nuclei), min_size=min_size)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (row, col) points, counter-clockwise."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts

    def half(seq: np.ndarray) -> list:
        chain: list = []
        for p in seq:
            while len(chain) >= 2:
                (ay, ax), (by, bx) = chain[-2], chain[-1]
                if (by - ay) * (p[1] - ax) - (bx - ax) * (p[0] - ay) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def objects(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(label, (n, 2) pixel coordinates) of every object, in label order."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat)
    starts = np.concatenate([[0], np.cumsum(counts)])
    width = labels.shape[1]
    for k in range(1, len(counts)):
        idx = order[starts[k] : starts[k + 1]]
        if len(idx):
            yield k, np.stack([idx // width, idx % width], axis=1)


def rois_and_measurements(labels: np.ndarray, image: np.ndarray) -> tuple[list[dict], str]:
    """ROIs and a CSV of per-object measurements on `image` (c, y, x): a polygon around each
    object (the convex hull of its pixels' corners) and, for objects much larger than the
    median (touching cells the threshold merged), a rectangle flagging them for review."""
    rois: list[dict] = []
    rows = ["label,area,centroid_row,centroid_col," + ",".join(f"mean_{c}" for c in CHANNELS)]
    corners = np.array([[0, 0], [0, 1], [1, 0], [1, 1]]) - 0.5
    found = list(objects(labels))
    median_area = float(np.median([len(px) for _, px in found])) if found else 0.0
    for k, pixels in found:
        hull = _convex_hull((pixels[:, None, :] + corners[None]).reshape(-1, 2))
        # plain Python floats (.tolist()): ROI coordinates are validated strictly
        rois.append({"kind": "polygon", "coords": hull.tolist(), "label": f"cell {k}"})
        if len(pixels) > 1.8 * median_area:
            box = [(pixels.min(axis=0) - 2.5).tolist(), (pixels.max(axis=0) + 2.5).tolist()]
            rois.append({"kind": "rectangle", "coords": box, "label": f"cluster? ({k})"})
        means = image[:, pixels[:, 0], pixels[:, 1]].mean(axis=1)
        cy, cx = pixels.mean(axis=0)
        rows.append(f"{k},{len(pixels)},{cy:.2f},{cx:.2f}," + ",".join(f"{m:.1f}" for m in means))
    return rois, "\n".join(rows) + "\n"


# -- the pipeline --------------------------------------------------------------------------------


@dataclass
class PipelineStats:
    time_points: int = 0
    frames_streamed: int = 0
    roi_sets_streamed: int = 0
    files_written: int = 0
    bytes_written: int = 0
    objects: int = 0
    seconds: float = 0.0
    dropped: int = 0


def run_pipeline(
    fm: Any,
    frames: int,
    *,
    size: int = 256,
    cells: int = 12,
    fps: float = 0.0,
    stream: bool = True,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> PipelineStats:
    """Simulate, smooth, segment and outline `frames` time points; save every step with
    ``backend="disk"`` and stream it with ``backend="napari_stream"`` (both through `fm`).
    `fps` > 0 paces the time points (a live acquisition); 0 runs flat out."""
    from tqdm import tqdm

    sim = CellSimulation(size=size, n=cells)
    stats = PipelineStats()
    disk = fm.get_backend("disk")
    t_start = time.perf_counter()

    def save(data: Any, path: str) -> None:
        fm.save(data, path, backend="disk")
        stats.files_written += 1
        stats.bytes_written += (Path(disk.base_dir or ".") / path).stat().st_size

    bar = tqdm(range(frames), desc="demo", unit="t", disable=not progress, leave=False)
    for t in bar:
        if stop is not None and stop.is_set():
            break
        t0 = time.perf_counter()
        raw = sim.image(t)
        sim.step()
        smoothed = np.rint(smooth(raw)).astype(np.uint16)  # same range as the raw image
        labels = segment(smoothed[0])
        rois, table = rois_and_measurements(labels, raw)
        name = f"t{t:03d}"

        save(raw, f"raw/{name}.tif")
        save(smoothed, f"smooth/{name}.tif")
        save(labels.astype(np.uint16), f"labels/{name}.tif")
        save(rois, f"rois/{name}.json")
        save(table, f"measurements/{name}.csv")
        if stream:
            # one napari layer per step; channels and time points placed by their axes
            for c in range(raw.shape[0]):
                axes = {"t": t, "c": c}
                fm.save(raw[c], f"raw/{name}_c{c}.tif", backend=STREAM, stream="raw",
                        axes=axes, axis_names=["c", "t"], colormap="gray",
                        contrast_limits=LIMITS)
                fm.save(smoothed[c], f"smooth/{name}_c{c}.tif", backend=STREAM,
                        stream="smooth", axes=axes, axis_names=["c", "t"], colormap="viridis",
                        contrast_limits=LIMITS)
            fm.save(labels, f"labels/{name}.tif", backend=STREAM, stream="labels",
                    axes={"t": t}, labels=True, opacity=0.5)
            fm.save(rois, f"rois/{name}.roi.zip", backend=STREAM, stream="labels",
                    axes={"t": t})
            stats.frames_streamed += 2 * raw.shape[0] + 1
            stats.roi_sets_streamed += 1
        stats.objects += int(labels.max())
        stats.time_points += 1
        if fps > 0:
            time.sleep(max(0.0, 1.0 / fps - (time.perf_counter() - t0)))
    bar.close()
    if stream:
        backend = fm.get_backend(STREAM)
        backend.flush()
        stats.dropped = int(backend.sender.stats["dropped"])
    stats.seconds = time.perf_counter() - t_start
    return stats


# -- viewers ------------------------------------------------------------------------------------


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def napari_missing() -> str | None:
    """Why napari cannot be used here (None if it can)."""
    for module, install in (("napari", "pip install 'napari[pyqt6]'"),
                            ("polystore_napari", "pip install -e viewers/napari")):
        if importlib.util.find_spec(module) is None:
            return (f"{module} is not installed ({install}, or `bash scripts/install.sh` "
                    "for everything)")
    return None


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class HeadlessReceiver:
    """A `Receiver` in a thread that keeps counts and the newest frame of every stream."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0") -> None:
        from polystore.streaming import NapariStreamingBackend, receiver_for

        self.frames: Counter[str] = Counter()
        self.rois: Counter[str] = Counter()
        self.latest: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()
        self.receiver = receiver_for(NapariStreamingBackend, endpoint, on_frame=self._frame,
                                     on_rois=self._rois)

    def _frame(self, item) -> None:
        with self._lock:
            self.frames[item.stream] += 1
            self.latest[(item.stream, item.header.axes.get("c", 0))] = item.array

    def _rois(self, item) -> None:
        with self._lock:
            self.rois[item.stream] += 1

    def __enter__(self) -> HeadlessReceiver:
        self.receiver.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.stop()

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint

    def preview(self) -> np.ndarray | None:
        """RGB composite of the newest raw frame (nuclei blue, membrane green, marker
        magenta) with the newest labels' outlines in yellow."""
        with self._lock:
            channels = [self.latest.get(("raw", c)) for c in range(3)]
            labels = self.latest.get(("labels", 0))
        if any(c is None for c in channels):
            return None
        norm = []
        for c in channels:
            lo, hi = np.percentile(c, (1, 99.8))
            norm.append(np.clip((c.astype(np.float32) - lo) / max(hi - lo, 1), 0, 1))
        nuclei, membrane, marker = norm
        rgb = np.stack([marker, membrane, np.maximum(nuclei, marker)], axis=-1)
        if labels is not None:
            edge = np.zeros(labels.shape, bool)
            edge[1:, :] |= labels[1:, :] != labels[:-1, :]
            edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
            rgb[edge] = (1.0, 1.0, 0.0)
        return (rgb * 255).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray, scale: int = 2) -> None:
    """Write an (h, w, 3) uint8 array as a PNG (zlib only), each pixel `scale` x `scale`."""
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path.write_bytes(png)


@contextlib.contextmanager
def virtual_display(size: tuple[int, int] = (1400, 900)) -> Iterator[str]:
    """Start Xvfb on a free display number and point $DISPLAY at it while inside."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{size[0]}x{size[1]}x24",
         "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            number = pipe.readline().strip().decode()
        if not number:
            raise RuntimeError("Xvfb did not start")
        old = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = f":{number}"
        try:
            yield os.environ["DISPLAY"]
        finally:
            if old is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = old
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _pump_until(app, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.005)
    app.processEvents()


# -- the demo -----------------------------------------------------------------------------------


@dataclass
class DemoResult:
    viewer: str  # window | virtual | receiver
    viewer_note: str
    out: str
    endpoint: str
    stats: PipelineStats
    received_frames: int | None = None
    received_roi_sets: int | None = None
    image: str | None = None  # screenshot (virtual) or preview (receiver)
    outputs: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.stats.frames_streamed / self.stats.seconds if self.stats.seconds else 0.0

    def summary(self) -> str:
        s = self.stats
        lines = [
            "polystore demo: done",
            f"  viewer     : {self.viewer_note}",
            f"  pipeline   : {s.time_points} time points x {len(CHANNELS)} channels -> smooth "
            f"-> labels ({s.objects / max(s.time_points, 1):.1f} cells per frame) -> ROIs",
            f"  streamed   : {s.frames_streamed} frames + {s.roi_sets_streamed} ROI sets to "
            f"{STREAM} at {self.endpoint} in {s.seconds:.1f} s ({self.fps:.0f} frames/s), "
            f"dropped: {s.dropped}",
        ]
        if self.received_frames is not None:
            lines.append(f"  received   : {self.received_frames} frames + "
                         f"{self.received_roi_sets} ROI sets by the receiver")
        lines += [
            f"  written    : {s.files_written} files ({s.bytes_written / 1e6:.1f} MB) with the "
            f"disk backend in {self.out}/",
            f"  outputs    : {', '.join(self.outputs)}",
        ]
        if self.image:
            lines.append(f"  image      : {self.image}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        data = asdict(self)
        data["fps"] = self.fps
        return data


def _make_fm(out: Path, endpoint: str):
    from polystore import BackendRegistry, DiskBackend, FileManager
    from polystore.streaming import NapariStreamingBackend

    registry = BackendRegistry()
    registry["disk"] = DiskBackend(base_dir=out)
    registry[STREAM] = NapariStreamingBackend(endpoint, policy="block", timeout=10.0)
    return FileManager(registry)


def _close(fm) -> None:
    if fm is not None:
        fm.get_backend(STREAM).close()


def _run_receiver(out: Path, frames: int, fps: float, progress: bool, why: str,
                  endpoint: str | None) -> DemoResult:
    with HeadlessReceiver(endpoint or "tcp://127.0.0.1:0") as rx:
        fm = _make_fm(out, rx.endpoint)
        try:
            stats = run_pipeline(fm, frames, fps=fps, progress=progress)
        finally:
            _close(fm)
        image = rx.preview()
        result = DemoResult("receiver", f"headless receiver ({why}); no napari window",
                            str(out), rx.endpoint, stats,
                            received_frames=sum(rx.frames.values()),
                            received_roi_sets=sum(rx.rois.values()))  # fmt: skip
    if image is not None:
        path = out / "preview.png"
        write_png(path, image)
        result.image = (f"{path} (rendered from the frames the receiver got; "
                        "not a napari screenshot)")
    return result


def _run_virtual(out: Path, frames: int, fps: float, progress: bool,
                 endpoint: str | None) -> DemoResult:
    """Real napari on an Xvfb display in this process: the pipeline streams from a worker
    thread while the main thread runs Qt; a screenshot of the window at the end."""
    with virtual_display() as display:
        from polystore_napari.launch import launch
        from qtpy.QtWidgets import QApplication

        widget = launch(endpoint or "tcp://127.0.0.1:0", mode="auto", show=True, run=False)
        viewer = widget.viewer
        app = QApplication.instance()
        fm = None
        try:
            viewer.window.resize(1400, 900)
            endpoint = widget.endpoint
            fm = _make_fm(out, endpoint)
            box: dict[str, Any] = {}
            stop = threading.Event()

            def work() -> None:
                try:
                    box["stats"] = run_pipeline(fm, frames, fps=fps, progress=progress,
                                                stop=stop)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    box["error"] = exc

            worker = threading.Thread(target=work, name="polystore-demo-pipeline")
            worker.start()
            try:
                _pump_until(app, lambda: not worker.is_alive(), timeout=600)
            finally:
                stop.set()
                worker.join()
            if "error" in box:
                raise box["error"]
            stats = box["stats"]
            buffer = widget.buffer
            _pump_until(app, lambda: buffer is None or buffer.pending == 0, timeout=30)
            received = widget.receiver.stats
            result = DemoResult(
                "virtual", f"napari {_napari_version()} on a virtual display ({display}, Xvfb)",
                str(out), endpoint, stats, received_frames=received.frames,
                received_roi_sets=received.rois,
            )  # fmt: skip
            _show_last_time_point(viewer)
            _pump_until(app, lambda: False, timeout=0.3)  # let the canvas draw
            shot = out / "screenshot.png"
            viewer.screenshot(str(shot), canvas_only=False)
            result.image = f"{shot} (napari window on the virtual display)"
            return result
        finally:
            _close(fm)
            widget.stop(drain=False)
            viewer.close()
            app.processEvents()


def _show_last_time_point(viewer) -> None:
    """Point the sliders at the newest time point and the nuclei channel."""
    labels = list(viewer.dims.axis_labels)
    for name, pick_last in (("t", True), ("c", False)):
        if name in labels:
            axis = labels.index(name)
            last = int(viewer.dims.range[axis].stop)
            viewer.dims.set_current_step(axis, last if pick_last else 0)


def _napari_version() -> str:
    import napari

    return napari.__version__


def _wait_listening(fm, proc: subprocess.Popen, timeout: float) -> None:
    backend = fm.get_backend(STREAM)
    deadline = time.monotonic() + timeout
    from polystore.streaming import StreamingError

    while True:
        try:
            backend.request("report", timeout=2.0)
            return
        except StreamingError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"napari exited (code {proc.returncode}) before it listened on "
                    f"{backend.endpoint}; see its messages above"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"napari did not listen on {backend.endpoint} within "
                                   f"{timeout:g} s") from None


def _run_window(out: Path, frames: int, fps: float, progress: bool,
                endpoint: str | None) -> tuple[DemoResult, subprocess.Popen]:
    """napari in a subprocess (`polystore napari --endpoint ...`); stream into it once it
    listens. Returns with napari still open."""
    endpoint = endpoint or _free_endpoint()
    cmd = [sys.executable, "-m", "polystore.apps.cli", "napari", "--endpoint", endpoint,
           "--mode", "auto"]
    print(f"starting napari: polystore napari --endpoint {endpoint} ...", flush=True)
    proc = subprocess.Popen(cmd)
    fm = None
    try:
        fm = _make_fm(out, endpoint)
        _wait_listening(fm, proc, timeout=120)
        stats = run_pipeline(fm, frames, fps=fps, progress=progress)
        report = fm.get_backend(STREAM).request("report")
    except BaseException:
        _close(fm)
        proc.terminate()
        proc.wait(30)
        raise
    _close(fm)
    result = DemoResult("window", f"napari window (pid {proc.pid})", str(out), endpoint, stats,
                        received_frames=report.get("frames"),
                        received_roi_sets=report.get("rois"))  # fmt: skip
    return result, proc


def run_demo(
    frames: int = 60,
    out: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    headless: bool = False,
    napari: bool = True,
    fps: float | None = None,
    endpoint: str | None = None,
    wait: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module docstring for where it streams); returns its result
    after writing ``summary.json`` into `out`. With a napari window and `wait`, returns once
    the user closes it."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    out_path = Path(out).resolve()
    earlier = sum(1 for p in out_path.rglob("*") if p.is_file()) if out_path.is_dir() else 0
    if earlier:
        log(f"{out_path} already holds {earlier} file(s): this run replaces those of the "
            "same name and keeps the others; its summary counts only its own")
    made = [p for p in (out_path, *out_path.parents) if not p.exists()]
    out_path.mkdir(parents=True, exist_ok=True)
    try:
        return _demo(out_path, frames, headless, napari, fps, endpoint, wait, progress, log)
    except BaseException:
        for folder in made:  # a demo that could not run leaves no empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _demo(out_path: Path, frames: int, headless: bool, napari: bool, fps: float | None,
          endpoint: str | None, wait: bool, progress: bool, log: Callable[[str], None],
          ) -> DemoResult:
    missing = napari_missing() if napari else "--no-napari"
    window = napari and not headless and _has_display()
    if window and missing:
        log(f"napari cannot be used: {missing}. Streaming to a headless receiver instead.")
        window = False
    result: DemoResult | None = None
    proc: subprocess.Popen | None = None
    if window:
        result, proc = _run_window(out_path, frames, 10.0 if fps is None else fps, progress,
                                   endpoint)  # fmt: skip
    elif not missing and shutil.which("Xvfb"):
        log("no display (or --headless): running napari on a virtual display (Xvfb)")
        try:
            result = _run_virtual(out_path, frames, fps or 0.0, progress, endpoint)
        except Exception as exc:  # noqa: BLE001 - fall back, and say why
            log(f"napari on a virtual display failed ({type(exc).__name__}: {exc}); "
                "streaming to a headless receiver instead")
    if result is None:
        if missing == "--no-napari":
            why = "--no-napari"
        elif missing:
            why = missing
        elif not shutil.which("Xvfb"):
            why = "no display and no Xvfb for a virtual one; apt-get install xvfb"
        else:
            why = "napari on a virtual display failed"
        result = _run_receiver(out_path, frames, fps or 0.0, progress, why, endpoint)
    result.outputs = sorted(p.name + ("/" if p.is_dir() else "") for p in out_path.iterdir()
                            if p.name != "summary.json") + ["summary.json"]  # fmt: skip
    (out_path / "summary.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    log(result.summary())
    if proc is not None:
        if wait:
            log("napari stays open with the results: close its window to finish "
                "(Ctrl+C closes it too).")
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        else:
            log(f"napari keeps running (pid {proc.pid}).")
    return result
