"""Local filesystem backend; the file format is chosen by the path's extension."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tifffile

from polystore.atomic import atomic_write, is_temp_name
from polystore.base import StorageBackend
from polystore.errors import UnsupportedFormatError
from polystore.paths import name_matches, normalize_extensions, resolve_within

__all__ = ["DiskBackend"]

logger = logging.getLogger(__name__)


def _json_default(obj: Any) -> Any:
    """Let numpy scalars and arrays pass through json.dump as plain numbers and lists."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class DiskBackend(StorageBackend):
    """Files on the local filesystem.

    Without ``base_dir`` paths are used exactly as given. With ``base_dir`` relative paths
    are taken inside it and any path that resolves outside it (``..``, an absolute path
    elsewhere, a symlink) raises PathEscapeError. Writes are atomic (see polystore.atomic).
    """

    _backend_type = "disk"
    can_list: ClassVar[bool] = True

    #: extension -> format; anything else raises UnsupportedFormatError.
    FORMATS: ClassVar[dict[str, str]] = {
        ".npy": "npy",
        ".tif": "tiff",
        ".tiff": "tiff",
        ".json": "json",
        ".txt": "text",
        ".csv": "text",
    }

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        self.base_dir: Path | None = None if base_dir is None else Path(base_dir).resolve()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_dir={self.base_dir!r})"

    # -- helpers ----------------------------------------------------------------------
    def _path(self, path: Any) -> Path:
        if self.base_dir is None:
            return Path(path)
        return resolve_within(self.base_dir, path)

    def same_path(self, a: Any, b: Any) -> bool:
        """Same file after resolving the base directory, '..' and symlinks."""
        return self._path(a).resolve() == self._path(b).resolve()

    def _format(self, path: Any) -> str:
        if str(path).lower().endswith((".roi", ".roi.zip")):  # ImageJ ROIs: polystore.rois
            return "roi"
        suffix = Path(path).suffix.lower()
        try:
            return self.FORMATS[suffix]
        except KeyError:
            raise UnsupportedFormatError(str(path), self.FORMATS, "disk") from None

    def _not_found(self, path: Any) -> FileNotFoundError:
        where = f" under {str(self.base_dir)!r}" if self.base_dir is not None else ""
        return FileNotFoundError(f"File not found: {str(path)!r} on backend 'disk'{where}")

    # -- primitives -------------------------------------------------------------------
    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Write ``data`` atomically in the format given by the extension.

        Extra keyword arguments go to tifffile.imwrite (.tif) or json.dump (.json); other
        formats take none.
        """
        fmt = self._format(file_path)
        if fmt == "roi":  # list of Roi (axes= places them in c/z/t) -> ImageJ .roi/.roi.zip
            from polystore.rois import encode_rois

            payload = encode_rois(data, file_path, **kwargs)
            self._path(file_path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self._path(file_path), "wb") as handle:
                handle.write(payload)
            return
        if fmt in ("npy", "text") and kwargs:
            raise TypeError(f"save() to {fmt} got unexpected keyword arguments {sorted(kwargs)}")
        if fmt == "text" and not isinstance(data, str):
            raise TypeError(f"{file_path!s}: .txt/.csv files take str, not {type(data).__name__}")
        target = self._path(file_path)
        if target.is_dir():
            raise IsADirectoryError(f"Cannot save to {str(file_path)!r}: it is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "npy":
            array = np.asarray(data)
            with atomic_write(target, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        elif fmt == "tiff":
            array = np.asarray(data)
            if array.ndim >= 2:
                # Never guess RGB from a trailing axis of 3/4: N-D data are stacks of planes.
                kwargs.setdefault("photometric", "minisblack")
            with atomic_write(target, "wb") as handle:
                tifffile.imwrite(handle, array, **kwargs)
        elif fmt == "json":
            kwargs.setdefault("indent", 2)
            kwargs.setdefault("default", _json_default)
            with atomic_write(target, "w", encoding="utf-8") as handle:
                json.dump(data, handle, **kwargs)
        else:
            with atomic_write(target, "w", encoding="utf-8", newline="") as handle:
                handle.write(data)
        logger.debug("saved %s (%s)", target, fmt)

    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """Read a file written by :meth:`save` (or any file of a supported format)."""
        fmt = self._format(file_path)
        target = self._path(file_path)
        if not target.exists():
            raise self._not_found(file_path)
        if target.is_dir():
            raise IsADirectoryError(f"Cannot load {str(file_path)!r}: it is a directory")
        if fmt == "roi":  # -> list of Roi (positions=True: PositionedRoi with c/z/t)
            from polystore.rois import decode_rois

            return decode_rois(target.read_bytes(), file_path, **kwargs)
        if fmt == "npy":
            return np.load(target, allow_pickle=False, **kwargs)
        if fmt == "tiff":
            return tifffile.imread(target, **kwargs)
        if fmt == "json":
            with open(target, encoding="utf-8") as handle:
                return json.load(handle, **kwargs)
        with open(target, encoding="utf-8", newline="") as handle:
            return handle.read()

    # -- navigation -------------------------------------------------------------------
    def exists(self, path: Any) -> bool:
        return self._path(path).exists()

    def is_file(self, path: Any) -> bool:
        return self._path(path).is_file()

    def is_dir(self, path: Any) -> bool:
        return self._path(path).is_dir()

    def _directory(self, path: Any) -> Path:
        directory = self._path(path)
        if not directory.exists():
            raise FileNotFoundError(f"Directory not found: {str(path)!r} on backend 'disk'")
        if not directory.is_dir():
            raise NotADirectoryError(f"Not a directory: {str(path)!r} on backend 'disk'")
        return directory

    def list_dir(self, path: Any) -> list[str]:
        """Sorted entry names of a directory (in-progress temporary files excluded)."""
        return sorted(n for n in os.listdir(self._directory(path)) if not is_temp_name(n))

    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Sorted file paths under ``directory``, in the same form as ``directory``.

        ``pattern`` is a glob matched against file names, ``extensions`` a set of suffixes
        (case-insensitive, compound ones such as '.ome.tif' work).
        """
        root = self._directory(directory)
        exts = normalize_extensions(extensions)
        found: list[str] = []
        for current, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = Path(current).relative_to(root)
            for name in filenames:
                if not is_temp_name(name) and name_matches(name, pattern, exts):
                    found.append(str(Path(directory) / rel_dir / name))
            if not recursive:
                break
        return sorted(found)

    def delete(self, path: Any, recursive: bool = False) -> None:
        """Delete a file, an empty directory, or (``recursive=True``) a directory tree."""
        target = self._path(path)
        if self.base_dir is not None and target == self.base_dir:
            raise ValueError(f"Refusing to delete the backend's base directory {self.base_dir}")
        if not target.exists() and not target.is_symlink():
            raise self._not_found(path)
        if target.is_dir() and not target.is_symlink():
            if recursive:
                shutil.rmtree(target)
            else:
                target.rmdir()
        else:
            target.unlink()

    def ensure_directory(self, path: Any) -> None:
        self._path(path).mkdir(parents=True, exist_ok=True)
