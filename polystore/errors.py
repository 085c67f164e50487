"""Exceptions raised by polystore.

Each error also derives from the built-in exception a caller would naturally catch
(``KeyError`` for registry look-ups, ``PermissionError`` for writes to a read-only backend,
...), so code written against plain Python exceptions keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "BackendNotFoundError",
    "BackendNotInstantiableError",
    "DuplicateBackendError",
    "PathEscapeError",
    "PolystoreError",
    "ReadOnlyBackendError",
    "UnsupportedFormatError",
    "UnsupportedOperationError",
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


class BackendNotFoundError(PolystoreError, KeyError):
    """No backend of that name is registered (the message lists the available ones)."""

    def __init__(self, name: str, available: Iterable[str] = ()) -> None:
        self.name = name
        self.available = sorted(available)
        listed = ", ".join(repr(n) for n in self.available) or "none"
        super().__init__(f"Unknown backend {name!r}. Available backends: {listed}.")
        self._reduce_args = (name, self.available)


class BackendNotInstantiableError(PolystoreError, KeyError):
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


class ReadOnlyBackendError(PolystoreError, PermissionError):
    """A write was attempted on a read-only backend."""

    def __init__(self, backend: str, operation: str = "write") -> None:
        self.backend = backend
        self.operation = operation
        super().__init__(
            f"Backend {backend!r} is read-only and cannot {operation}. "
            "Use a writable backend (for example 'disk' or 'memory') for writes."
        )
        self._reduce_args = (backend, operation)


class UnsupportedOperationError(PolystoreError, NotImplementedError):
    """The backend lacks the capability needed for an operation."""

    def __init__(self, backend: str, operation: str, reason: str = "") -> None:
        self.backend = backend
        self.operation = operation
        detail = f" ({reason})" if reason else ""
        super().__init__(f"Backend {backend!r} does not support {operation}(){detail}.")
        self._reduce_args = (backend, operation, reason)


class UnsupportedFormatError(PolystoreError, ValueError):
    """The file extension is not one the backend can read or write."""

    def __init__(self, path: str, supported: Iterable[str], backend: str = "disk") -> None:
        self.path = path
        self.supported = sorted(supported)
        self.backend = backend
        super().__init__(
            f"Backend {backend!r} cannot handle {path!r}: unsupported file extension. "
            f"Supported extensions: {', '.join(self.supported)}."
        )
        self._reduce_args = (path, self.supported, backend)


class PathEscapeError(PolystoreError, ValueError):
    """A path resolves outside the backend's root directory."""

    def __init__(self, path: str, root: str) -> None:
        self.path = path
        self.root = root
        super().__init__(f"Path {path!r} escapes the backend root {root!r}; refusing to use it.")
        self._reduce_args = (path, root)
