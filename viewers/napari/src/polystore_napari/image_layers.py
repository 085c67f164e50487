"""The napari calls that make and update one image or labels layer, and its state.

`LayerManager` (`layers.py`) sorts the pieces of each frame by layer and hands them here, one
`LayerState` per stream and channel: the layout of its pixels (`layout.py`), its colormap and
opacity hints and its contrast. A layer is made once and updated in place: a frame never
rebuilds it. Everything here runs on the Qt main thread.
"""

from __future__ import annotations

import functools
import time

from polystore_napari.layout import LayerLayout, View
from polystore_napari.pieces import Piece, channel_colormap, layer_name
from polystore_napari.roi_layers import STREAM_KEY, RoiLayers

#: napari layer metadata keys naming the stream (and channel) a layer shows
CHANNEL_KEY = "polystore_channel"
#: how often a layer updated in place redraws its thumbnail in the layer list
THUMBNAIL_HZ = 4


class LayerState:
    """One napari layer of a stream (one per channel) and the layout of its pixels."""

    def __init__(self, key: tuple[str, int | None], stack_capacity: int) -> None:
        self.key = key
        self.layout = LayerLayout(stack_capacity)
        self.layer = None
        self.hints: tuple | None = None
        #: the newest colormap and opacity hints of this stream and channel: they stay until
        #: others replace them (protocol.md), also in a new layer (after labels, or a deleted
        #: one), and a run's older frames count as much as its newest
        self.colormap: str | None = None
        self.opacity: float | None = None
        #: why the layer shows gray instead of its hinted colormap (None: it does not)
        self.colormap_error: str | None = None
        self.thumbnail_at = 0.0
        self.setting = False  # the plugin (not the user) is changing the layer

    def forget(self) -> None:
        self.layer = None
        self.hints = None
        self.colormap_error = None
        self.layout.reset()
        self.layout.geometry = None
        self.layout.contrast.user_set = False


class ImageLayers:
    """Makes and updates the image and labels layers of `LayerState`s, below the ROI layers
    of their stream."""

    def __init__(self, viewer, rois: RoiLayers) -> None:
        self.viewer = viewer
        self.rois = rois

    def create(self, state: LayerState, view: View, piece: Piece) -> None:
        hints = piece.header.display
        stream, channel = state.key
        state.colormap_error = None
        kwargs: dict = {"name": layer_name(state.key),
                        "metadata": {STREAM_KEY: stream, CHANNEL_KEY: channel}}
        if state.opacity is not None:
            kwargs["opacity"] = state.opacity
        if piece.kind == "labels":
            layer = self.viewer.add_labels(view.data, **kwargs)  # cyclic colours by default
        else:
            limits = state.layout.contrast.limits(hints.contrast_limits, view.newest, piece.rgb)
            kwargs.update(rgb=piece.rgb, contrast_limits=list(limits))
            if channel is not None:
                kwargs["blending"] = "additive"
            colormap = None if piece.rgb else channel_colormap(channel, state.colormap)
            layer = None
            if colormap:
                try:
                    layer = self.viewer.add_image(view.data, colormap=colormap, **kwargs)
                except (KeyError, ValueError, TypeError) as exc:
                    state.colormap_error = unknown_colormap(colormap, exc)
            if layer is None:
                layer = self.viewer.add_image(view.data, **kwargs)
            layer.events.contrast_limits.connect(functools.partial(self._contrast_set, state))
        state.layer = layer
        self._below_rois(stream, layer)
        layer.axis_labels = view.axis_labels
        if view.follow_axis is not None:  # napari opens new axes in the middle; show the newest
            self._show_last(layer, view.follow_axis)

    def _below_rois(self, stream: str, layer) -> None:
        """ROIs sent before their image's first frame must not vanish under it: the new layer
        goes below the stream's ROI layers. If those were all the viewer had, napari fitted
        the view to the ROIs; fit it to the image instead, as napari does for a first layer."""
        rois = self.rois.alive(stream)
        if not rois:
            return
        layers = self.viewer.layers
        lowest = min(layers.index(roi) for roi in rois)
        here = layers.index(layer)
        if here > lowest:
            layers.move(here, lowest)
        ours = {id(roi) for roi in self.rois.alive()} | {id(layer)}
        if all(id(other) in ours for other in layers):
            self.viewer.reset_view()

    @staticmethod
    def _contrast_set(state: LayerState, event=None) -> None:
        """The layer's contrast changed: by hand unless the plugin is setting it."""
        if not state.setting:
            state.layout.contrast.user_set = True

    def update(self, state: LayerState, view: View, refit: bool) -> None:
        layer = state.layer
        if view.data is not None:
            axis = view.follow_axis
            follow = axis is not None and (
                refit or axis >= layer.ndim  # a new axis, or another geometry
                or self._at_end(layer, layer.data.shape[axis], axis))
            state.setting = True  # napari may clip the contrast to a new dtype's range
            try:
                layer.data = view.data
            finally:
                state.setting = False
            if tuple(layer.axis_labels) != tuple(view.axis_labels):
                layer.axis_labels = view.axis_labels
            if follow:
                self._show_last(layer, axis)
        else:
            # pixels were written into the array the layer shows (same shape: its extent
            # stays); its thumbnail in the layer list is redrawn at most THUMBNAIL_HZ times
            # a second
            now = time.monotonic()
            thumbnail = now - state.thumbnail_at >= 1 / THUMBNAIL_HZ
            if thumbnail:
                state.thumbnail_at = now
            layer.refresh(thumbnail=thumbnail, extent=False)

    def apply_hints(self, state: LayerState, piece: Piece, view: View) -> None:
        hints = piece.header.display
        layer = state.layer
        key = (state.colormap, state.opacity)
        if state.hints is not None and key != state.hints:  # the layer was made with the first
            if state.opacity is not None:
                layer.opacity = state.opacity
            colormap = state.colormap  # none: the layer keeps the one it has (protocol.md)
            if piece.kind == "image" and not piece.rgb and colormap:
                try:
                    if colormap != layer.colormap.name:
                        layer.colormap = colormap
                    state.colormap_error = None
                except (KeyError, ValueError, TypeError) as exc:
                    state.colormap_error = unknown_colormap(colormap, exc)
                    layer.colormap = "gray"  # as the message says, not the earlier colour
        state.hints = key
        if piece.kind != "image":
            return
        limits = state.layout.contrast.limits(hints.contrast_limits, view.newest, piece.rgb)
        if limits is not None and list(layer.contrast_limits) != limits:
            state.setting = True
            try:
                layer.contrast_limits = limits
            finally:
                state.setting = False

    def _at_end(self, layer, length: int, layer_axis: int = 0) -> bool:
        """Whether the slider of `layer_axis` shows the last of `length` positions (the user
        has not scrolled back to look at older data)."""
        axis = self.viewer.dims.ndim - layer.ndim + layer_axis
        if axis < 0 or length == 0:
            return True
        return self.viewer.dims.current_step[axis] >= length - 1

    def _show_last(self, layer, layer_axis: int) -> None:
        """Move the slider to `layer`'s newest position, never back: the slider is shared,
        and a shorter layer (a new stream, a re-made channel layer) must not pull the others
        away from their newest frames (they would stop following)."""
        axis = self.viewer.dims.ndim - layer.ndim + layer_axis
        last = layer.data.shape[layer_axis] - 1
        if self.viewer.dims.current_step[axis] < last:
            self.viewer.dims.set_current_step(axis, last)


def unknown_colormap(colormap: str, exc: Exception) -> str:
    """What *Last error* and the report say of a colormap napari does not know (not napari's
    own message: it lists every colormap, thousands of characters for one line)."""
    return (f"unknown colormap {colormap!r}, shown in gray ({type(exc).__name__}; napari's "
            "names: napari.utils.colormaps.AVAILABLE_COLORMAPS, e.g. gray, green, magenta, "
            "viridis)")
