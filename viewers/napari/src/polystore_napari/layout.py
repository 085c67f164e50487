"""Where each received frame goes, in plain NumPy: no napari, no Qt.

The napari adapter (`layers.py`) turns what this module computes into layer calls. Here:

* naming a frame's leading dimensions (one rule for napari and Fiji, docs/protocol.md);
* RGB/RGBA detection and the labels dtypes napari can show exactly;
* splitting an axis named ``c`` into one layer per channel;
* stack windows, nD placement (with a sparsity cap) and `FrameStack`;
* the contrast rule: a hint fixes the range, else it follows the data until the user
  sets it by hand.

Everything is testable without a display (tests/test_layout.py).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CHANNEL_AXIS = "c"
#: a frame splits into at most this many channel layers (each costs napari's main thread
#: about 0.15 s to create: 300 froze it for 90 s)
MAX_CHANNEL_LAYERS = 64
#: default names of unnamed leading dimensions, given from the end (innermost first)
DEFAULT_LEADING = ("t", "c", "z")
TIME_AXES = ("t", "time", "frame", "timepoint")
#: colormaps of channels without a colormap hint (napari's `channel_axis` cycle, CYMRGB)
CHANNEL_COLORMAPS = ("cyan", "yellow", "magenta", "red", "green", "blue")
#: a placed layer may always grow to this size ...
PLACE_FREE_BYTES = 64 * 1024**2
#: ... and beyond it only while it is at most this many times the bytes placed into it
PLACE_MAX_SPARSITY = 4
#: float labels are checked for exactness in blocks of this many values (bounded memory)
_CHECK_BLOCK = 1 << 16


class LayoutError(ValueError):
    """A frame this display cannot show as sent; the message says why and what to send."""


# -- naming, colour, dtypes ------------------------------------------------------------------


def leading_axis_names(axes: Mapping[str, int], axis_names: Sequence[str] | None,
                       lead: int) -> tuple[str, ...]:
    """Names of a frame's `lead` leading dimensions (outermost first).

    The entries of `axis_names` that are not keys of `axes` name the outermost dimensions in
    order; the rest are named innermost first from the end of ``t, c, z``, skipping names
    the frame already uses, then ``d0, d1, ...``. So an unnamed (n, y, x) frame is
    (z, y, x) and (m, n, y, x) is (c, z, y, x), as in OME-NGFF."""
    named = [n for n in axis_names or () if n not in axes][:lead]
    taken = set(axes) | set(axis_names or ())
    defaults = itertools.chain(reversed(DEFAULT_LEADING), (f"d{i}" for i in itertools.count()))
    free = (n for n in defaults if n not in taken)
    inner = [next(free) for _ in range(lead - len(named))]
    return (*named, *reversed(inner))


def is_rgb(shape: Sequence[int], dtype: np.dtype, hint: bool | None) -> bool:
    """Whether a frame is RGB(A): ``rgb=None`` detects uint8 frames whose last dimension is
    3 or 4; ``False`` turns detection off; ``True`` on any other frame is an error."""
    looks = len(shape) >= 3 and shape[-1] in (3, 4) and np.dtype(dtype) == np.uint8
    if hint and not looks:
        raise LayoutError(
            f"rgb=True needs a uint8 frame of shape (..., rows, columns, 3 or 4); got "
            f"{tuple(shape)} {np.dtype(dtype)}. Send uint8 colour values last, or drop rgb=True")
    return looks if hint is None else bool(hint)


def unique_labels(labels: Iterable[str]) -> list[str]:
    """`labels` with repeats numbered (``y``, ``y2``): napari needs distinct axis labels."""
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label}{seen[label]}")
    return out


def image_dtype(dtype: np.dtype) -> np.dtype:
    """vispy has no float16 textures: show them as float32."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def labels_dtype(array: np.ndarray) -> np.dtype:
    """The integer dtype that holds float labels exactly, or a `LayoutError` saying why none
    does (fractions, NaN, beyond 2^53); integer labels keep their dtype. float64 labels are
    always int64, so a stream's dtype (and the frames its layer keeps) does not change when an
    id first passes 2^31; float32 ones are int32 unless an id does."""
    if array.dtype.kind in "iu":
        return array.dtype
    flat = array.reshape(-1)
    lo, hi = 0.0, 0.0
    for start in range(0, flat.size, _CHECK_BLOCK):
        block = flat[start:start + _CHECK_BLOCK]
        if not np.isfinite(block).all() or (np.floor(block) != block).any():
            raise LayoutError(
                f"labels must be whole numbers, but this {array.dtype} frame has fractions "
                "or NaN/inf; send an integer array (e.g. mask.astype(np.int32))")
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if max(-lo, hi) > 2**53:
        raise LayoutError(f"{array.dtype} labels up to {max(-lo, hi):.0f} are not exact "
                          "beyond 2^53; send them as int64 or uint64")
    info = np.iinfo(np.int32)
    fits = array.dtype.itemsize < 8 and info.min <= lo and hi <= info.max
    return np.dtype(np.int32) if fits else np.dtype(np.int64)


def data_limits(array: np.ndarray) -> tuple[float, float]:
    """(min, max) of `array` for contrast limits, never an empty or NaN range."""
    if array.size == 0:
        return 0.0, 1.0
    if array.dtype.kind == "f":
        lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
        if not math.isfinite(lo) or not math.isfinite(hi):
            finite = array[np.isfinite(array)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    else:
        lo, hi = float(array.min()), float(array.max())
    return increasing(lo, hi)


def increasing(lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) as napari takes contrast limits: low < high, even for a constant frame of
    large values (where ``lo + 1`` equals ``lo``) or a hint sent reversed."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi <= lo:
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return lo, hi


class Contrast:
    """The contrast rule of one image layer (both viewers, docs/protocol.md): a
    ``contrast_limits`` hint fixes the range; otherwise it follows each new frame's
    min..max until the user sets it by hand, and from then on the user's setting stays."""

    def __init__(self) -> None:
        self.user_set = False

    def limits(self, hint: Sequence[float] | None, newest: np.ndarray) -> list[float] | None:
        """The range to show now, or None to leave it as it is."""
        if hint:
            return list(increasing(float(hint[0]), float(hint[1])))
        if self.user_set:
            return None
        return list(data_limits(newest))


# -- one frame -> pieces, one per layer ------------------------------------------------------


@dataclass
class Piece:
    """What one frame contributes to one layer: the layer's key (stream, channel or None),
    the pixels (a view of the frame), the names of their leading dimensions and the frame's
    position axes without the channel axis."""

    key: tuple[str, int | None]
    header: object  # the frame's protocol header (display hints)
    array: np.ndarray  # as received: converted to `dtype` only where it is kept
    dtype: np.dtype  # the dtype napari shows
    kind: str  # "image" | "labels"
    rgb: bool
    own: tuple[str, ...]
    axes: dict[str, int]
    axis_names: list[str]

    @property
    def geometry(self) -> tuple:
        """What a layer must be rebuilt or refitted for when it changes."""
        return (self.kind, self.rgb, self.array.shape, self.dtype.str, self.own)

    @property
    def shown(self) -> np.ndarray:
        """The pixels in the display dtype (themselves when no conversion is needed)."""
        return self.array.astype(self.dtype, copy=False)


def pieces_of(stream: str, header, array: np.ndarray) -> list[Piece]:
    """Split one received frame into what each of its layers shows.

    A 1-D frame is one row. The display dtype is applied here (float16 images as float32,
    float labels as exact integers). An axis named ``c`` (a position axis or one of the
    frame's own leading dimensions) splits the frame into one piece per channel."""
    if array.ndim == 1:
        array = array.reshape(1, -1)
    display = header.display
    kind = "labels" if display.kind == "labels" else "image"
    hint = getattr(display, "rgb", None)
    # labels are never detected as colour (a (..., 3) uint8 mask is labels), as in Fiji
    rgb = is_rgb(array.shape, array.dtype, hint) if kind == "image" or hint else False
    if rgb and kind == "labels":
        raise LayoutError("a labels frame cannot be RGB; send integer labels, or drop "
                          "labels=True (or pass rgb=False)")
    dtype = labels_dtype(array) if kind == "labels" else image_dtype(array.dtype)
    lead = array.ndim - (3 if rgb else 2)
    own = leading_axis_names(header.axes, header.axis_names, lead)
    axes = dict(header.axes)
    names = list(header.axis_names or header.axes)
    if CHANNEL_AXIS in own:
        at = own.index(CHANNEL_AXIS)
        if array.shape[at] > MAX_CHANNEL_LAYERS and CHANNEL_AXIS not in (header.axis_names or ()):
            raise LayoutError(
                f"this {tuple(array.shape)} frame would split into {array.shape[at]} channel "
                f"layers (its dimensions are named {', '.join(own)}, y, x), and napari shows at "
                f"most {MAX_CHANNEL_LAYERS} channels as layers. Name its leading axes (e.g. "
                f"axis_names=['t', 'z']) or send fewer channels")
        rest = own[:at] + own[at + 1:]
        names = [n for n in names if n != CHANNEL_AXIS]
        return [Piece((stream, c), header, array[(slice(None),) * at + (c,)], dtype, kind, rgb,
                      rest, axes, names) for c in range(array.shape[at])]
    if CHANNEL_AXIS in axes:
        channel = axes.pop(CHANNEL_AXIS)
        names = [n for n in names if n != CHANNEL_AXIS]
        return [Piece((stream, channel), header, array, dtype, kind, rgb, own, axes, names)]
    return [Piece((stream, None), header, array, dtype, kind, rgb, own, axes, names)]


def layer_name(key: tuple[str, int | None]) -> str:
    stream, channel = key
    return stream if channel is None else f"{stream} [c{channel}]"


def channel_colormap(channel: int | None, hint: str | None) -> str | None:
    """The colormap a layer gets: the frame's hint, else napari's channel cycle."""
    if hint or channel is None:
        return hint
    return CHANNEL_COLORMAPS[channel % len(CHANNEL_COLORMAPS)]


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

    def show(self, mode: str, run: list[Piece], shown=None) -> View:
        """Lay out a run of pieces of one geometry. `shown`: the data the layer shows now
        (None if it has no layer), so a ``replace`` can write into it in place."""
        geometry = (mode, *run[0].geometry)
        self.refused = []
        if geometry != self.geometry:
            self.reset()
            self.geometry = geometry
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
                       if n not in last.own and n.lower() in TIME_AXES), None)
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
