"""One ROI model for files and streams: ImageJ ``.roi`` / ``.roi.zip`` <-> :class:`Roi`.

Streaming already sends :class:`polystore.streaming.protocol.Roi` (kind, ``(row, column)``
coordinates, label); the same objects are what the disk backend reads from and writes to
ImageJ ROI files, through `roifile` (Christoph Gohlke's reader/writer of ImageJ's binary
format) rather than hand-written bytes. Where a ROI lies in a hyperstack (channel, slice,
frame) travels as ``axes`` ``{"c": i, "z": j, "t": k}`` (0-based), like a ``Rois`` message's
``axes``; ImageJ stores them 1-based.

A ``point`` ROI may have several points (ImageJ's multi-point ROI) and a ``line`` more than
two (an open path: ImageJ's segmented line; its freehand lines and angles load as one too),
in files and streams alike. ImageJ's freehand and traced outlines load as polygons. A
composite (shape) ROI, a text or an image ROI has no polystore kind: loading one is refused,
naming it, rather than keeping only its bounding box.

:func:`labels_to_rois` turns a labels image into one polygon per label (scikit-image's
marching squares; ``pip install 'polystore[rois]'``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import msgspec
import numpy as np

from polystore.streaming import protocol as p
from polystore.streaming.errors import UnstreamableDataError
from polystore.streaming.protocol import ROI_POINT_COUNTS, Roi

__all__ = [
    "ROI_EXTENSIONS",
    "PositionedRoi",
    "decode_rois",
    "encode_rois",
    "from_imagej",
    "is_roi_path",
    "labels_to_rois",
    "to_imagej",
]

ROI_EXTENSIONS = (".roi.zip", ".roi")
#: ImageJ hyperstack position fields by polystore axis name.
_POSITION_FIELDS = {"c": "c_position", "z": "z_position", "t": "t_position"}
INSTALL_ROIS = "pip install 'polystore[rois]' (roifile, scikit-image)"


class PositionedRoi(NamedTuple):
    """A ROI and the plane it belongs to: ``axes`` such as ``{"c": 0, "z": 3, "t": 1}``
    (0-based; an axis left out means every plane along it)."""

    roi: Roi
    axes: dict[str, int]


def is_roi_path(path: Any) -> bool:
    """Whether ``path`` names an ImageJ ROI file (``.roi`` or ``.roi.zip``)."""
    return str(path).lower().endswith(ROI_EXTENSIONS)


def to_rois(data: Any) -> list[p.Roi]:
    """ROIs from `p.Roi` structs or dicts like ``{"kind": "polygon", "coords": [[y, x], ...],
    "label": "cell 1"}``."""
    if isinstance(data, (p.Roi, dict)):
        data = [data]
    try:
        rois = [r if isinstance(r, p.Roi) else msgspec.convert(_plain(r), p.Roi) for r in data]
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise UnstreamableDataError(
            f"ROIs must be polystore Roi objects or dicts with kind (polygon, rectangle, "
            f"ellipse, line, point), coords [[y, x], ...] and optional label: {exc}"
        ) from None
    return rois


def _plain(roi: Any) -> Any:
    """NumPy coordinates (arrays, float64 scalars) as plain lists of floats."""
    if isinstance(roi, dict) and "coords" in roi:
        return {**roi, "coords": np.asarray(roi["coords"], dtype=float).tolist()}
    return roi


def _roifile() -> Any:
    try:
        import roifile
    except ImportError as exc:
        raise ImportError(f"ImageJ ROI files need roifile: {INSTALL_ROIS} ({exc})") from None
    return roifile


def _check_axes(axes: Mapping[str, int] | None) -> dict[str, int]:
    axes = dict(axes or {})
    unknown = sorted(set(axes) - set(_POSITION_FIELDS))
    if unknown:
        raise ValueError(f"ImageJ ROIs are placed along c, z and t only, got axes {unknown}")
    for name, value in axes.items():
        if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < 65535:
            raise ValueError(f"ROI position {name}={value!r} must be a whole number 0..65534")
    return {k: int(v) for k, v in axes.items()}


#: what the 16-bit bounds of an ImageJ ROI (and a bound rounded outward) can hold
_IJ_MIN, _IJ_MAX = -32768, 32766
#: point counts a ROI file holds: a stream's fewest (ROI_POINT_COUNTS), but no most for an
#: open path or a multi-point, as for a polygon: a file holds as many as ImageJ wrote
FILE_POINT_COUNTS = {**ROI_POINT_COUNTS, "point": (1, None), "line": (2, None)}


def to_imagej(roi: Roi, axes: Mapping[str, int] | None = None) -> Any:
    """An ImageJ ROI (roifile.ImagejRoi) for a polystore :class:`Roi` at position ``axes``."""
    roifile = _roifile()
    kind = roi.kind
    yx = np.asarray(roi.coords, dtype=float)
    what = f"a {kind} ROI" + (f" {roi.label!r}" if roi.label else "")
    if not np.isfinite(yx).all():
        raise ValueError(f"{what} has a coordinate that is NaN or infinite; give finite "
                         "pixel coordinates")
    if yx.min() < _IJ_MIN or yx.max() > _IJ_MAX:  # ImageJ's bounds are 16-bit: they wrapped
        raise ValueError(f"{what} reaches {yx.min():g}..{yx.max():g}, and an ImageJ ROI "
                         f"file holds coordinates from {_IJ_MIN} to {_IJ_MAX} only")
    xy = yx[:, ::-1]
    integral = bool(np.all(xy == np.round(xy)))
    if kind in ("polygon", "point") or (kind == "line" and len(xy) > 2):
        points = xy.astype(np.int64) if integral else xy
        ij = roifile.ImagejRoi.frompoints(points, name=roi.label or "")
        ij.roitype = {"polygon": roifile.ROI_TYPE.POLYGON, "point": roifile.ROI_TYPE.POINT,
                      "line": roifile.ROI_TYPE.POLYLINE}[kind]  # a line of > 2: an open path
    else:
        ij = roifile.ImagejRoi()
        ij.name = roi.label or ""
        (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
        ij.left, ij.top = int(np.floor(x0)), int(np.floor(y0))
        ij.right, ij.bottom = int(np.ceil(x1)), int(np.ceil(y1))
        if kind == "line":
            ij.roitype = roifile.ROI_TYPE.LINE
            (ij.x1, ij.y1), (ij.x2, ij.y2) = (float(v) for v in xy[0]), (float(v) for v in xy[1])
            ij.options |= roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
        else:
            ij.roitype = roifile.ROI_TYPE.RECT if kind == "rectangle" else roifile.ROI_TYPE.OVAL
    for name, value in _check_axes(axes).items():
        setattr(ij, _POSITION_FIELDS[name], value + 1)
    if ij.version < 228:  # hyperstack positions need header version >= 228
        ij.version = 228
    return ij


def from_imagej(ij: Any) -> PositionedRoi:
    """A polystore :class:`Roi` and its position from an ImageJ ROI."""
    roifile = _roifile()
    T = roifile.ROI_TYPE
    what = f"ImageJ ROI {ij.name!r}" if ij.name else "an unnamed ImageJ ROI"
    if ij.composite:  # a ShapeRoi: outlines (holes, parts) that its RECT type only bounds
        raise ValueError(
            f"{what} is a composite (shape) ROI, made of several outlines, and a polystore "
            "ROI is one polygon, rectangle, ellipse, line or point: it would keep only its "
            "bounding box. In ImageJ, split it (ROI Manager > More >> Split) or leave it out, "
            "and save the set again")
    overlay = {roifile.ROI_SUBTYPE.TEXT: "a text", roifile.ROI_SUBTYPE.IMAGE: "an image"}
    if ij.subtype in overlay:
        raise ValueError(
            f"{what} is {overlay[ij.subtype]} ROI, which polystore's ROIs cannot hold "
            "(it would keep only its bounding box); leave it out of the set in ImageJ and "
            "save the set again")
    kind = {
        T.RECT: "rectangle",
        T.OVAL: "ellipse",
        T.LINE: "line",
        T.POINT: "point",
        # open paths: ImageJ's segmented, freehand and angle lines
        T.POLYLINE: "line",
        T.FREELINE: "line",
        T.ANGLE: "line",
    }.get(ij.roitype, "polygon")  # POLYGON, FREEHAND, TRACED: closed outlines
    if kind in ("rectangle", "ellipse"):
        coords = [[float(ij.top), float(ij.left)], [float(ij.bottom), float(ij.right)]]
    elif ij.roitype == T.LINE:  # a straight line: its ends, not a list of vertices
        coords = [[float(ij.y1), float(ij.x1)], [float(ij.y2), float(ij.x2)]]
    else:
        xy = np.asarray(ij.coordinates(), dtype=float)
        if len(xy) == 0:
            raise ValueError(f"{what} ({ij.roitype.name}) has no coordinates; leave it out "
                             "of the set in ImageJ and save the set again")
        coords = xy[:, ::-1].tolist()
        if len(coords) < {"polygon": 3, "line": 2}.get(kind, 1):  # too few for an outline
            kind = "line" if len(coords) == 2 else "point"
    axes = {name: getattr(ij, field) - 1 for name, field in _POSITION_FIELDS.items()
            if getattr(ij, field, 0) > 0}
    if not axes and getattr(ij, "position", 0) > 0:
        axes = {"z": ij.position - 1}  # a plain stack's slice
    # a multi-point drawn across a stack keeps each point's slice (a flat stack index)
    positions = getattr(ij, "counter_positions", None) if kind == "point" else None
    slices = set() if positions is None else {int(s) for s in positions if s}
    if len(slices) > 1:
        raise ValueError(
            f"{what} is a multi-point whose points lie on {len(slices)} different stack "
            "slices (ImageJ keeps each point's slice), which one polystore point ROI cannot "
            "hold: loaded, it would show on every plane and be saved back so. In ImageJ, add "
            "the points of each slice as a multi-point of their own, or leave it out, and save "
            "the set again")
    if slices and not axes:
        axes = {"z": slices.pop() - 1}  # every point on one slice: the ROI's slice
    return PositionedRoi(Roi(kind=kind, coords=coords, label=ij.name or None), axes)


def _positioned(data: Any, axes: Mapping[str, int] | None) -> list[PositionedRoi]:
    """Accept Roi objects/dicts (placed at ``axes``) or PositionedRoi items."""
    items = data if isinstance(data, list | tuple) else [data]
    if items and all(isinstance(i, PositionedRoi) for i in items):
        if axes:
            raise TypeError("axes= places plain ROIs; PositionedRoi items carry their own")
        placed = [PositionedRoi(i.roi, _check_axes(i.axes)) for i in items]
    else:
        try:
            rois = to_rois(data)
        except UnstreamableDataError as exc:  # the same message, as the ValueError it is
            raise ValueError(str(exc)) from None
        placed = [PositionedRoi(r, _check_axes(axes)) for r in rois]
    for roi, _ in placed:
        low, high = FILE_POINT_COUNTS.get(roi.kind, (3, None))
        if len(roi.coords) < low or (high is not None and len(roi.coords) > high):
            raise ValueError(f"a {roi.kind} ROI needs {low if low == high else f'>= {low}'} "
                             f"point(s), got {len(roi.coords)} (label {roi.label!r})")
    return placed


def encode_rois(data: Any, path: Any, axes: Mapping[str, int] | None = None) -> bytes:
    """The bytes of an ImageJ ``.roi`` (exactly one ROI) or ``.roi.zip`` file."""
    items = _positioned(data, axes)
    if not str(path).lower().endswith(".zip"):
        if len(items) != 1:
            raise ValueError(f"{path!s}: a .roi file holds exactly one ROI, got {len(items)}; "
                             "save several as .roi.zip")
        return _imagej_bytes(path, 0, *items[0])
    buffer, used = io.BytesIO(), set()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index, (roi, position) in enumerate(items):
            entry = _entry_name(roi.label, index, used)
            archive.writestr(entry + ".roi", _imagej_bytes(path, index, roi, position))
    return buffer.getvalue()


def _imagej_bytes(path: Any, index: int, roi: Roi, position: Mapping[str, int]) -> bytes:
    try:
        return to_imagej(roi, position).tobytes()
    except ValueError as exc:
        raise ValueError(f"{path!s}: ROI {index}: {exc}; nothing was written") from None


def _entry_name(label: str | None, index: int, used: set[str]) -> str:
    base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in (label or "")) or (
        f"roi-{index:04d}")
    name, n = base, 2
    while name in used:
        name, n = f"{base}-{n}", n + 1
    used.add(name)
    return name


def decode_rois(data: bytes, path: Any, positions: bool = False) -> list[Any]:
    """ROIs from the bytes of a ``.roi`` or ``.roi.zip`` file: a list of :class:`Roi`
    (``positions=True``: of :class:`PositionedRoi`)."""
    roifile = _roifile()
    raw: list[bytes] = []
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                raw = [archive.read(n) for n in archive.namelist() if n.lower().endswith(".roi")]
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{path!s} is not a readable ROI zip file: {exc}") from None
    else:
        raw = [data]
    items = []
    for index, entry in enumerate(raw):
        if entry[:4] != b"Iout":
            raise ValueError(f"{path!s} holds data that is not an ImageJ ROI (no 'Iout' header)")
        try:
            items.append(from_imagej(roifile.ImagejRoi.frombytes(entry)))
        except ValueError as exc:
            raise ValueError(f"{path!s}: ROI {index}: {exc}") from None
    return items if positions else [item.roi for item in items]


def labels_to_rois(
    labels: Any, *, tolerance: float = 0.5, prefix: str = ""
) -> list[Any]:
    """One polygon per label of a labels image (0 = background), named ``prefix + id``.

    2-D input gives a list of :class:`Roi`; N-D input (leading axes named by the viewers'
    rule, e.g. ``(z, y, x)``) a list of :class:`PositionedRoi`, one per label and plane.
    ``tolerance`` (pixels) simplifies the outline; 0 keeps every marching-squares vertex.
    """
    try:
        from skimage import measure
    except ImportError as exc:
        raise ImportError(f"labels_to_rois needs scikit-image: {INSTALL_ROIS} ({exc})") from None
    from polystore.zarr.backend import frame_axis_names

    array = np.asarray(labels)
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of >= 2 dimensions, got "
                         f"{array.ndim}-D {array.dtype}")
    if array.ndim == 2:
        return _plane_rois(array, measure, tolerance, prefix)
    names = frame_axis_names(array.ndim)
    if names is None or not set(names[:-2]) <= set(_POSITION_FIELDS):
        raise ValueError(f"labels of {array.ndim} dimensions have no c/z/t naming")
    found: list[Any] = []
    for index in np.ndindex(*array.shape[:-2]):
        position = dict(zip(names[:-2], map(int, index), strict=True))
        found += [PositionedRoi(roi, position)
                  for roi in _plane_rois(array[index], measure, tolerance, prefix)]
    return found


def _plane_rois(plane: np.ndarray, measure: Any, tolerance: float, prefix: str) -> list[Roi]:
    rois = []
    padded = np.pad(plane, 1)
    for label in np.unique(plane):
        if label == 0:
            continue
        contours = measure.find_contours((padded == label).astype(np.uint8), 0.5)
        outline = max(contours, key=len) - 1.0  # the outer boundary, back in image coords
        if tolerance > 0:
            outline = measure.approximate_polygon(outline, tolerance)
        if len(outline) > 1 and np.allclose(outline[0], outline[-1]):
            outline = outline[:-1]  # ImageJ polygons close themselves
        if len(outline) >= 3:
            rois.append(Roi(kind="polygon", coords=outline.tolist(), label=f"{prefix}{label}"))
    return rois


def group_by_position(items: Iterable[PositionedRoi]) -> dict[tuple, list[Roi]]:
    """ROIs grouped by plane, for sending each group as one ``Rois`` message."""
    groups: dict[tuple, list[Roi]] = {}
    for roi, axes in items:
        groups.setdefault(tuple(sorted(axes.items())), []).append(roi)
    return groups
