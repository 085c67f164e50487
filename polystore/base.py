"""Backend base classes and automatic registration.

One small hierarchy (in the spirit of zarr-python's ``zarr.abc.store``): :class:`Backend`
declares the full API with capability flags; every optional operation has a default that
either builds on ``save``/``load`` or raises :class:`UnsupportedOperationError`, so a
backend only implements what it can actually do. :class:`StorageBackend`,
:class:`ReadOnlyBackend` and :class:`WriteOnlyBackend` fix the read/write capabilities.

A subclass that sets ``_backend_type`` in its own class body is registered under that name
when the class is created; :class:`polystore.registry.BackendRegistry` builds on that table.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from polystore.errors import (
    DuplicateBackendError,
    ReadOnlyBackendError,
    UnsupportedOperationError,
)

__all__ = [
    "Backend",
    "ReadOnlyBackend",
    "StorageBackend",
    "WriteOnlyBackend",
    "backend_label",
    "registered_backend_classes",
]

logger = logging.getLogger(__name__)

_registry_lock = threading.Lock()
_backend_classes: dict[str, type[Backend]] = {}


def registered_backend_classes() -> dict[str, type[Backend]]:
    """Return a copy of the name -> class table filled by auto-registration."""
    with _registry_lock:
        return dict(_backend_classes)


def _register(name: str, cls: type[Backend]) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__}._backend_type must be a non-empty str, got {name!r}")
    with _registry_lock:
        existing = _backend_classes.get(name)
        if existing is not None and existing is not cls:

            def key(c: type) -> tuple[str, str]:
                return (c.__module__, c.__qualname__)

            if key(existing) != key(cls):
                raise DuplicateBackendError(name, existing, cls)
            logger.debug("re-registering backend %r (%s re-imported)", name, cls.__qualname__)
        _backend_classes[name] = cls


def backend_label(backend: Backend | type[Backend]) -> str:
    """Name used in error messages: the registered name, else the class name."""
    cls = backend if isinstance(backend, type) else type(backend)
    return getattr(cls, "_backend_type", None) or cls.__name__


class Backend(ABC):
    """Abstract storage backend.

    Capability flags are class attributes so callers can check them without an instance.
    ``can_list`` defaults to whether the class overrides :meth:`list_files`.
    """

    _backend_type: ClassVar[str | None] = None
    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = True
    can_list: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "can_list" not in cls.__dict__:
            cls.can_list = cls.list_files is not Backend.list_files
        if cls.__dict__.get("_backend_type") is not None:
            _register(cls.__dict__["_backend_type"], cls)

    def _unsupported(self, operation: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(backend_label(self), operation)

    # -- primitives ---------------------------------------------------------------------
    @abstractmethod
    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Store ``data`` at ``file_path``."""

    @abstractmethod
    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """Return the data stored at ``file_path``; raise FileNotFoundError if absent."""

    # -- defaults built on the primitives -------------------------------------------------
    def save_batch(
        self, data_list: Iterable[Any], output_paths: Iterable[Any], **kwargs: Any
    ) -> None:
        """Save each item; lengths are checked first so a mismatch writes nothing."""
        data_list, output_paths = list(data_list), list(output_paths)
        check_batch_lengths(data_list, output_paths)
        for data, path in zip(data_list, output_paths, strict=True):
            self.save(data, path, **kwargs)

    def load_batch(self, file_paths: Iterable[Any], **kwargs: Any) -> list[Any]:
        """Load each path in order."""
        return [self.load(path, **kwargs) for path in file_paths]

    # -- optional capabilities ----------------------------------------------------------
    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """List files under ``directory`` (unsupported unless implemented)."""
        raise self._unsupported("list_files")

    def list_dir(self, path: Any) -> list[str]:
        """List the entry names of a directory (unsupported unless implemented)."""
        raise self._unsupported("list_dir")

    def exists(self, path: Any) -> bool:
        """Whether ``path`` exists (unsupported unless implemented)."""
        raise self._unsupported("exists")

    def is_file(self, path: Any) -> bool:
        """Whether ``path`` is a file (unsupported unless implemented)."""
        raise self._unsupported("is_file")

    def is_dir(self, path: Any) -> bool:
        """Whether ``path`` is a directory (unsupported unless implemented)."""
        raise self._unsupported("is_dir")

    def delete(self, path: Any, recursive: bool = False) -> None:
        """Delete a file or directory (unsupported unless implemented)."""
        raise self._unsupported("delete")

    def ensure_directory(self, path: Any) -> None:
        """Create ``path`` and its parents if missing (unsupported unless implemented)."""
        raise self._unsupported("ensure_directory")

    def same_path(self, a: Any, b: Any) -> bool:
        """Whether two spellings name the same stored item (so moving one onto the other
        is a no-op). Backends with their own path rules override this."""
        return os.path.normpath(str(a)) == os.path.normpath(str(b))


def check_batch_lengths(data_list: Sequence[Any], paths: Sequence[Any]) -> None:
    """Raise ValueError when a batch has different numbers of items and paths."""
    if len(data_list) != len(paths):
        raise ValueError(
            f"save_batch needs one path per item: got {len(data_list)} data items and "
            f"{len(paths)} paths; nothing was written."
        )


class StorageBackend(Backend):
    """Read-write backend: implement ``save`` and ``load``, plus any optional operations."""

    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = True


class ReadOnlyBackend(Backend):
    """Backend for sources that can only be read; every write raises ReadOnlyBackendError."""

    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = False

    def _read_only(self, operation: str) -> ReadOnlyBackendError:
        return ReadOnlyBackendError(backend_label(self), operation)

    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        raise self._read_only("save")

    def save_batch(
        self, data_list: Iterable[Any], output_paths: Iterable[Any], **kwargs: Any
    ) -> None:
        raise self._read_only("save_batch")

    def delete(self, path: Any, recursive: bool = False) -> None:
        raise self._read_only("delete")

    def ensure_directory(self, path: Any) -> None:
        raise self._read_only("ensure_directory")

    @abstractmethod
    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """Return the data at ``file_path``."""


class WriteOnlyBackend(Backend):
    """Sink backend (e.g. a live viewer stream): data goes in, nothing comes back out."""

    can_read: ClassVar[bool] = False
    can_write: ClassVar[bool] = True

    def load(self, file_path: Any, **kwargs: Any) -> Any:
        raise UnsupportedOperationError(
            backend_label(self), "load", "write-only backend; load from a storage backend"
        )

    def load_batch(self, file_paths: Iterable[Any], **kwargs: Any) -> list[Any]:
        raise UnsupportedOperationError(
            backend_label(self), "load_batch", "write-only backend; load from a storage backend"
        )

    @abstractmethod
    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Send ``data`` (labelled ``file_path``) to the sink."""
