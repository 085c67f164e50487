"""Where a zarr path's store ends and its node path begins, and stores opened from URLs.

A polystore zarr path names a store whose last folder ends in ``.zarr`` (``plate.zarr``,
``img.ome.zarr``, ``s3://bucket/run1/plate.zarr``) followed by the node inside it
(``A/1/0``). Local paths open a :class:`zarr.storage.LocalStore`; URLs (``s3://``,
``gs://``, ``memory://``, any fsspec protocol) an :class:`zarr.storage.FsspecStore`.
zarr is imported only here and only when a store is opened, so ``import polystore`` stays
light and works without the ``zarr`` extra.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["INSTALL_ZARR", "ZarrPath", "require_zarr", "split_zarr_path"]

INSTALL_ZARR = "pip install 'polystore[zarr]' (zarr>=3, ome-zarr-models)"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def require_zarr() -> Any:
    """Import zarr, or say how to install it."""
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - the suite installs zarr
        raise ImportError(f"the zarr backend needs zarr-python 3: {INSTALL_ZARR} ({exc})") from None
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"the zarr backend needs zarr-python >= 3, found {zarr.__version__}: "
                          f"{INSTALL_ZARR}")
    return zarr


@dataclass(frozen=True)
class ZarrPath:
    """A zarr path split into the store (``root``) and the node inside it (``node``)."""

    root: str
    node: str

    @property
    def is_url(self) -> bool:
        return bool(_URL.match(self.root))

    def __str__(self) -> str:
        return f"{self.root}/{self.node}" if self.node else self.root


def split_zarr_path(path: Any) -> ZarrPath:
    """Split ``'plate.zarr/A/1/0'`` into store ``plate.zarr`` and node ``A/1/0``.

    The store is the first path component ending in ``.zarr``; a path without one is an
    error, because guessing where the store starts would write somewhere unexpected.
    """
    text = str(path).replace("\\", "/")
    match = _URL.match(text)
    scheme, rest = (match.group(0), text[match.end():]) if match else ("", text)
    parts = rest.split("/")
    for index, part in enumerate(parts):
        if part.lower().endswith(".zarr") and len(part) > len(".zarr"):
            root = scheme + "/".join(parts[: index + 1])
            node = "/".join(p for p in parts[index + 1:] if p not in ("", "."))
            if ".." in node.split("/"):
                raise ValueError(f"zarr path {text!r}: '..' is not allowed inside a store")
            return ZarrPath(root, node)
    raise ValueError(
        f"zarr path {text!r} names no store: put the array or group inside a folder whose "
        "name ends in '.zarr', e.g. 'plate.zarr/A/1/0' or 's3://bucket/plate.zarr/A/1/0'"
    )


class StoreCache:
    """One zarr store object per root, shared by every call (fsspec clients are costly)."""

    def __init__(self, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, root: str) -> Any:
        with self._lock:
            store = self._stores.get(root)
            if store is None:
                store = self._open(root)
                self._stores[root] = store
            return store

    def _open(self, root: str) -> Any:
        require_zarr()
        from zarr.storage import FsspecStore, LocalStore

        if _URL.match(root) and not root.startswith("file://"):
            try:
                # one filesystem per backend: credentials are read when it is created
                options = {"skip_instance_cache": True, **self.storage_options}
                return FsspecStore.from_url(root, storage_options=options)
            except (ImportError, ValueError) as exc:
                raise ImportError(
                    f"cannot open {root!r}: {exc}. Object stores need fsspec and the "
                    "protocol's package (s3://: pip install 'polystore[s3]')"
                ) from None
        return LocalStore(root.removeprefix("file://"))
