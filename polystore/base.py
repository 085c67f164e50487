"""Backend base classes and automatic registration.

One small hierarchy (in the spirit of zarr-python's ``zarr.abc.store``): :class:`Backend`
declares the full API with capability flags; every optional operation has a default that
either builds on ``save``/``load`` or raises :class:`UnsupportedOperationError`, so a
backend only implements what it can actually do. :class:`StorageBackend`,
:class:`ReadOnlyBackend` and :class:`WriteOnlyBackend` fix the read/write capabilities.

A subclass that sets ``_backend_type`` in its own class body is registered under that name
when the class is created; :class:`polystore.registry.BackendRegistry` builds on that table.
Names are case-insensitive (registered in lower case).

Upstream PolyStore's ``Backend`` was an enum of names (``Backend.DISK.value == "disk"``) while
here it is the abstract base class the custom-backends guide subclasses. Both work: the ABC's
metaclass answers ``Backend.DISK``, ``Backend("disk")``, ``Backend["DISK"]`` and
``list(Backend)`` with members of :class:`BackendName`, a ``StrEnum``, so a member is also
the plain name string wherever a backend name is accepted.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from abc import ABCMeta, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from enum import Enum, StrEnum
from typing import Any, ClassVar

from polystore.errors import (
    DuplicateBackendError,
    ReadOnlyBackendError,
    UnsupportedOperationError,
)

__all__ = [
    "Backend",
    "BackendMeta",
    "BackendName",
    "ReadOnlyBackend",
    "StorageBackend",
    "WriteOnlyBackend",
    "backend_label",
    "backend_name",
    "registered_backend_classes",
]

logger = logging.getLogger(__name__)

_registry_lock = threading.Lock()
_backend_classes: dict[str, type[Backend]] = {}


class BackendName(StrEnum):
    """Upstream PolyStore's backend identifiers; each member *is* its name string."""

    AUTO = "auto"
    DISK = "disk"
    MEMORY = "memory"
    ZARR = "zarr"
    OME_ZARR = "ome_zarr"
    STREAMING = "streaming"
    NAPARI_STREAM = "napari_stream"
    FIJI_STREAM = "fiji_stream"
    OMERO_LOCAL = "omero_local"
    VIRTUAL_WORKSPACE = "virtual_workspace"
    BIOFORMATS = "bioformats"


def backend_name(name: Any) -> str:
    """The registry key for ``name``: a str, or an enum member (its value), in lower case."""
    if isinstance(name, Enum):
        name = name.value
    if not isinstance(name, str):
        raise TypeError(
            f"backend must be a backend name (str or polystore.Backend.<NAME>), got {name!r}"
        )
    return name.strip().lower()


def registered_backend_classes() -> dict[str, type[Backend]]:
    """Return a copy of the name -> class table filled by auto-registration."""
    with _registry_lock:
        return dict(_backend_classes)


def forget_failed_imports(before: dict[str, type[Backend]]) -> None:
    """Restore the table to `before` for the classes registered since by a module whose
    import failed (Python dropped it from sys.modules): a plugin that raised after defining
    its class must not be reachable by name as if it had loaded."""
    with _registry_lock:
        for name, cls in list(_backend_classes.items()):
            if before.get(name) is not cls and cls.__module__ not in sys.modules:
                if name in before:
                    _backend_classes[name] = before[name]
                else:
                    del _backend_classes[name]


def _register(name: str, cls: type[Backend]) -> None:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"{cls.__qualname__}._backend_type must be a non-empty str, got {name!r}")
    name = backend_name(name)
    with _registry_lock:
        existing = _backend_classes.get(name)
        if existing is not None and existing is not cls:

            def key(c: type) -> tuple[str, str]:
                return (c.__module__, c.__qualname__)

            if cls.__dict__.get("__replaces_registered__", False):
                logger.info("backend %r: %s replaces %s on purpose", name, key(cls), key(existing))
            elif key(existing) != key(cls):
                raise DuplicateBackendError(name, existing, cls)
            logger.debug("re-registering backend %r (%s re-imported)", name, cls.__qualname__)
        _backend_classes[name] = cls


def backend_label(backend: Backend | type[Backend]) -> str:
    """Name used in error messages: the registered name, else the class name."""
    cls = backend if isinstance(backend, type) else type(backend)
    return getattr(cls, "_backend_type", None) or cls.__name__


class BackendMeta(ABCMeta):
    """ABCMeta that also lets the root ``Backend`` class act as upstream's name enum."""

    def _is_root(cls) -> bool:
        return cls.__dict__.get("_enum_root", False)

    def __getattr__(cls, name: str) -> Any:
        if name in BackendName.__members__ and cls._is_root():
            return BackendName[name]
        raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")

    def __getitem__(cls, name: str) -> BackendName:
        if not cls._is_root():
            raise TypeError(f"{cls.__name__!r} class is not subscriptable")
        return BackendName[name]

    def __iter__(cls) -> Iterator[BackendName]:
        if not cls._is_root():
            raise TypeError(f"{cls.__name__!r} class is not iterable")
        return iter(BackendName)


class Backend(metaclass=BackendMeta):
    """Abstract storage backend.

    Capability flags are class attributes so callers can check them without an instance.
    ``can_list`` defaults to whether the class overrides :meth:`list_files`.
    ``can_hold_bytes`` says that :meth:`read_bytes`/:meth:`write_bytes` store a file's exact
    bytes, so copy and move between two such backends never decode and re-encode.
    ``can_write_exclusive`` says that its writes and moves (save, write_bytes, rename,
    copy_within: those it has) take ``overwrite=False`` and refuse an existing name
    atomically, so that of two concurrent copies to one new name exactly one wins.
    A subclass that sets ``__replaces_registered__ = True`` may take over a name another
    class already registered (on purpose, e.g. a patched disk backend).
    """

    _enum_root: ClassVar[bool] = True
    _backend_type: ClassVar[str | None] = None
    can_read: ClassVar[bool] = True
    can_write: ClassVar[bool] = True
    can_list: ClassVar[bool] = False
    can_hold_bytes: ClassVar[bool] = False
    can_write_exclusive: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls.__dict__.get("_enum_root") and len(args) == 1 and not kwargs:
            return BackendName(backend_name(args[0]))  # Backend("disk"), as with the enum
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._enum_root = False
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

    def delete_all(self, path: Any) -> None:
        """Delete a file, a symlink or a whole directory tree (``delete(recursive=True)``)."""
        self.delete(path, recursive=True)

    # -- byte level (only where can_hold_bytes) -----------------------------------------
    def read_bytes(self, path: Any, **kwargs: Any) -> bytes:
        """The exact stored bytes of the file at ``path`` (backends with can_hold_bytes)."""
        raise self._unsupported("read_bytes")

    def write_bytes(self, data: bytes, path: Any, **kwargs: Any) -> None:
        """Store ``data`` as the exact content of ``path`` (backends with can_hold_bytes)."""
        raise self._unsupported("write_bytes")

    def rename(self, src: Any, dst: Any) -> None:
        """Move an item within this backend without copying it (unsupported unless
        implemented; FileManager.move then copies and deletes)."""
        raise self._unsupported("rename")

    def copy_within(self, src: Any, dst: Any, **kwargs: Any) -> None:
        """Copy an item (a file or a whole tree) to another path of this backend exactly as
        stored, with what a file-by-file copy would lose (zarr: group attributes, codecs,
        chunks). Unsupported unless implemented: FileManager.copy and move then copy file
        by file. ``kwargs`` are the caller's writer options; a backend that cannot honour
        them in an exact copy raises UnsupportedOperationError (the item is then loaded and
        saved with them) or refuses."""
        raise self._unsupported("copy_within")

    # -- symlinks (only where the backend has them) -------------------------------------
    def create_symlink(self, source: Any, link: Any, overwrite: bool = False) -> None:
        """Make ``link`` point at ``source`` (unsupported unless implemented)."""
        raise self._unsupported("create_symlink")

    def is_symlink(self, path: Any) -> bool:
        """Whether ``path`` is a symbolic link; False where the backend has none."""
        return False

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
