"""One received frame -> pieces, one per layer it shows in; plain NumPy, no napari, no Qt.

The first hop after the receiver: `layout.py` puts each piece's pixels into its layer's
array, and the napari adapter (`layers.py`, `image_layers.py`) turns that into layer
calls. Here:

* naming a frame's leading dimensions (one rule for napari and Fiji, docs/protocol.md);
* RGB/RGBA detection and the labels dtypes napari can show exactly;
* splitting an axis named ``c`` into one layer per channel, and their colormaps;
* the contrast rule: a hint fixes the range, else it follows the data until the user
  sets it by hand.

Everything is testable without a display (tests/test_layout.py).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from polystore.streaming.axis_names import canonical_axis

CHANNEL_AXIS = "c"
#: a frame splits into at most this many channel layers (each costs napari's main thread
#: about 0.15 s to create: 300 froze it for 90 s)
MAX_CHANNEL_LAYERS = 64
#: default names of unnamed leading dimensions, given from the end (innermost first)
DEFAULT_LEADING = ("t", "c", "z")
#: colormaps of channels without a colormap hint (napari's `channel_axis` cycle, CYMRGB)
CHANNEL_COLORMAPS = ("cyan", "yellow", "magenta", "red", "green", "blue")
#: float labels are checked for exactness in blocks of this many values (bounded memory)
_CHECK_BLOCK = 1 << 16


class LayoutError(ValueError):
    """A frame this display cannot show as sent; the message says why and what to send."""


# -- naming, colour, dtypes ------------------------------------------------------------------


def canonical_axes(header):
    """A frame or ROI header with its axis names as both viewers read them: synonyms
    (``time``, ``Channel``, ``slices``, docs/protocol.md) become t, c and z. The header
    itself when they are already (no copy for the common case)."""
    names = (*header.axes, *(header.axis_names or ()))
    if all(canonical_axis(name) == name for name in names):
        return header
    return msgspec.structs.replace(
        header, axes={canonical_axis(name): i for name, i in header.axes.items()},
        axis_names=None if header.axis_names is None else [canonical_axis(n)
                                                           for n in header.axis_names])


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


def frame_rgb(shape: Sequence[int], dtype: np.dtype, display) -> bool:
    """Whether a frame with these `display` hints is shown as RGB(A) (`is_rgb`); labels are
    never detected as colour (a (..., 3) uint8 mask is labels), as in Fiji, and ``rgb=True``
    on labels is a `LayoutError`."""
    hint = getattr(display, "rgb", None)
    if display.kind != "labels":
        return is_rgb(shape, dtype, hint)
    if hint:
        raise LayoutError("a labels frame cannot be RGB; send integer labels, or drop "
                          "labels=True (or pass rgb=False)")
    return False


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
    does (fractions, NaN, beyond 2^53); integer labels keep their dtype. Float labels are
    always int64, so a stream's dtype (and the frames its layer keeps) does not change when an
    id first passes 2^31: that would start the stream again."""
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
    return np.dtype(np.int64)


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


#: The widest contrast napari's controls survive: their ``hi - lo`` overflowed to infinity for
#: float64 data reaching both ends of its range, which broke the layer's controls for good.
WIDEST_CONTRAST = float(np.finfo(np.float64).max) / 2


def increasing(lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) as napari takes contrast limits: low < high, even for a constant frame of
    large values (where ``lo + 1`` equals ``lo``), and ``hi - lo`` finite."""
    lo, hi = min(lo, hi), max(lo, hi)
    lo, hi = max(lo, -WIDEST_CONTRAST), min(hi, WIDEST_CONTRAST)
    if hi <= lo:
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return lo, hi


class Contrast:
    """The contrast rule of one image layer (both viewers, docs/protocol.md): a
    ``contrast_limits`` hint fixes the range for the frames that carry it; otherwise it
    follows each new frame's min..max (RGB: 0-255) until the user sets it by hand, and from
    then on the user's setting stays."""

    def __init__(self) -> None:
        self.user_set = False

    def limits(self, hint: Sequence[float] | None, newest: np.ndarray,
               rgb: bool = False) -> list[float] | None:
        """The range to show now, or None to leave it as it is."""
        if hint:
            return list(increasing(float(hint[0]), float(hint[1])))
        if self.user_set:
            return None
        return [0.0, 255.0] if rgb else list(data_limits(newest))


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
    channels: int = 1  # how many channels the frame's own `c` dimension held (1: none)

    @property
    def geometry(self) -> tuple:
        """What a layer must be rebuilt or refitted for when it changes (and a stream started
        again: every piece of one frame has the same). The display dtype follows from the
        wire dtype and the kind, so it is not in it."""
        return (self.kind, self.rgb, self.array.shape, self.array.dtype.str, self.own,
                self.channels)

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
    rgb = frame_rgb(array.shape, array.dtype, display)
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
                      rest, axes, names, array.shape[at]) for c in range(array.shape[at])]
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
