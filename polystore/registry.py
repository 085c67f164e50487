"""Name -> backend instance mapping with lazy creation and lazy entry-point discovery.

Installed packages advertise backends in the ``polystore.backends`` entry-point group. As in
fsspec's ``get_filesystem_class``, the registry knows those backends *by name* from the
installed metadata and imports a plugin only when its name is first used: listing names or
testing membership imports nothing, so one slow or broken plugin costs nothing until asked for.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from polystore.base import (
    Backend,
    backend_name,
    forget_failed_imports,
    registered_backend_classes,
)
from polystore.errors import BackendLoadError, BackendNotFoundError, BackendNotInstantiableError

__all__ = [
    "ENTRY_POINT_GROUP",
    "BackendRegistry",
    "available_backends",
    "discover_entry_points",
    "ensure_storage_registry",
    "get_backend",
    "load_entry_point",
    "load_entry_points",
    "register_backend",
    "storage_registry",
]

logger = logging.getLogger(__name__)

#: Third-party packages list their backend classes under this entry-point group.
ENTRY_POINT_GROUP = "polystore.backends"


def discover_entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, EntryPoint]:
    """Entry-point name (lower case) -> entry point, read from installed metadata only."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(backend_name(ep.name), ep)
    return found


def load_entry_point(name: str, ep: EntryPoint) -> type[Backend] | Backend:
    """Import one advertised backend; any failure (``sys.exit`` at import included) becomes
    a BackendLoadError that says which entry point failed and why, and leaves no backend
    class of the failed module registered."""
    before = registered_backend_classes()
    try:
        obj = ep.load()
    except (Exception, SystemExit) as exc:
        forget_failed_imports(before)
        raise BackendLoadError(name, ep.value, f"{type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Backend) or (isinstance(obj, type) and issubclass(obj, Backend)):
        return obj
    raise BackendLoadError(name, ep.value, f"{obj!r} is not a polystore Backend")


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, type[Backend] | Backend]:
    """Import *every* advertised backend now (for tools that need all the classes, such as
    ``polystore shm ls`` looking for streaming prefixes). A registry never needs this: it
    imports a plugin when its name is first used. Failures are logged and skipped."""
    loaded: dict[str, type[Backend] | Backend] = {}
    for name, ep in discover_entry_points(group).items():
        try:
            loaded[name] = load_entry_point(name, ep)
        except BackendLoadError as exc:
            logger.warning("skipping backend entry point: %s", exc)
    return loaded


def _instantiate(name: str, cls: type[Backend]) -> Backend:
    """Create ``cls()``, or explain why the registry cannot do it on its own."""
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise BackendNotInstantiableError(name, cls, f"it is abstract (missing: {missing})")
    try:
        inspect.signature(cls).bind()
    except TypeError:
        raise BackendNotInstantiableError(name, cls) from None
    except ValueError:  # no introspectable signature: just try it
        pass
    return cls()


class BackendRegistry(MutableMapping[str, Backend]):
    """Every registered backend by name; instances are created on first access.

    Names are case-insensitive, and upstream's enum members (``Backend.DISK``) work as keys.
    Registered classes whose constructor takes no required arguments are instantiated
    lazily (once per registry). Others must be added explicitly:
    ``registry['db'] = SQLiteBackend(path)``. Membership tests never instantiate or import.
    Backends advertised in the ``polystore.backends`` entry-point group are listed by name
    and imported on first access (``entry_points=False`` ignores them).

    A registry pickles as configuration: the backend instances it holds (each pickles as its
    own configuration) and the names hidden in it; a copy in another process discovers its
    entry points afresh and creates the rest on first use there.
    """

    def __init__(
        self, backends: Mapping[str, Backend] | None = None, *, entry_points: bool = True
    ) -> None:
        self._lock = threading.RLock()
        self._use_entry_points = entry_points
        self._entry_points: dict[str, EntryPoint] | None = None
        self._instances: dict[str, Backend] = {}
        self._extra_classes: dict[str, type[Backend]] = {}
        self._hidden: set[str] = set()
        if backends:
            self.update(backends)

    # -- pickling: configuration only (no lock, no entry-point objects) -------------------
    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entry_points": self._use_entry_points,
                "instances": dict(self._instances),
                "extra_classes": dict(self._extra_classes),
                "hidden": set(self._hidden),
            }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(entry_points=state["entry_points"])  # type: ignore[misc]
        self._instances.update(state["instances"])
        self._extra_classes.update(state["extra_classes"])
        self._hidden.update(state["hidden"])

    # -- lookup tables ----------------------------------------------------------------
    def _advertised(self) -> dict[str, EntryPoint]:
        if not self._use_entry_points:
            return {}
        if self._entry_points is None:
            self._entry_points = discover_entry_points()
        return self._entry_points

    def _classes(self) -> dict[str, type[Backend]]:
        classes = {**self._extra_classes, **registered_backend_classes()}
        for name in self._hidden:
            classes.pop(name, None)
        return classes

    def _names(self) -> list[str]:
        advertised = set(self._advertised()) - self._hidden
        return sorted(set(self._instances) | set(self._classes()) | advertised)

    def _load_advertised(self, name: str) -> Backend:
        """Import the plugin behind entry point ``name`` and create its backend."""
        obj = load_entry_point(name, self._advertised()[name])
        if isinstance(obj, Backend):
            return obj
        if backend_name(obj._backend_type or "") != name:
            self._extra_classes[name] = obj  # also reachable under its own name
        return _instantiate(name, obj)

    # -- mapping protocol ---------------------------------------------------------------
    def __getitem__(self, name: str) -> Backend:
        key = backend_name(name)
        with self._lock:
            instance = self._instances.get(key)
            if instance is not None:
                return instance
            cls = self._classes().get(key)
            if cls is not None:
                instance = _instantiate(key, cls)
            elif key in self._advertised() and key not in self._hidden:
                instance = self._load_advertised(key)
            else:
                raise BackendNotFoundError(str(name), self._names())
            self._instances[key] = instance
            return instance

    def __setitem__(self, name: str, backend: Backend) -> None:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"backend names must be non-empty str, got {name!r}")
        if not isinstance(backend, Backend):
            raise TypeError(
                f"registry[{name!r}] must be a polystore Backend instance, got {backend!r}"
            )
        key = backend_name(name)
        with self._lock:
            self._instances[key] = backend
            self._hidden.discard(key)

    def __delitem__(self, name: str) -> None:
        """Forget the instance and hide the name in this registry (until set again)."""
        key = backend_name(name)
        with self._lock:
            if key not in self:
                raise BackendNotFoundError(str(name), self._names())
            self._instances.pop(key, None)
            self._hidden.add(key)

    def __contains__(self, name: object) -> bool:
        try:
            key = backend_name(name)
        except TypeError:
            return False
        with self._lock:
            return key in self._names()

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(self._names())

    def __len__(self) -> int:
        with self._lock:
            return len(self._names())

    def __repr__(self) -> str:
        with self._lock:
            parts = [f"{n}{'' if n in self._instances else '*'}" for n in self._names()]
        return f"{type(self).__name__}({', '.join(parts)})  (* = not created yet)"


def available_backends() -> list[str]:
    """Sorted names of every backend a fresh registry offers; imports no plugin."""
    return list(BackendRegistry())


class StorageRegistry(BackendRegistry):
    """Upstream's ``storage_registry``: iterating it yields only the backends that can be
    created without arguments (creating them, importing their plugins), so
    ``FileManager(dict(storage_registry))`` works as upstream's README shows. Backends that
    need arguments stay reachable by name once added (``storage_registry[name] = ...``)."""

    def _ready_names(self) -> list[str]:
        ready = []
        for name in self._names():
            try:
                self[name]
            except (BackendNotInstantiableError, BackendLoadError) as exc:
                logger.debug("storage_registry skips %r: %s", name, exc)
            else:
                ready.append(name)
        return ready

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(self._ready_names())

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready_names())


#: Upstream PolyStore's process-wide registry. Nothing is created until it is used; new
#: code should prefer its own ``BackendRegistry()``.
storage_registry = StorageRegistry()


def ensure_storage_registry() -> None:
    """Upstream compatibility: create every backend that needs no arguments now."""
    len(storage_registry)


def get_backend(backend_type: Any) -> Backend:
    """Upstream compatibility: the backend named ``backend_type`` in ``storage_registry``."""
    return storage_registry[backend_type]


def register_backend(name: Any, backend: Backend) -> None:
    """Upstream compatibility: add or replace ``name`` in ``storage_registry``."""
    storage_registry[backend_name(name)] = backend
