"""The napari adapter: apply buffered frames and ROIs to napari layers, on the Qt main thread.

`pieces.py` and `layout.py` decide where pixels go (napari-free); `image_layers.py` makes
and updates one layer, `roi_layers.py` the ROI layers. This module routes each batch there
(the pieces of a stream's frames sorted by layer), removes the layers of a ``clear``, forgets
those the user deleted, and keeps the counts and errors the receiver reports. One layer per
stream and channel, updated in place. `DisplayTimer` (`display_timer.py`) calls `apply`.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import Counter

from napari.layers import Labels

from polystore_napari.buffer import Batch, Update
from polystore_napari.gl_release import release_deleted_gl_program
from polystore_napari.image_layers import ImageLayers, LayerState
from polystore_napari.pieces import CHANNEL_AXIS, LayoutError, Piece, pieces_of
from polystore_napari.roi_layers import RoiLayers

log = logging.getLogger(__name__)


#: the manager of each viewer (by id of the viewer behind napari's proxy), while it lives
_MANAGERS: weakref.WeakValueDictionary[int, LayerManager] = weakref.WeakValueDictionary()


def _unwrapped(viewer):
    return getattr(viewer, "__wrapped__", viewer)  # napari's PublicOnlyProxy


class LayerManager:
    """Owns the layers of the streams it has seen; everything here runs on the main thread.

    One per viewer, living as long as its layer list (`for_viewer`): a widget opened again
    for the same viewer takes over the layers the last one made instead of adding a second
    set beside them (which a ``clear`` then left behind)."""

    @classmethod
    def for_viewer(cls, viewer, *, stack_capacity: int = 100) -> LayerManager:
        """The manager of `viewer`'s stream layers: the one it already has, else a new one."""
        manager = _MANAGERS.get(id(_unwrapped(viewer)))
        if manager is None or _unwrapped(manager.viewer) is not _unwrapped(viewer):
            return cls(viewer, stack_capacity=stack_capacity)
        manager.stack_capacity = max(1, int(stack_capacity))
        return manager

    def __init__(self, viewer, *, stack_capacity: int = 100):
        self.viewer = viewer
        self.stack_capacity = max(1, int(stack_capacity))
        self.images: dict[tuple[str, int | None], LayerState] = {}
        self.rois = RoiLayers(viewer, self._placed_names)
        self.image_layers = ImageLayers(viewer, self.rois)
        self.updates = 0  # image/labels layer updates (one per stream per tick with pixels)
        self.frames = 0  # frames written into layers
        self.skipped = 0  # empty frames (a 0 in their shape), not shown
        self.rejected = 0  # frames this display cannot show (see `errors`)
        self._skipped: Counter[str] = Counter()  # ... per stream
        #: the current problem of each stream, cleared when the stream shows a frame again
        self.errors: dict[str, str] = {}
        #: (mode, *Piece.geometry) of each stream's newest frame: a change starts it again
        self._geometry: dict[str, tuple] = {}
        #: what the receiver's `report` answers; replaced (never mutated) on the main thread
        self.snapshot: dict = {"layers": [], "layer_updates": 0, "roi_updates": 0,
                               "frames_displayed": 0, "frames_skipped": 0,
                               "frames_rejected": 0, "errors": {}}
        # a deleted layer frees what its stream holds at once, not at the stream's next frame;
        # held strongly by the layer list (napari holds a bound method weakly), so that the
        # manager lives as long as the viewer's layers, also after its widget is closed
        viewer.layers.events.removed.connect(functools.partial(LayerManager._on_layer_removed,
                                                               self))
        _MANAGERS[id(_unwrapped(viewer))] = self

    @property
    def roi_updates(self) -> int:
        """ROI layer updates (one per stream per tick with ROI sets)."""
        return self.rois.updates

    @property
    def last_error(self) -> str:
        """The most recent problem that still holds ("" when every stream is fine)."""
        if not self.errors:
            return ""
        stream, message = next(reversed(self.errors.items()))
        return f"{stream}: {message}"

    def _error(self, stream: str, message: str) -> None:
        self.errors.pop(stream, None)  # re-inserted: the newest is last
        self.errors[stream] = message

    # -- entry points ------------------------------------------------------------------------

    def apply(self, batch: Batch) -> None:
        if batch.cleared:
            self.clear()
        for update in batch.updates:
            try:
                self._apply_frames(update)
                self.rois.relayout(update.stream)  # its placed axes may have changed
            except Exception as exc:  # noqa: BLE001 - one bad stream must not stop the display
                log.exception("could not show stream %s", update.stream)
                self._error(update.stream, f"could not show it ({exc})")
        for update in batch.rois:
            key = f"{update.stream} (ROIs)"  # not cleared by the stream's next image frame
            try:
                self.rois.apply(update)
                self.errors.pop(key, None)
            except Exception as exc:  # noqa: BLE001
                log.exception("could not show ROIs of %s", update.stream)
                self._error(key, f"could not show a ROI set ({type(exc).__name__}: {exc}); "
                                 "it was left out, and later sets still show")
        self._take_snapshot()

    def clear(self) -> None:
        """Remove every layer this manager made (a sender's ``clear`` command)."""
        for state in self.images.values():
            if self._alive(state.layer):
                self.viewer.layers.remove(state.layer)
        self.images.clear()
        self._geometry.clear()
        self.rois.clear()
        self.errors.clear()
        self._skipped.clear()  # forgotten streams start afresh (the totals stay counted)
        self._take_snapshot()

    def _on_layer_removed(self, event=None) -> None:
        """Forget the state of every stream whose layer is gone (the user deleted it): its
        frames and backing array are freed now; its next frame makes a new layer. Runs after
        napari's own handler (napari calls its core callbacks first), once the layer's GL
        programs are deleted: see `release_deleted_gl_program`."""
        release_deleted_gl_program(self.viewer)
        for state in self.images.values():
            if state.layer is not None and not self._alive(state.layer):
                state.forget()
        self.rois.forget_removed()
        self._take_snapshot()

    def layer(self, stream: str, channel: int | None = None):
        """The image/labels layer of `stream` (of its `channel`, for a split stream)."""
        state = self.images.get((stream, channel))
        return None if state is None else state.layer

    def held_bytes(self, stream: str) -> int:
        """Bytes of pixels held for the layers of `stream` (0 once they are deleted)."""
        return sum(s.layout.nbytes for key, s in self.images.items() if key[0] == stream)

    def held_rois(self, stream: str) -> int:
        """ROI entries held for the image stream `stream`."""
        return self.rois.held(stream)

    def roi_layers(self, stream: str):
        """(Shapes layer, Points layer) of the ROIs of image stream `stream`."""
        return self.rois.layers(stream)

    def _placed_names(self, stream: str) -> list[str]:
        """Leading axes of the placed layers of `stream` (where its ROIs belong)."""
        placed = [s.layout.names for key, s in self.images.items()
                  if key[0] == stream and s.layout.mode == "place"]
        return list(placed[0]) if placed else []

    # -- frames ------------------------------------------------------------------------------

    def _alive(self, layer) -> bool:
        return layer is not None and layer in self.viewer.layers

    def _skip_empty(self, stream: str, shape: tuple) -> None:
        """An empty frame (a 0 in its shape) has nothing to show: count it, say so once in
        *Last error* (updated, not repeated), log it once per stream."""
        self.skipped += 1
        self._skipped[stream] += 1
        n = self._skipped[stream]
        self._error(stream, f"{n} empty frame(s) not shown (shape {shape})")
        if n == 1:
            log.warning("stream %s: empty frame of shape %s not shown", stream, shape)

    def _apply_frames(self, update: Update) -> None:
        """Show a stream's frames in order. A frame whose geometry (mode, kind, dtype, shape,
        channels) differs from the stream's before, or the first of an update the buffer
        marks `starts_again`, starts the stream again, as in Fiji: the layers it covers
        start empty and the stream's others are removed (docs/protocol.md, "Modes")."""
        stream = update.stream
        shown = 0
        failed = False
        segment: list[tuple] = []  # consecutive (frame, pieces) of one geometry
        geometry = None
        first = update.starts_again  # the buffer dropped what came before these frames
        for frame in update.frames:
            if frame.array.size == 0:
                self._skip_empty(stream, frame.array.shape)
                failed = True
                continue
            try:
                pieces = pieces_of(stream, frame.header, frame.array)
            except LayoutError as exc:
                self._reject(stream, str(exc))
                failed = True
                continue
            shown += 1
            frame_geometry = (update.mode, *pieces[0].geometry)
            if segment and frame_geometry != geometry:
                failed |= self._apply_segment(stream, update.mode, segment, geometry, first)
                segment, first = [], False
            geometry = frame_geometry
            segment.append((frame, pieces))
        if segment:
            failed |= self._apply_segment(stream, update.mode, segment, geometry, first)
        if shown:
            self.updates += 1
            self.frames += shown
        if not failed:
            self.errors.pop(stream, None)  # the stream shows its frames again
            unknown = [s.colormap_error for key, s in self.images.items()
                       if key[0] == stream and s.colormap_error and self._alive(s.layer)]
            if unknown:  # ... but in gray, for as long as the hint stays (as in Fiji)
                self._error(stream, unknown[0])

    def _apply_segment(self, stream: str, mode: str, segment: list[tuple], geometry: tuple,
                       starts_again: bool) -> bool:
        """Show frames of one geometry, their pieces sorted by layer; True if one failed.
        The stream starts again with them if their geometry is new to it (or the buffer
        says so), unless every one is refused."""
        before = self._geometry.get(stream)
        again = before is not None and (before != geometry or starts_again)
        by_layer: dict[tuple, list[Piece]] = {}
        newest: set[tuple] | None = None  # the layers of the newest whole frame and after
        for frame, pieces in segment:
            keys = {piece.key for piece in pieces}
            for piece in pieces:
                by_layer.setdefault(piece.key, []).append(piece)
            if CHANNEL_AXIS not in frame.header.axes:  # not one channel placed among others
                newest = keys
            elif newest is not None:  # a channel sent after it stays too
                newest |= keys
        failed = False
        shown = False
        for key, pieces in by_layer.items():
            state = self.images.get(key)
            if state is None:
                state = self.images[key] = LayerState(key, self.stack_capacity)
            elif state.layer is not None and not self._alive(state.layer):
                state.forget()  # the user deleted it: start afresh
            state.layout.stack_capacity = self.stack_capacity
            result = self._apply_run(state, mode, pieces, fresh=again)
            failed |= result is not True
            shown |= result is not None
        if shown:
            self._geometry[stream] = geometry
        if newest is not None and not failed:  # newest is among by_layer: it drops the most
            self._drop_other_channels(stream, newest)
        elif shown and again:
            self._drop_other_channels(stream, set(by_layer))
        return failed

    def _drop_other_channels(self, stream: str, keep: set[tuple]) -> None:
        """Remove the stream's layers the newest frame no longer covers (it has fewer
        channels, or is no longer split): they would go on showing an old frame, blended
        over the new one. Their state stays, without pixels (`_on_layer_removed`): a channel
        that comes back keeps its colormap and opacity hints (protocol.md)."""
        for key, state in list(self.images.items()):
            if key[0] == stream and key not in keep and self._alive(state.layer):
                self.viewer.layers.remove(state.layer)

    def _reject(self, stream: str, message: str) -> None:
        self.rejected += 1
        self._error(stream, message)
        log.warning("stream %s: %s", stream, message)

    def _apply_run(self, state: LayerState, mode: str, run: list[Piece],
                   fresh: bool = False) -> bool | None:
        """Show a run of one layer's pieces: True, False if some were refused, None if all
        were (the layer is as it was)."""
        piece = run[-1]
        old = state.layout.geometry
        # another mode, shape, dtype or axes: the layer's slider positions mean other things
        refit = state.layer is not None and old is not None and old != (mode, *piece.geometry)
        try:  # first: a refused run leaves the layer (and the layout) as they were
            view = state.layout.show(mode, run, None if state.layer is None
                                     else state.layer.data, fresh)
        except LayoutError as exc:
            self._reject(state.key[0], str(exc))
            return None
        for message in state.layout.refused:
            self._reject(state.key[0], message)
        for each in run:  # hints of a run wholly refused are not taken either
            display = each.header.display
            state.colormap = display.colormap or state.colormap
            state.opacity = state.opacity if display.opacity is None else display.opacity
        if state.layer is not None and old is not None and old[1:3] != (piece.kind, piece.rgb):
            layer, state.layer = state.layer, None  # image <-> labels, or RGB: a new layer
            state.hints = None
            state.layout.contrast.user_set = False  # the user set that layer's, not the new one's
            self.viewer.layers.remove(layer)
        if state.layer is None:
            self.image_layers.create(state, view, piece)
        else:
            self.image_layers.update(state, view, refit)
        self.image_layers.apply_hints(state, piece, view)
        return not state.layout.refused

    @staticmethod
    def _layer_kind(layer) -> str:
        # isinstance, not type(): plugin widgets get layers wrapped in napari's proxies
        return "labels" if isinstance(layer, Labels) else "image"

    # -- report ------------------------------------------------------------------------------

    def _take_snapshot(self) -> None:
        layers = []
        for (stream, channel), state in self.images.items():
            layer = state.layer
            if not self._alive(layer):
                continue
            entry = {
                "name": layer.name, "stream": stream, "channel": channel,
                "kind": self._layer_kind(layer), "mode": state.layout.mode,
                "shape": list(layer.data.shape), "dtype": str(layer.data.dtype),
                "axis_labels": list(layer.axis_labels), "colormap": layer.colormap.name,
            }  # fmt: skip
            if entry["kind"] == "image":
                entry.update(rgb=bool(layer.rgb), blending=str(layer.blending),
                             contrast_limits=[float(v) for v in layer.contrast_limits])
            layers.append(entry)
        layers += self.rois.report()
        self.snapshot = {"layers": layers, "layer_updates": self.updates,
                         "roi_updates": self.rois.updates, "frames_displayed": self.frames,
                         "frames_skipped": self.skipped, "frames_rejected": self.rejected,
                         "errors": dict(self.errors)}
