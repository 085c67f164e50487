"""Shared memory: the sender's reusable segment pool, the receiver's read-only views, the sweep.

Segments are named ``<prefix><pid>_<token>_<n>``: the pid lets anyone find the orphans of a
dead sender, the token keeps two senders of one pid apart, and ``n`` only grows, so a name is
never reused for different memory. A segment whose frame is still unacknowledged is never
rewritten: if the sender must give up on it, it unlinks it (a reader that already mapped it
keeps valid memory) and makes a new one.
"""

from __future__ import annotations

import _posixshmem  # CPython's shm_open/shm_unlink, used without the resource tracker
import itertools
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PAGE = mmap.PAGESIZE
SEGMENT_NAME_RE = re.compile(
    r"^(?P<prefix>[A-Za-z0-9]+_)(?P<pid>\d+)_(?P<token>[A-Za-z0-9]+)_(?P<n>\w+)$"
)

# Python < 3.13 registers every SharedMemory it creates with the resource tracker, which then
# warns about (and unlinks) "leaked" segments at exit. We unlink ours explicitly, so that is
# right for the creator; readers never go through SharedMemory at all (see SegmentReader).


def segment_prefix(shm_prefix: str, pid: int, token: str) -> str:
    return f"{shm_prefix}{pid}_{token}_"


class SegmentPool:
    """Reusable shared-memory segments of one sender, bounded in total bytes.

    Not thread-safe: the sender serialises access.
    """

    def __init__(self, shm_prefix: str, max_bytes: int) -> None:
        self.token = secrets.token_hex(4)
        self.pid = os.getpid()
        self.prefix = segment_prefix(shm_prefix, self.pid, self.token)
        self.max_bytes = -(-max_bytes // PAGE) * PAGE  # segments are whole pages
        self._counter = itertools.count()
        self._free: list[shared_memory.SharedMemory] = []
        self._busy: dict[int, shared_memory.SharedMemory] = {}
        self._total = 0
        # A pool dropped without close() (or still open at exit) still unlinks its segments.
        weakref.finalize(self, _unlink_leftovers, self._free, self._busy, self.pid)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    @property
    def total_bytes(self) -> int:
        return self._total

    def acquire(self, seq: int, nbytes: int) -> shared_memory.SharedMemory | None:
        """A segment of at least `nbytes` reserved for message `seq`, or None if the byte
        budget is used up by unacknowledged frames (the caller waits for credits)."""
        best = None
        for segment in self._free:
            if segment.size >= nbytes and (best is None or segment.size < best.size):
                best = segment
        if best is not None:
            self._free.remove(best)
            self._busy[seq] = best
            return best
        size = -(-nbytes // PAGE) * PAGE
        while self._total + size > self.max_bytes and self._free:
            self._destroy(max(self._free, key=lambda s: s.size), free=True)
        if self._total + size > self.max_bytes:
            return None
        segment = self._create(size)
        self._busy[seq] = segment
        return segment

    def release(self, seq: int) -> bool:
        """The receiver holds its copy of `seq`: its segment is free for the next frame."""
        segment = self._busy.pop(seq, None)
        if segment is None:
            return False
        self._free.append(segment)
        return True

    def abandon(self, seq: int) -> bool:
        """Give up on `seq` without its acknowledgement: unlink, never rewrite."""
        segment = self._busy.get(seq)
        if segment is None:
            return False
        self._destroy(segment, free=False, seq=seq)
        return True

    def close(self) -> None:
        for seq in list(self._busy):
            self.abandon(seq)
        for segment in list(self._free):
            self._destroy(segment, free=True)

    def _create(self, size: int) -> shared_memory.SharedMemory:
        name = f"{self.prefix}{next(self._counter)}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=size)
        self._total += segment.size
        return segment

    def _destroy(self, segment: shared_memory.SharedMemory, *, free: bool, seq: int = -1) -> None:
        if free:
            self._free.remove(segment)
        else:
            del self._busy[seq]
        self._total -= segment.size
        log.debug("unlink %s (free=%s seq=%s)", segment.name, free, seq)
        try:
            segment.unlink()
        except FileNotFoundError:
            pass  # someone swept it already
        try:
            segment.close()
        except BufferError:
            # A NumPy view of it is still alive somewhere; the mapping is freed with it.
            log.debug("segment %s still viewed; leaving the mapping to the GC", segment.name)


def _unlink_leftovers(free: list, busy: dict, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child never owned these
    for segment in [*free, *busy.values()]:
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def create_probe(prefix: str) -> tuple[shared_memory.SharedMemory, str]:
    """A one-page segment holding a random token; a reader that can read it back shares
    our /dev/shm (same machine, same container)."""
    token = secrets.token_hex(8)
    segment = shared_memory.SharedMemory(name=f"{prefix}probe", create=True, size=PAGE)
    segment.buf[: len(token)] = token.encode()
    return segment, token


def destroy(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.unlink()
    except FileNotFoundError:
        pass
    segment.close()


class SegmentError(Exception):
    """A segment could not be read: `missing` tells a vanished one from a forbidden one."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class _Mapping:
    __slots__ = ("fd", "map", "size")

    def __init__(self, fd: int, mapping: mmap.mmap, size: int) -> None:
        self.fd, self.map, self.size = fd, mapping, size

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive; the GC unmaps it later
        os.close(self.fd)


class SegmentReader:
    """Read-only, cached mappings of other processes' segments.

    Opened with ``shm_open(O_RDONLY)`` and ``mmap(PROT_READ)``: a reader can neither write the
    sender's memory nor, unlike ``SharedMemory(name)`` on Python 3.11, hand it to a resource
    tracker that would unlink it when the reader exits.
    """

    def __init__(self, max_cached: int = 64) -> None:
        self.max_cached = max_cached
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self._uid = os.getuid()
        self._lock = threading.Lock()

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        """`nbytes` at `offset` of segment `name`; raises SegmentError if that is not all
        inside the segment, or the segment is missing, not ours, or not a regular file."""
        with self._lock:
            mapping = self._maps.get(name)
            if mapping is None:
                mapping = self._open(name)
                self._maps[name] = mapping
                while len(self._maps) > self.max_cached:
                    self._maps.popitem(last=False)[1].close()
            else:
                self._maps.move_to_end(name)
        if offset + nbytes > mapping.size:
            raise SegmentError(
                f"segment {name} holds {mapping.size} bytes; offset {offset} + nbytes {nbytes}"
                " would read past its end"
            )
        return memoryview(mapping.map)[offset : offset + nbytes]

    def _open(self, name: str) -> _Mapping:
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, 0o600)
        except FileNotFoundError:
            raise SegmentError(
                f"segment {name} does not exist (unlinked by its sender?)", True
            ) from None
        except OSError as exc:
            raise SegmentError(f"segment {name} cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self._uid:
                raise SegmentError(f"segment {name} is not a shared-memory segment of this user")
            if st.st_size == 0:
                raise SegmentError(f"segment {name} is empty")
            mapping = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        return _Mapping(fd, mapping, st.st_size)

    def forget_unlinked(self) -> int:
        """Drop mappings whose segment its sender has unlinked (st_nlink drops to 0)."""
        with self._lock:
            gone = [n for n, m in self._maps.items() if os.fstat(m.fd).st_nlink == 0]
            for name in gone:
                self._maps.pop(name).close()
        return len(gone)

    def forget_prefix(self, prefix: str) -> None:
        with self._lock:
            for name in [n for n in self._maps if n.startswith(prefix)]:
                self._maps.pop(name).close()

    def close(self) -> None:
        with self._lock:
            while self._maps:
                self._maps.popitem()[1].close()


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    prefix: str
    pid: int
    size: int
    owner_alive: bool


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


def list_segments(prefixes: tuple[str, ...] | list[str]) -> list[SegmentInfo]:
    """Our segments in /dev/shm (Linux), with owner pid and whether it still runs."""
    if not SHM_DIR.is_dir():
        return []
    found = []
    for entry in os.scandir(SHM_DIR):
        match = SEGMENT_NAME_RE.match(entry.name)
        if not match or match["prefix"] not in prefixes:
            continue
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            continue
        pid = int(match["pid"])
        found.append(SegmentInfo(entry.name, match["prefix"], pid, size, pid_alive(pid)))
    return sorted(found, key=lambda s: s.name)


def sweep(prefixes: tuple[str, ...] | list[str]) -> list[SegmentInfo]:
    """Unlink the segments of our prefixes whose owner process is dead; return them."""
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
