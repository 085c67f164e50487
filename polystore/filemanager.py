"""FileManager: one front door that routes every call to an explicitly named backend."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from polystore.base import Backend, check_batch_lengths
from polystore.errors import BackendNotFoundError, ReadOnlyBackendError, UnsupportedOperationError

__all__ = ["FileManager"]

logger = logging.getLogger(__name__)


def _raise_not_found(exc: FileNotFoundError, path: Any, backend: str) -> NoReturn:
    """Re-raise with a message that names both the path and the backend."""
    message = str(exc)
    if str(path) in message and backend in message:
        raise exc
    raise FileNotFoundError(f"{str(path)!r} not found on backend {backend!r}: {message}") from exc


class FileManager:
    """Route storage calls to the backend named by the ``backend=`` keyword.

    ``registry`` is a :class:`~polystore.registry.BackendRegistry` or any mapping of name
    to backend instance. There is no default backend and no guessing: an unknown name
    raises BackendNotFoundError listing the available ones.
    """

    def __init__(self, registry: Mapping[str, Backend]) -> None:
        if not isinstance(registry, Mapping):
            raise TypeError(f"FileManager needs a mapping of name -> backend, got {registry!r}")
        self.registry = registry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.registry!r})"

    def get_backend(self, backend: str) -> Backend:
        """The backend instance registered as ``backend``."""
        if not isinstance(backend, str):
            raise TypeError(f"backend= must be a backend name (str), got {backend!r}")
        if backend not in self.registry:
            raise BackendNotFoundError(backend, list(self.registry))
        return self.registry[backend]

    # -- data -----------------------------------------------------------------------
    def save(self, data: Any, file_path: Any, *, backend: str, **kwargs: Any) -> None:
        self.get_backend(backend).save(data, file_path, **kwargs)

    def load(self, file_path: Any, *, backend: str, **kwargs: Any) -> Any:
        target = self.get_backend(backend)
        try:
            return target.load(file_path, **kwargs)
        except FileNotFoundError as exc:
            _raise_not_found(exc, file_path, backend)

    def save_batch(
        self, data_list: Iterable[Any], file_paths: Iterable[Any], *, backend: str, **kwargs: Any
    ) -> None:
        """Save several items; a length mismatch raises ValueError before anything is written."""
        target = self.get_backend(backend)
        data_list, file_paths = list(data_list), list(file_paths)
        check_batch_lengths(data_list, file_paths)
        target.save_batch(data_list, file_paths, **kwargs)

    def load_batch(self, file_paths: Iterable[Any], *, backend: str, **kwargs: Any) -> list[Any]:
        target = self.get_backend(backend)
        file_paths = list(file_paths)
        try:
            return target.load_batch(file_paths, **kwargs)
        except FileNotFoundError as exc:
            missing = exc.filename or next(
                (p for p in file_paths if str(p) in str(exc)), ", ".join(map(str, file_paths))
            )
            _raise_not_found(exc, missing, backend)

    # -- navigation -----------------------------------------------------------------
    def list_files(
        self,
        directory: Any,
        *,
        backend: str,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
    ) -> list[str]:
        target = self.get_backend(backend)
        try:
            return target.list_files(
                directory, pattern=pattern, extensions=extensions, recursive=recursive
            )
        except FileNotFoundError as exc:
            _raise_not_found(exc, directory, backend)

    def list_dir(self, path: Any, *, backend: str) -> list[str]:
        target = self.get_backend(backend)
        try:
            return target.list_dir(path)
        except FileNotFoundError as exc:
            _raise_not_found(exc, path, backend)

    def exists(self, path: Any, *, backend: str) -> bool:
        return self.get_backend(backend).exists(path)

    def is_file(self, path: Any, *, backend: str) -> bool:
        return self.get_backend(backend).is_file(path)

    def is_dir(self, path: Any, *, backend: str) -> bool:
        return self.get_backend(backend).is_dir(path)

    def delete(self, path: Any, *, backend: str, recursive: bool = False) -> None:
        target = self.get_backend(backend)
        try:
            # Only pass recursive when asked: third-party delete(path) may not accept it.
            if recursive:
                target.delete(path, recursive=True)
            else:
                target.delete(path)
        except FileNotFoundError as exc:
            _raise_not_found(exc, path, backend)

    def ensure_directory(self, path: Any, *, backend: str) -> None:
        self.get_backend(backend).ensure_directory(path)

    # -- between backends -----------------------------------------------------------
    def copy(
        self, src: Any, dst: Any, *, src_backend: str, dst_backend: str, **kwargs: Any
    ) -> None:
        """Load ``src`` from one backend and save it as ``dst`` on another (or the same)."""
        source, dest = self.get_backend(src_backend), self.get_backend(dst_backend)
        if not source.can_read:
            raise UnsupportedOperationError(src_backend, "load", "cannot copy from a sink")
        if not dest.can_write:
            raise ReadOnlyBackendError(dst_backend, "save")
        data = self.load(src, backend=src_backend)
        dest.save(data, dst, **kwargs)

    def move(
        self, src: Any, dst: Any, *, src_backend: str, dst_backend: str, **kwargs: Any
    ) -> None:
        """Copy, then delete the source; the source is kept if the copy fails."""
        source = self.get_backend(src_backend)
        if not source.can_write:
            raise ReadOnlyBackendError(src_backend, "delete (needed to move)")
        if source is self.get_backend(dst_backend) and source.same_path(src, dst):
            return  # moving a file onto itself: nothing to do, and nothing to delete
        self.copy(src, dst, src_backend=src_backend, dst_backend=dst_backend, **kwargs)
        self.delete(src, backend=src_backend)
        logger.debug("moved %s (%s) -> %s (%s)", src, src_backend, dst, dst_backend)
