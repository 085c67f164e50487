"""OME-Zarr (OME-NGFF) images, pyramids and HCS plates, with metadata from ome-zarr-models.

NGFF 0.5 on zarr v3 (``zarr_format=3``, the default) or 0.4 on zarr v2 for older readers.
The metadata objects are built and validated by `ome-zarr-models` (pydantic models of the
spec) rather than written as hand-made JSON: an invalid axis order or a scale that does not
match the pyramid fails before anything is stored. The arrays are plain zarr-python arrays,
so they can grow one time point at a time (:func:`append_frame`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from polystore.zarr.backend import WRITE_CONFIG, default_chunks, frame_axis_names
from polystore.zarr.store import require_zarr

__all__ = [
    "AXIS_TYPES",
    "DEFAULT_UNITS",
    "append_frame",
    "downsample",
    "image_level_path",
    "write_image",
    "write_plate",
]

AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
DEFAULT_UNITS = {"t": "second", "z": "micrometer", "y": "micrometer", "x": "micrometer"}
#: Pyramid levels are added while the previous level's larger side exceeds this.
PYRAMID_MIN_SIDE = 512
MAX_LEVELS = 6


def downsample(data: np.ndarray, labels: bool = False) -> np.ndarray:
    """Halve y and x: 2x2 means for images, every other pixel for labels (values stay ids)."""
    y, x = data.shape[-2] // 2 * 2, data.shape[-1] // 2 * 2
    cropped = data[..., :y, :x]
    if labels:
        return np.ascontiguousarray(cropped[..., ::2, ::2])
    blocks = cropped.reshape(*cropped.shape[:-2], y // 2, 2, x // 2, 2)
    mean = blocks.mean(axis=(-3, -1))
    if np.issubdtype(data.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(data.dtype)


def _level_count(shape: tuple[int, ...], levels: int | None) -> int:
    if levels is not None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if min(shape[-2:]) >> (levels - 1) < 1:
            raise ValueError(f"{levels} levels halve a {shape[-2:]} image below one pixel")
        return levels
    count, side = 1, max(shape[-2:])
    while side > PYRAMID_MIN_SIDE and count < MAX_LEVELS and min(shape[-2:]) >> count >= 1:
        side //= 2
        count += 1
    return count


def _axes(ndim: int, axes: str | Sequence[str] | None) -> list[str]:
    if axes is None:
        names = frame_axis_names(ndim)
        if names is None:
            raise ValueError(f"an OME-Zarr image has 2 to 5 dimensions, got {ndim}")
        return list(names)
    names = list(axes)
    if len(names) != ndim:
        raise ValueError(f"axes={axes!r} names {len(names)} dimensions, the data has {ndim}")
    unknown = [n for n in names if n not in AXIS_TYPES]
    if unknown:
        raise ValueError(f"OME-Zarr axes are t, c, z, y, x; got {unknown} in {axes!r}")
    return names


def _models(zarr_format: int) -> Any:
    try:
        if zarr_format == 3:
            from ome_zarr_models import v05 as models
            from ome_zarr_models.v05 import axes, hcs, image, multiscales, plate, well
        else:
            from ome_zarr_models import v04 as models
            from ome_zarr_models.v04 import axes, hcs, image, multiscales, plate, well
    except ImportError as exc:  # pragma: no cover - the zarr extra installs it
        raise ImportError(f"OME-Zarr metadata needs ome-zarr-models: pip install "
                          f"'polystore[zarr]' ({exc})") from None
    models.axes_, models.hcs_, models.image_ = axes, hcs, image
    models.multiscales_, models.plate_, models.well_ = multiscales, plate, well
    return models


def _ome_attributes(attrs_model: Any, zarr_format: int) -> dict[str, Any]:
    """Group attributes for a validated model: under "ome" in 0.5, top level in 0.4."""
    data = attrs_model.model_dump(exclude_none=True, mode="json")
    return {"ome": data} if zarr_format == 3 else data


def _read_ome(group: Any) -> dict[str, Any]:
    attrs = group.attrs.asdict()
    return attrs.get("ome", attrs)


def write_image(
    data: Any,
    store: Any,
    node: str,
    *,
    axes: str | Sequence[str] | None = None,
    scale: Mapping[str, float] | None = None,
    units: Mapping[str, str] | None = None,
    levels: int | None = None,
    labels: bool = False,
    name: str | None = None,
    chunks: tuple[int, ...] | None = None,
    compressors: Any = "auto",
    zarr_format: int = 3,
) -> None:
    """Write ``data`` as an OME-Zarr image group at ``node`` of ``store``: arrays ``0``,
    ``1``, ... (each halving y and x) and validated multiscales metadata, written last.

    ``axes`` default: the viewers' rule (``(n, y, x)`` is z, y, x; 5-D is t, c, z, y, x).
    ``scale``: physical pixel size per axis (default 1), in ``units`` (default micrometer
    for space, second for time).
    """
    zarr = require_zarr()
    models = _models(zarr_format)
    array = np.asarray(data)
    names = _axes(array.ndim, axes)
    unit_of = {**DEFAULT_UNITS, **(units or {})}
    size = {n: 1.0 for n in names} | {k: float(v) for k, v in (scale or {}).items()}
    count = _level_count(array.shape, levels)
    axis_models = [
        models.axes_.Axis(name=n, type=AXIS_TYPES[n], unit=unit_of.get(n) if n != "c" else None)
        for n in names
    ]
    datasets, level_data = [], array
    for level in range(count):
        factor = 2.0**level
        level_scale = [size[n] * (factor if n in ("y", "x") else 1.0) for n in names]
        shift = [size[n] * (factor - 1) / 2 if n in ("y", "x") and not labels else 0.0
                 for n in names]
        datasets.append(models.multiscales_.Dataset.build(
            path=str(level), scale=level_scale, translation=shift if any(shift) else None))
    multiscale_kw: dict[str, Any] = {"axes": axis_models, "datasets": datasets, "name": name,
                                     "type": "mean" if not labels else "nearest"}
    if zarr_format == 2:
        multiscale_kw["version"] = "0.4"
    multiscale = models.multiscales_.Multiscale(**multiscale_kw)
    attrs_kw: dict[str, Any] = {"multiscales": [multiscale]}
    if zarr_format == 3:
        attrs_kw["version"] = "0.5"
    image_attrs = models.image_.ImageAttrs(**attrs_kw)  # validates before anything is written
    if chunks is not None and (len(chunks) != array.ndim or not all(
            isinstance(n, (int, np.integer)) and n >= 1 for n in chunks)):
        raise ValueError(f"chunks={tuple(chunks)!r}: give one whole number >= 1 per axis of "
                         f"the {array.ndim}-D image ({''.join(names)}); nothing was written")

    group = zarr.open_group(store=store, path=node, mode="a", zarr_format=zarr_format)
    for existing in list(group.keys()):  # an earlier image's levels; nothing else it holds
        if existing.isdigit():
            del group[existing]
    for level in range(count):
        if level:
            level_data = downsample(level_data, labels=labels)
        options: dict[str, Any] = {"chunks": chunks or default_chunks(level_data.shape,
                                                                     level_data.dtype.itemsize),
                                   "compressors": compressors}
        if zarr_format == 3:
            options["dimension_names"] = names
        else:
            options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        target = group.create_array(str(level), shape=level_data.shape, dtype=level_data.dtype,
                                    fill_value=0, **options)
        target.with_config(WRITE_CONFIG)[...] = level_data
    group.update_attributes(_ome_attributes(image_attrs, zarr_format))


def image_level_path(group: Any, level: int = 0) -> str | None:
    """Path of resolution ``level`` of an OME-Zarr image group; None if it is no image."""
    multiscales = _read_ome(group).get("multiscales")
    if not multiscales:
        return None
    datasets = multiscales[0]["datasets"]
    if not 0 <= level < len(datasets):
        raise IndexError(f"the image has resolution levels 0..{len(datasets) - 1}, "
                         f"not {level}")
    return datasets[level]["path"]


def append_frame(group: Any, t: int, frame: np.ndarray) -> None:
    """Write time point ``t`` into every level of an OME-Zarr image whose first axis is t."""
    multiscales = _read_ome(group).get("multiscales")
    if not multiscales:
        raise IsADirectoryError(f"{group.path!r} is a zarr group, not an array or an OME-Zarr "
                                "image: a time point needs one of those")
    first_axis = multiscales[0]["axes"][0]["name"]
    if first_axis != "t":
        raise ValueError(f"the image's first axis is {first_axis!r}, not 't': it holds no "
                         "time series to append to")
    labels = multiscales[0].get("type") == "nearest"
    level_frame = frame
    for index, dataset in enumerate(multiscales[0]["datasets"]):
        array = group[dataset["path"]]
        if index:
            level_frame = downsample(level_frame, labels=labels)
        if tuple(array.shape[1:]) != level_frame.shape or array.dtype != frame.dtype:
            raise ValueError(
                f"frame {frame.shape} {frame.dtype} does not fit the image {group.path!r} "
                f"(level {index} frames are {tuple(array.shape[1:])} {array.dtype}); nothing "
                "more was written"
            )
        if t >= array.shape[0]:
            array.resize((t + 1, *array.shape[1:]))
        array.with_config(WRITE_CONFIG)[t:t + 1] = level_frame[None]


def _well_key(key: str) -> tuple[str, str]:
    row, sep, column = key.partition("/")
    if not sep or not row.isalnum() or not column.isalnum():
        raise ValueError(f"plate wells are named 'ROW/COLUMN' like 'A/1', got {key!r}")
    return row, column


def write_plate(
    wells: Mapping[str, Sequence[Any]],
    store: Any,
    node: str,
    *,
    name: str | None = None,
    zarr_format: int = 3,
    **image_options: Any,
) -> None:
    """Write an HCS plate: ``wells`` maps ``"A/1"`` to that well's fields (images); each
    field becomes ``A/1/0``, ``A/1/1``, ... with well and plate metadata written last."""
    zarr = require_zarr()
    models = _models(zarr_format)
    if not wells:
        raise ValueError("a plate needs at least one well")
    keys = [_well_key(k) for k in wells]
    rows = sorted({r for r, _ in keys})
    columns = sorted({c for _, c in keys}, key=lambda c: (len(c), c))
    field_count = max(len(fields) for fields in wells.values())
    version = {"version": "0.5"} if zarr_format == 3 else {"version": "0.4"}
    plate = models.plate_.Plate(
        name=name, field_count=field_count,
        rows=[{"name": r} for r in rows], columns=[{"name": c} for c in columns],
        wells=[{"path": f"{r}/{c}", "rowIndex": rows.index(r), "columnIndex": columns.index(c)}
               for r, c in keys], **version,
    )  # fmt: skip
    plate_attrs = models.hcs_.HCSAttrs(plate=plate, **({"version": "0.5"} if zarr_format == 3
                                                        else {}))
    root = zarr.open_group(store=store, path=node, mode="a", zarr_format=zarr_format)
    for (row, column), fields in zip(keys, wells.values(), strict=True):
        well_node = f"{node}/{row}/{column}".lstrip("/")
        for index, image in enumerate(fields):
            write_image(image, store, f"{well_node}/{index}", zarr_format=zarr_format,
                        **image_options)
        well_meta = {"images": [{"path": str(i)} for i in range(len(fields))]}
        if zarr_format == 3:
            well_attrs = models.well_.WellAttrs(well=well_meta, version="0.5")
        else:
            well_attrs = models.well_.WellAttrs(well={**well_meta, "version": "0.4"})
        zarr.open_group(store=store, path=well_node, mode="a", zarr_format=zarr_format
                        ).update_attributes(_ome_attributes(well_attrs, zarr_format))
    root.update_attributes(_ome_attributes(plate_attrs, zarr_format))
