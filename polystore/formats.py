"""File formats by extension: one table of encoders and decoders shared by disk and memory.

Each :class:`Format` turns data into bytes written to a binary file object (``write``) and a
path or binary file object back into data (``read``). The disk backend writes through
:func:`polystore.atomic.atomic_write`; the memory backend uses the same table to decode
files it holds as raw bytes. Other modules add formats with :func:`register_format`.

Every format uses a well-kept library: NumPy (``.npy``, ``.npz``), tifffile (``.tif``),
imageio (``.png``, ``.jpg``, ``.bmp``, ``.gif``: one NumPy-in, NumPy-out call per format on
top of Pillow, with multi-frame GIFs as stacks, where Pillow alone would need per-mode
conversions), the standard library's ``json`` and ``csv``, and pandas for a DataFrame when
it is installed. ``bytes`` are written verbatim to any extension.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import IO, Any

import numpy as np
import tifffile

from polystore.errors import (
    FormatDataError,
    FormatReadError,
    ImageLoadError,
    UnsupportedFormatError,
)

__all__ = [
    "BYTES_TYPES",
    "FORMATS",
    "FORMAT_NAMES",
    "Format",
    "check",
    "decode",
    "encode",
    "format_for",
    "register_format",
    "to_numpy",
    "write",
]

BYTES_TYPES = (bytes, bytearray, memoryview)
Source = str | IO[bytes]


@dataclass(frozen=True)
class Format:
    """How one family of extensions is written and read."""

    name: str
    extensions: tuple[str, ...]
    #: What ``save`` accepts, for error messages ("a NumPy-compatible array", ...).
    accepts: str
    write: Callable[[Any, IO[bytes], str, dict[str, Any]], None]
    read: Callable[[Source, str, dict[str, Any]], Any]
    #: ``check(data, path)`` raises FormatDataError for data ``write`` would refuse, without
    #: encoding it (the memory backend checks what it is given with it); None: :func:`check`
    #: runs ``write`` into a scratch buffer.
    check: Callable[[Any, str], None] | None = None


#: extension (lower case, with its dot; compound ones like ".ome.tif" allowed) -> Format
FORMATS: dict[str, Format] = {}


class _FormatNames(Mapping[str, str]):
    """A live, read-only view extension -> format name ('.tif' -> 'tiff')."""

    def __getitem__(self, ext: str) -> str:
        return FORMATS[ext].name

    def __iter__(self) -> Iterator[str]:
        return iter(FORMATS)

    def __len__(self) -> int:
        return len(FORMATS)


#: extension -> format name, always in step with FORMATS (``DiskBackend.FORMATS`` too).
FORMAT_NAMES: Mapping[str, str] = _FormatNames()


def register_format(fmt: Format) -> None:
    """Add (or replace) the format for each of ``fmt.extensions``."""
    for ext in fmt.extensions:
        FORMATS[ext.lower()] = fmt


def format_for(path: Any) -> Format | None:
    """The format of the longest registered extension ``path`` ends with, else None."""
    name = PurePath(str(path)).name.lower()
    best = None
    for ext in FORMATS:
        if name.endswith(ext) and (best is None or len(ext) > len(best)):
            best = ext
    return FORMATS[best] if best else None


def supported_extensions() -> list[str]:
    return sorted(FORMATS)


def to_numpy(data: Any) -> np.ndarray:
    """A NumPy array from NumPy, torch (any device) or CuPy data, without importing them."""
    module = type(data).__module__.split(".", 1)[0]
    if module == "torch":
        return data.detach().cpu().numpy()
    if module == "cupy":
        return data.get()
    return np.asarray(data)


def _describe(data: Any) -> str:
    if isinstance(data, np.ndarray):
        return f"a {data.dtype} array of shape {data.shape}"
    name = f"{type(data).__module__}.{type(data).__qualname__}".replace("builtins.", "")
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _numeric_array(data: Any, path: str, accepts: str) -> np.ndarray:
    if isinstance(data, str | Mapping) or data is None:
        raise FormatDataError(path, _describe(data), accepts)
    try:
        array = to_numpy(data)
    except (TypeError, ValueError):
        raise FormatDataError(path, _describe(data), accepts) from None
    if array.dtype.kind not in "biufc":
        raise FormatDataError(path, _describe(array), accepts)
    return array


def _no_kwargs(fmt: str, kwargs: dict[str, Any], operation: str = "save() to") -> None:
    if kwargs:
        raise TypeError(f"{operation} {fmt} got unexpected keyword arguments {sorted(kwargs)}")


# -- NumPy ----------------------------------------------------------------------------------
_NPY_ACCEPTS = "a numeric array (NumPy, torch, CuPy, or nested lists of numbers)"


def _write_npy(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    _no_kwargs(".npy", kwargs)
    np.save(handle, _numeric_array(data, path, _NPY_ACCEPTS), allow_pickle=False)


def _check_npy(data: Any, path: str) -> None:
    _numeric_array(data, path, _NPY_ACCEPTS)


def _damaged(path: str, kind: str, exc: BaseException | str) -> FormatReadError:
    return FormatReadError(
        f"Cannot read {path!r} as {kind}: {exc} (the file is damaged, truncated, or not "
        f"a {kind} file; load it as bytes with read_bytes() to inspect it)"
    )


def _read_npy(source: Source, path: str, kwargs: dict[str, Any]) -> Any:
    try:
        return np.load(source, allow_pickle=False, **kwargs)
    except (ValueError, EOFError) as exc:  # numpy calls any bad header "pickled data"
        if str(exc).startswith("Object arrays cannot be loaded"):  # intact, but pickled
            raise FormatReadError(
                f"Cannot read {path!r}: it is an NPY file of Python objects (dtype=object), "
                "stored as a pickle, which polystore never loads (loading a pickle can run "
                "code). Save the data as a numeric array, or load it with numpy.load("
                "allow_pickle=True) if you trust the file") from exc
        raise _damaged(path, "NPY", exc) from exc


_NPZ_ACCEPTS = "a numeric array, a list of arrays, or a dict of name -> array"


def _unique_names(keys: Iterable[Any], name: Callable[[Any], str], path: str, given: str,
                  accepts: str) -> None:
    """Refuse keys that the format stores under one name (1 and '1'): one would replace the
    other in the file."""
    seen: dict[str, Any] = {}
    for key in keys:
        written = name(key)
        if written in seen:
            raise FormatDataError(
                path,
                f"{given} with the keys {seen[written]!r} and {key!r}, both stored as "
                f"{written!r} (one would silently replace the other)",
                f"{accepts}; rename one of the two keys",
            )
        seen[written] = key


def _npz_arrays(data: Any, path: str) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        _unique_names(data, str, path, _describe(data), _NPZ_ACCEPTS)
        return {str(k): _numeric_array(v, path, _NPZ_ACCEPTS) for k, v in data.items()}
    if isinstance(data, list | tuple) and data and all(np.ndim(d) > 0 for d in data):
        return {f"arr_{i}": _numeric_array(v, path, _NPZ_ACCEPTS) for i, v in enumerate(data)}
    return {"arr_0": _numeric_array(data, path, _NPZ_ACCEPTS)}


def _check_npz(data: Any, path: str) -> None:
    _npz_arrays(data, path)


def _write_npz(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    compress = kwargs.pop("compress", False)
    _no_kwargs(".npz", kwargs)
    arrays = _npz_arrays(data, path)
    # What np.savez does, without its keyword arguments: a dict key "file" or
    # "allow_pickle" is an array name like any other.
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(handle, "w", compression=mode, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _read_npz(source: Source, path: str, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False, **kwargs) as archive:
            # by member name: archive["a.npy"] is the member of key "a" (member "a.npy"),
            # not key "a.npy" (member "a.npy.npy"), when a file holds both
            return {name: archive[member]
                    for member, name in zip(archive.zip.namelist(), archive.files, strict=True)}
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _damaged(path, "NPZ", exc) from exc


# -- TIFF -----------------------------------------------------------------------------------
_TIFF_ACCEPTS = "a numeric array (NumPy, torch or CuPy); tifffile.imwrite keywords apply"


def _tiff_array(data: Any, path: str) -> np.ndarray:
    array = _numeric_array(data, path, _TIFF_ACCEPTS)
    if array.dtype.kind in "fc" and array.dtype.itemsize > (8 if array.dtype.kind == "f" else 16):
        # tifffile writes them, but no TIFF reader (tifffile included) reads them back
        raise FormatDataError(
            path, _describe(array), _TIFF_ACCEPTS + "; extended precision has no TIFF "
            "form: convert to float64/complex128, or save it to .npy"
        )
    return array


def _check_tiff(data: Any, path: str) -> None:
    _tiff_array(data, path)


def _write_tiff(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    array = _tiff_array(data, path)
    if array.ndim >= 2:
        # Never guess RGB from a trailing axis of 3/4: N-D data are stacks of planes.
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(handle, array, **kwargs)


_TIFF_INDICES = ("key", "series", "level")


def _tiff_index_error(source: Source, path: str, kwargs: dict[str, Any],
                      exc: BaseException | None) -> FormatReadError:
    """The error for a page, series or level the file does not have, saying what it has."""
    if not isinstance(source, str):
        source.seek(0)
    with tifffile.TiffFile(source) as tif:
        pages, series = len(tif.pages), tif.series
        levels = len(series[0].levels) if series else 0
    asked = ", ".join(f"{k}={kwargs[k]!r}" for k in _TIFF_INDICES if k in kwargs)
    detail = f" ({exc})" if exc is not None else ""
    return FormatReadError(
        f"Cannot read {asked} of {path!r}: the file has {pages} page(s) (key=0..{pages - 1}, "
        f"or a slice or list of those), {len(series)} series (series=0..{len(series) - 1}) "
        f"and {levels} resolution level(s) (level=0..{levels - 1}){detail}; ask for one it "
        "has, or load it without them for the whole first series"
    )


def _is_index(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _negative_index_missing(source: Source, key: Any, series: Any) -> bool:
    """Whether a negative ``key``/``series`` lies before the first page/series (tifffile
    counts round again from the end: key=-3 of 2 pages reads page 1)."""
    if not isinstance(source, str):
        source.seek(0)
    with tifffile.TiffFile(source) as tif:
        n_series = len(tif.series)
        if series is not None and not -n_series <= series < n_series:
            return True
        pages = tif.pages if series is None else tif.series[series].pages
        missing = _is_index(key) and not -len(pages) <= key < len(pages)
    if not isinstance(source, str):
        source.seek(0)
    return missing


def _read_tiff(source: Source, path: str, kwargs: dict[str, Any]) -> Any:
    key, series = kwargs.get("key"), kwargs.get("series")
    if (series is None or _is_index(series)) and (
        (_is_index(key) and key < 0) or (_is_index(series) and series < 0)
    ) and _negative_index_missing(source, key, series):
        raise _tiff_index_error(source, path, kwargs, None)
    try:
        array = tifffile.imread(source, **kwargs)
    except tifffile.TiffFileError as exc:
        raise _damaged(path, "TIFF", exc) from exc
    except (IndexError, TypeError) as exc:
        if not any(k in kwargs for k in _TIFF_INDICES) or "keyword" in str(exc):
            raise
        raise _tiff_index_error(source, path, kwargs, exc) from exc
    if getattr(array, "size", 1) == 0:  # tifffile returns an empty array when no page reads
        if not isinstance(source, str):
            source.seek(0)
        with tifffile.TiffFile(source) as tif:
            if len(tif.pages) == 0:
                raise _damaged(path, "TIFF", "no readable page")
    return array


# -- 8-bit images through imageio -----------------------------------------------------------
def _image_shape_ok(name: str, array: np.ndarray) -> bool:
    """What the Pillow writer behind imageio stores exactly: 16 bits only for grey PNG,
    alpha only in PNG (JPEG refuses it, BMP and GIF drop it)."""
    dtype, ndim, last = array.dtype.name, array.ndim, array.shape[-1] if array.ndim else 0
    if name == "png":
        rgb_or_rgba = ndim == 3 and last in (3, 4)
        return (dtype == "uint8" and (ndim == 2 or rgb_or_rgba)) or (
            dtype == "uint16" and ndim == 2
        )
    if dtype != "uint8":
        return False
    if name == "gif":  # a frame (y, x[, 3]) or a stack (n, y, x[, 3])
        return ndim == 2 or (ndim == 3 and last != 4) or (ndim == 4 and last == 3)
    return ndim == 2 or (ndim == 3 and last == 3)


def _most_gif_colours(array: np.ndarray) -> int:
    """The largest number of distinct colours in one frame (GIF keeps at most 256; Pillow
    silently quantises the rest)."""
    if array.shape[-1] != 3 or array.ndim == 2:
        return 0  # grey frames: at most 256 levels
    frames = array.reshape(-1, *array.shape[-3:]) if array.ndim == 4 else array[None]
    packed = (
        frames[..., 0].astype(np.uint32) << 16
        | frames[..., 1].astype(np.uint32) << 8
        | frames[..., 2]
    )
    return max(len(np.unique(frame)) for frame in packed)


_IMAGE_ACCEPTS = {
    "png": "a uint8 or uint16 array of shape (y, x), or a uint8 (y, x, 3) or (y, x, 4)",
    "jpeg": "a uint8 array of shape (y, x) or (y, x, 3) (no alpha; lossy)",
    "bmp": "a uint8 array of shape (y, x) or (y, x, 3) (no alpha)",
    "gif": "a uint8 frame (y, x) or (y, x, 3), or a stack (n, y, x[, 3]), with at most 256 "
    "colours per frame (no alpha)",
}


def _image_format(name: str, extensions: tuple[str, ...]) -> Format:
    accepts = _IMAGE_ACCEPTS[name]

    def write_image(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
        import imageio.v3 as iio

        array = _numeric_array(data, path, accepts)
        if not _image_shape_ok(name, array) or array.size == 0:
            empty = " (no pixels: an image needs at least one)" if array.size == 0 else ""
            raise FormatDataError(path, _describe(array) + empty, accepts)
        if name == "gif" and (colours := _most_gif_colours(array)) > 256:
            raise FormatDataError(
                path, f"{_describe(array)} with {colours} colours in a frame", accepts
            )
        if name == "gif" and (array.ndim == 2 or array.shape[-1] != 3):
            # Grey frames with the whole grey ramp as their palette, unoptimised: Pillow
            # reads that palette back as grey ("L"), where an optimised one reads as RGB.
            kwargs.setdefault("optimize", False)
        iio.imwrite(handle, array, extension=extensions[0], **kwargs)

    def read_image(source: Source, path: str, kwargs: dict[str, Any]) -> Any:
        import imageio.v3 as iio

        try:
            image = iio.imread(source, extension=extensions[0], **kwargs)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageLoadError(f"Cannot read {path!r} as {name.upper()}: {exc}") from exc
        if name == "gif" and "index" not in kwargs and image.ndim >= 3 and len(image) == 1:
            return image[0]  # one frame: the frame, as saved (imageio stacks even one)
        return image

    return Format(name, extensions, accepts, write_image, read_image)


# -- text -----------------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    """Let numpy scalars and arrays pass through json.dump as plain numbers and lists."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_JSON_ACCEPTS = "JSON-serialisable data"
_JSON_KEY_TYPES = (str, int, float, bool, type(None))


def _json_key(key: Any) -> str:
    return key if isinstance(key, str) else json.dumps(key)


def _json_unique_keys(data: Any, path: str) -> None:
    """Refuse a dict whose keys JSON writes alike (1 and '1', True and 'true'): the file
    would hold the name twice and a reader keeps only the last."""
    stack, seen = [data], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue  # json.dumps reports the circular reference
        if isinstance(item, Mapping):
            seen.add(id(item))
            if not all(isinstance(k, str) for k in item) and all(
                isinstance(k, _JSON_KEY_TYPES) for k in item
            ):
                _unique_names(item, _json_key, path, "a dict", _JSON_ACCEPTS)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            seen.add(id(item))
            stack.extend(item)


def _write_json(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("default", _json_default)
    # Standard JSON has no NaN or infinity: Python writes them as NaN/Infinity, which other
    # JSON readers refuse. allow_nan=True writes them all the same.
    kwargs.setdefault("allow_nan", False)
    _json_unique_keys(data, path)
    try:
        text = json.dumps(data, **kwargs)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise FormatDataError(path, _describe(data), f"{_JSON_ACCEPTS} ({exc})") from exc
        raise FormatDataError(
            path,
            f"{_describe(data)} holding NaN or infinity",
            f"{_JSON_ACCEPTS} without NaN or infinity (standard JSON has no such numbers and "
            "other readers refuse Python's NaN/Infinity): replace them with None, save "
            "the numbers to .npy or .csv, or pass allow_nan=True to write them anyway",
        ) from exc
    except TypeError as exc:
        raise FormatDataError(path, _describe(data), f"{_JSON_ACCEPTS} ({exc})") from exc
    handle.write(text.encode("utf-8"))


def _not_utf8(path: str, exc: UnicodeDecodeError) -> FormatReadError:
    return FormatReadError(
        f"Cannot read {path!r} as text: it is not UTF-8 ({exc}); polystore reads and writes "
        "text files as UTF-8. Load it as bytes with read_bytes() and decode it with its "
        "encoding (for example data.decode('latin-1')), or save it again as UTF-8"
    )


def _text(source: Source, path: str) -> str:
    try:
        if isinstance(source, str):
            with open(source, encoding="utf-8", newline="") as handle:
                return handle.read()
        return io.TextIOWrapper(source, encoding="utf-8", newline="").read()
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc


def _read_json(source: Source, path: str, kwargs: dict[str, Any]) -> Any:
    text = _text(source, path)
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise _damaged(path, "JSON", exc) from exc


def _write_text(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    _no_kwargs(".txt", kwargs)
    if not isinstance(data, str):
        raise FormatDataError(path, _describe(data), "str (or bytes, written verbatim)")
    handle.write(data.encode("utf-8"))


def _read_text(source: Source, path: str, kwargs: dict[str, Any]) -> str:
    _no_kwargs(".txt", kwargs, "load() of")
    return _text(source, path)


# -- CSV ------------------------------------------------------------------------------------
_CSV_ACCEPTS = (
    "str (written as is), a 2-D numeric array, a list of rows, a list of dicts, "
    "or a pandas DataFrame"
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")


_FLOAT_WORDS = frozenset({"nan", "inf", "-inf"})  # how str() writes them


def _cell(text: str) -> Any:
    """A CSV cell back as the number it was written from, else the text. An integer only
    in the form str() writes it: '007' or '+5' stay text (identifiers, not numbers)."""
    if _INTEGER.match(text):
        return int(text) if str(int(text)) == text else text
    if _NUMBER.match(text) or text in _FLOAT_WORDS:
        return float(text)
    return text


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _write_csv(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    try:
        if isinstance(data, str):
            _no_kwargs(".csv text", kwargs)
            text.write(data)
        elif type(data).__name__ == "DataFrame" and hasattr(data, "to_csv"):
            kwargs.setdefault("index", False)
            data.to_csv(text, **kwargs)
        elif isinstance(data, Sequence) and data and all(isinstance(r, Mapping) for r in data):
            fields: dict[str, None] = {}
            for row in data:
                _unique_names(row, str, path, "a list of dicts, one", _CSV_ACCEPTS)
                fields.update(dict.fromkeys(map(str, row)))
            writer = csv.DictWriter(text, fieldnames=list(fields), **kwargs)
            writer.writeheader()
            writer.writerows({str(k): _plain(v) for k, v in row.items()} for row in data)
        elif isinstance(data, np.ndarray) or type(data).__module__.split(".")[0] in (
            "torch",
            "cupy",
        ):
            array = _numeric_array(data, path, _CSV_ACCEPTS)
            if array.ndim != 2:
                raise FormatDataError(path, _describe(array), _CSV_ACCEPTS)
            csv.writer(text, **kwargs).writerows(array.tolist())
        elif isinstance(data, Sequence) and all(
            isinstance(r, Sequence) and not isinstance(r, str | bytes) for r in data
        ):
            csv.writer(text, **kwargs).writerows([[_plain(v) for v in r] for r in data])
        else:
            raise FormatDataError(path, _describe(data), _CSV_ACCEPTS)
        text.flush()
    finally:
        text.detach()


_CSV_FORMS = ("text", "rows", "dicts", "array", "dataframe")


def _read_csv(source: Source, path: str, kwargs: dict[str, Any]) -> Any:
    """``as_="text"`` (default: the file's text), ``"rows"``, ``"dicts"``, ``"array"`` or
    ``"dataframe"``; numbers come back as int/float in rows and dicts."""
    form = kwargs.pop("as_", "text")
    if form not in _CSV_FORMS:
        raise ValueError(f"load({path!r}, as_={form!r}): as_ must be one of {_CSV_FORMS}")
    if form == "dataframe":
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                f"load({path!r}, as_='dataframe') needs pandas: pip install pandas "
                "(or use as_='dicts' or 'rows')"
            ) from None

        try:
            return pd.read_csv(source, **kwargs)
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
    dtype = kwargs.pop("dtype", None) if form == "array" else None
    lines = io.StringIO(_text(source, path), newline="")
    if form == "text":
        _no_kwargs(".csv text", kwargs, "load() of")
        return lines.getvalue()
    if form == "dicts":
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(lines, **kwargs)]
    rows = [[_cell(v) for v in row] for row in csv.reader(lines, **kwargs)]
    if form == "rows":
        return rows
    return _csv_array(rows, dtype, path)


_COMPLEX = re.compile(r"^\(.+j\)$|^[^()]+j$")  # how str() writes a complex number


def _csv_array(rows: list[list[Any]], dtype: Any, path: str) -> np.ndarray:
    """The cells as the array they were written from: what `csv.writer` makes of a bool,
    complex or uint64 array (``True``, ``(1+2j)``, integers past int64) comes back as such."""
    if len({len(row) for row in rows}) > 1:
        lengths = sorted({len(row) for row in rows})
        raise ValueError(f"load({path!r}, as_='array'): its rows have {lengths[0]} to "
                         f"{lengths[-1]} cells, and an array needs as many in each; load it "
                         "with as_='rows' (or 'dicts')")
    cells = [cell for row in rows for cell in row]
    if dtype is None and cells:
        if all(cell in ("True", "False") for cell in cells):
            return np.asarray(rows) == "True"
        texts = [cell for cell in cells if isinstance(cell, str)]
        if texts and all(_COMPLEX.match(cell) for cell in texts):
            try:
                return np.asarray([[complex(cell) for cell in row] for row in rows])
            except ValueError:
                pass
        if not texts and all(type(cell) is int for cell in cells) and min(cells) >= 0 and (
                np.iinfo(np.int64).max < max(cells) <= np.iinfo(np.uint64).max):
            dtype = np.uint64
    return np.asarray(rows, dtype=dtype)


def _write_roi(data: Any, handle: IO[bytes], path: str, kwargs: dict[str, Any]) -> None:
    from polystore.rois import encode_rois  # roifile is imported only for ROI files

    handle.write(encode_rois(data, path, **kwargs))


def _read_roi(source: Source, path: str, kwargs: dict[str, Any]) -> Any:
    from polystore.rois import decode_rois

    if isinstance(source, str):
        with open(source, "rb") as handle:
            return decode_rois(handle.read(), path, **kwargs)
    return decode_rois(source.read(), path, **kwargs)


for _fmt in (
    Format("npy", (".npy",), _NPY_ACCEPTS, _write_npy, _read_npy, _check_npy),
    Format("npz", (".npz",), _NPZ_ACCEPTS, _write_npz, _read_npz, _check_npz),
    Format("tiff", (".tif", ".tiff"), _TIFF_ACCEPTS, _write_tiff, _read_tiff, _check_tiff),
    _image_format("png", (".png",)),
    _image_format("jpeg", (".jpg", ".jpeg")),
    _image_format("bmp", (".bmp",)),
    _image_format("gif", (".gif",)),
    Format("json", (".json",), _JSON_ACCEPTS, _write_json, _read_json),
    Format("text", (".txt",), "str", _write_text, _read_text),
    Format("csv", (".csv",), _CSV_ACCEPTS, _write_csv, _read_csv),
    # ImageJ ROIs (polystore.rois, with roifile): a list of Roi, axes= places them in c/z/t
    Format("roi", (".roi", ".roi.zip"), "a list of polystore Roi (ImageJ .roi/.roi.zip)",
           _write_roi, _read_roi),
):
    register_format(_fmt)


# -- entry points used by the backends ------------------------------------------------------
def write(data: Any, handle: IO[bytes], path: Any, backend: str, **kwargs: Any) -> None:
    """Encode ``data`` for ``path`` into ``handle``; bytes go in verbatim."""
    if isinstance(data, BYTES_TYPES):
        if kwargs:
            raise TypeError(f"save() of raw bytes takes no keyword arguments, got {sorted(kwargs)}")
        handle.write(data)
        return
    fmt = format_for(path)
    if fmt is None:
        raise UnsupportedFormatError(
            str(path),
            supported_extensions(),
            backend,
            f"unsupported file extension for {_describe(data)} (bytes are written verbatim "
            "to any extension)",
        )
    fmt.write(data, handle, str(path), dict(kwargs))


def check(data: Any, path: Any, **kwargs: Any) -> None:
    """Raise what :func:`write` would raise for ``data`` at ``path`` with ``kwargs``
    (FormatDataError), without keeping an encoding; data at a path without a format pass (a
    backend may hold them)."""
    if isinstance(data, BYTES_TYPES):
        return
    fmt = format_for(path)
    if fmt is None:
        return
    if fmt.check is not None:
        fmt.check(data, str(path))
    else:
        fmt.write(data, io.BytesIO(), str(path), kwargs)


def encode(data: Any, path: Any, backend: str, **kwargs: Any) -> bytes:
    """The bytes :func:`write` would store."""
    buffer = io.BytesIO()
    write(data, buffer, path, backend, **kwargs)
    return buffer.getvalue()


def read(source: Source, path: Any, **kwargs: Any) -> Any:
    """Decode the file at ``source`` by ``path``'s extension; unknown extensions: bytes."""
    fmt = format_for(path)
    if fmt is None:
        if kwargs:
            raise TypeError(
                f"load({str(path)!r}): files of an unknown extension load as bytes and take "
                f"no keyword arguments, got {sorted(kwargs)}"
            )
        if isinstance(source, str):
            with open(source, "rb") as handle:
                return handle.read()
        return source.read()
    return fmt.read(source, str(path), dict(kwargs))


def decode(data: bytes, path: Any, **kwargs: Any) -> Any:
    """Decode stored bytes by ``path``'s extension."""
    return read(io.BytesIO(data), path, **kwargs)
