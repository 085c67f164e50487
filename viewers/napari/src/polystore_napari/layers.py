"""Apply buffered frames and ROIs to napari layers, on the Qt main thread only.

One layer per stream key, updated in place: a ``replace`` layer gets the new pixels copied
into its existing array, ``stack`` and ``place`` layers write into a preallocated backing array
and hand napari a view of it, so a frame never rebuilds a layer. `DisplayTimer` drains the
`CoalescingBuffer` about 60 times a second.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import QObject, Qt, QTimer

from polystore.streaming import ReceivedFrame, ReceivedRois
from polystore_napari.buffer import Batch, CoalescingBuffer, RoisUpdate, Update, position

log = logging.getLogger(__name__)

#: napari layer metadata key naming the stream a layer shows
STREAM_KEY = "polystore_stream"
#: how often a layer updated in place redraws its thumbnail in the layer list
THUMBNAIL_HZ = 4


def display_array(frame: ReceivedFrame, kind: str) -> np.ndarray:
    """The received array in a dtype napari shows: labels need integers, and vispy has no
    float16 textures."""
    array = frame.array
    if kind == "labels" and array.dtype.kind not in "iu":
        return array.astype(np.int32)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def data_limits(array: np.ndarray) -> tuple[float, float]:
    """(min, max) of `array` for contrast limits, never an empty or NaN range."""
    if array.size == 0:
        return 0.0, 1.0
    if array.dtype.kind == "f":
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if not np.isfinite(lo) or not np.isfinite(hi):
            finite = array[np.isfinite(array)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    else:
        lo, hi = float(array.min()), float(array.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def trailing_labels(ndim: int) -> list[str]:
    """Axis labels of a frame's own dimensions: rows and columns last."""
    return [f"d{i}" for i in range(ndim - 2)] + ["y", "x"][-ndim:]


def unique_labels(labels: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label}{seen[label]}")
    return out


TIME_AXES = ("t", "time", "frame", "timepoint")

class FrameStack:
    """A read-only ``(n, *frame_shape)`` array-like over equally shaped frames, for napari.

    napari slices a stack layer one time point at a time (``data[k:k+1, ...]``); that is a
    view of one received frame here, so a stack layer never copies its frames into one big
    array. Other indexing (3D rendering, ``np.asarray``) stacks the frames it selects.
    """

    def __init__(self, frames) -> None:
        self._frames = tuple(frames)
        first = self._frames[0]
        self.shape = (len(self._frames), *first.shape)
        self.dtype = first.dtype
        self.ndim = len(self.shape)
        self.size = len(self._frames) * first.size
        self.nbytes = self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            index = (index,)
        if not index or index[0] is Ellipsis:
            return np.stack(self._frames)[index]
        first, rest = index[0], index[1:]
        if isinstance(first, (int, np.integer)):
            return self._frames[first][rest]
        if isinstance(first, slice):
            chosen = self._frames[first]
            if len(chosen) == 1:
                return chosen[0][None][(slice(None), *rest)]
            if not chosen:
                return np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
            return np.stack(chosen)[(slice(None), *rest)]
        return np.stack(self._frames)[index]

    def __array__(self, dtype=None, copy=None):
        array = np.stack(self._frames)
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"FrameStack(shape={self.shape}, dtype={self.dtype})"


class _ImageStream:
    """State of one image/labels stream: its layer and the array napari shows."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.layer = None
        self.geometry: tuple | None = None  # (mode, kind, frame shape, dtype)
        self.backing: np.ndarray | None = None
        self.start = self.end = 0  # stack window in backing
        self.names: list[str] = []  # place: leading axis names
        self.frames: deque[np.ndarray] | None = None  # image stack: the newest frames
        self.extent: list[int] = []  # place: used size along each leading axis
        self.hints: tuple | None = None
        self.thumbnail_at = 0.0

    @property
    def mode(self) -> str | None:
        return self.geometry[0] if self.geometry else None

    def reset(self) -> None:
        self.geometry = None
        self.backing = None
        self.start = self.end = 0
        self.names, self.extent = [], []
        self.frames = None


class _RoiStream:
    """The Shapes and Points layers of the ROIs that belong to one image stream."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.names: list[str] | None = None  # leading axes of the ROI layers
        self.shapes = None
        self.points = None
        self.shape_pos: list[tuple] = []  # position of each shape in the Shapes layer
        self.shape_labels: list[str] = []
        self.text_shown = False
        self.point_sets: dict[tuple, tuple[list, list[str]]] = {}


class LayerManager:
    """Owns the layers of the streams it has seen; everything here runs on the main thread."""

    def __init__(self, viewer, *, stack_capacity: int = 100, follow_contrast: bool = False):
        self.viewer = viewer
        self.stack_capacity = max(1, int(stack_capacity))
        self.follow_contrast = follow_contrast
        self.images: dict[str, _ImageStream] = {}
        self.rois: dict[str, _RoiStream] = {}
        self.updates = 0  # layer updates (one per stream per tick that had frames)
        self.frames = 0  # frames written into layers
        self.last_error = ""
        #: what the receiver's `report` answers; replaced (never mutated) on the main thread
        self.snapshot: dict = {"layers": [], "layer_updates": 0, "frames_displayed": 0}

    # -- entry points ------------------------------------------------------------------------

    def apply(self, batch: Batch) -> None:
        if batch.cleared:
            self.clear()
        for update in batch.updates:
            try:
                self._apply_frames(update)
            except Exception as exc:  # noqa: BLE001 - one bad stream must not stop the display
                log.exception("could not show stream %s", update.stream)
                self.last_error = f"{update.stream}: {exc}"
        for update in batch.rois:
            try:
                self._apply_rois(update)
            except Exception as exc:  # noqa: BLE001
                log.exception("could not show ROIs of %s", update.stream)
                self.last_error = f"{update.stream} ROIs: {exc}"
        self._take_snapshot()

    def clear(self) -> None:
        """Remove every layer this manager made (a sender's ``clear`` command)."""
        layers = [s.layer for s in self.images.values()]
        layers += [r.shapes for r in self.rois.values()] + [r.points for r in self.rois.values()]
        for layer in layers:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.images.clear()
        self.rois.clear()
        self._take_snapshot()

    def layer(self, stream: str):
        """The image/labels layer of `stream` (None if not shown)."""
        state = self.images.get(stream)
        return None if state is None else state.layer

    def roi_layers(self, stream: str):
        """(Shapes layer, Points layer) of the ROIs of image stream `stream`."""
        state = self.rois.get(stream)
        return (None, None) if state is None else (state.shapes, state.points)

    # -- frames ------------------------------------------------------------------------------

    def _alive(self, layer) -> bool:
        return layer is not None and layer in self.viewer.layers

    def _apply_frames(self, update: Update) -> None:
        state = self.images.setdefault(update.stream, _ImageStream(update.stream))
        if state.layer is not None and not self._alive(state.layer):
            state.layer = None  # the user deleted it: start afresh
            state.reset()
        # consecutive frames of one geometry go together (a stream may change shape)
        run: list[tuple[ReceivedFrame, np.ndarray]] = []
        run_geometry = None
        for frame in update.frames:
            kind = "labels" if frame.header.display.kind == "labels" else "image"
            array = display_array(frame, kind)
            geometry = (update.mode, kind, array.shape, array.dtype.str)
            if run and geometry != run_geometry:
                self._apply_run(state, run_geometry, run)
                run = []
            run.append((frame, array))
            run_geometry = geometry
        if run:
            self._apply_run(state, run_geometry, run)
        self.updates += 1
        self.frames += len(update.frames)

    def _apply_run(self, state: _ImageStream, geometry: tuple, run: list) -> None:
        mode, kind = geometry[0], geometry[1]
        if state.geometry != geometry:
            if state.layer is not None and self._layer_kind(state.layer) != kind:
                self.viewer.layers.remove(state.layer)
                state.layer = None
            state.reset()
            state.geometry = geometry
        if mode == "stack":
            stack = self._stack_frames if kind == "image" else self._stack
            data, labels, follow_axis = stack(state, run)
        elif mode == "place":
            data, labels, follow_axis = self._place(state, run)
        else:
            data, labels, follow_axis = self._replace(state, run[-1][1])
        frame, newest = run[-1]
        if state.layer is None:
            state.layer = self._create(state, data, frame, kind)
            state.layer.axis_labels = labels
            if follow_axis is not None:  # napari opens new axes in the middle; show the newest
                self._show_last(state.layer, follow_axis)
        elif data is not None:
            old_len = state.layer.data.shape[follow_axis] if follow_axis is not None else 0
            follow = follow_axis is not None and self._at_end(state.layer, old_len, follow_axis)
            state.layer.data = data
            if tuple(state.layer.axis_labels) != tuple(labels):
                state.layer.axis_labels = labels
            if follow:
                self._show_last(state.layer, follow_axis)
        else:
            # pixels were written into the array the layer shows; its thumbnail in the
            # layer list is redrawn at most THUMBNAIL_HZ times a second
            now = time.monotonic()
            thumbnail = now - state.thumbnail_at >= 1 / THUMBNAIL_HZ
            if thumbnail:
                state.thumbnail_at = now
            state.layer.refresh(thumbnail=thumbnail)
        self._apply_hints(state, frame, newest, kind)

    def _replace(self, state: _ImageStream, array: np.ndarray):
        """Copy into the array the layer already shows (None: nothing to swap)."""
        labels = unique_labels(trailing_labels(array.ndim))
        if state.backing is not None and state.layer is not None and \
                state.layer.data is state.backing:
            np.copyto(state.backing, array)
            return None, labels, None
        state.backing = array  # received arrays are our own copies: no copy needed
        return array, labels, None

    def _stack_frames(self, state: _ImageStream, run: list):
        """Image stacks: keep the newest `stack_capacity` received arrays and show them as
        one `FrameStack`, so appending a frame copies no pixels on the main thread."""
        capacity = self.stack_capacity
        if state.frames is None or state.frames.maxlen != capacity:
            state.frames = deque(state.frames or (), maxlen=capacity)
        for _frame, array in run[-capacity:]:
            state.frames.append(array)
        labels = unique_labels(["t", *trailing_labels(run[0][1].ndim)])
        return FrameStack(state.frames), labels, 0

    def _stack(self, state: _ImageStream, run: list):
        """Labels stacks (a writable array, so they can be painted): append along a leading
        time axis, keeping the newest `stack_capacity` frames.

        The backing array holds up to 2 x capacity frames; the layer shows the window
        [start, end). When the window reaches the end it moves back to the front (one copy
        per `capacity` frames), so appending costs O(1) frames amortised."""
        capacity = self.stack_capacity
        shape, dtype = run[0][1].shape, run[0][1].dtype
        if len(run) > capacity:
            run = run[-capacity:]
        before = (state.start, state.end, id(state.backing))
        for _frame, array in run:
            if state.backing is None:
                state.backing = np.empty((min(4, 2 * capacity), *shape), dtype)
                state.start = state.end = 0
            if state.end == len(state.backing):
                self._make_room(state, capacity)
            state.backing[state.end] = array
            state.end += 1
            if state.end - state.start > capacity:
                state.start = state.end - capacity
        if state.end - state.start > capacity:  # capacity lowered since the last frame
            state.start = state.end - capacity
        labels = unique_labels(["t", *trailing_labels(len(shape))])
        if (state.start, state.end, id(state.backing)) == before and state.layer is not None:
            return None, labels, 0
        return state.backing[state.start:state.end], labels, 0

    @staticmethod
    def _make_room(state: _ImageStream, capacity: int) -> None:
        n = state.end - state.start
        alloc = len(state.backing)
        if alloc < 2 * capacity:  # still growing towards 2 x capacity
            grown = np.empty((min(2 * capacity, max(2 * alloc, n + 1)),
                              *state.backing.shape[1:]), state.backing.dtype)
            grown[:n] = state.backing[state.start:state.end]
            state.backing = grown
        else:  # slide the window back to the front
            keep = min(n, capacity - 1)
            state.backing[:keep] = state.backing[state.end - keep:state.end]
            n = keep
        state.start, state.end = 0, n

    def _place(self, state: _ImageStream, run: list):
        """Write each frame at its position in an nD array that grows (geometrically) as new
        positions arrive; the layer shows the used extent."""
        before = (tuple(state.extent), id(state.backing))
        for frame, array in run:
            header = frame.header
            names = list(header.axis_names or header.axes)
            if state.backing is None:
                state.names = names
                state.extent = [0] * len(names)
                state.backing = np.zeros((1,) * len(names) + array.shape, array.dtype)
            new = [n for n in names if n not in state.names]
            if new:  # a new axis: old frames sit at index 0 of it
                lead = len(state.names)
                state.backing = state.backing.reshape(
                    state.backing.shape[:lead] + (1,) * len(new) + state.backing.shape[lead:])
                state.names += new
                state.extent += [1] * len(new)
            index = tuple(header.axes.get(n, 0) for n in state.names)
            if any(i >= s for i, s in zip(index, state.backing.shape, strict=False)):
                shape = tuple(max(s, 2 * s if i >= s else s, i + 1)
                              for i, s in zip(index, state.backing.shape, strict=False))
                grown = np.zeros(shape + array.shape, array.dtype)
                grown[tuple(slice(0, s) for s in state.backing.shape)] = state.backing
                state.backing = grown
            state.backing[index] = array
            state.extent = [max(e, i + 1) for e, i in zip(state.extent, index, strict=True)]
        labels = unique_labels(state.names + trailing_labels(run[0][1].ndim))
        # a live time series follows its newest time point, as a stack does
        follow = next((i for i, n in enumerate(state.names) if n.lower() in TIME_AXES), None)
        if (tuple(state.extent), id(state.backing)) == before and state.layer is not None:
            return None, labels, follow
        return state.backing[tuple(slice(0, e) for e in state.extent)], labels, follow

    def _at_end(self, layer, length: int, layer_axis: int = 0) -> bool:
        """Whether the slider of `layer_axis` shows the last of `length` positions (the user
        has not scrolled back to look at older data)."""
        axis = self.viewer.dims.ndim - layer.ndim + layer_axis
        if axis < 0 or length == 0:
            return True
        return self.viewer.dims.current_step[axis] >= length - 1

    def _show_last(self, layer, layer_axis: int) -> None:
        axis = self.viewer.dims.ndim - layer.ndim + layer_axis
        self.viewer.dims.set_current_step(axis, layer.data.shape[layer_axis] - 1)

    @staticmethod
    def _layer_kind(layer) -> str:
        # isinstance, not type(): plugin widgets get layers wrapped in napari's proxies
        return "labels" if isinstance(layer, Labels) else "image"

    def _create(self, state: _ImageStream, data: np.ndarray, frame: ReceivedFrame, kind: str):
        hints = frame.header.display
        kwargs: dict = {"name": state.stream, "metadata": {STREAM_KEY: state.stream}}
        if hints.opacity is not None:
            kwargs["opacity"] = hints.opacity
        if kind == "labels":
            return self.viewer.add_labels(data, **kwargs)
        newest = display_array(frame, kind)
        limits = hints.contrast_limits or data_limits(newest)
        kwargs["contrast_limits"] = list(limits)
        if hints.colormap:
            try:
                return self.viewer.add_image(data, colormap=hints.colormap, **kwargs)
            except (KeyError, ValueError, TypeError) as exc:
                self.last_error = f"{state.stream}: unknown colormap {hints.colormap!r} ({exc})"
        return self.viewer.add_image(data, **kwargs)

    def _apply_hints(self, state: _ImageStream, frame: ReceivedFrame, newest: np.ndarray,
                     kind: str) -> None:
        hints = frame.header.display
        key = (hints.colormap, hints.opacity, tuple(hints.contrast_limits or ()))
        layer = state.layer
        if key != state.hints:
            if state.hints is not None:  # the layer was made with the first hints
                if hints.opacity is not None:
                    layer.opacity = hints.opacity
                if kind == "image" and hints.colormap and hints.colormap != layer.colormap.name:
                    try:
                        layer.colormap = hints.colormap
                    except (KeyError, ValueError, TypeError) as exc:
                        self.last_error = f"{state.stream}: unknown colormap {hints.colormap!r}"\
                                          f" ({exc})"
                if kind == "image" and hints.contrast_limits:
                    layer.contrast_limits = list(hints.contrast_limits)
            state.hints = key
        if kind == "image" and self.follow_contrast and not hints.contrast_limits:
            limits = list(data_limits(newest))
            if list(layer.contrast_limits) != limits:
                layer.contrast_limits = limits

    # -- ROIs --------------------------------------------------------------------------------

    def _apply_rois(self, update: RoisUpdate) -> None:
        state = self.rois.setdefault(update.stream, _RoiStream(update.stream))
        for item in update.items:
            self._apply_roi_set(state, item)
        self.updates += 1
        if state.shapes is not None:
            state.shapes.features = {"label": np.array(state.shape_labels, dtype=object)}
            if any(state.shape_labels) and not state.text_shown:
                state.text_shown = True
                state.shapes.text = {"string": "{label}", "color": "yellow", "size": 9,
                                     "anchor": "upper_left"}
        if state.point_sets or self._alive(state.points):
            coords = [c for cs, _ in state.point_sets.values() for c in cs]
            labels = [lab for _, ls in state.point_sets.values() for lab in ls]
            nd = len(state.names) + 2
            data = np.array(coords, dtype=float).reshape(-1, nd)
            if state.points is None or not self._alive(state.points):
                if not coords:
                    return
                state.points = self.viewer.add_points(
                    data, ndim=nd, name=f"{state.stream} points", size=7,
                    face_color="#ff4040", border_color="white",
                    features={"label": np.array(labels, dtype=object)},
                    metadata={STREAM_KEY: state.stream})
                state.points.axis_labels = self._roi_axis_labels(state)
            else:
                state.points.data = data
                state.points.features = {"label": np.array(labels, dtype=object)}

    def _roi_names(self, state: _RoiStream, item: ReceivedRois) -> list[str]:
        """Leading axes of the ROI layers: those of the image stream when it is placed by
        axes (so shapes sit on the right planes), plus the ROIs' own."""
        image = self.images.get(state.stream)
        names = list(image.names) if image is not None and image.mode == "place" else []
        for name in item.header.axis_names or item.header.axes:
            if name not in names:
                names.append(name)
        return names if item.header.axes else (state.names or [])

    def _roi_axis_labels(self, state: _RoiStream) -> list[str]:
        return unique_labels(list(state.names) + ["y", "x"])

    def _apply_roi_set(self, state: _RoiStream, item: ReceivedRois) -> None:
        names = self._roi_names(state, item)
        if state.names is None:
            state.names = names
        elif names != state.names and (item.header.axes or set(names) - set(state.names)):
            # new axes: the layers' dimensionality changes, so start them afresh (rare)
            for layer in (state.shapes, state.points):
                if self._alive(layer):
                    self.viewer.layers.remove(layer)
            state.shapes = state.points = None
            state.shape_pos, state.shape_labels, state.point_sets = [], [], {}
            state.text_shown = False
            state.names = names
        lead = [float(item.header.axes.get(n, 0)) for n in state.names]
        pos = position(item.header.axes)
        shapes, types, labels, points, point_labels = [], [], [], [], []
        for roi in item.header.rois:
            coords = [[*lead, float(r), float(c)] for r, c in roi.coords]
            if roi.kind == "point":
                points.append(coords[0])
                point_labels.append(roi.label or "")
                continue
            if roi.kind in ("rectangle", "ellipse"):
                (r0, c0), (r1, c1) = roi.coords
                coords = [[*lead, r, c] for r, c in ((r0, c0), (r0, c1), (r1, c1), (r1, c0))]
            shapes.append(np.array(coords))
            types.append("path" if roi.kind == "line" and len(coords) > 2 else roi.kind)
            labels.append(roi.label or "")
        nd = len(state.names) + 2
        if state.shapes is not None and not self._alive(state.shapes):
            state.shapes, state.shape_pos, state.shape_labels = None, [], []
            state.text_shown = False
        if state.shapes is not None:
            old = [i for i, p in enumerate(state.shape_pos) if p == pos]
            if old:
                state.shapes.remove(old)
                keep = set(old)
                state.shape_pos = [p for i, p in enumerate(state.shape_pos) if i not in keep]
                state.shape_labels = [la for i, la in enumerate(state.shape_labels)
                                      if i not in keep]
        if shapes:
            if state.shapes is None:
                state.shapes = self.viewer.add_shapes(
                    ndim=nd, name=f"{state.stream} ROIs", edge_color="yellow",
                    face_color="transparent", edge_width=2,
                    metadata={STREAM_KEY: state.stream})
                state.shapes.current_edge_color = "yellow"
                state.shapes.current_face_color = "transparent"
                state.shapes.current_edge_width = 2
                state.shapes.axis_labels = self._roi_axis_labels(state)
            state.shapes.add(shapes, shape_type=types)
            state.shape_pos += [pos] * len(shapes)
            state.shape_labels += labels
        state.point_sets.pop(pos, None)
        if points:
            state.point_sets[pos] = (points, point_labels)

    # -- report ------------------------------------------------------------------------------

    def _take_snapshot(self) -> None:
        layers = []
        for state in self.images.values():
            if self._alive(state.layer):
                data = state.layer.data
                layers.append({
                    "name": state.layer.name, "stream": state.stream,
                    "kind": self._layer_kind(state.layer), "mode": state.mode,
                    "shape": list(data.shape), "dtype": str(data.dtype),
                    "axis_labels": list(state.layer.axis_labels),
                })  # fmt: skip
        for state in self.rois.values():
            if self._alive(state.shapes):
                layers.append({
                    "name": state.shapes.name, "stream": state.stream, "kind": "shapes",
                    "count": len(state.shapes.data),
                    "types": dict(Counter(state.shapes.shape_type)),
                })  # fmt: skip
            if self._alive(state.points):
                layers.append({
                    "name": state.points.name, "stream": state.stream, "kind": "points",
                    "count": len(state.points.data),
                })  # fmt: skip
        self.snapshot = {"layers": layers, "layer_updates": self.updates,
                         "frames_displayed": self.frames}


class DisplayTimer(QObject):
    """Drains a `CoalescingBuffer` into a `LayerManager` on the main thread at ~60 Hz."""

    def __init__(self, manager: LayerManager, interval_ms: int = 16, parent=None) -> None:
        super().__init__(parent)
        self.manager = manager
        self.buffer: CoalescingBuffer | None = None
        self.ticks = 0
        self.busy_s = 0.0  # time spent applying updates
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.tick)

    def start(self, buffer: CoalescingBuffer) -> None:
        self.buffer = buffer
        buffer.display_state = self.manager.snapshot
        self._timer.start()

    def stop(self, drain: bool = True) -> None:
        self._timer.stop()
        if drain and self.buffer is not None:
            self.tick()  # show what arrived before the stop
        self.buffer = None

    @property
    def active(self) -> bool:
        return self._timer.isActive()

    def tick(self) -> None:
        buffer = self.buffer
        if buffer is None:
            return
        batch = buffer.take()
        if batch:
            t0 = time.perf_counter()
            self.manager.apply(batch)
            self.busy_s += time.perf_counter() - t0
            buffer.display_state = self.manager.snapshot
        self.ticks += 1
