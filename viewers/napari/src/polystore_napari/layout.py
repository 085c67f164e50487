"""Where each piece of a frame goes in its layer's array, in plain NumPy: no napari, no Qt.

`pieces.py` splits a frame into pieces (one per layer); here each layer's array is kept for
the modes ``replace``, ``stack`` (a window of the newest frames, `FrameStack`) and ``place``
(nD placement, with a sparsity cap). The napari adapter (`layers.py`, `image_layers.py`)
hands the result to napari. Everything is testable without a display (tests/test_layout.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from polystore_napari.pieces import Contrast, LayoutError, Piece, unique_labels

#: a placed layer may always grow to this size ...
PLACE_FREE_BYTES = 64 * 1024**2
#: ... and beyond it only while it is at most this many times the bytes placed into it
PLACE_MAX_SPARSITY = 4


# -- arrays the layers show ------------------------------------------------------------------


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


@dataclass
class View:
    """What a layer should show after a run of pieces.

    `data`: the array to hand the layer, or None when the pixels were written into the array
    it already shows (only a refresh is needed). `follow_axis`: the layer axis whose slider
    should move to the newest position (time), if any. `newest`: the newest piece's pixels
    (for contrast)."""

    data: object | None
    axis_labels: list[str]
    follow_axis: int | None
    newest: np.ndarray


class LayerLayout:
    """The array one layer shows, for the modes ``replace``, ``stack`` and ``place``."""

    def __init__(self, stack_capacity: int = 100, *,
                 place_free_bytes: int = PLACE_FREE_BYTES) -> None:
        self.stack_capacity = max(1, int(stack_capacity))
        #: a placed layer may always grow to this size (beyond it only while dense)
        self.place_free_bytes = place_free_bytes
        self.geometry: tuple | None = None  # (mode, *Piece.geometry)
        self.contrast = Contrast()
        self.reset()

    def reset(self) -> None:
        """Forget the pixels (the layer was deleted, or the geometry changed)."""
        self.backing: np.ndarray | None = None
        self.start = self.end = 0  # labels stack window in backing
        self.frames: deque[np.ndarray] | None = None  # image stack: the newest arrays
        self.names: list[str] = []  # place: leading axis names (positions and own dims)
        self.extent: list[int] = []  # place: used size along each leading axis
        self.placed: set[tuple] = set()  # place: positions written
        #: why pieces of the last `show` were refused (the others were shown)
        self.refused: list[str] = []

    @property
    def mode(self) -> str | None:
        return self.geometry[0] if self.geometry else None

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held for this layer."""
        held = 0 if self.backing is None else self.backing.nbytes
        return held + sum(f.nbytes for f in self.frames or ())

    def show(self, mode: str, run: list[Piece], shown=None, fresh: bool = False) -> View:
        """Lay out a run of pieces of one geometry. `shown`: the data the layer shows now
        (None if it has no layer), so a ``replace`` can write into it in place. A new
        geometry (or `fresh`: the stream starts again) forgets the pixels held, unless every
        piece is refused (`LayoutError`): then the layer stays as it was."""
        geometry = (mode, *run[0].geometry)
        if geometry == self.geometry and not fresh:
            self.refused = []
            return self._show(mode, run, shown)
        before = dict(vars(self))
        self.reset()
        self.geometry = geometry
        try:
            return self._show(mode, run, None)
        except LayoutError:
            vars(self).update(before)
            raise

    def _show(self, mode: str, run: list[Piece], shown) -> View:
        if mode == "stack":
            return self._stack_frames(run) if run[0].kind == "image" else self._stack(run, shown)
        if mode == "place":
            return self._place(run, shown)
        return self._replace(run[-1], shown)

    def _labels(self, lead: list[str], piece: Piece) -> list[str]:
        """Axis labels: napari labels an RGB layer's spatial axes only."""
        return unique_labels([*lead, *piece.own, "y", "x"])

    def _replace(self, piece: Piece, shown) -> View:
        labels = self._labels([], piece)
        if self.backing is not None and shown is self.backing:
            # converts while copying: no intermediate converted copy of the frame
            np.copyto(self.backing, piece.array, casting="unsafe")
            return View(None, labels, None, self.backing)
        # received arrays are our own copies: one is kept as it is unless converted
        self.backing = piece.shown
        return View(self.backing, labels, None, self.backing)

    def _stack_frames(self, run: list[Piece]) -> View:
        """Image stacks: keep the newest `stack_capacity` arrays and show them as one
        `FrameStack`, so appending a frame copies no pixels on the main thread."""
        capacity = self.stack_capacity
        if self.frames is None or self.frames.maxlen != capacity:
            self.frames = deque(self.frames or (), maxlen=capacity)
        for piece in run[-capacity:]:
            self.frames.append(piece.shown)
        return View(FrameStack(self.frames), self._labels(["t"], run[-1]), 0, self.frames[-1])

    def _stack(self, run: list[Piece], shown) -> View:
        """Labels stacks (a writable array, so they can be painted): append along a leading
        time axis in a backing array of up to 2 x capacity frames; the layer shows the
        window [start, end), moved back to the front once per `capacity` frames."""
        capacity = self.stack_capacity
        run = run[-capacity:]
        before = (self.start, self.end, id(self.backing))
        if self.backing is not None and len(self.backing) > 2 * capacity:
            self._shrink(capacity)  # the capacity was lowered: free what it no longer keeps
        for piece in run:
            if self.backing is None:
                self.backing = np.empty((min(4, 2 * capacity), *piece.array.shape),
                                        piece.dtype)
                self.start = self.end = 0
            if self.end == len(self.backing):
                self._make_room(capacity)
            self.backing[self.end] = piece.array
            self.end += 1
        self.start = max(self.start, self.end - capacity)
        labels = self._labels(["t"], run[-1])
        newest = self.backing[self.end - 1]
        if (self.start, self.end, id(self.backing)) == before and shown is not None:
            return View(None, labels, 0, newest)
        return View(self.backing[self.start:self.end], labels, 0, newest)

    def _shrink(self, capacity: int) -> None:
        """Move the newest `capacity` frames into a backing array of at most 2 x capacity,
        so that the old one (sized for a larger capacity) is freed, as an image stack frees
        the frames beyond a lowered capacity."""
        keep = min(self.end - self.start, capacity)
        size = min(2 * capacity, max(2 * keep, 4))
        smaller = np.empty((size, *self.backing.shape[1:]), self.backing.dtype)
        smaller[:keep] = self.backing[self.end - keep:self.end]
        self.backing, self.start, self.end = smaller, 0, keep

    def _make_room(self, capacity: int) -> None:
        n = self.end - self.start
        alloc = len(self.backing)
        if alloc < 2 * capacity:  # still growing towards 2 x capacity
            grown = np.empty((min(2 * capacity, max(2 * alloc, n + 1)), *self.backing.shape[1:]),
                             self.backing.dtype)
            grown[:n] = self.backing[self.start:self.end]
            self.backing = grown
        else:  # slide the window back to the front
            keep = min(n, capacity - 1)
            self.backing[:keep] = self.backing[self.end - keep:self.end]
            n = keep
        self.start, self.end = 0, n

    def _place(self, run: list[Piece], shown) -> View:
        """Write each piece at its position in an nD array that grows geometrically as new
        positions arrive; the layer shows the used extent.

        Leading axes are the position axes and the piece's own leading dimensions in
        ``axis_names`` order: ``axes={"t": 1}``, ``axis_names=["t", "z"]`` and a (3, Y, X)
        piece is the block ``[1, 0:3]`` of a (T, Z, Y, X) layer. A position that would make
        the layer both larger than `place_free_bytes` and more than `PLACE_MAX_SPARSITY`
        times the bytes placed into it is refused with a `LayoutError` (nothing changes):
        ``t = 40001`` after ``t = 0`` must not allocate 40,000 empty planes."""
        before = (tuple(self.extent), id(self.backing))
        index: tuple | None = None
        for piece in run:
            own = piece.own
            size = dict(zip(own, piece.array.shape[:len(own)], strict=True))
            names = place_names(piece)
            if self.backing is None:
                new, order, extent = [], names, [size.get(n, 0) for n in names]
            else:  # only position axes can be new: inserted before the own dimensions
                new = [n for n in names if n not in self.names]
                at = next((i for i, n in enumerate(self.names) if n in size), len(self.names))
                order = self.names[:at] + new + self.names[at:]
                extent = self.extent[:at] + [1] * len(new) + self.extent[at:]
            at_index = tuple(slice(None) if n in size else piece.axes.get(n, 0) for n in order)
            extent = [e if isinstance(i, slice) else max(e, i + 1)
                      for e, i in zip(extent, at_index, strict=True)]
            position = tuple(i for i in at_index if not isinstance(i, slice))
            cells = math.prod(e for e, i in zip(extent, at_index, strict=True)
                              if not isinstance(i, slice))
            try:
                self._check_sparsity(piece, cells, position)
            except LayoutError as exc:
                self.refused.append(str(exc))
                continue
            if self.backing is None:
                self.backing = np.zeros(tuple(size.get(n, 1) for n in order)
                                        + piece.array.shape[len(own):], piece.dtype)
            elif new:  # old frames sit at index 0 of a new axis
                shape = self.backing.shape
                self.backing = self.backing.reshape(shape[:at] + (1,) * len(new) + shape[at:])
            self.names = order
            self._grow_to(at_index, extent, self._allowed_bytes(piece, position))
            self.backing[at_index] = piece.array
            self.extent = extent
            self.placed.add(position)
            index = at_index
        if index is None:  # every piece refused
            raise LayoutError(self.refused[-1])
        last = run[-1]
        labels = unique_labels([*self.names, "y", "x"])
        # a live time series follows its newest time point, as a stack does
        follow = next((i for i, n in enumerate(self.names)
                       if n not in last.own and n == "t"), None)
        newest = self.backing[index]
        if (tuple(self.extent), id(self.backing)) == before and shown is not None:
            return View(None, labels, follow, newest)
        return View(self.backing[tuple(slice(0, e) for e in self.extent)], labels, follow,
                    newest)

    def _allowed_bytes(self, piece: Piece, position: tuple) -> int:
        """How large the layer may be once `piece` is placed at `position`."""
        placed = len(self.placed | {position}) * piece.array.nbytes
        return max(self.place_free_bytes, PLACE_MAX_SPARSITY * placed)

    def _check_sparsity(self, piece: Piece, cells: int, position: tuple) -> None:
        """Refuse a position that would make the layer mostly empty and large."""
        block = piece.array.nbytes
        layer_bytes = cells * block
        placed = len(self.placed | {position}) * block
        if layer_bytes > self._allowed_bytes(piece, position):
            at = ", ".join(f"{n}={i}" for n, i in sorted(piece.axes.items()))
            raise LayoutError(
                f"placing the frame at {at} would grow the layer to {layer_bytes / 2**20:.0f}"
                f" MiB for {placed / 2**20:.2f} MiB of frames placed; a placed layer beyond "
                f"{self.place_free_bytes / 2**20:.0f} MiB may hold at most "
                f"{PLACE_MAX_SPARSITY}x the frames sent. Frame not shown: send positions "
                "closer together (e.g. number time points 0, 1, 2, ...), or use a new stream")

    def _grow_to(self, index: tuple, extent: list[int], allowed_bytes: int) -> None:
        """Grow the backing array so that `index` fits, with room to spare (so that growing
        stays rare) but within `allowed_bytes`: doubling several axes multiplies (six of them
        made 1 GiB for a 49 MiB layer). The spare room shrinks from 2x to 1.25x to none, and
        as a last resort the array is cut to the layer's `extent`."""
        shape = self.backing.shape[:len(index)]
        if all(isinstance(i, slice) or i < s for i, s in zip(index, shape, strict=True)):
            return
        rest = self.backing.shape[len(shape):]

        def grown_by(factor: float) -> tuple[int, ...]:
            return tuple(s if isinstance(i, slice) or i < s else max(int(s * factor), i + 1)
                         for i, s in zip(index, shape, strict=True))

        for grown_shape in (*(grown_by(f) for f in (2.0, 1.5, 1.25, 1.0)), tuple(extent)):
            if math.prod(grown_shape + rest) * self.backing.itemsize <= allowed_bytes:
                break
        grown = np.zeros(grown_shape + rest, self.backing.dtype)
        kept = tuple(slice(0, min(s, g)) for s, g in zip(self.backing.shape, grown.shape,
                                                         strict=True))
        grown[kept] = self.backing[kept]
        self.backing = grown


def place_names(piece: Piece) -> list[str]:
    """Leading axes of a placed piece in layer order: ``axis_names`` order (position axes and
    the piece's own dimensions), then position axes ``axis_names`` does not name, then own
    dimensions it does not name."""
    names = [n for n in piece.axis_names if n in piece.axes or n in piece.own]
    names += [n for n in piece.axes if n not in names]
    return names + [n for n in piece.own if n not in names]
