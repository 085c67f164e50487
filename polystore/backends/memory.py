"""In-memory backend with real directories; useful for tests and as a fast scratch store."""

from __future__ import annotations

import copy
import errno
import threading
from collections.abc import Iterable
from typing import Any, ClassVar

from polystore import formats
from polystore.base import StorageBackend
from polystore.errors import DestinationExistsError
from polystore.paths import (
    name_matches,
    natural_sort_key,
    normalize_extensions,
    normalize_relative,
)

__all__ = ["MemoryBackend"]

_ROOT = "memory root"


class _RawFile(bytes):
    """A file held as its exact bytes (from write_bytes); load() decodes it by extension."""

    __slots__ = ()


def _parents(key: str) -> list[str]:
    """Ancestor directory keys of ``key``, root ('') first."""
    parts = key.split("/")[:-1] if key else []
    return [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]


class MemoryBackend(StorageBackend):
    """A hierarchical store held in a dict, safe to share between threads.

    Paths are '/'-separated and relative to the store's root ('/a' means 'a'); '..' that
    climbs above the root raises PathEscapeError. Stored data are deep copies, and loads
    return copies, so callers mutating their arrays never change what is stored.

    What it is given at a path with a file format must be what that format takes (as on
    disk); at a path without one it holds any Python object.

    It can hold bytes: a file copied in from disk is kept as its exact bytes (``load``
    decodes them by extension, as disk would), so disk -> memory -> disk is bit-exact.

    One store per process: pickling a MemoryBackend (to a worker process, with a
    FileManager) sends its configuration, not its content, so the copy in a worker starts
    empty and what a worker saves stays in that worker. Share data between processes
    through disk (or another store both can reach).
    """

    _backend_type = "memory"
    can_list: ClassVar[bool] = True
    can_hold_bytes: ClassVar[bool] = True
    #: save/write_bytes/rename take ``overwrite=False`` and refuse an existing file under
    #: the store's lock (FileManager.copy/move with overwrite=False rely on it).
    can_write_exclusive: ClassVar[bool] = True

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[str, Any] = {}
        self._dirs: set[str] = {""}

    _STORE_ATTRIBUTES = ("_lock", "_files", "_dirs")

    def __getstate__(self) -> dict[str, Any]:
        """Configuration only (a subclass's own attributes), not the stored items."""
        return {k: v for k, v in self.__dict__.items() if k not in self._STORE_ATTRIBUTES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        MemoryBackend.__init__(self)
        self.__dict__.update(state)

    def __copy__(self) -> MemoryBackend:
        """An independent store holding the same items (stored items are never mutated)."""
        clone = type(self).__new__(type(self))
        clone.__setstate__(self.__getstate__())
        with self._lock:
            clone._files = dict(self._files)
            clone._dirs = set(self._dirs)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> MemoryBackend:
        """A full, independent copy of the store (unlike pickling, which copies none)."""
        clone = type(self).__new__(type(self))
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        with self._lock:
            clone._files = copy.deepcopy(self._files, memo)
            clone._dirs = set(self._dirs)
        return clone

    def __repr__(self) -> str:
        with self._lock:
            return f"{type(self).__name__}({len(self._files)} files, {len(self._dirs)} dirs)"

    @staticmethod
    def _key(path: Any) -> str:
        return normalize_relative(path, _ROOT)

    def same_path(self, a: Any, b: Any) -> bool:
        return self._key(a) == self._key(b)

    @staticmethod
    def _not_found(path: Any, what: str = "File") -> FileNotFoundError:
        return FileNotFoundError(f"{what} not found: {str(path)!r} on backend 'memory'")

    def _make_parents(self, key: str, path: Any, include_self: bool) -> None:
        """Create the directories above ``key`` (and ``key`` itself); caller holds the lock."""
        chain = _parents(key) + ([key] if include_self and key else [])
        for directory in chain:
            if directory in self._files:
                raise NotADirectoryError(
                    f"Cannot create {str(path)!r} on backend 'memory': {directory!r} is a file"
                )
        self._dirs.update(chain)

    # -- primitives -------------------------------------------------------------------
    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Store a deep copy of ``data``; parent directories are created as needed.

        At a path with a file format (``.npy``, ``.json``, ...) ``data`` must be what that
        format takes, as on disk (FormatDataError otherwise, and nothing is stored), so that
        a later copy or move to disk cannot fail on it; at any other path (no extension, or
        one without a format) any Python object is held. ``overwrite=False`` refuses an
        existing file (DestinationExistsError) in the same step that stores it."""
        key = self._key(file_path)
        overwrite = kwargs.pop("overwrite", True)
        formats.check(data, file_path, **kwargs)
        stored = copy.deepcopy(data)  # outside the lock: may be slow for big arrays
        self._put(key, file_path, stored, overwrite)

    def _put(self, key: str, path: Any, stored: Any, overwrite: bool) -> None:
        with self._lock:
            if key in self._dirs:
                raise IsADirectoryError(f"Cannot save to {str(path)!r}: it is a directory")
            if not overwrite and key in self._files:
                raise self._exists(path)
            self._make_parents(key, path, include_self=False)
            self._files[key] = stored

    @staticmethod
    def _exists(path: Any) -> DestinationExistsError:
        return DestinationExistsError(f"{str(path)!r} already exists on backend 'memory'; "
                                      "pass overwrite=True to replace it")

    def _stored(self, file_path: Any) -> Any:
        key = self._key(file_path)
        with self._lock:
            if key in self._dirs:
                raise IsADirectoryError(f"Cannot load {str(file_path)!r}: it is a directory")
            try:
                return self._files[key]
            except KeyError:
                raise self._not_found(file_path) from None

    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """A copy of what was saved; a file held as bytes is decoded by its extension."""
        stored = self._stored(file_path)
        if isinstance(stored, _RawFile):
            return formats.decode(bytes(stored), file_path, **kwargs)
        # Stored objects are never mutated in place (save replaces them), so copying
        # outside the lock is safe.
        return copy.deepcopy(stored)

    # -- byte level -------------------------------------------------------------------
    def read_bytes(self, path: Any, **kwargs: Any) -> bytes:
        """The exact bytes of a file held as bytes; other items are encoded by extension
        (UnsupportedFormatError when the extension has no format)."""
        stored = self._stored(path)
        if isinstance(stored, formats.BYTES_TYPES):
            return bytes(stored)
        return formats.encode(stored, path, "memory", **kwargs)

    def holds_bytes(self, path: Any) -> bool:
        """Whether ``path`` is held as a file's exact bytes; else as the object saved, which
        `read_bytes` encodes (a move checks that encoding as it checks any conversion)."""
        return isinstance(self._stored(path), formats.BYTES_TYPES)

    def write_bytes(self, data: bytes, path: Any, overwrite: bool = True, **kwargs: Any) -> None:
        """Hold ``data`` as the exact content of ``path`` (``overwrite`` as in `save`)."""
        self._put(self._key(path), path, _RawFile(data), overwrite)

    def rename(self, src: Any, dst: Any, overwrite: bool = True) -> None:
        """Move a file or a directory tree to another key, without copying the data
        (``overwrite=False``: an existing file is refused, in the same step)."""
        old, new = self._key(src), self._key(dst)
        with self._lock:
            if old in self._files:
                if new in self._dirs:
                    raise IsADirectoryError(f"Cannot move {str(src)!r} onto directory {str(dst)!r}")
                if not overwrite and new in self._files and new != old:
                    raise self._exists(dst)
                self._make_parents(new, dst, include_self=False)
                self._files[new] = self._files.pop(old)
                return
            if old not in self._dirs or not old:
                raise self._not_found(src)
            if new in self._files or new in self._dirs:
                raise DestinationExistsError(
                    f"Cannot move directory {str(src)!r} onto {str(dst)!r}"
                )
            if new.startswith(f"{old}/"):
                raise ValueError(f"Cannot move {str(src)!r} into itself ({str(dst)!r})")
            files, dirs = self._children(old)
            self._make_parents(new, dst, include_self=True)
            for file_key in files:
                self._files[new + file_key[len(old) :]] = self._files.pop(file_key)
            for dir_key in dirs:
                self._dirs.discard(dir_key)
                self._dirs.add(new + dir_key[len(old) :])
            self._dirs.discard(old)

    # -- navigation -------------------------------------------------------------------
    def exists(self, path: Any) -> bool:
        key = self._key(path)
        with self._lock:
            return key in self._files or key in self._dirs

    def is_file(self, path: Any) -> bool:
        key = self._key(path)
        with self._lock:
            return key in self._files

    def is_dir(self, path: Any) -> bool:
        key = self._key(path)
        with self._lock:
            return key in self._dirs

    def _check_dir(self, key: str, path: Any) -> None:
        if key in self._files:
            raise NotADirectoryError(f"Not a directory: {str(path)!r} on backend 'memory'")
        if key not in self._dirs:
            raise self._not_found(path, "Directory")

    def _children(self, key: str) -> tuple[list[str], list[str]]:
        """(files, dirs) keys strictly below ``key``; caller holds the lock."""
        prefix = f"{key}/" if key else ""
        files = [k for k in self._files if k.startswith(prefix)]
        dirs = [d for d in self._dirs if d and d.startswith(prefix) and d != key]
        return files, dirs

    def list_dir(self, path: Any) -> list[str]:
        """Sorted names of the files and directories directly inside ``path``."""
        key = self._key(path)
        with self._lock:
            self._check_dir(key, path)
            files, dirs = self._children(key)
        start = len(key) + 1 if key else 0
        names = {k[start:] for k in files + dirs if "/" not in k[start:]}
        return sorted(names, key=natural_sort_key)

    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """File keys under ``directory`` in natural order (same filters as disk)."""
        key = self._key(directory)
        exts = normalize_extensions(extensions)
        with self._lock:
            self._check_dir(key, directory)
            files, _ = self._children(key)
        start = len(key) + 1 if key else 0
        found = []
        for file_key in files:
            rel = file_key[start:]
            if not recursive and "/" in rel:
                continue
            if name_matches(rel.rsplit("/", 1)[-1], pattern, exts):
                found.append(file_key)
        return sorted(found, key=natural_sort_key)

    def delete(self, path: Any, recursive: bool = False) -> None:
        """Delete a file, an empty directory, or (``recursive=True``) a directory tree."""
        key = self._key(path)
        with self._lock:
            if key in self._files:
                del self._files[key]
                return
            if key not in self._dirs:
                raise self._not_found(path)
            if not key:
                raise ValueError("Refusing to delete the root of the memory backend")
            files, dirs = self._children(key)
            if (files or dirs) and not recursive:
                raise OSError(
                    errno.ENOTEMPTY, f"Directory not empty: {str(path)!r} on backend 'memory'"
                )
            for file_key in files:
                del self._files[file_key]
            self._dirs.difference_update(dirs)
            self._dirs.discard(key)

    def ensure_directory(self, path: Any) -> None:
        key = self._key(path)
        with self._lock:
            if key in self._files:
                raise FileExistsError(f"{str(path)!r} is a file on backend 'memory'")
            self._make_parents(key, path, include_self=True)
