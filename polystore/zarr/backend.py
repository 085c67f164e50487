"""The ``zarr`` backend: chunked, compressed arrays on zarr-python 3, local or in object stores.

Paths name a store ending in ``.zarr`` and a node inside it: ``plate.zarr/A/1/0``. Saving an
array writes its chunks first and its metadata last, so a reader never sees an array whose
chunks are still missing. Saving a frame to ``series.zarr/cells/t003`` writes time point 3
of the array ``cells`` and grows its ``t`` axis when needed (a live time series). Loading
returns a NumPy array, or with ``lazy=True`` a :class:`zarr.Array` (``lazy="dask"``: a dask
array) that reads chunks only when indexed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from polystore.base import StorageBackend
from polystore.errors import (
    DestinationExistsError,
    PathEscapeError,
    TransferError,
    UnsupportedOperationError,
)
from polystore.paths import name_matches, normalize_extensions
from polystore.zarr.store import StoreCache, ZarrPath, require_zarr, split_zarr_path

__all__ = ["COMPRESSIONS", "ZarrBackend", "default_chunks", "frame_axis_names"]

logger = logging.getLogger(__name__)

#: A path's last component naming one time point of a series: t0, t003, t12345.
FRAME_NAME = re.compile(r"^t(\d{1,9})$")
#: Compression presets: Blosc (multithreaded, bit-shuffled for integer images) or none.
COMPRESSIONS = ("zstd", "lz4", "none")
#: Largest chunk edge along y and x by default (a 2048x2048 uint16 plane is 8 MiB).
MAX_CHUNK_EDGE = 2048
#: Largest default chunk when whole leading axes are added to a plane.
MAX_CHUNK_BYTES = 32 * 2**20
_SHARED_NAMES = ("t", "c", "z")
#: Write every chunk, even one that equals the fill value: zarr's check for such chunks
#: compares every byte and cost ~4x the write itself in scripts/bench_zarr.py.
WRITE_CONFIG = {"write_empty_chunks": True}


def default_chunks(shape: tuple[int, ...], itemsize: int = 2) -> tuple[int, ...] | Literal["auto"]:
    """One time point (or first-axis item) per chunk when it fits in 32 MiB, else one plane
    (y and x capped at 2048): what imaging writes and reads. A live series thus writes one
    chunk per saved frame: 1.7-6x faster than a chunk per plane for 3 x 2048 x 2048 uint16
    frames in side-by-side runs on the loaded 2-core VM."""
    if len(shape) < 2:
        return "auto"
    y, x = shape[-2:]
    edges = [max(1, min(y, MAX_CHUNK_EDGE)), max(1, min(x, MAX_CHUNK_EDGE))]
    chunks = [1] * (len(shape) - 2) + edges
    if (y, x) == tuple(chunks[-2:]):  # whole planes: take whole leading axes while they fit
        size = y * x * itemsize
        for axis in range(len(shape) - 3, 0, -1):
            if size * shape[axis] > MAX_CHUNK_BYTES:
                break
            size *= shape[axis]
            chunks[axis] = max(1, shape[axis])
    return tuple(chunks)


def frame_axis_names(ndim: int, used: Iterable[str] = ()) -> tuple[str, ...] | None:
    """Names of a frame's axes: y, x, then the leading ones from the end of t, c, z (skipping
    used names), as the viewers name them. None beyond five dimensions."""
    if ndim < 2:
        return None
    free = [n for n in _SHARED_NAMES if n not in set(used)]
    leading = ndim - 2
    if leading > len(free):
        return None
    return tuple(free[len(free) - leading:]) + ("y", "x")


def _compressors(compression: str | None, level: int, zarr_format: int) -> Any:
    """zarr compressors for a preset name; None for no compression."""
    name = "none" if compression is None else str(compression).lower()
    if name not in COMPRESSIONS:
        raise ValueError(
            f"unknown compression {compression!r}: use one of {', '.join(COMPRESSIONS)} (or "
            "pass zarr codecs as compressors=...)"
        )
    if name == "none":
        return None
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(cname=name, clevel=level, shuffle=Blosc.BITSHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname=name, clevel=level, shuffle="bitshuffle")


class ZarrBackend(StorageBackend):
    """Arrays and groups in zarr stores (zarr-python 3), on disk or at any fsspec URL.

    ``compression``: ``"zstd"`` (default, Blosc-zstd level ``level``), ``"lz4"`` or
    ``"none"``; ``save(..., compressors=...)`` takes zarr codecs directly. ``zarr_format``
    3 (default) or 2 (for readers that need OME-NGFF 0.4). ``storage_options`` go to fsspec
    (credentials otherwise come from the standard environment and config files).
    ``base_dir`` is prefixed to relative paths.
    """

    _backend_type = "zarr"
    can_list: ClassVar[bool] = True
    #: save/rename/copy_within take ``overwrite=False`` and refuse an existing node under
    #: its lock (FileManager.copy/move with overwrite=False rely on it).
    can_write_exclusive: ClassVar[bool] = True

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        compression: str | None = "zstd",
        level: int = 3,
        zarr_format: Literal[2, 3] = 3,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format!r}")
        _compressors(compression, level, zarr_format)  # fail now on a bad preset, not later
        self.base_dir = None if base_dir is None else str(base_dir).rstrip("/")
        self.compression = compression
        self.level = level
        self.zarr_format = zarr_format
        self.stores = StoreCache(storage_options)
        self._thread_lock = threading.RLock()

    # -- pickling: configuration only (a process pool's workers open their own stores) --
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_thread_lock"]
        state["stores"] = self.stores.storage_options
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.stores = StoreCache(state.pop("stores"))
        self._thread_lock = threading.RLock()
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_dir={self.base_dir!r}, "
                f"compression={self.compression!r}, zarr_format={self.zarr_format})")

    # -- paths ------------------------------------------------------------------------
    def split(self, path: Any) -> ZarrPath:
        """The store and node a path names (``base_dir`` applied)."""
        text = str(path)
        if self.base_dir is not None:
            parts = text.replace("\\", "/").split("/")
            if "://" in text or text.startswith("/") or ".." in parts:
                raise PathEscapeError(text, self.base_dir)
            text = f"{self.base_dir}/{text}"
        return split_zarr_path(text)

    def store(self, path: Any) -> Any:
        """The zarr store holding ``path`` (opened once, then reused)."""
        return self.stores.get(self.split(path).root)

    # -- opening nodes ----------------------------------------------------------------
    def _open(self, zp: ZarrPath, mode: str = "r") -> Any:
        """The zarr Array or Group at ``zp``; FileNotFoundError if there is none."""
        zarr = require_zarr()
        from zarr.errors import ContainsArrayError, ContainsGroupError

        store = self.stores.get(zp.root)
        with _clear_errors(zp):
            # zarr.open tries an array, then a group on any failure; when another process
            # rewrites the array's metadata meanwhile, the group attempt finds an array and
            # raises ContainsArrayError. Such a node is there: open it again.
            for attempt in range(5):
                try:
                    # the store itself, not consolidated metadata another tool left there
                    return zarr.open(store=store, path=zp.node, mode=mode, zarr_format=None,
                                     use_consolidated=False)
                except (ContainsArrayError, ContainsGroupError):
                    if attempt == 4:
                        raise

    def open(self, path: Any, mode: Literal["r", "r+"] = "r") -> Any:
        """The zarr Array or Group at ``path`` itself, for anything this API does not cover."""
        return self._open(self.split(path), mode)

    def _frame(self, zp: ZarrPath) -> tuple[ZarrPath, int] | None:
        """(series array, t) when the path's last component is a time point such as t003."""
        parent, _, name = zp.node.rpartition("/")
        match = FRAME_NAME.match(name)
        if match is None or not zp.node:
            return None
        return ZarrPath(zp.root, parent), int(match.group(1))

    # -- save -------------------------------------------------------------------------
    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Write an array (replacing what is there), or one time point ``.../t003``.

        Keywords: ``chunks``, ``compression``, ``compressors`` (zarr codecs), ``axes``
        (dimension names, e.g. ``"tczyx"``), ``attributes``; ``ome=True`` writes an
        OME-Zarr image instead (:func:`polystore.zarr.ome.write_image`), ``ome="plate"``
        an HCS plate from ``{"A/1": [field0, ...], ...}`` (:func:`~polystore.zarr.ome.write_plate`).
        ``overwrite=False`` refuses an existing node (or time point) instead, atomically
        among writers on this machine (DestinationExistsError).
        """
        zp = self.split(file_path)
        ome = kwargs.pop("ome", False)
        overwrite = kwargs.pop("overwrite", True)
        if ome:
            from polystore.zarr.ome import write_image, write_plate

            writer = write_plate if ome == "plate" else write_image
            with _clear_errors(zp, writing=True), self._grow_lock(zp):
                if not overwrite and self._node(zp) is not None:
                    raise _exists(zp)
                writer(data, self.store(file_path), zp.node, zarr_format=self.zarr_format,
                       compressors=self._codec_options(kwargs), **kwargs)
                self._reconsolidate(zp)
            return
        frame = self._frame(zp)
        if frame is not None:
            series, t = frame
            self.append(data, series, t, overwrite=overwrite, **kwargs)
            return
        if not zp.node:
            raise IsADirectoryError(
                f"cannot save an array as the store itself ({zp.root!r}): name it inside the "
                f"store, e.g. '{zp.root}/image'"
            )
        array = _as_array(data)
        self._write_array(array, zp, overwrite, **kwargs)

    def _codec_options(self, kwargs: dict[str, Any]) -> Any:
        """Pop compression options from ``kwargs``; return zarr ``compressors``."""
        compression = kwargs.pop("compression", self.compression)
        level = kwargs.pop("level", self.level)
        if "compressors" in kwargs:
            return kwargs.pop("compressors")
        return _compressors(compression, level, self.zarr_format)

    def _array_options(self, shape: tuple[int, ...], kwargs: dict[str, Any],
                       itemsize: int = 2) -> dict[str, Any]:
        compressors = self._codec_options(kwargs)
        axes = kwargs.pop("axes", None)
        options: dict[str, Any] = {
            "chunks": kwargs.pop("chunks", None) or default_chunks(shape, itemsize),
            "compressors": compressors,
            "zarr_format": self.zarr_format,
            "attributes": kwargs.pop("attributes", None),
        }
        if axes is not None:
            names = tuple(axes)
            if len(names) != len(shape):
                raise ValueError(f"axes={axes!r} names {len(names)} dimensions, but the array "
                                 f"has {len(shape)} (shape {shape})")
            if self.zarr_format == 3:
                options["dimension_names"] = names
            else:
                options["attributes"] = {**(options["attributes"] or {}), "_ARRAY_DIMENSIONS":
                                         list(names)}
        if kwargs:
            raise TypeError(f"save() to zarr got unexpected keyword arguments {sorted(kwargs)}")
        return options

    def _write_array(self, array: np.ndarray, zp: ZarrPath, overwrite: bool = True,
                     **kwargs: Any) -> None:
        """Chunks first, metadata last: an interrupted write leaves no readable array."""
        zarr = require_zarr()
        from zarr.storage import MemoryStore, StorePath

        options = self._array_options(array.shape, kwargs, array.dtype.itemsize)
        try:  # bad chunks, dtype or codecs fail here, before anything is touched
            spec = zarr.create_array(MemoryStore(), shape=array.shape, dtype=array.dtype,
                                     **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot store {array.shape} {array.dtype} at {str(zp)!r} with "
                             f"{options}: {exc}; nothing was written") from None
        store = self.stores.get(zp.root)
        with _clear_errors(zp, writing=True):
            with self._grow_lock(zp):
                existing = self._kind(zp)
                if existing == "group":
                    raise IsADirectoryError(
                        f"{str(zp)!r} is a zarr group: delete it first (delete(path, "
                        "recursive=True)) or save the array under another name"
                    )
                if existing == "array" and not overwrite:
                    raise _exists(zp)
                if existing == "array":
                    self._delete_node(zp)  # replaced: an I/O failure from here loses it
                target = zarr.Array(zarr.AsyncArray(spec.metadata, StorePath(store, zp.node),
                                                    config=WRITE_CONFIG))
                try:
                    target[...] = array
                except BaseException:
                    self._forget_chunks(store, zp)
                    raise
                try:
                    zarr.create_array(store, name=zp.node, shape=array.shape,
                                      dtype=array.dtype, overwrite=False, **options)
                except BaseException as exc:
                    self._forget_chunks(store, zp)  # written first: no array owns them now
                    where, above = self._node_above(zp) if isinstance(exc, ValueError) \
                        else ("", None)
                    if above is not None and _is_array(above):
                        raise NotADirectoryError(
                            f"cannot save {str(zp)!r}: a node above it is a zarr array "
                            f"({where!r}), and only groups hold other nodes; nothing was "
                            "written") from None
                    raise
                self._reconsolidate(zp)
        logger.debug("saved %s %s %s", zp, array.shape, array.dtype)

    def _forget_chunks(self, store: Any, zp: ZarrPath) -> None:
        """Best effort: remove chunks of a write that failed (its metadata was never written)."""
        try:
            _sync(store.delete_dir(zp.node))
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            logger.warning("could not remove the chunks of a failed write at %s: %s", zp, exc)

    def append(self, frame: Any, series: Any, t: int, overwrite: bool = True,
               **kwargs: Any) -> None:
        """Write ``frame`` as time point ``t`` of ``series``, creating or growing it.

        Growing is serialised across processes on one machine by a file lock, so workers
        appending different time points lose none. An OME-Zarr image group grows every
        resolution level. ``overwrite=False`` refuses a time point the series already has.
        """
        zp = series if isinstance(series, ZarrPath) else self.split(series)
        if t < 0:
            raise ValueError(f"time point must be >= 0, got {t}")
        frame = _as_array(frame)
        zarr = require_zarr()
        store = self.stores.get(zp.root)
        with _clear_errors(zp, writing=True):
            with self._grow_lock(zp):
                node = self._node(zp, "r+")
                if not overwrite and node is not None:
                    point = ZarrPath(zp.root, f"{zp.node}/t{t:03d}")
                    if self._stored_frame(point):
                        raise _exists(point)
                if node is not None and not _is_array(node):
                    from polystore.zarr.ome import append_frame

                    append_frame(node, t, frame)
                    self._reconsolidate(zp)
                    return
                if node is None:
                    axes = kwargs.pop("axes", None)
                    if axes is None:
                        names = frame_axis_names(frame.ndim, used=("t",))
                        axes = ("t", *names) if names else None
                    shape = (t + 1, *frame.shape)
                    options = self._array_options(shape, {**kwargs, "axes": axes},
                                                  frame.dtype.itemsize)
                    array = zarr.create_array(store, name=zp.node, shape=shape,
                                              dtype=frame.dtype, fill_value=0, **options)
                    self._reconsolidate(zp)
                else:
                    if kwargs:
                        raise TypeError(f"appending to an existing array takes no options, "
                                        f"got {sorted(kwargs)}")
                    array = node
                    _check_frame(array, frame, zp)
                    if t >= array.shape[0]:
                        array.resize((t + 1, *array.shape[1:]))
                        self._reconsolidate(zp)
            # t:t+1 with a leading axis: zarr then sees whole chunks and skips merging each
            # into a fill-valued copy (~30% faster for 2048x2048 planes)
            array.with_config(WRITE_CONFIG)[t:t + 1] = frame[None]

    def _reconsolidate(self, *changed: ZarrPath) -> None:
        """Keep consolidated metadata true: a group above (or at) a changed node that holds
        it (zarr v2 ``.zmetadata``, v3 ``consolidated_metadata``, written by
        ``zarr.consolidate_metadata``) is consolidated again, deepest first. zarr, napari's
        readers and ome-zarr open a group through it when it is there, so a node saved,
        grown, moved or deleted without it would be missing, or a ghost, for them."""
        paths = {ZarrPath(zp.root, "/".join(zp.node.split("/")[:depth]))
                 for zp in changed for depth in range(zp.node.count("/") + 2 if zp.node else 1)}
        ordered = sorted(paths, key=lambda z: (z.root, -len(z.node), z.node))
        remote = [zp for zp in ordered if zp.is_url]
        found = dict(zip(remote, _sync(_gather(  # one trip to zarr's event loop
            _consolidated_format(self.stores.get(zp.root), zp.node) for zp in remote)),
            strict=True)) if remote else {}
        found.update((zp, _local_consolidated_format(os.path.join(zp.root, zp.node)))
                     for zp in ordered if not zp.is_url)  # a live series: every frame
        for zp in ordered:
            fmt = found[zp]
            if fmt is None:
                continue
            store = self.stores.get(zp.root)
            try:
                require_zarr().consolidate_metadata(store, path=zp.node, zarr_format=fmt)
            except Exception as exc:
                exc.add_note(f"polystore: the write itself is complete, but the consolidated "
                             f"metadata of {str(zp)!r} is now out of date; run "
                             f"zarr.consolidate_metadata on it")
                raise

    @contextmanager
    def _grow_lock(self, *nodes: ZarrPath) -> Iterator[None]:
        """Serialise metadata changes of these nodes: threads always, processes on local
        stores. Several nodes are locked in one order (their lock files' names), so two
        processes moving a -> b and b -> a at once cannot each hold one and wait for the
        other until the timeout."""
        with self._thread_lock:
            from filelock import FileLock

            keys = sorted({hashlib.sha256(f"{Path(zp.root).resolve()}::{zp.node}".encode())
                           .hexdigest()[:24] for zp in nodes if not zp.is_url})
            with ExitStack() as locks:
                for key in keys:
                    lock = Path(tempfile.gettempdir()) / f"polystore-zarr-{key}.lock"
                    locks.enter_context(FileLock(str(lock), timeout=120))
                yield

    # -- load -------------------------------------------------------------------------
    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """A NumPy array; ``lazy=True`` a zarr.Array, ``lazy="dask"`` a dask array.

        An OME-Zarr image group loads its full-resolution level (``level=`` picks another);
        ``.../t003`` loads time point 3 of a series.
        """
        lazy = kwargs.pop("lazy", False)
        level = kwargs.pop("level", 0)
        if kwargs:
            raise TypeError(f"load() from zarr got unexpected keyword arguments {sorted(kwargs)}")
        zp = self.split(file_path)
        frame = self._series_frame(zp)
        if frame is not None:
            series, t = frame
            array = self._array_at(series, level)
            if array.ndim == 0 or t >= array.shape[0]:
                stored = array.shape[0] if array.ndim else 0
                raise FileNotFoundError(
                    f"{str(zp)!r}: time point {t} is not stored; the series has "
                    f"{stored} (t0..t{stored - 1})"
                )
            return _deliver(array, lazy, index=t)
        return _deliver(self._array_at(zp, level), lazy)

    def _array_at(self, zp: ZarrPath, level: int) -> Any:
        node = self._open(zp)
        if _is_array(node):
            return node
        from polystore.zarr.ome import image_level_path

        level_path = image_level_path(node, level)
        if level_path is None:
            raise IsADirectoryError(
                f"{str(zp)!r} is a zarr group, not an array: list it with list_dir() or load "
                "one of its arrays"
            )
        return node[level_path]

    # -- navigation -------------------------------------------------------------------
    def _node(self, zp: ZarrPath, mode: str = "r") -> Any:
        """The Array or Group at ``zp``, or None if there is none."""
        try:
            return self._open(zp, mode)
        except FileNotFoundError:
            return None

    def _node_above(self, zp: ZarrPath) -> tuple[str, Any]:
        """The nearest node above ``zp`` (an array there holds no nodes) and its path; None
        if there is none up to the store's root."""
        parent, above = zp.node, None
        while parent and above is None:
            parent = parent.rpartition("/")[0]
            above = self._node(ZarrPath(zp.root, parent))
        return str(ZarrPath(zp.root, parent)), above

    def _kind(self, zp: ZarrPath) -> Literal["array", "group"] | None:
        node = self._node(zp)
        if node is None:
            return None
        return "array" if _is_array(node) else "group"

    def _series_frame(self, zp: ZarrPath) -> tuple[ZarrPath, int] | None:
        """(series, t) when ``zp`` names no node of its own but time point t of an existing
        array or OME-Zarr image (``.../cells/t003``); whether t is stored is not checked."""
        frame = self._frame(zp)
        if frame is None or self._kind(zp) is not None:
            return None
        series = self._node(frame[0])
        if series is None:
            return None
        if not _is_array(series):
            from polystore.zarr.ome import image_level_path

            if image_level_path(series) is None:
                return None  # a plain group: 't003' would be a member's name, and is none
        return frame

    def _stored_frame(self, zp: ZarrPath) -> tuple[ZarrPath, int] | None:
        """(series, t) when ``zp`` is a time point that load() reads: the frame model that
        exists(), is_file() and delete() share with load(). An image whose OME metadata is
        damaged (no datasets) holds none: load() says what is wrong with it."""
        try:
            frame = self._series_frame(zp)
        except (KeyError, IndexError, TypeError):
            return None
        if frame is None:
            return None
        series, t = frame
        try:
            array = self._array_at(series, 0)
        except (IsADirectoryError, IndexError, KeyError):
            return None  # a group that is no OME-Zarr image holds no time points
        return frame if array.ndim and t < array.shape[0] else None

    def exists(self, path: Any) -> bool:
        """Whether ``path`` is an array, a group, or a stored time point of a series
        (``series.zarr/cells/t003``: what load() reads)."""
        zp = self.split(path)
        return self._kind(zp) is not None or self._stored_frame(zp) is not None

    def is_file(self, path: Any) -> bool:
        """Arrays are the 'files' of a zarr store, and so is a stored time point of a series
        (``.../cells/t003`` of an array or OME-Zarr image): whatever load() reads as one item.
        A time point is not listed by list_files/list_dir (it is a plane of its array), and
        cannot be deleted on its own (see :meth:`delete`)."""
        zp = self.split(path)
        return self._kind(zp) == "array" or self._stored_frame(zp) is not None

    def is_dir(self, path: Any) -> bool:
        """Groups are its 'directories' (an OME-Zarr image is a group too)."""
        return self._kind(self.split(path)) == "group"

    def _group(self, path: Any) -> tuple[ZarrPath, Any]:
        zp = self.split(path)
        node = self._open(zp)
        if _is_array(node):
            raise NotADirectoryError(f"{str(zp)!r} is a zarr array, not a group")
        return zp, node

    def list_dir(self, path: Any) -> list[str]:
        """Sorted names of a group's members (arrays and groups)."""
        _, group = self._group(path)
        return sorted(group.keys())

    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Paths of the arrays in a group (``recursive``: in its subgroups too), spelled
        like ``directory``; ``pattern``/``extensions`` match array names."""
        _, group = self._group(directory)
        exts = normalize_extensions(extensions)
        prefix = str(directory).rstrip("/")
        found: list[str] = []
        members = group.members(max_depth=None if recursive else 0)
        for name, node in members:
            if _is_array(node) and name_matches(name.rsplit("/", 1)[-1], pattern, exts):
                found.append(f"{prefix}/{name}")
        return sorted(found)

    def delete(self, path: Any, recursive: bool = False) -> None:
        """Delete an array, an empty group, or (``recursive=True``) a group and its contents.

        A time point of a series (``.../cells/t003``) exists and is a file, but is one plane
        of its array: deleting it alone would shift or blank the others, so it is refused
        (UnsupportedOperationError) and nothing changes. Delete the whole series, or save
        another frame to the time point to replace it."""
        zp = self.split(path)
        kind = self._kind(zp)
        if kind is None:
            frame = self._stored_frame(zp)
            if frame is not None:
                series, t = frame
                raise UnsupportedOperationError(
                    "zarr", "delete",
                    f"{str(zp)!r} is time point {t} of the series {str(series)!r}, a plane of "
                    "one array, and one plane cannot be deleted on its own: nothing was "
                    f"deleted. Delete the whole series (delete({str(series)!r}, "
                    "recursive=True)) or save another frame to this time point")
            raise FileNotFoundError(f"nothing at {str(zp)!r} on backend 'zarr'")
        if kind == "group" and not recursive and list(self._open(zp).keys()):
            raise OSError(f"zarr group {str(zp)!r} is not empty: delete(path, recursive=True) "
                          "removes it with everything in it")
        with _clear_errors(zp, writing=True), self._grow_lock(zp):
            self._delete_node(zp)
            self._reconsolidate(zp)

    def _delete_node(self, zp: ZarrPath) -> None:
        store = self.stores.get(zp.root)
        _sync(store.delete_dir(zp.node))
        if not zp.node and not zp.is_url:
            shutil.rmtree(zp.root, ignore_errors=True)

    def ensure_directory(self, path: Any) -> None:
        """Create the group (and its parents) if missing."""
        zarr = require_zarr()
        zp = self.split(path)
        with _clear_errors(zp, writing=True), self._grow_lock(zp):
            node = self._node(zp)
            if node is not None and _is_array(node):
                raise NotADirectoryError(f"cannot make the zarr group {str(zp)!r}: an array "
                                         "is stored there; nothing was changed")
            if node is None:
                zarr.open_group(store=self.stores.get(zp.root), path=zp.node, mode="a",
                                zarr_format=self.zarr_format)
                self._reconsolidate(zp)

    # -- moving and copying nodes, exactly as stored ---------------------------------
    def rename(self, src: Any, dst: Any, overwrite: bool = True) -> None:
        """Move an array, a group or a whole store with everything stored for it (attributes,
        dimension names, codecs, chunks, OME-Zarr metadata and levels, plate layout), also
        into another store: `FileManager.move` would otherwise load and save it again,
        keeping only pixels. Within local folders one directory rename, else key by key
        (metadata last) and the source deleted last.

        An array replaces an existing array (the old one is set aside until the new one is
        in place); a group is never merged into an existing node, nor an array put over a
        group: DestinationExistsError, nothing changed. A time point of a series
        (``.../cells/t003``) cannot be moved: it cannot be deleted from its array
        (TransferError, nothing written; copy it instead). ``overwrite=False`` refuses an
        existing array too (DestinationExistsError), checked under the nodes' locks so that
        of two transfers to one new name exactly one wins."""
        if self.same_path(src, dst):
            return
        self._transfer(src, dst, "move", overwrite)

    def copy_within(self, src: Any, dst: Any, overwrite: bool = True, **kwargs: Any) -> None:
        """Copy an array, a group or a whole store with everything stored for it, key by key
        with the bytes unchanged and metadata last (FileManager.copy within this backend).

        Onto an existing node (and ``overwrite``) as :meth:`rename`. Writer options
        (``compression=``, ``chunks=``, ...) ask for re-encoding: for an array
        UnsupportedOperationError tells FileManager to load and save it; a group is refused
        (re-saving its arrays one by one would drop its attributes). A time point of a
        series: UnsupportedOperationError (FileManager loads and saves it)."""
        if kwargs:
            zs = self.split(src)
            if self._kind(zs) == "group":
                raise ValueError(
                    f"cannot copy or move the zarr group {str(zs)!r} with writer options "
                    f"{sorted(kwargs)}: re-saving its arrays one by one would drop the group's "
                    "attributes (OME-Zarr metadata, plate layout); nothing was written. Copy it "
                    "without options (an exact copy), or copy its arrays one by one")
            raise UnsupportedOperationError("zarr", "copy_within",
                                            "writer options: load and save instead")
        self._transfer(src, dst, "copy", overwrite)

    def _same_store(self, a: ZarrPath, b: ZarrPath) -> bool:
        return _store_identity(a) == _store_identity(b)

    def _plan_transfer(self, zs: ZarrPath, zd: ZarrPath, verb: str) -> tuple[int, bool]:
        """Check a move or copy before anything changes: (the source's zarr format, whether
        the destination is an array the source array replaces)."""
        with _clear_errors(zs):
            node = self._node(zs)
        if node is None:
            frame = self._stored_frame(zs)
            if frame is None:
                raise FileNotFoundError(f"nothing at {str(zs)!r} on backend 'zarr'")
            if verb == "move":
                raise TransferError(
                    f"cannot move {str(zs)!r}: it is time point {frame[1]} of the series "
                    f"{str(frame[0])!r}, a plane of one array that cannot be deleted on its "
                    "own; nothing was written. copy() it, then delete or keep the series")
            raise UnsupportedOperationError("zarr", "copy_within", "a time point: load and save it")
        existing = self._node(zd)
        if existing is None and self._series_frame(zd) is not None:
            if not _is_array(node):
                raise IsADirectoryError(
                    f"cannot {verb} the zarr group {str(zs)!r} to {str(zd)!r}, a time point "
                    "of a series: only an array (one frame) fits there; nothing was changed")
            # a time point of an existing series: FileManager saves it there (appends)
            raise UnsupportedOperationError("zarr", verb, "to a time point: load and save it")
        if self._same_store(zs, zd) and (
                zs.node == zd.node or not zs.node or f"{zd.node}/".startswith(f"{zs.node}/")):
            raise ValueError(f"cannot {verb} {str(zs)!r} into itself ({str(zd)!r}); nothing "
                             "was changed")
        is_array = _is_array(node)
        if is_array and not zd.node and zs.node:  # a store that is one array moves whole
            name = zs.node.rsplit("/", 1)[-1]
            raise IsADirectoryError(
                f"cannot {verb} the array {str(zs)!r} as the store {zd.root!r} itself: name "
                f"it inside the store, e.g. '{zd.root}/{name}'; nothing was changed")
        if existing is not None and not (is_array and _is_array(existing)):
            kind = "array" if _is_array(existing) else "group"
            raise DestinationExistsError(
                f"{str(zs)!r} cannot replace the existing zarr {kind} {str(zd)!r}: the "
                "zarr backend replaces an array with an array but never merges groups (their "
                "attributes, such as OME-Zarr metadata, and their arrays would mix); nothing "
                "was changed. Delete it first (delete(path, recursive=True)) or choose a new "
                "name")
        if existing is not None and not zd.node:
            raise DestinationExistsError(
                f"cannot {verb} {str(zs)!r} onto the existing store {zd.root!r}, an array: a "
                "whole store is not replaced; nothing was changed. Delete it first "
                "(delete(path, recursive=True)) or choose a new name")
        fmt = int(node.metadata.zarr_format)
        where, above = self._node_above(zd)
        if above is not None and _is_array(above):
            raise NotADirectoryError(f"cannot {verb} to {str(zd)!r}: {where!r} is a zarr array, "
                                     "not a group; nothing was changed")
        if above is not None and int(above.metadata.zarr_format) != fmt:
            raise ValueError(
                f"cannot {verb} the zarr v{fmt} node {str(zs)!r} into {where!r}, a zarr "
                f"v{above.metadata.zarr_format} group: one store holds one format (readers "
                "would not find it); nothing was changed. Choose a store of that format or a "
                "new store")
        target_dir = Path(zd.root, zd.node)
        if existing is None and not zd.is_url and target_dir.is_dir() and any(
                target_dir.iterdir()):
            raise FileExistsError(
                f"cannot {verb} to {str(zd)!r}: that folder holds files but no zarr node "
                "(perhaps the chunks of an interrupted write); remove it first. Nothing was "
                "changed")
        if existing is None and zd.is_url and self._holds_keys(zd):
            raise FileExistsError(
                f"cannot {verb} to {str(zd)!r}: it holds keys but no zarr node (perhaps the "
                "chunks of an interrupted write, or a store without its root metadata); "
                "they would mix with the copy. Remove them first. Nothing was changed")
        return fmt, existing is not None

    def _holds_keys(self, zp: ZarrPath) -> bool:
        """Whether any key is stored under ``zp`` (its own or those of nodes below it)."""
        store = self.stores.get(zp.root)
        prefix = f"{zp.node}/" if zp.node else ""

        async def first() -> bool:
            async for _ in store.list_prefix(prefix):
                return True
            return False

        with _clear_errors(zp):
            return bool(_sync(first()))

    def _transfer(self, src: Any, dst: Any, verb: Literal["move", "copy"],
                  overwrite: bool) -> None:
        """Check, then copy (or move) a node, both under the two nodes' locks: directory
        renames where both are local folders on one filesystem, else keys with the bytes
        unchanged, metadata last."""
        zs, zd = self.split(src), self.split(dst)
        with self._grow_lock(zs, zd):
            fmt, replace = self._plan_transfer(zs, zd, verb)
            if replace and not overwrite:
                raise _exists(zd)
            with _clear_errors(zd, writing=True):
                self._transfer_checked(zs, zd, fmt, replace, move=verb == "move")
                self._reconsolidate(zd, *([zs] if verb == "move" else []))

    def _transfer_checked(self, zs: ZarrPath, zd: ZarrPath, fmt: int, replace: bool,
                          move: bool) -> None:
        zarr = require_zarr()
        source, target = self.stores.get(zs.root), self.stores.get(zd.root)
        local = not (zs.is_url or zd.is_url)
        created: list[ZarrPath] = []  # groups made above the destination, removed on failure
        try:
            if zd.node:  # the groups above the destination, in the source's format
                parts = zd.node.split("/")[:-1]
                for depth in range(len(parts) + 1):
                    above = ZarrPath(zd.root, "/".join(parts[:depth]))
                    if self._node(above) is None:
                        zarr.open_group(store=target, path=above.node, mode="a",
                                        zarr_format=fmt)
                        created.append(above)
            if move and local:
                try:
                    _swap_in(Path(zs.root, zs.node), Path(zd.root, zd.node), replace)
                    return
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
            staged = zd
            if replace:  # copied beside the array it replaces, which stays until then
                name = zd.node.rpartition("/")
                staged = ZarrPath(zd.root, f"{name[0]}{name[1]}.{name[2]}.polystore-"
                                           f"{uuid.uuid4().hex[:8]}")
            try:
                _sync(_copy_keys(source, zs.node, target, staged.node))
            except BaseException:
                self._discard(staged)
                raise
        except BaseException:
            self._discard_groups(created)
            raise
        if replace:
            self._put_in_place(staged, zd)
        if move:
            self._delete_node(zs)

    def _put_in_place(self, staged: ZarrPath, zd: ZarrPath) -> None:
        """Replace the array at ``zd`` with the complete copy at ``staged``."""
        if not zd.is_url:
            _swap_in(Path(staged.root, staged.node), Path(zd.root, zd.node), True)
            return
        store = self.stores.get(zd.root)
        self._delete_node(zd)
        try:
            _sync(_copy_keys(store, staged.node, store, zd.node))
        except BaseException as exc:
            exc.add_note(f"polystore: the replaced array {str(zd)!r} was deleted; its new "
                         f"content is complete at {str(staged)!r}")
            raise
        self._discard(staged)

    def _discard_groups(self, created: list[ZarrPath]) -> None:
        """Best effort: remove the groups a failed move or copy created, deepest first and
        only while empty: their metadata keys, then (local) their folder if nothing else is
        in it. A store folder that held other files before keeps them."""
        for zp in reversed(created):
            try:
                node = self._node(zp)
                with warnings.catch_warnings():  # files that are no nodes: not ours, kept
                    warnings.simplefilter("ignore")
                    if node is None or _is_array(node) or list(node.keys()):
                        continue
                store = self.stores.get(zp.root)
                prefix = f"{zp.node}/" if zp.node else ""
                for key in _METADATA_KEYS:
                    _sync(store.delete(prefix + key))
                if not zp.is_url:
                    with suppress(OSError):
                        os.rmdir(Path(zp.root, zp.node))
            except Exception as exc:  # noqa: BLE001 - the original error matters more
                logger.warning("could not remove the group %s made for a failed copy: %s",
                               zp, exc)

    def _discard(self, zp: ZarrPath) -> None:
        """Best effort: remove a node this backend was writing (a failed copy)."""
        try:
            self._delete_node(zp)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            logger.warning("could not remove the partial copy at %s: %s", zp, exc)

    def same_path(self, a: Any, b: Any) -> bool:
        za, zb = self.split(a), self.split(b)
        return (_store_identity(za), za.node) == (_store_identity(zb), zb.node)


# -- helpers ----------------------------------------------------------------------------------


def _store_identity(zp: ZarrPath) -> str | Path:
    """One spelling per store: a local folder by its resolved path, also when named as a
    ``file://`` URL (the same LocalStore opens both); an object-store URL as written."""
    if zp.is_url and not zp.root.startswith("file://"):
        return zp.root
    return Path(zp.root.removeprefix("file://")).resolve()


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


#: Keys that make a node readable: copied last, deepest first, so an interrupted copy
#: leaves nothing a reader could open with missing chunks.
_METADATA_KEYS = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


async def _gather(coroutines: Iterable[Any]) -> list[Any]:
    return list(await asyncio.gather(*coroutines))


async def _consolidated_format(store: Any, node: str) -> int | None:
    """The zarr format of the group at `node` if it holds consolidated metadata, else None:
    two key reads, not a group opened."""
    from zarr.core.buffer import default_buffer_prototype

    prefix = f"{node}/" if node else ""
    if await store.exists(f"{prefix}.zmetadata"):
        return 2
    raw = await store.get(f"{prefix}zarr.json", default_buffer_prototype())
    return None if raw is None else _v3_consolidated(raw.to_bytes())


def _local_consolidated_format(folder: str) -> int | None:
    """`_consolidated_format` for a folder on this machine, without zarr's event loop (a
    live series grows through here every frame: 4 levels cost 0.8 ms that way)."""
    if os.path.exists(os.path.join(folder, ".zmetadata")):
        return 2
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return _v3_consolidated(raw)


def _v3_consolidated(raw: bytes) -> int | None:
    try:
        meta = json.loads(raw)
    except ValueError:
        return None  # damaged: whoever reads it is told so
    return 3 if isinstance(meta, dict) and meta.get("node_type") == "group" and meta.get(
        "consolidated_metadata") is not None else None


async def _copy_keys(source: Any, src_node: str, target: Any, dst_node: str) -> None:
    """Copy every key of node `src_node` of store `source` (``""``: the whole store) to
    `dst_node` of `target`, bytes unchanged: chunks first, then metadata deepest first."""
    from zarr.core.buffer import default_buffer_prototype

    prototype = default_buffer_prototype()
    prefix = f"{src_node}/" if src_node else ""
    keys = [key async for key in source.list_prefix(prefix)]
    keys.sort(key=lambda k: (k.rsplit("/", 1)[-1] in _METADATA_KEYS, -k.count("/"), k))
    for key in keys:
        value = await source.get(key, prototype)
        if value is not None:
            rest = key[len(prefix):]
            await target.set(f"{dst_node}/{rest}" if dst_node else rest, value)


def _swap_in(source: Path, target: Path, replace: bool) -> None:
    """Rename the directory ``source`` to ``target``; with ``replace`` the directory at
    ``target`` is set aside first and put back if the rename fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        os.replace(source, target)
        return
    aside = target.with_name(f".{target.name}.polystore-old-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _is_array(node: Any) -> bool:
    import zarr

    return isinstance(node, zarr.Array)


def _as_array(data: Any) -> np.ndarray:
    array = np.asarray(data)
    if array.dtype == object:
        raise TypeError(f"zarr stores numeric arrays; got {type(data).__name__} of objects")
    return array


def _check_frame(array: Any, frame: np.ndarray, zp: ZarrPath) -> None:
    if tuple(array.shape[1:]) != frame.shape or array.dtype != frame.dtype:
        raise ValueError(
            f"frame {frame.shape} {frame.dtype} does not fit the series {str(zp)!r}, whose "
            f"frames are {tuple(array.shape[1:])} {array.dtype}; nothing was written. Save it "
            "to a new series or convert it first"
        )


def _deliver(array: Any, lazy: Any, index: int | None = None) -> Any:
    if lazy == "dask":
        import dask.array as da

        lazy_array = da.from_zarr(array)
        return lazy_array if index is None else lazy_array[index]
    if lazy:
        return array if index is None else _LazyFrame(array, index)
    return array[...] if index is None else array[index]


class _LazyFrame:
    """One time point of a zarr array, read when indexed (``frame[...]`` reads it all)."""

    def __init__(self, array: Any, index: int) -> None:
        self.array, self.index = array, index
        self.shape, self.dtype, self.ndim = tuple(array.shape[1:]), array.dtype, array.ndim - 1

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.array[(self.index, *key)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = np.asarray(self.array[self.index])
        return data if dtype is None else data.astype(dtype)


def _exists(zp: ZarrPath) -> DestinationExistsError:
    return DestinationExistsError(f"{str(zp)!r} already exists on backend 'zarr'; pass "
                                  "overwrite=True to replace it. Nothing was changed")


@contextmanager
def _clear_errors(zp: ZarrPath, writing: bool = False) -> Iterator[None]:
    """Turn store failures (missing bucket, refused credentials, dropped connection) into
    errors that name the path and say what to do. Reads made on behalf of a write (does
    the array exist?) are explained as part of that write."""
    writing = writing or _WRITING.get()
    token = _WRITING.set(writing)
    try:
        yield
    except (IsADirectoryError, NotADirectoryError, FileExistsError):
        raise  # already say what is wrong (FileExistsError: overwrite=False)
    except OSError as exc:
        if getattr(exc, "polystore_explained", False):
            raise  # already explained by an inner call
        explained = _explain(exc, zp, writing)
        explained.polystore_explained = True  # type: ignore[attr-defined]
        raise explained from exc
    except Exception as exc:
        if zp.is_url and _looks_like_connection_error(exc):
            explained = _no_answer(exc, zp, writing)
            explained.polystore_explained = True  # type: ignore[attr-defined]
            raise explained from exc
        raise
    finally:
        _WRITING.reset(token)


_WRITING: ContextVar[bool] = ContextVar("polystore_zarr_writing", default=False)


def _looks_like_connection_error(exc: BaseException) -> bool:
    """botocore/aiohttp connection failures, which are not OSErrors."""
    name = type(exc).__name__
    return any(word in name for word in ("Connect", "Endpoint", "Timeout", "Disconnected"))


def _explain(exc: OSError, zp: ZarrPath, writing: bool) -> OSError:
    """The error to raise instead of ``exc``: it names the path and says what to do."""
    if isinstance(exc, FileNotFoundError):
        if zp.is_url and writing:
            return FileNotFoundError(
                f"cannot write {str(zp)!r}: {exc}. Does the bucket exist? Create it first "
                "(e.g. `aws s3 mb`); nothing was written")
        return FileNotFoundError(f"nothing at {str(zp)!r} on backend 'zarr'")
    if isinstance(exc, PermissionError):
        return PermissionError(
            f"access to {str(zp)!r} was refused: {exc}. Check the credentials in the "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws) or storage_options")
    if zp.is_url:
        return _no_answer(exc, zp, writing)
    return exc


def _no_answer(exc: BaseException, zp: ZarrPath, writing: bool) -> ConnectionError:
    """One wording for every lost connection, OSError or botocore's own."""
    return ConnectionError(
        f"the object store did not answer for {str(zp)!r}: {type(exc).__name__}: {exc}. "
        "Check the endpoint and the network, then retry"
        + ("; no array was written" if writing else ""))
