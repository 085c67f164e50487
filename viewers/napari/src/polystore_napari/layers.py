"""Apply buffered frames and ROIs to napari layers, on the Qt main thread only.

One layer per stream key, updated in place, so a frame never rebuilds a layer: a ``replace``
layer gets the new pixels copied into the array it already shows; an image ``stack`` layer
shows the newest received arrays as one `FrameStack` (no pixels copied); a labels ``stack``
layer and a ``place`` layer write into a backing array that grows geometrically and hand
napari a view of its used part. `DisplayTimer` drains the `CoalescingBuffer` about 60 times
a second.
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


def frame_array(frame: ReceivedFrame) -> np.ndarray:
    """The received array with at least two dimensions: a 1-D frame is one row."""
    array = frame.array
    return array.reshape(1, -1) if array.ndim == 1 else array


def display_dtype(dtype: np.dtype, kind: str) -> np.dtype:
    """The dtype napari shows for `dtype`: labels need integers, and vispy has no float16
    textures."""
    if kind == "labels" and dtype.kind not in "iu":
        return np.dtype(np.int32)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def as_display(array: np.ndarray, kind: str) -> np.ndarray:
    """`array` in its display dtype (itself when that is its dtype already)."""
    dtype = display_dtype(array.dtype, kind)
    return array if array.dtype == dtype else array.astype(dtype)


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


def own_axis_names(header, lead: int) -> tuple[str, ...]:
    """Names of a frame's own `lead` leading dimensions (those before rows and columns).

    The entries of ``axis_names`` that are not keys of ``axes`` name them, in order
    (``axes={"t": 1}``, ``axis_names=["t", "c", "z"]``, shape (2, 3, Y, X): c, z). Dimensions
    left unnamed are ``d0``, ``d1``, ...; names beyond the frame's leading dimensions are
    ignored."""
    axes = header.axes
    named = [n for n in header.axis_names or () if n not in axes][:lead]
    taken = set(axes) | set(named)
    defaults = (f"d{i}" for i in range(lead + len(taken)))
    named += [n for n in defaults if n not in taken][:lead - len(named)]
    return tuple(named)


def place_names(header, own: tuple[str, ...]) -> list[str]:
    """Leading axes of a placed frame in layer order: ``axis_names`` order (position axes and
    the frame's own named dimensions), then own dimensions ``axis_names`` does not name."""
    order = list(header.axis_names or header.axes)
    names = [n for n in order if n in header.axes or n in own]
    names += [n for n in header.axes if n not in names]
    return names + [n for n in own if n not in names]


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
        #: (mode, kind, frame shape, display dtype, names of the frame's leading dims)
        self.geometry: tuple | None = None
        self.backing: np.ndarray | None = None
        self.start = self.end = 0  # stack window in backing
        self.names: list[str] = []  # place: leading axis names (positions and own dims)
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
        self.shape_types: dict[str, int] = {}  # shape type counts, for the report
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
        self.updates = 0  # image/labels layer updates (one per stream per tick with pixels)
        self.roi_updates = 0  # ROI layer updates (one per stream per tick with ROI sets)
        self.frames = 0  # frames written into layers
        self.skipped = 0  # empty frames (a 0 in their shape), not shown
        self._skipped: Counter[str] = Counter()  # ... per stream
        self.last_error = ""
        #: what the receiver's `report` answers; replaced (never mutated) on the main thread
        self.snapshot: dict = {"layers": [], "layer_updates": 0, "roi_updates": 0,
                               "frames_displayed": 0, "frames_skipped": 0}
        # a deleted layer frees what its stream holds at once, not at the stream's next frame
        viewer.layers.events.removed.connect(self._on_layer_removed)

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

    def _on_layer_removed(self, event=None) -> None:
        """Forget the state of every stream whose layer is gone (the user deleted it): its
        frames and backing array are freed now; its next frame makes a new layer."""
        for state in self.images.values():
            if state.layer is not None and not self._alive(state.layer):
                state.layer = None
                state.reset()
        for rois in self.rois.values():
            if rois.shapes is not None and not self._alive(rois.shapes):
                rois.shapes, rois.shape_pos, rois.shape_labels = None, [], []
                rois.shape_types, rois.text_shown = {}, False
            if rois.points is not None and not self._alive(rois.points):
                rois.points, rois.point_sets = None, {}
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

    def _skip_empty(self, stream: str, frame: ReceivedFrame) -> None:
        """An empty frame (a 0 in its shape) has nothing to show: count it, say so once in
        *Last error* (updated, not repeated), log it once per stream."""
        self.skipped += 1
        self._skipped[stream] += 1
        n = self._skipped[stream]
        self.last_error = f"{stream}: {n} empty frame(s) not shown (shape {frame.array.shape})"
        if n == 1:
            log.warning("stream %s: empty frame of shape %s not shown", stream,
                        frame.array.shape)

    def _apply_frames(self, update: Update) -> None:
        state = self.images.setdefault(update.stream, _ImageStream(update.stream))
        if state.layer is not None and not self._alive(state.layer):
            state.layer = None  # the user deleted it: start afresh
            state.reset()
        # consecutive frames of one geometry go together (a stream may change shape)
        run: list[tuple[ReceivedFrame, np.ndarray]] = []
        run_geometry = None
        shown = 0
        for frame in update.frames:
            if frame.array.size == 0:
                self._skip_empty(update.stream, frame)
                continue
            kind = "labels" if frame.header.display.kind == "labels" else "image"
            array = frame_array(frame)  # converted to its display dtype only where kept
            geometry = (update.mode, kind, array.shape, display_dtype(array.dtype, kind).str,
                        own_axis_names(frame.header, array.ndim - 2))
            if run and geometry != run_geometry:
                self._apply_run(state, run_geometry, run)
                run = []
            run.append((frame, array))
            run_geometry = geometry
            shown += 1
        if run:
            self._apply_run(state, run_geometry, run)
        if shown:
            self.updates += 1
            self.frames += shown

    def _apply_run(self, state: _ImageStream, geometry: tuple, run: list) -> None:
        mode, kind = geometry[0], geometry[1]
        refit = False  # the layer is kept for frames of another shape or dtype
        if state.geometry != geometry:
            old = state.geometry
            if state.layer is not None and self._layer_kind(state.layer) != kind:
                layer, state.layer = state.layer, None
                self.viewer.layers.remove(layer)
            refit = state.layer is not None and old is not None and old[2:4] != geometry[2:4]
            state.reset()
            state.geometry = geometry
        if mode == "stack":
            stack = self._stack_frames if kind == "image" else self._stack
            data, labels, follow_axis, newest = stack(state, run)
        elif mode == "place":
            data, labels, follow_axis, newest = self._place(state, run)
        else:
            data, labels, follow_axis, newest = self._replace(state, run[-1][1], kind)
        frame = run[-1][0]
        if state.layer is None:
            state.layer = self._create(state, data, frame, kind, newest)
            state.layer.axis_labels = labels
            if follow_axis is not None:  # napari opens new axes in the middle; show the newest
                self._show_last(state.layer, follow_axis)
        elif data is not None:
            follow = follow_axis is not None and (
                refit or follow_axis >= state.layer.ndim  # a new axis, or another geometry
                or self._at_end(state.layer, state.layer.data.shape[follow_axis], follow_axis))
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
        if refit and kind == "image" and not frame.header.display.contrast_limits:
            # limits of the old data can hide the new (uint16 at 4000, then float32 at 0.5)
            state.layer.contrast_limits = list(data_limits(newest))
        self._apply_hints(state, frame, newest, kind)

    @staticmethod
    def _labels(state: _ImageStream, lead: list[str]) -> list[str]:
        """Layer axis labels: `lead`, the frame's own leading dims, rows, columns."""
        return unique_labels([*lead, *state.geometry[4], "y", "x"])

    def _replace(self, state: _ImageStream, array: np.ndarray, kind: str):
        """Copy into the array the layer already shows (data None: nothing to swap)."""
        labels = self._labels(state, [])
        if state.backing is not None and state.layer is not None and \
                state.layer.data is state.backing:
            # converts while copying: no intermediate float32/int32 copy of the frame
            np.copyto(state.backing, array, casting="unsafe")
            return None, labels, None, state.backing
        # received arrays are our own copies: no copy needed unless the dtype changes
        state.backing = as_display(array, kind)
        return state.backing, labels, None, state.backing

    def _stack_frames(self, state: _ImageStream, run: list):
        """Image stacks: keep the newest `stack_capacity` received arrays and show them as
        one `FrameStack`, so appending a frame copies no pixels on the main thread."""
        capacity = self.stack_capacity
        if state.frames is None or state.frames.maxlen != capacity:
            state.frames = deque(state.frames or (), maxlen=capacity)
        for _frame, array in run[-capacity:]:
            state.frames.append(as_display(array, "image"))
        return FrameStack(state.frames), self._labels(state, ["t"]), 0, state.frames[-1]

    def _stack(self, state: _ImageStream, run: list):
        """Labels stacks (a writable array, so they can be painted): append along a leading
        time axis, keeping the newest `stack_capacity` frames.

        The backing array holds up to 2 x capacity frames; the layer shows the window
        [start, end). When the window reaches the end it moves back to the front (one copy
        per `capacity` frames), so appending costs O(1) frames amortised."""
        capacity = self.stack_capacity
        shape, dtype = run[0][1].shape, np.dtype(state.geometry[3])
        if len(run) > capacity:
            run = run[-capacity:]
        before = (state.start, state.end, id(state.backing))
        for _frame, array in run:
            if state.backing is None:
                state.backing = np.empty((min(4, 2 * capacity), *shape), dtype)
                state.start = state.end = 0
            if state.end == len(state.backing):
                self._make_room(state, capacity)
            state.backing[state.end] = array  # converts to the labels dtype as it copies
            state.end += 1
            if state.end - state.start > capacity:
                state.start = state.end - capacity
        if state.end - state.start > capacity:  # capacity lowered since the last frame
            state.start = state.end - capacity
        labels = self._labels(state, ["t"])
        newest = state.backing[state.end - 1]
        if (state.start, state.end, id(state.backing)) == before and state.layer is not None:
            return None, labels, 0, newest
        return state.backing[state.start:state.end], labels, 0, newest

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
        positions arrive; the layer shows the used extent.

        The layer's leading axes are the frame's position axes (``axes``) and its own leading
        dimensions (named by the rest of ``axis_names``), in ``axis_names`` order: with
        ``axes={"t": 1}``, ``axis_names=["t", "c", "z"]``, a (2, 3, Y, X) frame is the block
        ``[1, 0:2, 0:3]`` of a (T, C, Z, Y, X) layer."""
        own = state.geometry[4]  # the same for every frame of this geometry
        lead = len(own)
        before = (tuple(state.extent), id(state.backing))
        index: tuple = ()
        for frame, array in run:
            header = frame.header
            size = dict(zip(own, array.shape[:lead], strict=True))
            names = place_names(header, own)
            if state.backing is None:
                state.names = names
                state.extent = [size.get(n, 0) for n in names]
                state.backing = np.zeros(tuple(size.get(n, 1) for n in names)
                                         + array.shape[lead:], np.dtype(state.geometry[3]))
            new = [n for n in names if n not in state.names]  # only position axes can be new
            if new:  # a new axis: old frames sit at index 0 of it, inserted before own dims
                at = next((i for i, n in enumerate(state.names) if n in size),
                          len(state.names))
                shape = state.backing.shape
                state.backing = state.backing.reshape(shape[:at] + (1,) * len(new) + shape[at:])
                state.names[at:at] = new
                state.extent[at:at] = [1] * len(new)
            index = tuple(slice(None) if n in size else header.axes.get(n, 0)
                          for n in state.names)
            shape = state.backing.shape[:len(state.names)]
            if any(not isinstance(i, slice) and i >= s for i, s in zip(index, shape,
                                                                         strict=True)):
                grown_shape = tuple(s if isinstance(i, slice) or i < s else max(2 * s, i + 1)
                                    for i, s in zip(index, shape, strict=True))
                grown = np.zeros(grown_shape + state.backing.shape[len(shape):],
                                 state.backing.dtype)
                grown[tuple(slice(0, s) for s in state.backing.shape)] = state.backing
                state.backing = grown
            # own dims keep their order in state.names, so the block lands as it is;
            # assigning converts to the display dtype
            state.backing[index] = array
            state.extent = [e if isinstance(i, slice) else max(e, i + 1)
                            for e, i in zip(state.extent, index, strict=True)]
        labels = unique_labels(state.names + ["y", "x"])
        # a live time series follows its newest time point, as a stack does
        follow = next((i for i, n in enumerate(state.names)
                       if n not in own and n.lower() in TIME_AXES), None)
        newest = state.backing[index]
        if (tuple(state.extent), id(state.backing)) == before and state.layer is not None:
            return None, labels, follow, newest
        return state.backing[tuple(slice(0, e) for e in state.extent)], labels, follow, newest

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

    def _create(self, state: _ImageStream, data, frame: ReceivedFrame, kind: str,
                newest: np.ndarray):
        hints = frame.header.display
        kwargs: dict = {"name": state.stream, "metadata": {STREAM_KEY: state.stream}}
        if hints.opacity is not None:
            kwargs["opacity"] = hints.opacity
        if kind == "labels":
            return self.viewer.add_labels(data, **kwargs)
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
        self.roi_updates += 1
        if state.shapes is not None:
            # counted here, once per ROI update, not by every report snapshot
            state.shape_types = dict(Counter(state.shapes.shape_type))
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
            state.shape_types = {}
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
            types.append(roi.kind)
            labels.append(roi.label or "")
        nd = len(state.names) + 2
        if state.shapes is not None and not self._alive(state.shapes):
            state.shapes, state.shape_pos, state.shape_labels = None, [], []
            state.shape_types, state.text_shown = {}, False
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
                    "count": state.shapes.nshapes, "types": dict(state.shape_types),
                })  # fmt: skip
            if self._alive(state.points):
                layers.append({
                    "name": state.points.name, "stream": state.stream, "kind": "points",
                    "count": len(state.points.data),
                })  # fmt: skip
        self.snapshot = {"layers": layers, "layer_updates": self.updates,
                         "roi_updates": self.roi_updates, "frames_displayed": self.frames,
                         "frames_skipped": self.skipped}


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
        # also after a layer was deleted between batches
        buffer.display_state = self.manager.snapshot
        self.ticks += 1
