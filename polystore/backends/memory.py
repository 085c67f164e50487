"""In-memory backend with real directories; useful for tests and as a fast scratch store."""

from __future__ import annotations

import copy
import errno
import threading
from collections.abc import Iterable
from typing import Any, ClassVar

from polystore.base import StorageBackend
from polystore.paths import name_matches, normalize_extensions, normalize_relative

__all__ = ["MemoryBackend"]

_ROOT = "memory root"


def _parents(key: str) -> list[str]:
    """Ancestor directory keys of ``key``, root ('') first."""
    parts = key.split("/")[:-1] if key else []
    return [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]


class MemoryBackend(StorageBackend):
    """A hierarchical store held in a dict, safe to share between threads.

    Paths are '/'-separated and relative to the store's root ('/a' means 'a'); '..' that
    climbs above the root raises PathEscapeError. Stored data are deep copies, and loads
    return copies, so callers mutating their arrays never change what is stored.
    """

    _backend_type = "memory"
    can_list: ClassVar[bool] = True

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[str, Any] = {}
        self._dirs: set[str] = {""}

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
        """Store a deep copy of ``data``; parent directories are created as needed."""
        key = self._key(file_path)
        stored = copy.deepcopy(data)  # outside the lock: may be slow for big arrays
        with self._lock:
            if key in self._dirs:
                raise IsADirectoryError(f"Cannot save to {str(file_path)!r}: it is a directory")
            self._make_parents(key, file_path, include_self=False)
            self._files[key] = stored

    def load(self, file_path: Any, **kwargs: Any) -> Any:
        key = self._key(file_path)
        with self._lock:
            if key in self._dirs:
                raise IsADirectoryError(f"Cannot load {str(file_path)!r}: it is a directory")
            try:
                stored = self._files[key]
            except KeyError:
                raise self._not_found(file_path) from None
        # Stored objects are never mutated in place (save replaces them), so copying
        # outside the lock is safe.
        return copy.deepcopy(stored)

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
        return sorted({k[start:] for k in files + dirs if "/" not in k[start:]})

    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Sorted file keys under ``directory`` (same filters as the disk backend)."""
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
        return sorted(found)

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
