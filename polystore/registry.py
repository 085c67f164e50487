"""Name -> backend instance mapping with lazy creation and entry-point discovery."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from importlib.metadata import entry_points

from polystore.base import Backend, registered_backend_classes
from polystore.errors import BackendNotFoundError, BackendNotInstantiableError

__all__ = ["ENTRY_POINT_GROUP", "BackendRegistry", "available_backends", "load_entry_points"]

logger = logging.getLogger(__name__)

#: Third-party packages list their backend classes under this entry-point group.
ENTRY_POINT_GROUP = "polystore.backends"


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, type[Backend] | Backend]:
    """Import every backend advertised in ``group``; importing registers the classes.

    Returns entry-point name -> loaded object. A broken entry point (import error, clashing
    name, not a backend) is logged as a warning and skipped so one bad plugin cannot break
    polystore for everyone.
    """
    loaded: dict[str, type[Backend] | Backend] = {}
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as exc:
            logger.warning(
                "skipping backend entry point %r (%s): %s: %s",
                ep.name,
                ep.value,
                type(exc).__name__,
                exc,
            )
            continue
        if isinstance(obj, Backend) or (isinstance(obj, type) and issubclass(obj, Backend)):
            loaded[ep.name] = obj
        else:
            logger.warning(
                "skipping backend entry point %r (%s): %r is not a polystore Backend",
                ep.name,
                ep.value,
                obj,
            )
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

    Registered classes whose constructor takes no required arguments are instantiated
    lazily (once per registry). Others must be added explicitly:
    ``registry['db'] = SQLiteBackend(path)``. Membership tests never instantiate.
    Construction also imports third-party backends from the ``polystore.backends``
    entry-point group (``entry_points=False`` skips that).
    """

    def __init__(
        self, backends: Mapping[str, Backend] | None = None, *, entry_points: bool = True
    ) -> None:
        self._lock = threading.RLock()
        self._instances: dict[str, Backend] = {}
        self._extra_classes: dict[str, type[Backend]] = {}
        self._hidden: set[str] = set()
        if entry_points:
            for ep_name, obj in load_entry_points().items():
                if isinstance(obj, Backend):
                    self._instances.setdefault(ep_name, obj)
                elif obj._backend_type != ep_name:
                    self._extra_classes[ep_name] = obj  # also reachable under its own name
        if backends:
            self.update(backends)

    def _classes(self) -> dict[str, type[Backend]]:
        classes = {**self._extra_classes, **registered_backend_classes()}
        for name in self._hidden:
            classes.pop(name, None)
        return classes

    def __getitem__(self, name: str) -> Backend:
        with self._lock:
            instance = self._instances.get(name)
            if instance is not None:
                return instance
            cls = self._classes().get(name)
            if cls is None:
                raise BackendNotFoundError(name, self._names())
            instance = _instantiate(name, cls)
            self._instances[name] = instance
            return instance

    def __setitem__(self, name: str, backend: Backend) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"backend names must be non-empty str, got {name!r}")
        if not isinstance(backend, Backend):
            raise TypeError(
                f"registry[{name!r}] must be a polystore Backend instance, got {backend!r}"
            )
        with self._lock:
            self._instances[name] = backend
            self._hidden.discard(name)

    def __delitem__(self, name: str) -> None:
        """Forget the instance and hide the name in this registry (until set again)."""
        with self._lock:
            if name not in self:
                raise BackendNotFoundError(name, self._names())
            self._instances.pop(name, None)
            self._hidden.add(name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._instances or name in self._classes()

    def _names(self) -> list[str]:
        return sorted(set(self._instances) | set(self._classes()))

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
    """Sorted names of every backend a fresh registry offers (entry points included)."""
    return list(BackendRegistry())
