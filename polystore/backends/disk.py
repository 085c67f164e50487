"""Local filesystem backend; the file format is chosen by the path's extension."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, ClassVar

from polystore import formats
from polystore.atomic import atomic_write, is_temp_name, rename_no_replace
from polystore.base import StorageBackend
from polystore.errors import DestinationExistsError
from polystore.paths import name_matches, natural_sort_key, normalize_extensions, resolve_within

__all__ = ["DiskBackend"]

logger = logging.getLogger(__name__)


class DiskBackend(StorageBackend):
    """Files on the local filesystem.

    Without ``base_dir`` paths are used exactly as given. With ``base_dir`` relative paths
    are taken inside it and any path that resolves outside it (``..``, an absolute path
    elsewhere, a symlink) raises PathEscapeError. Writes are atomic (see polystore.atomic)
    and an overwritten file keeps its mode (and owner, where permitted). Formats come from
    :mod:`polystore.formats`; ``bytes`` are written verbatim to any extension and files of an
    unknown extension load as ``bytes``.
    """

    _backend_type = "disk"
    can_list: ClassVar[bool] = True
    can_hold_bytes: ClassVar[bool] = True
    #: save/write_bytes/rename take ``overwrite=False`` and refuse an existing name
    #: atomically (FileManager.copy/move with overwrite=False rely on it).
    can_write_exclusive: ClassVar[bool] = True
    #: extension -> format name; the formats themselves live in polystore.formats.
    FORMATS: ClassVar[Mapping[str, str]] = formats.FORMAT_NAMES

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        self.base_dir: Path | None = None if base_dir is None else Path(base_dir).resolve()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_dir={self.base_dir!r})"

    # -- helpers ----------------------------------------------------------------------
    def _path(self, path: Any) -> Path:
        if self.base_dir is None:
            return Path(path)
        return resolve_within(self.base_dir, path)

    def same_path(self, a: Any, b: Any, *, from_backend: DiskBackend | None = None) -> bool:
        """Same file after resolving the base directory, '..' and symlinks
        (``from_backend``: ``a`` is a path of that disk backend)."""
        return (from_backend or self)._path(a).resolve() == self._path(b).resolve()

    def _not_found(self, path: Any) -> FileNotFoundError:
        where = f" under {str(self.base_dir)!r}" if self.base_dir is not None else ""
        return FileNotFoundError(f"File not found: {str(path)!r} on backend 'disk'{where}")

    def _exists_error(self, path: Any) -> DestinationExistsError:
        return DestinationExistsError(
            f"{str(path)!r} already exists on backend 'disk'; pass overwrite=True to replace it"
        )

    def _write(
        self, file_path: Any, write: Callable[[IO[bytes]], None], overwrite: bool = True
    ) -> Path:
        """Run ``write`` on an atomic handle for ``file_path``. Missing parent directories
        are created, and removed again if the write fails, so a failed save leaves nothing.
        ``overwrite=False``: an existing ``file_path`` raises DestinationExistsError, checked
        atomically when the file is put in place (of concurrent writers one wins)."""
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, not {overwrite!r}")
        target = self._path(file_path)
        if not overwrite and (target.exists() or target.is_symlink()):
            raise self._exists_error(file_path)  # early, before the data is encoded
        if target.is_dir():
            raise IsADirectoryError(f"Cannot save to {str(file_path)!r}: it is a directory")
        missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
        above = (missing[-1] if missing else target).parent  # the nearest that exists
        if not above.is_dir():
            raise NotADirectoryError(f"Cannot save to {str(file_path)!r}: {str(above)!r} is a "
                                     "file, not a directory; choose another path")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_write(target, "wb", replace=overwrite) as handle:
                write(handle)
        except FileExistsError as exc:  # replace=False and the name appeared meanwhile
            for directory in missing:
                with suppress(OSError):
                    directory.rmdir()
            raise self._exists_error(file_path) from exc
        except BaseException:
            for directory in missing:  # innermost first
                with suppress(OSError):
                    directory.rmdir()
            raise
        return target

    def _readable_file(self, file_path: Any) -> Path:
        target = self._path(file_path)
        if not target.exists():
            if target.is_symlink():
                raise FileNotFoundError(
                    f"Cannot load {str(file_path)!r} on backend 'disk': it is a symbolic link "
                    f"to {os.readlink(target)!r}, which does not exist (a dangling link; "
                    "list_files leaves such links out). Restore its target or delete the link"
                )
            raise self._not_found(file_path)
        if target.is_dir():
            raise IsADirectoryError(f"Cannot load {str(file_path)!r}: it is a directory")
        return target

    # -- primitives -------------------------------------------------------------------
    def save(self, data: Any, file_path: Any, *, overwrite: bool = True, **kwargs: Any) -> None:
        """Write ``data`` atomically in the format given by the extension.

        ``overwrite=False`` raises DestinationExistsError (a FileExistsError) if
        ``file_path`` exists, atomically: of several writers of one new name exactly one
        succeeds and the others get the error, their data discarded.
        Extra keyword arguments go to the format's writer (tifffile.imwrite for .tif,
        json.dumps for .json, imageio for images, csv.writer for rows); the others take none.
        Bad data raises before the target is touched.
        """
        target = self._write(
            file_path,
            lambda handle: formats.write(data, handle, file_path, "disk", **kwargs),
            overwrite,
        )
        logger.debug("saved %s", target)

    def load(self, file_path: Any, **kwargs: Any) -> Any:
        """Read a file by its extension (``mmap_mode="r"`` for a lazy .npy, ``key=``/
        ``series=`` for one page or series of a TIFF, ``as_=`` for CSV)."""
        target = self._readable_file(file_path)
        return formats.read(str(target), file_path, **kwargs)

    # -- byte level -------------------------------------------------------------------
    def read_bytes(self, path: Any, **kwargs: Any) -> bytes:
        """The file's exact bytes."""
        return self._readable_file(path).read_bytes()

    def write_bytes(
        self, data: bytes, path: Any, *, overwrite: bool = True, **kwargs: Any
    ) -> None:
        """Replace the file's content with ``data``, atomically (``overwrite=False``: as in
        :meth:`save`)."""
        target = self._write(path, lambda handle: handle.write(data), overwrite)
        logger.debug("saved %s (%d bytes)", target, len(data))

    def rename(
        self,
        src: Any,
        dst: Any,
        *,
        from_backend: DiskBackend | None = None,
        overwrite: bool = True,
    ) -> None:
        """``os.replace`` within one filesystem (OSError EXDEV across filesystems).
        ``from_backend``: ``src`` is a path of that disk backend (another base directory).
        ``overwrite=False``: an existing ``dst`` raises DestinationExistsError, atomically
        (``renameat2(RENAME_NOREPLACE)``; see :func:`polystore.atomic.rename_no_replace`)."""
        source = (from_backend or self)._path(src)
        target = self._path(dst)
        if not source.exists() and not source.is_symlink():
            raise self._not_found(src)
        is_tree = source.is_dir() and not source.is_symlink()
        if source.is_dir() and target.exists():
            raise DestinationExistsError(
                f"Cannot move directory {str(src)!r} onto existing {str(dst)!r}"
            )
        if is_tree and target.resolve().is_relative_to(source.resolve()):
            raise ValueError(f"Cannot move {str(src)!r} into itself ({str(dst)!r})")
        if target.is_dir() and not source.is_dir():
            raise IsADirectoryError(f"Cannot move {str(src)!r} onto directory {str(dst)!r}")
        if source.resolve() == target.resolve():
            return  # one file spelt twice (or a link onto its target): replacing would lose it
        if not overwrite and (target.exists() or target.is_symlink()):
            raise self._exists_error(dst)  # a hard link of the source too: it is a name in use
        if target.exists() and not is_tree and os.path.samefile(source, target):
            source.unlink()  # hard links of one file: rename() would do nothing
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            os.replace(source, target)
            return
        try:
            rename_no_replace(source, target)
        except FileExistsError as exc:
            raise self._exists_error(dst) from exc

    # -- symlinks ---------------------------------------------------------------------
    def create_symlink(self, source: Any, link: Any, overwrite: bool = False) -> None:
        """Make ``link`` a symbolic link to ``source``'s absolute path (replacing an existing
        link, never a regular file, when ``overwrite``)."""
        target, link_path = Path(os.path.abspath(self._path(source))), self._path(link)
        if link_path.is_symlink() or link_path.exists():
            if not overwrite:
                raise DestinationExistsError(f"Cannot create symlink {str(link)!r}: it exists")
            if not link_path.is_symlink():
                raise DestinationExistsError(
                    f"Refusing to replace {str(link)!r} with a symlink: it is not a symlink"
                )
            link_path.unlink()
        link_path.parent.mkdir(parents=True, exist_ok=True)
        link_path.symlink_to(target)

    def is_symlink(self, path: Any) -> bool:
        return self._path(path).is_symlink()

    # -- navigation -------------------------------------------------------------------
    def exists(self, path: Any) -> bool:
        return self._path(path).exists()

    def is_file(self, path: Any) -> bool:
        return self._path(path).is_file()

    def is_dir(self, path: Any) -> bool:
        return self._path(path).is_dir()

    def _directory(self, path: Any) -> Path:
        directory = self._path(path)
        if not directory.exists():
            raise FileNotFoundError(f"Directory not found: {str(path)!r} on backend 'disk'")
        if not directory.is_dir():
            raise NotADirectoryError(f"Not a directory: {str(path)!r} on backend 'disk'")
        return directory

    def list_dir(self, path: Any) -> list[str]:
        """Sorted entry names of a directory (in-progress temporary files excluded)."""
        names = (n for n in os.listdir(self._directory(path)) if not is_temp_name(n))
        return sorted(names, key=natural_sort_key)

    def list_files(
        self,
        directory: Any,
        pattern: str | None = None,
        extensions: Iterable[str] | None = None,
        recursive: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """File paths under ``directory`` in natural order ('t2' before 't10'), in the same
        form as ``directory``.

        ``pattern`` is a glob matched against file names, ``extensions`` a set of suffixes
        (case-insensitive, compound ones such as '.ome.tif' work).

        Symbolic links are not followed into directories (a link to a parent would loop, a
        link elsewhere would list files outside the tree); a link to a file is listed like
        the file, and a dangling link, which cannot be loaded, is left out (logged).
        """
        root = self._directory(directory)
        exts = normalize_extensions(extensions)
        found: list[str] = []
        dangling: list[str] = []
        for current, dirnames, filenames in os.walk(root):  # followlinks=False
            dirnames.sort()
            rel_dir = Path(current).relative_to(root)
            for name in filenames:
                if not is_temp_name(name) and name_matches(name, pattern, exts):
                    if not os.path.exists(os.path.join(current, name)):
                        dangling.append(os.path.join(current, name))  # a link to nothing
                        continue
                    found.append(str(Path(directory) / rel_dir / name))
            if not recursive:
                break
        if dangling:
            logger.warning("list_files(%r): left out %d dangling symbolic link(s): %s",
                           str(directory), len(dangling), ", ".join(dangling[:5]))
        return sorted(found, key=natural_sort_key)

    def delete(self, path: Any, recursive: bool = False) -> None:
        """Delete a file, an empty directory, or (``recursive=True``) a directory tree."""
        target = self._path(path)
        if self.base_dir is not None and target == self.base_dir:
            raise ValueError(f"Refusing to delete the backend's base directory {self.base_dir}")
        if not target.exists() and not target.is_symlink():
            raise self._not_found(path)
        if target.is_dir() and not target.is_symlink():
            if recursive:
                shutil.rmtree(target)
            else:
                target.rmdir()
        else:
            target.unlink()

    def ensure_directory(self, path: Any) -> None:
        self._path(path).mkdir(parents=True, exist_ok=True)
