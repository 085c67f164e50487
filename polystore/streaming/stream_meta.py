"""What every frame of one stream repeats, checked once, and the array a frame carries.

`StreamMeta` is the part of a frame header that stays the same frame after frame (stream key,
axes, axis names, display hints): validated once against the protocol's own field rules and
reused for every frame that shares it, so no header is encoded, decoded and encoded again.
`display_hints` turns `save()`'s display keywords into the header's `Display`;
`to_wire_array` makes a frame's data an array of a dtype the protocol carries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

from polystore.streaming import protocol as p
from polystore.streaming.axis_names import repeated_axis
from polystore.streaming.checks import check_rois
from polystore.streaming.errors import UnstreamableDataError
from polystore.streaming.header_template import HeaderTemplate


class _StreamFields(msgspec.Struct, omit_defaults=True):
    """The frame header fields a `StreamMeta` holds, with the protocol's own constraints."""

    stream: p.StreamKey
    axis_names: Annotated[list[p.AxisName], Meta(max_length=6)] | None = None
    display: p.Display = msgspec.field(default_factory=p.Display)


_AXIS_LIMIT = 1_000_000  # protocol.Axes: an index is 0..1,000,000


@dataclass(frozen=True, eq=False)
class StreamMeta:
    """What every frame of one stream repeats (stream key, axis names, display hints):
    built by `StreamMeta.build`, which checks it exactly as a receiver will, so a frame
    header needs only its own fields checked: path, shape, dtype and `axes`, the frame's
    position, which changes from frame to frame."""

    stream: str
    axis_names: list[str] | None
    display: p.Display
    _templates: dict[tuple, HeaderTemplate] = field(default_factory=dict, init=False,
                                                     repr=False)

    @classmethod
    def build(
        cls,
        stream: str,
        axis_names: Sequence[str] | None = None,
        display: p.Display | None = None,
        *,
        what: str = "",
    ) -> StreamMeta:
        """Validate once; `what` names the item in the error (e.g. its path)."""
        raw = {"stream": stream,
               "axis_names": list(axis_names) if axis_names is not None else None,
               "display": display if display is not None else p.Display()}  # fmt: skip
        try:
            fields = msgspec.convert(raw, _StreamFields, from_attributes=True)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise UnstreamableDataError(f"cannot stream {what or stream}: {exc}") from None
        if fields.axis_names is not None and (problem := repeated_axis(fields.axis_names)):
            raise UnstreamableDataError(f"cannot stream {what or stream}: {problem}")
        return cls(fields.stream, fields.axis_names, fields.display)

    def checked_axes(self, axes: dict[str, int] | None, what: str) -> dict[str, int]:
        """A frame's position (``{"t": 3, "c": 1}``) under the protocol's rules: at most 6
        names of 1..32 characters, each named by `axis_names` if given, and whole-number
        indices 0..1,000,000."""
        if not axes:
            return {}
        problem = ""
        if not isinstance(axes, dict) or len(axes) > 6:
            problem = "axes must be a dict of at most 6 axis names to indices"
        else:
            checked = {}
            for name, index in axes.items():
                if not isinstance(name, str) or not 1 <= len(name) <= 32:
                    problem = f"axis name {name!r} must be a string of 1 to 32 characters"
                elif isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                        or not 0 <= index <= _AXIS_LIMIT:
                    problem = (f"axes[{name!r}] = {index!r} must be a whole number from 0 to "
                               f"{_AXIS_LIMIT:,}")
                elif self.axis_names is not None and name not in self.axis_names:
                    problem = (f"axis_names {self.axis_names} must name every key of axes "
                               f"{list(axes)}")
                if problem:
                    break
                checked[name] = int(index)
            if self.axis_names is None:  # else `build` checked the names these are among
                problem = problem or repeated_axis(checked)
        if problem:
            raise UnstreamableDataError(f"cannot stream {what}: {problem}")
        return checked

    def header_template(self, path: str, shape: tuple[int, ...], dtype: np.dtype,
                        max_frame_bytes: int) -> HeaderTemplate:
        """The header of this stream's frames at `path` of `shape` and `dtype`, encoded once
        and remembered (a pipeline saves the same names and shapes again and again). Only
        the frame's own fields are checked, exactly as a receiver will check them: the rest
        was checked by `build`."""
        key = (path, shape, dtype, max_frame_bytes)
        template = self._templates.get(key)
        if template is None:
            header = self._frame_header(path, shape, dtype, max_frame_bytes)
            template = HeaderTemplate(header, encode_header(header, path))
            if len(self._templates) >= 256:
                self._templates.clear()
            self._templates[key] = template
        return template

    def _frame_header(self, path: str, shape: tuple[int, ...], dtype: np.dtype,
                      max_frame_bytes: int) -> p.Frame:
        """A checked header with none of a frame's own fields (`HeaderTemplate`)."""
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        problem = ""
        if len(path) > 4096:
            problem = f"its path is {len(path)} characters long (at most 4096)"
        elif max(shape) > p.MAX_DIM:
            problem = f"shape {list(shape)} has a dimension above {p.MAX_DIM}"
        elif nbytes > max_frame_bytes:
            problem = f"frame of {nbytes} bytes exceeds the receiver's limit of {max_frame_bytes}"
        elif self.display.rgb and not (len(shape) >= 3 and shape[-1] in (3, 4)
                                       and dtype == np.uint8):
            problem = (f"display.rgb=true needs a uint8 frame of shape (..., rows, columns, 3 "
                       f"or 4); got {list(shape)} {dtype}. Send colour values last as uint8, "
                       "or drop rgb")
        if problem:
            raise UnstreamableDataError(f"cannot stream {path}: {problem}")
        return p.Frame(v=p.VERSION, seq=0, stream=self.stream, path=path, shape=list(shape),
                       dtype=wire_dtype_name(dtype), nbytes=nbytes, sent_ns=0,
                       axis_names=self.axis_names, display=self.display)  # fmt: skip

    def encoded_rois(self, seq: int, path: str, rois: list[p.Roi],
                     axes: dict[str, int]) -> bytes:
        """The encoded message carrying `rois` of this (image) stream, checked as a receiver
        will, header size included (a larger one would be refused without its sequence
        number, so its credit would never come back)."""
        message = p.Rois(v=p.VERSION, seq=seq, stream=self.stream, path=path,
                         sent_ns=time.time_ns(), rois=rois, axes=axes,
                         axis_names=self.axis_names)  # fmt: skip
        for index, roi in enumerate(rois):  # JSON would carry NaN as null: refused later
            if not all(math.isfinite(v) for point in roi.coords for v in point):
                label = f" {roi.label!r}" if roi.label else ""
                raise UnstreamableDataError(
                    f"cannot stream {path}: ROI {index} ({roi.kind}{label}) has a coordinate "
                    "that is NaN or infinite; give finite pixel coordinates, or leave that "
                    "ROI out")
        try:
            check_rois(message)
        except p.ProtocolError as exc:
            raise UnstreamableDataError(f"cannot stream {path}: {exc}") from None
        data = encode_header(message, path)
        if len(data) > p.MAX_HEADER_BYTES:
            points = sum(len(roi.coords) for roi in rois)
            raise UnstreamableDataError(
                f"cannot stream {path}: {len(rois)} ROIs with {points} points in all encode to "
                f"{len(data):,} bytes, and a ROI message may hold at most "
                f"{p.MAX_HEADER_BYTES:,}. Send them as several sets (other paths), fewer "
                f"points, or simpler outlines (labels_to_rois(..., tolerance=2))")
        return data


def encode_header(message: p.Frame | p.Rois, path: str) -> bytes:
    """`p.encode(message)`, with a clear error for text that is not valid UTF-8 (a file name
    from `os.listdir` that is not UTF-8 holds lone surrogates, which JSON cannot carry)."""
    try:
        return p.encode(message)
    except UnicodeEncodeError as exc:
        raise UnstreamableDataError(
            f"cannot stream {path!r}: its path, stream, labels or a name in it are not valid "
            f"UTF-8 ({exc.reason}: {exc.object[exc.start:exc.end]!r}), and the protocol "
            f"carries text as UTF-8. Rename the file, or pass stream= and a path made with "
            f"os.fsencode(name).decode('utf-8', 'replace')") from None


def display_hints(
    *,
    kind: str | None = None,
    labels: bool = False,
    contrast_limits: Sequence[float] | None = None,
    what: str = "",
    **fields: Any,
) -> p.Display:
    """`save()`'s display keywords (kind or labels=True, contrast_limits and every other
    field of `protocol.Display`: colormap, mode, opacity, ...) as a validated `Display`."""
    unknown = sorted(set(fields) - set(p.Display.__struct_fields__))
    if unknown:
        raise TypeError(f"unknown save() option(s) {unknown} for {what}: the display hints "
                        f"are labels, {', '.join(p.Display.__struct_fields__)}")
    try:
        raw = {k: v for k, v in fields.items() if v is not None}
        raw["kind"] = "labels" if labels else (kind or "image")
        if raw["kind"] == "labels" and raw.get("rgb"):
            raise ValueError("labels are never RGB (docs/protocol.md): drop rgb=True, or send "
                             "the colours as an image")
        if contrast_limits is not None:
            raw["contrast_limits"] = limits = [float(v) for v in contrast_limits]
            # JSON has no NaN or infinity: they would travel as null, and the receiver would
            # reject every frame of the stream
            if not all(math.isfinite(v) for v in limits):
                raise ValueError(f"contrast_limits must be finite numbers [low, high], got "
                                 f"{limits}; compute them with np.nanmin and np.nanmax over "
                                 f"the finite pixels, or leave them out to follow the data")
            if len(limits) == 2 and not limits[0] < limits[1]:  # napari refuses it too
                raise ValueError(f"contrast_limits must be [low, high] with low below high, "
                                 f"got {limits}; swap them, or widen an empty range")
        return msgspec.convert(raw, p.Display)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise UnstreamableDataError(f"bad display hint for {what}: {exc}") from None


_WIRE_NAMES: dict[np.dtype, str] = {}  # dtype -> protocol name ('' if not allowed)


def wire_dtype_name(dtype: np.dtype) -> str:
    """The protocol's name of `dtype` ('' if it cannot travel), cached: NumPy computes
    ``dtype.name`` in Python every time."""
    name = _WIRE_NAMES.get(dtype)
    if name is None:
        name = dtype.name if dtype.name in p.DTYPES else ""  # .name ignores byte order
        _WIRE_NAMES[dtype] = name
    return name


def to_wire_array(data: Any) -> np.ndarray:
    """View `data` as a NumPy array of an allowed dtype, copying only when unavoidable.

    Accepts NumPy arrays (any strides or byte order), torch tensors (CPU or CUDA), CuPy arrays
    and anything with ``__array__``. Booleans become uint8.
    """
    if type(data) is not np.ndarray:
        module = type(data).__module__.split(".")[0]
        if module == "torch":
            data = data.detach().cpu().numpy()
        elif module == "cupy":
            data = data.get()
        elif isinstance(data, np.ndarray) or hasattr(data, "__array__"):
            data = np.asarray(data)
        else:
            raise UnstreamableDataError(
                f"cannot stream {type(data).__name__}: pass a NumPy array or an object with "
                "__array__ (torch and CuPy arrays work too)"
            )
    dtype = data.dtype
    if dtype.kind == "b":
        data = data.view(np.uint8)
    elif not wire_dtype_name(dtype):
        raise UnstreamableDataError(
            f"cannot stream dtype {dtype}: allowed are {', '.join(p.DTYPES)}; convert first "
            "(e.g. np.abs(z).astype('float32') for complex data)"
        )
    if not 1 <= data.ndim <= p.MAX_NDIM:
        raise UnstreamableDataError(
            f"cannot stream a {data.ndim}-d array: 1 to {p.MAX_NDIM} dimensions are allowed"
        )
    return data
