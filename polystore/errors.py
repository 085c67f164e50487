"""Exceptions raised by polystore.

Each error also derives from the built-in exception a caller would naturally catch
(``KeyError`` for registry look-ups, ``PermissionError`` for writes to a read-only backend,
...), so code written against plain Python exceptions keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "BackendLoadError",
    "BackendNotFoundError",
    "BackendNotInstantiableError",
    "DeliveryNotConfirmedError",
    "DestinationExistsError",
    "DuplicateBackendError",
    "FormatDataError",
    "FormatReadError",
    "ImageLoadError",
    "ImageSaveError",
    "MetadataNotFoundError",
    "NotFoundOnBackendError",
    "PathEscapeError",
    "PathMismatchError",
    "PolystoreError",
    "ReadOnlyBackendError",
    "StorageResolutionError",
    "StorageWriteError",
    "TransferError",
    "UnsupportedFormatError",
    "UnsupportedOperationError",
    "VFSTypeError",
]


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class PolystoreError(Exception):
    """Base class of every polystore error.

    Subclasses build their message from structured fields; ``__reduce__`` re-creates them
    from those fields so errors survive pickling (worker processes, dask).
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message
        self._reduce_args: tuple[Any, ...] = (message,)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._reduce_args)


# -- upstream PolyStore's names (polystore.exceptions re-exports them) ------------------------
# Each is a PolystoreError *and* the built-in upstream derived it from, and this project's
# specific errors derive from the upstream name that covers them, so `except
# StorageResolutionError` (upstream style) and `except BackendNotFoundError` (this project)
# both catch the same failure.
class StorageResolutionError(PolystoreError, ValueError):
    """A backend, path or stored item could not be resolved (upstream's catch-all)."""


class ImageLoadError(PolystoreError, RuntimeError):
    """Decoding a stored item failed."""


class ImageSaveError(PolystoreError, RuntimeError):
    """Encoding data for storage failed."""


class StorageWriteError(PolystoreError, RuntimeError):
    """Writing to storage failed."""


class MetadataNotFoundError(PolystoreError, ValueError):
    """Required metadata could not be found."""


class PathMismatchError(PolystoreError, ValueError):
    """A path does not fit the backend it was given to."""


class VFSTypeError(PolystoreError, TypeError):
    """A value of the wrong type crossed the storage boundary."""


class BackendNotFoundError(StorageResolutionError, KeyError):
    """No backend of that name is registered (the message lists the available ones)."""

    def __init__(self, name: str, available: Iterable[str] = ()) -> None:
        self.name = name
        self.available = sorted(available)
        listed = ", ".join(repr(n) for n in self.available) or "none"
        super().__init__(f"Unknown backend {name!r}. Available backends: {listed}.")
        self._reduce_args = (name, self.available)


class BackendNotInstantiableError(StorageResolutionError, KeyError):
    """A backend class is registered but cannot be created without arguments."""

    def __init__(self, name: str, cls: type | str, reason: str = "its constructor needs arguments"):
        self.name = name
        self.cls_name = cls if isinstance(cls, str) else _class_name(cls)
        short = self.cls_name.rsplit(".", 1)[-1]
        super().__init__(
            f"Backend {name!r} ({self.cls_name}) cannot be created automatically: {reason}. "
            f"Create it yourself and add it to the registry: registry[{name!r}] = {short}(...)"
        )
        self._reduce_args = (name, self.cls_name, reason)


class DuplicateBackendError(PolystoreError, TypeError):
    """Two different classes claim the same ``_backend_type``."""

    def __init__(self, name: str, existing: type | str, new: type | str) -> None:
        self.name = name
        self.existing = existing if isinstance(existing, str) else _class_name(existing)
        self.new = new if isinstance(new, str) else _class_name(new)
        super().__init__(
            f"Backend name {name!r} is already registered by {self.existing}; "
            f"{self.new} cannot claim it too. Choose a different _backend_type."
        )
        self._reduce_args = (name, self.existing, self.new)


class ReadOnlyBackendError(StorageWriteError, PermissionError):
    """A write was attempted on a read-only backend."""

    def __init__(self, backend: str, operation: str = "write") -> None:
        self.backend = backend
        self.operation = operation
        super().__init__(
            f"Backend {backend!r} is read-only and cannot {operation}. "
            "Use a writable backend (for example 'disk' or 'memory') for writes."
        )
        self._reduce_args = (backend, operation)


class UnsupportedOperationError(StorageResolutionError, NotImplementedError):
    """The backend lacks the capability needed for an operation."""

    def __init__(self, backend: str, operation: str, reason: str = "") -> None:
        self.backend = backend
        self.operation = operation
        detail = f" ({reason})" if reason else ""
        super().__init__(f"Backend {backend!r} does not support {operation}(){detail}.")
        self._reduce_args = (backend, operation, reason)


class UnsupportedFormatError(StorageResolutionError):
    """The file extension is not one the backend can read or write."""

    def __init__(
        self, path: str, supported: Iterable[str], backend: str = "disk", detail: str = ""
    ) -> None:
        self.path = path
        self.supported = sorted(supported)
        self.backend = backend
        self.detail = detail
        super().__init__(
            f"Backend {backend!r} cannot handle {path!r}: "
            f"{detail or 'unsupported file extension'}. "
            f"Supported extensions: {', '.join(self.supported)}."
        )
        self._reduce_args = (path, self.supported, backend, detail)


class PathEscapeError(PathMismatchError):
    """A path resolves outside the backend's root directory."""

    def __init__(self, path: str, root: str) -> None:
        self.path = path
        self.root = root
        super().__init__(f"Path {path!r} escapes the backend root {root!r}; refusing to use it.")
        self._reduce_args = (path, root)


class BackendLoadError(StorageResolutionError, KeyError):
    """An installed plugin advertises a backend name, but importing it failed."""

    def __init__(self, name: str, source: str, reason: str) -> None:
        self.name = name
        self.source = source
        self.reason = reason
        super().__init__(
            f"Backend {name!r} is advertised by the entry point {source!r}, but loading it "
            f"failed: {reason}. Reinstall or fix the package that provides it, or use another "
            "backend."
        )
        self._reduce_args = (name, source, reason)


class NotFoundOnBackendError(StorageResolutionError, FileNotFoundError):
    """A path does not exist on a backend (a FileNotFoundError that names both)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class DestinationExistsError(StorageResolutionError, FileExistsError):
    """A copy, move or symlink would replace an existing item without being asked to (a
    FileExistsError; upstream's FileManager reported it as StorageResolutionError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class FormatDataError(ImageSaveError, TypeError):
    """Data of a type the path's format cannot hold (the message says what it accepts)."""

    def __init__(self, path: str, given: str, accepts: str) -> None:
        self.path = path
        self.given = given
        self.accepts = accepts
        super().__init__(f"Cannot save {given} to {path!r}: this extension takes {accepts}.")
        self._reduce_args = (path, given, accepts)


class FormatReadError(ImageLoadError, ValueError):
    """A file that cannot be read as its extension's format: damaged, not in the encoding the
    format uses (text is UTF-8), or asked for a part it lacks (a TIFF page or series). A
    ValueError, as the JSON and text decoding errors it replaces; the message names the
    file and says what to do."""


class TransferError(StorageWriteError):
    """A copy or move did not complete; the message says where the data are now."""


class DeliveryNotConfirmedError(TransferError):
    """A move to a sink that cannot confirm delivery (or did not): the source was kept."""
