"""The receiver's side of shared memory: copy a frame out of another process's segment.

Nothing another process puts in /dev/shm can hang or crash the reader. A name is opened
with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink fails, a FIFO does not block) and then checked
with ``fstat``: a regular file, owned by this user, large enough. Bytes are copied with
``pread`` into the receiver's own array instead of through a long-lived ``mmap``: a segment
truncated by its owner then gives a short read (an error reply) where a mapped read would
kill the process with SIGBUS. scripts/bench_auth.py measures what that costs.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict

from polystore.streaming.shm import SEGMENT_NAME_RE, SHM_DIR

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_MAX_READ = 1 << 30  # Linux reads at most ~2 GiB per call


class SegmentError(Exception):
    """A segment could not be read: `missing` tells a vanished one from a forbidden one."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class SegmentReader:
    """Cached read-only file descriptors of other processes' segments (at most `max_cached`)."""

    def __init__(self, max_cached: int = 64) -> None:
        self.max_cached = max_cached
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._uid = os.getuid()
        self._lock = threading.Lock()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill `out` (a writable byte buffer) from `name` at `offset`, or raise SegmentError
        if the name is not a segment of this user or the bytes are not all there."""
        fd = self._fd(name)
        nbytes, done = out.nbytes, 0
        out = out.cast("B")
        while done < nbytes:
            chunk = out[done : done + _MAX_READ]
            got = os.preadv(fd, [chunk], offset + done)
            if got == 0:
                size = os.fstat(fd).st_size
                raise SegmentError(
                    f"segment {name} holds {size} bytes; offset {offset} + nbytes {nbytes} "
                    "would read past its end"
                )
            done += got

    def read(self, name: str, offset: int, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        self.read_into(name, offset, memoryview(out))
        return bytes(out)

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
            fd = self._open(name)
            self._fds[name] = fd
            while len(self._fds) > self.max_cached:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def _open(self, name: str) -> int:
        if not SEGMENT_NAME_RE.fullmatch(name):
            raise SegmentError(f"{name!r} is not a segment name (<prefix><pid>_<token>_<n>)")
        try:
            fd = os.open(SHM_DIR / name, _OPEN_FLAGS)
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
        except BaseException:
            os.close(fd)
            raise
        return fd

    def forget_unlinked(self) -> int:
        """Close descriptors of segments their sender has unlinked (st_nlink drops to 0)."""
        with self._lock:
            gone = [n for n, fd in self._fds.items() if os.fstat(fd).st_nlink == 0]
            for name in gone:
                os.close(self._fds.pop(name))
        return len(gone)

    def forget_prefix(self, prefix: str) -> None:
        with self._lock:
            for name in [n for n in self._fds if n.startswith(prefix)]:
                os.close(self._fds.pop(name))

    def close(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])
