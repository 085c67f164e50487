"""FileManager: one front door that routes every call to an explicitly named backend."""

from __future__ import annotations

import hashlib
import io
import logging
from collections import deque
from collections.abc import Iterable, Mapping, MutableMapping
from contextlib import suppress
from pathlib import PurePosixPath
from typing import Any, NoReturn

import numpy as np
import tifffile

from polystore import formats
from polystore.backends.disk import DiskBackend
from polystore.base import Backend, backend_label, backend_name, check_batch_lengths
from polystore.errors import (
    BackendNotFoundError,
    DeliveryNotConfirmedError,
    DestinationExistsError,
    NotFoundOnBackendError,
    ReadOnlyBackendError,
    TransferError,
    UnsupportedFormatError,
    UnsupportedOperationError,
)
from polystore.paths import natural_sort_key

__all__ = ["DEFAULT_IMAGE_EXTENSIONS", "FileManager"]

logger = logging.getLogger(__name__)

#: Extensions ``list_image_files`` looks for unless told otherwise.
DEFAULT_IMAGE_EXTENSIONS = frozenset(
    {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".npy"}
)


def _raise_not_found(exc: FileNotFoundError, path: Any, backend: str) -> NoReturn:
    """Re-raise as a NotFoundOnBackendError (a FileNotFoundError and upstream's
    StorageResolutionError) whose message names both the path and the backend."""
    if isinstance(exc, NotFoundOnBackendError):
        raise exc
    message = str(exc)
    if not (str(path) in message and backend in message):
        message = f"{str(path)!r} not found on backend {backend!r}: {message}"
    raise NotFoundOnBackendError(message) from exc


def _overrides(backend: Backend, method: str) -> bool:
    return getattr(type(backend), method) is not getattr(Backend, method)


def _delivery_policy(sink: Backend) -> str | None:
    """A streaming sink's back-pressure policy ('block', 'raise', 'latest'), wherever the
    backend exposes it; None for sinks without one."""
    for holder in (sink, getattr(sink, "options", None), getattr(sink, "sender", None)):
        policy = getattr(holder, "policy", None)
        if isinstance(policy, str):
            return policy
    return None


def _refuse_partial_decode(source: Backend, src: Any, dst: Any) -> None:
    """A TIFF of several series decodes to its first series only: a move that converted
    it would delete the others, so say so before anything is written."""
    fmt = formats.format_for(src)
    if fmt is None or fmt.name != "tiff" or not source.can_hold_bytes:
        return
    try:
        raw = source.read_bytes(src)
    except UnsupportedFormatError:
        return
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            count = len(tif.series)
    except tifffile.TiffFileError:
        return  # load() reports a damaged file
    if count > 1:
        raise TransferError(
            f"{str(src)!r} holds {count} TIFF series and load() reads only the first, so "
            f"moving it to {str(dst)!r} would convert it and drop the rest; nothing was "
            "written and the source was kept. Keep "
            "the extension (bytes are copied exactly), or load(..., series=i) each and save it"
        )


def _refuse_file_and_directory(source: Backend, path: Any) -> None:
    """An object store may hold an object ``run1`` and objects under ``run1/``: a tree
    copy would take only those under it, and a move would then delete the object too."""
    if _overrides(source, "is_file") and source.is_file(path):
        raise UnsupportedOperationError(
            backend_label(source),
            "copy",
            f"{str(path)!r} is both a file and a directory (an object and a prefix of other "
            "objects): copying it as a tree would leave the file behind, and a move would "
            "delete it. Nothing was copied; copy the file and the objects under it separately",
        )


def _reading_as(data: Any, fmt: formats.Format) -> dict[str, Any]:
    """How to load a converted item back in the form it was saved: a CSV of an array as an
    array, of records as dicts, of rows as rows (a plain load gives its text)."""
    if fmt.name != "csv" or isinstance(data, str):
        return {}
    if isinstance(data, np.ndarray):
        return {"as_": "array"}
    if isinstance(data, list) and data and all(isinstance(row, Mapping) for row in data):
        return {"as_": "dicts"}
    return {"as_": "rows"} if isinstance(data, list) else {}


def _check_loads_back(data: Any, back: Any, src: Any, dst: Any, written: bool = False) -> None:
    """A move converts only what loads back equal: an array of the same dtype (byte order
    aside: the format's) and values, else an object equal to the source's."""
    if isinstance(data, np.ndarray) and isinstance(back, Mapping) and len(back) == 1:
        back = next(iter(back.values()))  # an array saved as .npz: its one member
    if isinstance(data, np.ndarray):
        same = (isinstance(back, np.ndarray)
                and back.dtype.newbyteorder("=") == data.dtype.newbyteorder("=")
                and np.array_equal(back, data, equal_nan=data.dtype.kind in "fc"))
    else:
        try:
            same = type(back) is type(data) and bool(back == data)
        except Exception:  # noqa: BLE001 - objects that cannot say whether they are equal
            same = False
    if not same:
        raise TransferError(
            f"move of {str(src)!r}: converting it to {str(dst)!r} changes the data (a lossy "
            "format, another type, or writer options); the source was kept, and "
            + ("the converted copy stays at the destination" if written else
               "nothing was written") + ". Use copy() to convert anyway"
        )


def _join(base: Any, rel: str) -> str:
    """`rel` under `base`; a URL keeps its ``scheme://`` (PurePosixPath made it ``s3:/``)."""
    if not rel:
        return str(base)
    text = str(base)
    scheme, sep, rest = text.partition("://")
    if sep:
        return f"{scheme}://{PurePosixPath(rest) / rel}"
    return str(PurePosixPath(text) / rel)


class FileManager:
    """Route storage calls to the backend each call names.

    ``registry`` is a :class:`~polystore.registry.BackendRegistry` or any mapping of name
    to backend instance. Every method takes the backend's name, positionally (as upstream
    PolyStore documents) or as ``backend=``; names are case-insensitive and upstream's
    ``Backend.DISK`` enum members work too. There is no default backend and no guessing:
    an unknown name raises BackendNotFoundError listing the available ones.

    A FileManager pickles with its registry (as configuration), so one instance can be
    handed to multiprocessing, ProcessPoolExecutor or Dask workers.
    """

    def __init__(self, registry: Mapping[str, Backend]) -> None:
        if not isinstance(registry, Mapping):
            raise TypeError(f"FileManager needs a mapping of name -> backend, got {registry!r}")
        self.registry = registry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.registry!r})"

    def get_backend(self, backend: Any) -> Backend:
        """The backend instance registered as ``backend``."""
        key = backend_name(backend)
        if key in self.registry:
            return self.registry[key]
        if isinstance(backend, str) and backend in self.registry:  # a plain dict, mixed case
            return self.registry[backend]
        raise BackendNotFoundError(str(backend), list(self.registry))

    def register_backend(self, name: Any, backend: Backend) -> None:
        """Add or replace a backend in this FileManager's registry."""
        if not isinstance(self.registry, MutableMapping):
            raise TypeError(
                f"this FileManager's registry ({type(self.registry).__name__}) is read-only; "
                "build the FileManager on a BackendRegistry or a dict to register backends"
            )
        self.registry[backend_name(name)] = backend

    # -- data -----------------------------------------------------------------------
    def save(self, data: Any, file_path: Any, backend: Any, **kwargs: Any) -> Any:
        """Store ``data`` at ``file_path``; keyword arguments go to the backend."""
        return self.get_backend(backend).save(data, file_path, **kwargs)

    def load(self, file_path: Any, backend: Any, **kwargs: Any) -> Any:
        """Return the item at ``file_path``; keyword arguments go to the backend."""
        target = self.get_backend(backend)
        try:
            return target.load(file_path, **kwargs)
        except FileNotFoundError as exc:
            _raise_not_found(exc, file_path, str(backend))

    def load_text(self, file_path: Any, backend: Any) -> str:
        """The stored item as text: bytes decoded as UTF-8, a str as it is."""
        target = self.get_backend(backend)
        try:
            raw = target.read_bytes(file_path) if target.can_hold_bytes else None
        except FileNotFoundError as exc:
            _raise_not_found(exc, file_path, str(backend))
        except UnsupportedFormatError:
            raw = None
        data = raw if raw is not None else self.load(file_path, backend)
        if isinstance(data, formats.BYTES_TYPES):
            return bytes(data).decode("utf-8")
        if isinstance(data, str):
            return data
        raise TypeError(
            f"load_text({str(file_path)!r}): backend {backend!r} holds "
            f"{type(data).__name__}, not text; use load()"
        )

    def save_batch(
        self, data_list: Iterable[Any], file_paths: Iterable[Any], backend: Any, **kwargs: Any
    ) -> None:
        """Save several items; a length mismatch raises ValueError before anything is written."""
        target = self.get_backend(backend)
        data_list, file_paths = list(data_list), list(file_paths)
        check_batch_lengths(data_list, file_paths)
        target.save_batch(data_list, file_paths, **kwargs)

    def load_batch(self, file_paths: Iterable[Any], backend: Any, **kwargs: Any) -> list[Any]:
        target = self.get_backend(backend)
        file_paths = list(file_paths)
        try:
            return target.load_batch(file_paths, **kwargs)
        except FileNotFoundError as exc:
            missing = exc.filename or next(
                (p for p in file_paths if str(p) in str(exc)), ", ".join(map(str, file_paths))
            )
            _raise_not_found(exc, missing, str(backend))

    # -- navigation -----------------------------------------------------------------
    def list_files(
        self,
        directory: Any,
        backend: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Files under ``directory`` in natural order ('t2' before 't10'); extra keyword
        arguments go to the backend."""
        target = self.get_backend(backend)
        try:
            found = target.list_files(
                directory, pattern=pattern, extensions=extensions, recursive=recursive, **kwargs
            )
        except FileNotFoundError as exc:
            _raise_not_found(exc, directory, str(backend))
        return sorted((str(f) for f in found), key=natural_sort_key)

    def list_image_files(
        self,
        directory: Any,
        backend: Any,
        pattern: str | None = None,
        extensions: Iterable[str] = DEFAULT_IMAGE_EXTENSIONS,
        recursive: bool = False,
    ) -> list[str]:
        """Image files under ``directory`` (``DEFAULT_IMAGE_EXTENSIONS``), natural order."""
        return self.list_files(
            directory, backend, pattern=pattern, extensions=extensions, recursive=recursive
        )

    def find_file_recursive(self, directory: Any, filename: str, backend: Any) -> str | None:
        """The first file named ``filename`` under ``directory`` (natural order), else None."""
        for path in self.list_files(directory, backend, recursive=True):
            if PurePosixPath(path).name == filename:
                return path
        return None

    def list_dir(self, path: Any, backend: Any) -> list[str]:
        target = self.get_backend(backend)
        try:
            return sorted(target.list_dir(path), key=natural_sort_key)
        except FileNotFoundError as exc:
            _raise_not_found(exc, path, str(backend))

    def collect_dirs_and_files(
        self, base_dir: Any, backend: Any, recursive: bool = True
    ) -> tuple[list[str], list[str]]:
        """Every directory (``base_dir`` included) and file below ``base_dir``, breadth
        first, each list in natural order.

        As ``os.walk``: a symbolic link to a directory is listed among the directories but
        not entered (a link to a parent would loop, one elsewhere would walk outside the
        tree); a link to a file is a file; a dangling link is left out (logged), as by
        ``list_files``: it is neither a file nor a directory, and cannot be loaded."""
        target = self.get_backend(backend)
        dirs: list[str] = []
        files: list[str] = []
        dangling: list[str] = []
        queue = deque([str(base_dir)])
        while queue:
            current = queue.popleft()
            dirs.append(current)
            for name in self.list_dir(current, backend):
                full = _join(current, name)
                link = target.is_symlink(full)
                if target.is_dir(full):
                    if recursive and not link:
                        queue.append(full)
                    else:
                        dirs.append(full)
                elif link and not target.exists(full):
                    dangling.append(full)
                else:
                    files.append(full)
        if dangling:
            logger.warning("collect_dirs_and_files(%r): left out %d dangling symbolic link(s): "
                           "%s", str(base_dir), len(dangling), ", ".join(dangling[:5]))
        return sorted(dirs, key=natural_sort_key), sorted(files, key=natural_sort_key)

    def exists(self, path: Any, backend: Any) -> bool:
        return self.get_backend(backend).exists(path)

    def is_file(self, path: Any, backend: Any) -> bool:
        return self.get_backend(backend).is_file(path)

    def is_dir(self, path: Any, backend: Any) -> bool:
        return self.get_backend(backend).is_dir(path)

    def is_symlink(self, path: Any, backend: Any) -> bool:
        return self.get_backend(backend).is_symlink(path)

    def delete(self, path: Any, backend: Any, recursive: bool = False) -> bool:
        """Delete a file, an empty directory, or (``recursive=True``) a tree; True when done."""
        target = self.get_backend(backend)
        try:
            # Only pass recursive when asked: third-party delete(path) may not accept it.
            if recursive:
                target.delete(path, recursive=True)
            else:
                target.delete(path)
        except FileNotFoundError as exc:
            _raise_not_found(exc, path, str(backend))
        return True

    def delete_all(self, path: Any, backend: Any) -> bool:
        """Delete a file, a symlink or a whole directory tree; True when done."""
        target = self.get_backend(backend)
        try:
            target.delete_all(path)
        except FileNotFoundError as exc:
            _raise_not_found(exc, path, str(backend))
        return True

    def ensure_directory(self, path: Any, backend: Any) -> str:
        """Create ``path`` and its parents if missing; returns the path (as upstream)."""
        self.get_backend(backend).ensure_directory(path)
        return str(path)

    # -- symlinks -------------------------------------------------------------------
    def create_symlink(
        self,
        source_path: Any,
        symlink_path: Any,
        backend: Any,
        overwrite_symlinks_only: bool = False,
    ) -> bool:
        """Make ``symlink_path`` a link to ``source_path``. An existing path is an error,
        except a symlink when ``overwrite_symlinks_only`` (a regular file is never replaced)."""
        self.get_backend(backend).create_symlink(
            source_path, symlink_path, overwrite=overwrite_symlinks_only
        )
        return True

    def mirror_directory_with_symlinks(
        self,
        source_dir: Any,
        target_dir: Any,
        backend: Any,
        recursive: bool = True,
        overwrite_symlinks_only: bool = False,
    ) -> int:
        """Recreate ``source_dir``'s tree under ``target_dir`` with a symlink per file;
        returns the number of links made. A symbolic link to a directory in the source gets
        one symlink (to it), not a tree of them: following it could loop (a link to a
        parent) or recreate a tree from outside ``source_dir``. Dangling links are left
        out (see :meth:`collect_dirs_and_files`)."""
        dirs, files = self.collect_dirs_and_files(source_dir, backend, recursive=recursive)
        dir_links = [d for d in dirs if d != str(source_dir) and self.is_symlink(d, backend)]
        files = sorted([*files, *dir_links], key=natural_sort_key)
        self.ensure_directory(target_dir, backend)
        for path in files:
            rel = PurePosixPath(path).relative_to(PurePosixPath(str(source_dir)))
            self.create_symlink(path, _join(target_dir, str(rel)), backend, overwrite_symlinks_only)
        return len(files)

    # -- between backends -----------------------------------------------------------
    def _endpoints(
        self, backend: Any, src_backend: Any, dst_backend: Any, operation: str
    ) -> tuple[str, str, bool]:
        """(source name, destination name, upstream-style single backend?)."""
        if backend is not None:
            if src_backend is not None or dst_backend is not None:
                raise TypeError(
                    f"{operation}() takes backend= or src_backend=/dst_backend=, not both"
                )
            return str(backend), str(backend), True
        if src_backend is None or dst_backend is None:
            raise TypeError(
                f"{operation}() needs a backend: {operation}(src, dst, 'disk') within one "
                f"backend, or {operation}(src, dst, src_backend=..., dst_backend=...)"
            )
        return str(src_backend), str(dst_backend), False

    def _items(self, source: Backend, src: Any) -> tuple[list[str], list[str]] | None:
        """For a directory: its sub-directories and files relative to it; None for a file.

        A symbolic link to a file counts as that file (its content is copied; a move
        removes only the link). A symbolic link to a directory is refused before anything
        is written: following it could loop, and a move would have to delete files that
        live outside the tree."""
        if not (_overrides(source, "is_dir") and source.is_dir(src)):
            return None
        _refuse_file_and_directory(source, src)
        dirs: list[str] = []
        files: list[str] = []
        queue = deque([""])
        while queue:
            rel = queue.popleft()
            for name in source.list_dir(_join(src, rel)):
                child = f"{rel}/{name}" if rel else name
                if source.is_dir(_join(src, child)):
                    if source.is_symlink(_join(src, child)):
                        raise UnsupportedOperationError(
                            backend_label(source),
                            "copy",
                            f"{_join(src, child)!r} is a symbolic link to a directory: "
                            "following it could loop, and a move would delete files outside "
                            "the tree. Nothing was copied; copy its target separately, or "
                            "move the tree within one filesystem (a rename)",
                        )
                    _refuse_file_and_directory(source, _join(src, child))
                    dirs.append(child)
                    queue.append(child)
                else:
                    files.append(child)
        return dirs, files

    @staticmethod
    def _transfer_file(
        source: Backend,
        dest: Backend,
        src: Any,
        dst: Any,
        kwargs: dict[str, Any],
        for_move: bool = False,
        exclusive: bool = False,
    ) -> str | None:
        """Copy one item; returns the sha256 of its bytes when they were copied verbatim.
        ``exclusive`` (overwrite=False): a destination that can refuse an existing name
        atomically (``can_write_exclusive``: disk) is asked to, so of two concurrent
        transfers to one new name exactly one wins.

        Bytes travel as they are when both backends hold bytes and the two paths name the
        same format ('a.tif' -> 'b.tiff', 'x.bin' -> 'y.bin'); a change of format
        ('a.tif' -> 'a.npy') or keyword arguments for the writer mean decode and re-encode.
        For a move (``for_move``) a conversion that would keep only part of the item (a
        TIFF of several series) is refused, and the converted array must load back equal."""
        no_replace = {"overwrite": False} if exclusive and getattr(
            dest, "can_write_exclusive", False) else {}
        dst_format = formats.format_for(dst)
        same_format = formats.format_for(src) is dst_format
        holds_bytes = getattr(source, "holds_bytes", None)  # memory: maybe a decoded object
        verbatim = not (for_move and holds_bytes is not None and not holds_bytes(src))
        if source.can_hold_bytes and dest.can_hold_bytes and same_format and not kwargs \
                and verbatim:
            try:
                raw = source.read_bytes(src)
            except UnsupportedFormatError:
                raw = None  # an object the source holds decoded, with no file format
            if raw is not None:
                dest.write_bytes(raw, dst, **no_replace)
                return hashlib.sha256(raw).hexdigest()
        if for_move:
            _refuse_partial_decode(source, src, dst)
        data = source.load(src)
        if for_move and dst_format is not None:
            # checked before anything is written: a refused conversion leaves the destination
            # as it was (with overwrite=True, the file it would have replaced)
            encoded = formats.encode(data, dst, backend_label(dest), **kwargs)
            _check_loads_back(data, formats.decode(encoded, dst, **_reading_as(data, dst_format)),
                              src, dst)
        dest.save(data, dst, **kwargs, **no_replace)
        if for_move and dst_format is None and dest.can_read:
            _check_loads_back(data, dest.load(dst), src, dst, written=True)  # zarr: no format
        return None

    def copy(
        self,
        src: Any,
        dst: Any,
        backend: Any = None,
        *,
        src_backend: Any = None,
        dst_backend: Any = None,
        overwrite: bool | None = None,
        **kwargs: Any,
    ) -> bool:
        """Copy a file or a directory tree, within one backend (``copy(src, dst, 'disk')``)
        or between two (``src_backend=``, ``dst_backend=``).

        Between backends that can hold bytes (disk, memory, custom ones declaring
        ``can_hold_bytes``) the stored bytes are copied exactly; otherwise the item is
        loaded and given to the destination's ``save()`` with ``kwargs``. Within one backend
        that copies items itself (``copy_within``: zarr) its exact copy is used. ``overwrite``
        defaults to False in the one-backend form (upstream never overwrote) and to True
        with ``src_backend``/``dst_backend``; an existing destination with
        ``overwrite=False`` raises DestinationExistsError (a FileExistsError). Returns True.
        """
        src_name, dst_name, single = self._endpoints(backend, src_backend, dst_backend, "copy")
        source, dest = self.get_backend(src_name), self.get_backend(dst_name)
        overwrite = self._check_transfer(
            source, dest, src, dst, src_name, dst_name, overwrite, single
        )
        self._copy(source, dest, src, dst, kwargs, exclusive=not overwrite)
        return True

    def _check_transfer(
        self,
        source: Backend,
        dest: Backend,
        src: Any,
        dst: Any,
        src_name: str,
        dst_name: str,
        overwrite: bool | None,
        single: bool,
    ) -> bool:
        """Refuse what cannot be done before anything is written; returns ``overwrite``
        with its default applied. (``dest.exists`` here gives the early, clear error; a
        destination that appears after it is refused by the write itself where the backend
        can (disk), see ``_transfer_file``.)"""
        if not source.can_read:
            raise UnsupportedOperationError(src_name, "load", "cannot copy from a sink")
        if not dest.can_write:
            raise ReadOnlyBackendError(dst_name, "save")
        if _overrides(source, "exists") and not source.exists(src):
            raise NotFoundOnBackendError(f"{str(src)!r} not found on backend {src_name!r}")
        if overwrite is None:
            overwrite = not single
        if not overwrite and _overrides(dest, "exists") and dest.exists(dst):
            raise DestinationExistsError(
                f"{str(dst)!r} already exists on backend {dst_name!r}; pass overwrite=True "
                "to replace it"
            )
        return overwrite

    def _copy(
        self,
        source: Backend,
        dest: Backend,
        src: Any,
        dst: Any,
        kwargs: dict[str, Any],
        tree: tuple[list[str], list[str]] | None | bool = False,
        for_move: bool = False,
        exclusive: bool = False,
    ) -> dict[str, str | None]:
        """Copy a file or tree (``tree``: from :meth:`_items`, listed here when not given);
        returns destination path -> sha256 (None: re-encoded, or copied by the backend).
        ``exclusive``: no file at the destination is replaced (see :meth:`_transfer_file`).

        Within one backend that copies items itself (``copy_within``: zarr keeps a group's
        attributes and arrays exactly) that copy is used; otherwise file by file."""
        if source is dest and _overrides(source, "copy_within"):
            no_replace = {"overwrite": False} if exclusive and getattr(
                dest, "can_write_exclusive", False) else {}
            try:
                source.copy_within(src, dst, **no_replace, **kwargs)
            except UnsupportedOperationError:
                pass  # not for this item (or these writer options): file by file
            else:
                return {str(dst): None}
        if tree is False:
            tree = self._items(source, src)
        if tree is None:
            return {str(dst): self._transfer_file(
                source, dest, src, dst, kwargs, for_move, exclusive)}
        dirs, files = tree
        written: dict[str, str | None] = {}
        created: list[str] = []  # what did not exist before, in creation order
        can_check = _overrides(dest, "exists")

        def note_new(path: str) -> None:
            if can_check and not dest.exists(path):
                created.append(path)

        try:
            if _overrides(dest, "ensure_directory"):
                for rel in ["", *dirs]:
                    note_new(_join(dst, rel))
                    dest.ensure_directory(_join(dst, rel))
            for rel in files:
                target = _join(dst, rel)
                # noted once written: a file that another writer put there meanwhile (the
                # write refused it) is not ours to remove
                new = can_check and not dest.exists(target)
                written[target] = self._transfer_file(
                    source, dest, _join(src, rel), target, kwargs, for_move, exclusive
                )
                if new or exclusive:
                    created.append(target)
        except BaseException as exc:
            # A tree copy that stops half way (a full disk, a file that cannot be read)
            # leaves nothing of itself behind: a partial tree would look like a finished one.
            for path in reversed(created):
                with suppress(Exception):
                    dest.delete(path)  # a directory only when empty
            exc.add_note(
                f"polystore: the copy of {str(src)!r} stopped; the source is untouched and "
                f"the {len(created)} files and directories it had created at {str(dst)!r} "
                "were removed again"
            )
            raise
        return written

    def move(
        self,
        src: Any,
        dst: Any,
        backend: Any = None,
        *,
        src_backend: Any = None,
        dst_backend: Any = None,
        overwrite: bool | None = None,
        replace_symlinks: bool = False,
        **kwargs: Any,
    ) -> bool:
        """Move a file or a directory tree; the source is deleted only once the destination
        verifiably holds everything.

        * Within one backend that can rename (disk on one filesystem, memory): a rename.
        * Between backends that hold bytes: the bytes are copied, read back and compared
          (sha256), then the source is deleted.
        * To a sink such as a live viewer: every item must have an extension it takes, the
          backend must confirm delivery (policy 'block' or 'raise': ``flush()`` waits for
          the receiver's acknowledgement), else DeliveryNotConfirmedError and the source
          stays.
        * If the source cannot be deleted, the copy is removed again and TransferError says
          so; if even that fails, TransferError says plainly that both exist.

        ``overwrite`` as in :meth:`copy`; ``replace_symlinks=True`` (upstream) allows
        replacing a destination that is a symlink. Returns True.
        """
        src_name, dst_name, single = self._endpoints(backend, src_backend, dst_backend, "move")
        source, dest = self.get_backend(src_name), self.get_backend(dst_name)
        if self._same_item(source, dest, src, dst):
            return True  # moving an item onto itself: nothing to do, and nothing to delete
        if not source.can_write:
            raise ReadOnlyBackendError(src_name, "delete (needed to move)")
        if not _overrides(source, "delete"):
            raise UnsupportedOperationError(
                src_name, "delete", "needed to move; nothing was copied. Use copy() instead"
            )
        if replace_symlinks and dest.is_symlink(dst):
            overwrite = True
        overwrite = self._check_transfer(
            source, dest, src, dst, src_name, dst_name, overwrite, single
        )
        # writer options: re-encode
        if not kwargs and self._try_rename(source, dest, src, dst, overwrite):
            return True
        tree = self._items(source, src)  # listed once: only what was copied is deleted
        if dest.can_read:
            written = self._copy(
                source, dest, src, dst, kwargs, tree, for_move=True, exclusive=not overwrite
            )
            self._verify(dest, written, dst_name, src)
        else:
            self._deliver(source, dest, src, dst, dst_name, kwargs, tree)
        # `src` itself a link to a directory: as for a link to a file, only the link goes
        # (deleting the tree through it emptied the directory it points to)
        link = tree is not None and source.is_symlink(src)
        self._delete_source(source, dest, src, dst, src_name, dst_name, None if link else tree)
        logger.debug("moved %s (%s) -> %s (%s)", src, src_name, dst, dst_name)
        return True

    @staticmethod
    def _same_item(source: Backend, dest: Backend, src: Any, dst: Any) -> bool:
        """Whether ``src`` and ``dst`` name one stored item (also through two disk
        backends, or a symbolic link and its target)."""
        if source is dest:
            return source.same_path(src, dst)
        if isinstance(source, DiskBackend) and isinstance(dest, DiskBackend):
            return dest.same_path(src, dst, from_backend=source)
        return False

    @staticmethod
    def _try_rename(
        source: Backend, dest: Backend, src: Any, dst: Any, overwrite: bool = True
    ) -> bool:
        """Move without copying where possible: within one backend that can rename, or
        between two disk backends on one filesystem; never when the format changes.
        ``overwrite=False`` on disk: a rename that refuses an existing ``dst`` atomically,
        and DestinationExistsError propagates (copying instead would replace it)."""
        if formats.format_for(src) is not formats.format_for(dst) and not (
            _overrides(source, "is_dir") and source.is_dir(src)
        ):
            return False  # 'a.tif' -> 'a.npy' is a conversion, not a rename
        try:
            if isinstance(source, DiskBackend) and isinstance(dest, DiskBackend):
                dest.rename(src, dst, from_backend=None if source is dest else source,
                            overwrite=overwrite)
            elif source is dest and getattr(source, "can_write_exclusive", False):
                source.rename(src, dst, overwrite=overwrite)  # refused atomically
            elif source is dest:
                source.rename(src, dst)
            else:
                return False
        except DestinationExistsError:
            if not overwrite:
                raise
            return False
        except UnsupportedOperationError:
            return False  # or a directory onto one (overwrite=True): merge by copying
        except OSError as exc:
            if exc.errno == 18:  # EXDEV: another filesystem, so copy and delete instead
                return False
            raise
        return True

    def _verify(self, dest: Backend, written: dict[str, str | None], dst_name: str, src: Any):
        """Read back what was written before anything is deleted."""
        for path, digest in written.items():
            if digest is not None:
                ok = hashlib.sha256(dest.read_bytes(path)).hexdigest() == digest
            else:
                ok = not _overrides(dest, "exists") or dest.exists(path)
            if not ok:
                raise TransferError(
                    f"move of {str(src)!r}: {path!r} on backend {dst_name!r} does not hold what "
                    "was written; the source was kept"
                )

    def _deliver(
        self,
        source: Backend,
        dest: Backend,
        src: Any,
        dst: Any,
        dst_name: str,
        kwargs: dict[str, Any],
        tree: tuple[list[str], list[str]] | None,
    ) -> None:
        """Send to a sink and wait until it confirms it holds everything."""
        pairs = (
            [(src, dst)]
            if tree is None
            else [(_join(src, rel), _join(dst, rel)) for rel in tree[1]]
        )
        accepted = getattr(dest, "SUPPORTED_EXTENSIONS", None)
        if accepted:
            refused = [d for _, d in pairs if not str(d).lower().endswith(tuple(accepted))]
            if refused:
                raise DeliveryNotConfirmedError(
                    f"move to {dst_name!r}: it does not take {refused[:5]} (it takes "
                    f"{', '.join(sorted(accepted))}); nothing was sent and the source was kept"
                )
        flush = getattr(dest, "flush", None)
        policy = _delivery_policy(dest)
        if flush is None or policy == "latest":
            why = (
                "its policy 'latest' may drop frames without telling the sender"
                if policy == "latest"
                else "it cannot confirm delivery (no flush())"
            )
            raise DeliveryNotConfirmedError(
                f"move to {dst_name!r} refused: {why}. Nothing was sent and the source was "
                "kept; use copy(), or a backend with policy='block'"
            )
        try:
            for item_src, item_dst in pairs:
                dest.save(source.load(item_src), item_dst, **kwargs)
            flush()
        except Exception as exc:
            raise DeliveryNotConfirmedError(
                f"move to {dst_name!r}: delivery was not confirmed ({exc}); the source was kept"
            ) from exc

    def _delete_source(
        self,
        source: Backend,
        dest: Backend,
        src: Any,
        dst: Any,
        src_name: str,
        dst_name: str,
        tree: tuple[list[str], list[str]] | None,
    ) -> None:
        """Delete what was copied from the source, one file at a time, so a failure half
        way never loses a file: the files already deleted stay at the destination, and the
        copies of the others are removed again (or the error says that both exist).
        Directories are removed last and only when empty, so a file that appeared in the
        source during the move is never deleted."""
        pairs = (
            [(src, dst)]
            if tree is None
            else [(_join(src, rel), _join(dst, rel)) for rel in tree[1]]
        )
        for done, (item_src, _) in enumerate(pairs):
            try:
                source.delete(item_src)
            except Exception as exc:
                self._undo_copies(
                    dest, pairs, done, tree, src, dst, src_name, dst_name, item_src, exc
                )
        if tree is not None:
            for rel in [*reversed(tree[0]), ""]:
                directory = _join(src, rel)
                try:
                    source.delete(directory)
                except FileNotFoundError:
                    continue  # gone already: an object store's prefix ends with its last object
                except Exception as exc:
                    raise TransferError(
                        f"move: all {len(pairs)} files of {str(src)!r} are now at {str(dst)!r} "
                        f"on {dst_name!r}, but the directory {directory!r} could not be removed "
                        f"from {src_name!r} ({type(exc).__name__}: {exc}); anything still in it "
                        "was not part of the move"
                    ) from exc

    def _undo_copies(
        self,
        dest: Backend,
        pairs: list[tuple[Any, Any]],
        done: int,
        tree: tuple[list[str], list[str]] | None,
        src: Any,
        dst: Any,
        src_name: str,
        dst_name: str,
        failed: Any,
        exc: Exception,
    ) -> NoReturn:
        """The source's ``pairs[done]`` could not be deleted: remove the copies of the items
        still in the source (never of those already deleted there) and raise TransferError
        saying where every item is."""
        cause = f"could not delete {str(failed)!r} on {src_name!r} ({type(exc).__name__}: {exc})"
        moved = (
            f"; {done} of {len(pairs)} files were already moved and are only at {str(dst)!r} "
            f"on {dst_name!r}"
            if done
            else ""
        )
        if not dest.can_read:
            raise TransferError(
                f"move: {str(src)!r} was delivered to {dst_name!r} but {cause}{moved}; the "
                "files not moved still exist on both"
            ) from exc
        both: list[str] = []
        for _, item_dst in pairs[done:]:
            try:
                dest.delete(item_dst)
            except Exception:
                both.append(str(item_dst))
        if tree is not None and not done:  # nothing moved: remove the directories copied
            for rel in [*reversed(tree[0]), ""]:
                with suppress(Exception):
                    dest.delete(_join(dst, rel))  # only when empty
        if both:
            raise TransferError(
                f"move: {cause}{moved}, nor remove the copies {both[:5]} on {dst_name!r}: "
                "BOTH EXIST now"
            ) from exc
        if done:
            raise TransferError(
                f"move: {cause}{moved}; the copies of the other {len(pairs) - done} were "
                f"removed again, so they are only on {src_name!r}"
            ) from exc
        raise TransferError(
            f"move: {cause}; the copy on {dst_name!r} was removed again, so nothing moved"
        ) from exc
