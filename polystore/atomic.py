"""Atomic file writes: readers see either the old file or the complete new one.

Data is written to a temporary file in the target's directory (same filesystem), flushed
and fsynced, then moved over the target with :func:`os.replace`. On Linux the temporary
file is created with ``O_TMPFILE``: it has no name until the write has finished, so even a
process killed with SIGKILL mid-write leaves nothing behind. Where ``O_TMPFILE`` is not
available a hidden named temporary file is used and removed on any error.

With ``replace=False`` the finished file is put in place in a step that fails with
FileExistsError if the name exists, whoever made it and however short the race: the
anonymous file is linked (``linkat``), a named temporary file renamed by
:func:`rename_no_replace` (``renameat2(RENAME_NOREPLACE)``, else a hard link). Of two
writers of one new name exactly one wins and the other's data is discarded, never mixed in;
only where a filesystem refuses both (some FUSE and network ones) is the name checked and
then renamed to, which a concurrent writer could race.

Replacing a file keeps what the user set on it: the new file gets the old one's permission
bits, and its owner and group where this process may set them (root, or a group the user
belongs to); a new file gets the usual mode from the umask.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "is_temp_name", "rename_no_replace"]

# link() errors that mean "this filesystem (or this file) cannot be hard-linked", not that
# the name exists: vfat and exFAT (EPERM), FUSE/CIFS without link (ENOSYS, EOPNOTSUPP),
# fs.protected_hardlinks on a file of another user (EPERM), a file at its link limit (EMLINK).
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS,
                           errno.EMLINK})
# renameat2() errors that mean RENAME_NOREPLACE is not available here.
NO_RENAMEAT2 = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
AT_FDCWD = -100
RENAME_NOREPLACE = 1


def _load_renameat2() -> Any:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 (musl before 1.2.4, macOS)
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()

logger = logging.getLogger(__name__)

_TEMP_SUFFIX = ".polystore-tmp"
_TEMP_RE = re.compile(r"^\..*\.[0-9a-f]{16}" + re.escape(_TEMP_SUFFIX) + r"$")
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None)
# st_dev -> whether O_TMPFILE + linkat works on that filesystem (probed once per device).
_tmpfile_support: dict[int, bool] = {}


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our in-progress temporary files (hidden from listings)."""
    return _TEMP_RE.match(name) is not None


def _temp_name(target_name: str) -> str:
    """A hidden sibling name of at most 232 bytes: the target's first 200 *bytes* (200
    characters of a non-ASCII name made it longer than the 255 bytes a name may have)."""
    head = os.fsdecode(os.fsencode(target_name)[:200])
    return f".{head}.{secrets.token_hex(8)}{_TEMP_SUFFIX}"


def _link_anonymous(fd: int, dir_fd: int, target_name: str) -> str:
    """Give an O_TMPFILE file a (temporary) name in its directory and return that name."""
    while True:
        name = _temp_name(target_name)
        try:
            # Passing a dir_fd makes CPython use linkat(AT_SYMLINK_FOLLOW); plain link() would
            # try to hard-link the /proc magic symlink itself and fail with EXDEV.
            os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return name
        except FileExistsError:
            continue


def _copy_ownership(fd: int, dir_fd: int, target_name: str) -> None:
    """Give the new file the mode (and owner/group where permitted) of the file it replaces."""
    try:
        old = os.stat(target_name, dir_fd=dir_fd, follow_symlinks=True)
    except FileNotFoundError:
        return
    new = os.fstat(fd)
    if (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            with suppress(PermissionError):
                os.fchown(fd, -1, old.st_gid)  # a group the user is in: allowed
    os.fchmod(fd, old.st_mode & 0o7777)


def _tmpfile_works(dir_fd: int) -> bool:
    if _O_TMPFILE is None or not os.path.isdir("/proc/self/fd"):
        return False
    dev = os.fstat(dir_fd).st_dev
    if dev not in _tmpfile_support:
        try:
            fd = os.open(".", _O_TMPFILE | os.O_WRONLY, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            ok = False
        else:
            try:
                name = _link_anonymous(fd, dir_fd, "probe")
                os.unlink(name, dir_fd=dir_fd)
                ok = True
            except OSError:
                ok = False
            finally:
                os.close(fd)
        _tmpfile_support[dev] = ok
        logger.debug("O_TMPFILE support on device %s: %s", dev, ok)
    return _tmpfile_support[dev]


def rename_no_replace(source: Any, target: Any, dir_fd: int | None = None) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (FileExistsError), both
    relative to ``dir_fd`` if given. In one atomic step: ``renameat2(RENAME_NOREPLACE)``
    (Linux 3.15+); where that is missing or refused, a file or symlink is hard-linked to
    ``target`` (fails if it exists) and unlinked from ``source`` (if that fails the link is
    removed again, so the file never keeps two names); a directory, or a file on a
    filesystem without hard links, is renamed after a check, which a writer could race."""
    fds = {"src_dir_fd": dir_fd, "dst_dir_fd": dir_fd}
    if _renameat2 is not None:
        at = AT_FDCWD if dir_fd is None else dir_fd
        if _renameat2(at, os.fsencode(source), at, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in NO_RENAMEAT2:
            raise OSError(err, os.strerror(err), str(source), None, str(target))
    if not stat.S_ISDIR(os.stat(source, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        try:
            os.link(source, target, **fds, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            logger.debug("no hard link for %s (%s); checking, then renaming", target,
                         errno.errorcode.get(exc.errno, exc.errno))
        else:
            try:
                os.unlink(source, dir_fd=dir_fd)
            except BaseException:
                with suppress(OSError):
                    if os.path.samestat(os.lstat(target, dir_fd=dir_fd),
                                        os.lstat(source, dir_fd=dir_fd)):
                        os.unlink(target, dir_fd=dir_fd)
                raise
            return
    try:
        os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(source, target, **fds)
    else:
        raise FileExistsError(errno.EEXIST, "File exists", str(target))


@contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
    durable: bool = True,
    replace: bool = True,
) -> Iterator[IO[Any]]:
    """Yield a file object whose contents replace ``path`` only if the block succeeds.

    ``durable`` fsyncs the data and the directory so the new file survives a power cut.
    ``replace=False`` never replaces: if ``path`` exists when the block ends (any kind of
    entry, a dangling symlink too) FileExistsError is raised and nothing is written; the
    check and the creation are one atomic step. The target's directory must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', not {mode!r}")
    target = Path(path)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    temp: str | None = None
    try:
        if _tmpfile_works(dir_fd):
            fd = os.open(".", _O_TMPFILE | os.O_RDWR, 0o666, dir_fd=dir_fd)  # type: ignore[operator]
        else:
            while True:
                temp = _temp_name(target.name)
                try:
                    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
                    break
                except FileExistsError:
                    continue
        if replace:
            _copy_ownership(fd, dir_fd, target.name)
        text_args = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text_args) as handle:
            # Some writers (tifffile) need a str name; a raw fd's name is an int.
            raw = handle.buffer.raw if mode == "w" else handle.raw
            raw.name = str(target.parent / temp) if temp else f"/proc/self/fd/{fd}"
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
            if temp is None:
                if not replace:
                    # name the anonymous file straight away: linkat fails if the name exists
                    os.link(f"/proc/self/fd/{handle.fileno()}", target.name,
                            src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                else:
                    temp = _link_anonymous(handle.fileno(), dir_fd, target.name)
        if not replace:
            if temp is not None:  # the named temporary file (no O_TMPFILE)
                rename_no_replace(temp, target.name, dir_fd)
        else:
            os.replace(temp, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        temp = None
        if durable:
            os.fsync(dir_fd)
    finally:
        if temp is not None:
            with suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
        os.close(dir_fd)
