"""ROIs as napari layers: per image stream, a Shapes layer (polygons, rectangles, ellipses,
lines) and a Points layer, on the planes of the image they belong to."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import numpy as np

from polystore.streaming import ReceivedRois
from polystore_napari.buffer import RoisUpdate, roi_key
from polystore_napari.pieces import CHANNEL_AXIS, unique_labels

#: napari layer metadata key naming the stream a layer shows
STREAM_KEY = "polystore_stream"


def _layer_of(roi) -> str:
    """The layer a ROI is drawn in: "points" for a point, "shapes" for the rest."""
    return "points" if roi.kind == "point" else "shapes"


class _RoiStream:
    """The Shapes and Points layers of the ROIs that belong to one image stream."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.names: list[str] | None = None  # leading axes of the ROI layers
        self.shapes = None
        self.points = None
        self.shape_keys: list[tuple] = []  # the set (`roi_key`) of each shape in the layer
        self.shape_labels: list[str] = []
        self.shape_types: dict[str, int] = {}  # shape type counts, for the report
        self.text_shown = False
        self.point_sets: dict[tuple, tuple[list, list[str]]] = {}
        #: the newest ROI set per (path, position), `roi_key`: what the layers are rebuilt
        #: from when their axes change (a set with new axes, or the image placed by new axes)
        self.sets: dict[tuple, ReceivedRois] = {}
        #: the kinds ("shapes", "points") of a set whose layer the user deleted: not drawn
        #: again, while the set's other kind still is
        self.deleted: dict[tuple, set[str]] = {}


class RoiLayers:
    """The ROI layers of every image stream; runs on the main thread."""

    def __init__(self, viewer, placed_names: Callable[[str], list[str]]) -> None:
        self.viewer = viewer
        #: the leading axes of an image stream's placed layer (ROIs sit on its planes)
        self.placed_names = placed_names
        self.streams: dict[str, _RoiStream] = {}
        self.updates = 0  # ROI layer updates (one per stream per tick with ROI sets)

    def _alive(self, layer) -> bool:
        return layer is not None and layer in self.viewer.layers

    def layers(self, stream: str):
        """(Shapes layer, Points layer) of the ROIs of image stream `stream`."""
        state = self.streams.get(stream)
        return (None, None) if state is None else (state.shapes, state.points)

    def alive(self, stream: str | None = None) -> list:
        """The ROI layers (Shapes, Points) still in the viewer, of `stream` or of every stream."""
        states = self.streams.values() if stream is None else [self.streams.get(stream)]
        return [layer for state in states if state is not None
                for layer in (state.shapes, state.points) if self._alive(layer)]

    def held(self, stream: str) -> int:
        """ROI entries held for the image stream `stream`."""
        state = self.streams.get(stream)
        if state is None:
            return 0
        return len(state.shape_keys) + sum(len(c) for c, _ in state.point_sets.values())

    def clear(self) -> None:
        for state in self.streams.values():
            for layer in (state.shapes, state.points):
                if self._alive(layer):
                    self.viewer.layers.remove(layer)
        self.streams.clear()

    def forget_removed(self) -> None:
        """Forget the ROIs of a layer the user deleted: a later rebuild does not bring them
        back, but still redraws the other layer's (deleting "points" emptied the sets both
        are made from, so the shapes lost their sets and their planes). A set left with
        nothing to draw is dropped."""
        for rois in self.streams.values():
            gone = set()
            if rois.shapes is not None and not self._alive(rois.shapes):
                rois.shapes, rois.shape_keys, rois.shape_labels = None, [], []
                rois.shape_types, rois.text_shown = {}, False
                gone.add("shapes")
            if rois.points is not None and not self._alive(rois.points):
                rois.points, rois.point_sets = None, {}
                gone.add("points")
            if not gone:
                continue
            for key, item in list(rois.sets.items()):
                deleted = rois.deleted.setdefault(key, set())
                deleted |= gone
                if {_layer_of(roi) for roi in item.header.rois} <= deleted:
                    del rois.sets[key], rois.deleted[key]

    def report(self) -> list[dict]:
        entries = []
        for state in self.streams.values():
            if self._alive(state.shapes):
                entries.append({
                    "name": state.shapes.name, "stream": state.stream, "kind": "shapes",
                    "count": state.shapes.nshapes, "types": dict(state.shape_types),
                })  # fmt: skip
            if self._alive(state.points):
                entries.append({
                    "name": state.points.name, "stream": state.stream, "kind": "points",
                    "count": len(state.points.data),
                })  # fmt: skip
        return entries

    def apply(self, update: RoisUpdate) -> None:
        state = self.streams.setdefault(update.stream, _RoiStream(update.stream))
        for item in update.items:
            key = roi_key(item)
            state.sets.pop(key, None)  # the newest goes last
            state.sets[key] = item
            state.deleted.pop(key, None)  # a set sent again is new: all of it shows
        names = self._names(state)
        try:
            if names != state.names:
                self._rebuild(state, names)
            else:
                for item in update.items:
                    self._add_set(state, item)
        finally:
            self.updates += 1
            self._finish(state)

    def relayout(self, stream: str) -> None:
        """Put the ROIs of `stream` on the right planes again after its image's placed axes
        changed (ROIs that came before the image's first frame, or before a new axis)."""
        state = self.streams.get(stream)
        if state is not None and state.sets and self._names(state) != state.names:
            self._rebuild(state, self._names(state))
            self._finish(state)

    def _finish(self, state: _RoiStream) -> None:
        """Labels, text and the Points layer, after sets were added."""
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

    def _names(self, state: _RoiStream) -> list[str]:
        """Leading axes of the ROI layers: those of the image stream when it is placed by
        axes (so shapes sit on the right planes), plus those of the ROI sets; none when no
        set has a position (they show on every plane). The channel axis is not one: each
        channel is a layer of its own, and ROIs show over all of them."""
        positioned = [item for item in state.sets.values() if item.header.axes]
        if not positioned:
            return []
        image = self.placed_names(state.stream)
        extra: list[str] = []
        for item in positioned:
            for name in item.header.axis_names or item.header.axes:
                if name not in image and name not in extra:
                    extra.append(name)
        # napari lines layers up from their last axis: the image's axes go last, so that a
        # set's `t` never lands on an image's `z`
        return [n for n in extra + image if n != CHANNEL_AXIS]

    def _rebuild(self, state: _RoiStream, names: list[str]) -> None:
        """New layers with `names` as leading axes, holding every set again (the layers'
        dimensionality changes, so they cannot be updated in place)."""
        old = (state.shapes, state.points)
        state.shapes = state.points = None  # first: removing them is not the user's deleting
        for layer in old:
            if self._alive(layer):
                self.viewer.layers.remove(layer)
        state.shape_keys, state.shape_labels, state.point_sets = [], [], {}
        state.shape_types = {}
        state.text_shown = False
        state.names = names
        for item in state.sets.values():
            self._add_set(state, item)

    def _roi_axis_labels(self, state: _RoiStream) -> list[str]:
        return unique_labels(list(state.names) + ["y", "x"])

    def _add_set(self, state: _RoiStream, item: ReceivedRois) -> None:
        """Show one ROI set, replacing the one shown of the same path and position."""
        lead = [float(item.header.axes.get(n, 0)) for n in state.names]
        key = roi_key(item)
        deleted = state.deleted.get(key, ())
        shapes, types, labels, points, point_labels = [], [], [], [], []
        for roi in item.header.rois:
            if _layer_of(roi) in deleted:
                continue
            coords = [[*lead, float(r), float(c)] for r, c in roi.coords]
            if roi.kind == "point":  # one or several (an ImageJ multi-point ROI)
                points += coords
                point_labels += [roi.label or ""] * len(coords)
                continue
            if roi.kind in ("rectangle", "ellipse"):
                (r0, c0), (r1, c1) = roi.coords
                coords = [[*lead, r, c] for r, c in ((r0, c0), (r0, c1), (r1, c1), (r1, c0))]
            shapes.append(np.array(coords))
            # a line of more than two points is an open path (ImageJ's segmented line)
            types.append("path" if roi.kind == "line" and len(coords) > 2 else roi.kind)
            labels.append(roi.label or "")
        nd = len(state.names) + 2
        if state.shapes is not None and not self._alive(state.shapes):
            state.shapes, state.shape_keys, state.shape_labels = None, [], []
            state.shape_types, state.text_shown = {}, False
        if state.shapes is not None:
            old = [i for i, k in enumerate(state.shape_keys) if k == key]
            if old:
                state.shapes.remove(old)
                keep = set(old)
                state.shape_keys = [k for i, k in enumerate(state.shape_keys) if i not in keep]
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
            before = len(state.shapes.data)
            try:
                state.shapes.add(shapes, shape_type=types)
            except Exception:
                # napari may fail after adding (a coordinate its sliders cannot hold): take
                # the set out again, so the layer and the records agree and later sets show
                added = list(range(before, len(state.shapes.data)))
                if added:
                    with contextlib.suppress(Exception):
                        state.shapes.remove(added)
                state.sets.pop(key, None)
                state.point_sets.pop(key, None)  # nor the points of the set it replaced
                raise
            state.shape_keys += [key] * len(shapes)
            state.shape_labels += labels
        state.point_sets.pop(key, None)
        if points:
            state.point_sets[key] = (points, point_labels)
