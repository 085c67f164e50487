"""Segments whose sender is gone: find them (`list_segments`) and unlink them (`sweep`).

A sender unlinks its own segments when it closes; one that was killed cannot. Its segments
name its pid, and while it lives it holds a shared ``flock`` on each (`shm.Segment`), so an
orphan is a segment of our prefixes whose pid is not alive here and whose lock nobody holds
(the lock also covers a sender in another pid namespace sharing /dev/shm). Receivers sweep
their viewer's prefix when they start; ``polystore shm clean`` sweeps on demand.
"""

from __future__ import annotations

import _posixshmem  # CPython's shm_unlink, used without the resource tracker
import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from polystore.streaming.shm import SEGMENT_NAME_RE, SHM_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    prefix: str
    pid: int
    size: int
    owner_alive: bool


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs here; True when we cannot tell (a number too large for a pid, as
    any account can put in a file name: never ours to remove, and never an OverflowError
    that stops a receiver from starting)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists and belongs to someone else, or not a pid we can ask about
    return True


def held_open(name: str) -> bool:
    """Whether a live process holds segment `name`'s liveness lock (see `Segment`).

    True also when we cannot tell (not a regular file, not readable by us): such an entry is
    not ours to remove.
    """
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # closing the fd drops our probe lock
    finally:
        os.close(fd)


def list_segments(prefixes: tuple[str, ...] | list[str]) -> list[SegmentInfo]:
    """Our segments in /dev/shm (Linux), with owner pid and whether the owner still runs:
    its pid is alive here, or a process anywhere (another pid namespace) holds its lock."""
    if not SHM_DIR.is_dir():
        return []
    found = []
    for entry in os.scandir(SHM_DIR):
        match = SEGMENT_NAME_RE.match(entry.name)
        if not match or match["prefix"] not in prefixes:
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        pid = int(match["pid"])
        alive = pid_alive(pid) or held_open(entry.name)
        found.append(SegmentInfo(entry.name, match["prefix"], pid, size, alive))
    return sorted(found, key=lambda s: s.name)


def sweep(prefixes: tuple[str, ...] | list[str]) -> list[SegmentInfo]:
    """Unlink the segments of our prefixes whose owner is gone (`list_segments`); return them."""
    removed = []
    for info in list_segments(prefixes):
        if info.owner_alive:
            continue
        try:
            _posixshmem.shm_unlink("/" + info.name)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("cannot remove %s: it belongs to another user", info.name)
            continue
        removed.append(info)
    if removed:
        log.info("swept %d orphaned segment(s): %s", len(removed), [s.name for s in removed])
    return removed
