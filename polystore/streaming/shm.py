"""Shared memory: the sender's reusable segment pool (orphans.py finds what dead senders left).

Segments are named ``<prefix><pid>_<token>_<n>``: the pid lets anyone find the orphans of a
dead sender, the token keeps two senders of one pid apart, and ``n`` only grows, so a name is
never reused for different memory. A segment whose frame is still unacknowledged is never
rewritten: if the sender must give up on it, it unlinks it (a reader that already mapped it
keeps valid memory) and makes a new one.

Names in /dev/shm are public, so another account can take our next name first, and the
sticky bit stops us removing its file. A name that exists already is never opened, reused or
removed (``O_EXCL``): the pool moves to unpredictable names (``n`` random hex), and a taken
handshake probe name ``<prefix>probe`` moves it to a fresh token (`SegmentPool.renew`).

Every segment is allocated with ``posix_fallocate`` (a full /dev/shm is an `OSError` naming
the free space, never a SIGBUS on first write) and its creator holds a shared ``flock`` on it
for as long as it lives, so a sweep can tell a live segment from an orphan even when the
owner's pid means nothing here (a container sharing /dev/shm has its own pid namespace).
"""

from __future__ import annotations

import _posixshmem  # CPython's shm_open/shm_unlink, used without the resource tracker
import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import secrets
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PAGE = mmap.PAGESIZE
SEGMENT_NAME_RE = re.compile(
    r"^(?P<prefix>[A-Za-z0-9]+_)(?P<pid>\d+)_(?P<token>[A-Za-z0-9]+)_(?P<n>\w+)$"
)
#: Unpredictable names tried for one segment whose next name another process took first.
NAME_ATTEMPTS = 8



class Segment:
    """One shared-memory segment this process created: its name, size, writable `buf`.

    Not `multiprocessing.shared_memory.SharedMemory`: we need its file descriptor for
    `posix_fallocate` and the liveness `flock`, and no resource tracker (we unlink our own).
    """

    def __init__(self, name: str, size: int) -> None:
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # "alive" for as long as this fd is open
            os.ftruncate(fd, size)
            _allocate(fd, name, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            os.close(fd)
            raise
        self.name, self.size, self._fd = name, size, fd
        self.buf: memoryview | None = memoryview(self._map)

    def unlink(self) -> None:
        _posixshmem.shm_unlink("/" + self.name)

    def close(self) -> None:
        """Unmap and drop the lock; raises BufferError while a NumPy array made on it (a
        lease's) still uses it, and the mapping, which holds its own descriptor and so the
        lock, goes with that array."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        if self._map is not None:
            self._map.close()
            self._map = None


def _allocate(fd: int, name: str, size: int) -> None:
    """Reserve the pages now, so a full /dev/shm raises here instead of SIGBUS later."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG):
            raise
        raise OSError(exc.errno, (
            f"shared memory is full: segment {name} needs {_mib(size)} but {SHM_DIR} has "
            f"{_mib(shm_free_bytes())} free. Remove stale segments (`polystore shm clean`), "
            "give the machine or container more /dev/shm (docker run --shm-size=1g), lower "
            "max_inflight_bytes, or stream with transport='inline'"
        )) from None


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def shm_free_bytes() -> int:
    """Bytes still free in /dev/shm for this user."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def segment_prefix(shm_prefix: str, pid: int, token: str) -> str:
    return f"{shm_prefix}{pid}_{token}_"


class SegmentPool:
    """Reusable shared-memory segments of one sender, bounded in total bytes.

    Not thread-safe: the sender serialises access.
    """

    def __init__(self, shm_prefix: str, max_bytes: int) -> None:
        self.shm_prefix = shm_prefix
        self.token = secrets.token_hex(4)
        self.pid = os.getpid()
        self.prefix = segment_prefix(shm_prefix, self.pid, self.token)
        self._random_names = False  # set once a predictable name was found taken
        self.max_bytes = -(-max_bytes // PAGE) * PAGE  # segments are whole pages
        self._counter = itertools.count()
        self._free: list[Segment] = []
        self._busy: dict[int, Segment] = {}
        self._total = 0
        # A pool dropped without close() (or still open at exit) still unlinks its segments.
        weakref.finalize(self, unlink_unless_forked, self.pid, self._free, self._busy)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    @property
    def total_bytes(self) -> int:
        return self._total

    def acquire(self, seq: int, nbytes: int) -> Segment | None:
        """A segment of at least `nbytes` reserved for message `seq`, or None if the byte
        budget is used up by unacknowledged frames (the caller waits for credits)."""
        # The smallest segment that fits; of equal ones, the most recently released (the
        # end of the list): its pages are still mapped and cache-warm, so an idle pipe keeps
        # reusing one warm segment instead of cycling through cold ones.
        free = self._free
        wanted = -(-nbytes // PAGE) * PAGE
        best_index = -1
        for index in range(len(free) - 1, -1, -1):
            size = free[index].size
            if size >= nbytes and (best_index < 0 or size < free[best_index].size):
                best_index = index
                if size == wanted:
                    break
        if best_index >= 0:
            best = free.pop(best_index)
            self._busy[seq] = best
            return best
        size = wanted
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

    def renew(self) -> bool:
        """Move to a fresh, unpredictable token (so a new prefix) and unlink the free
        segments named under the old one; False (nothing changed) while a segment is busy,
        since its frame names the old prefix. For a handshake whose probe name
        ``<prefix>probe`` another process took first."""
        if self._busy:
            return False
        for segment in list(self._free):
            self._destroy(segment, free=True)
        self.token = secrets.token_hex(8)
        self.prefix = segment_prefix(self.shm_prefix, self.pid, self.token)
        return True

    def _create(self, size: int) -> Segment:
        names = (secrets.token_hex(8) for _ in range(NAME_ATTEMPTS))
        if not self._random_names:
            names = itertools.chain([str(next(self._counter))], names)
        for n in names:
            try:
                segment = Segment(f"{self.prefix}{n}", size)
            except FileExistsError:
                # Not ours (O_EXCL): never open, reuse or unlink it. Another process can see
                # our names in /dev/shm and take the next ones: from now on, guess-proof names.
                log.warning("shared-memory segment %s%s exists already and is not this "
                            "sender's; using unpredictable names", self.prefix, n)
                self._random_names = True
                continue
            self._total += segment.size
            return segment
        raise OSError(errno.EEXIST, (
            f"cannot create a shared-memory segment: every name tried under {SHM_DIR}/"
            f"{self.prefix}* ({NAME_ATTEMPTS} random ones included) was taken by another "
            "process. Remove such files as their owner or root (`ls -l /dev/shm`), or stream "
            "with transport='inline'"))

    def _destroy(self, segment: Segment, *, free: bool, seq: int = -1) -> None:
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


def unlink_unless_forked(pid: int, *groups) -> None:
    """A finalizer's job (the owner was collected without closing): unlink the segments of
    process `pid` in `groups` (lists, or dicts of segments, read when this runs), unless this
    is a forked child of it, which never owned them."""
    if os.getpid() != pid:
        return
    for group in groups:
        for segment in group.values() if isinstance(group, dict) else group:
            try:
                segment.unlink()
            except FileNotFoundError:
                pass


def create_probe(prefix: str) -> tuple[Segment, str]:
    """A one-page segment holding a random token; a reader that can read it back shares
    our /dev/shm (same machine, same container)."""
    token = secrets.token_hex(8)
    segment = Segment(f"{prefix}probe", PAGE)
    segment.buf[: len(token)] = token.encode()
    return segment, token


def destroy(segment: Segment) -> None:
    try:
        segment.unlink()
    except FileNotFoundError:
        pass
    segment.close()
