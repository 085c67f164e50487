"""The receiver's side of shared memory: copy a frame out of another process's segment.

Nothing another process puts in /dev/shm can hang or crash the reader. A name is opened
with ``O_NOFOLLOW | O_NONBLOCK`` (a symlink fails, a FIFO does not block) and then checked
with ``fstat``: a regular file, owned by this user, large enough. Before every copy the
segment's current size is checked again (``fstat``, about a microsecond), so a segment
truncated after it was mapped is an error reply, not a SIGBUS on the next frame. Copies
go through a read-only ``mmap``: ``pread`` would close the remaining race (a truncation by
the segment's owner, this same user, between the check and the copy) but copies 8 MiB
1.7-2.7x slower (scripts/bench_auth.py measures both).
"""

from __future__ import annotations

import mmap
import os
import stat
import sys
import threading
from collections import OrderedDict

import numpy as np

from polystore.streaming import protocol as p
from polystore.streaming.shm import SEGMENT_NAME_RE, SHM_DIR

#: copies at least this large go through numpy, which lets go of the GIL while it copies: a
#: receiver thread copying 8 MiB frames (1-3 ms each) would otherwise stall its process's
#: other threads, napari's drawing main thread among them; smaller ones through a memoryview
#: (a few microseconds less per frame)
GIL_FREE_COPY_BYTES = 1 << 20

#: NumPy dtypes of the wire's dtype names (always little-endian), looked up per frame.
WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in p.DTYPES}

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def copy_bytes(out: memoryview, source: memoryview) -> None:
    """`out[:] = source` for byte views of one size; without the GIL from
    GIL_FREE_COPY_BYTES on (segments and inline payloads alike)."""
    if out.nbytes >= GIL_FREE_COPY_BYTES:
        np.copyto(np.frombuffer(out, np.uint8), np.frombuffer(source, np.uint8))
    else:
        out[:] = source


class SegmentError(Exception):
    """A segment could not be read: `missing` tells a vanished one from a forbidden one."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


#: frames this large get fresh memory: numpy asks for huge pages from 4 MiB on, and a fresh
#: 8 MiB array was measured faster to fill than a reused one (2048x2048 uint16: about 4 %
#: more frames/s, alternating runs), while a fresh 512 KiB one was far slower (page faults)
RECYCLE_BELOW_BYTES = 4 << 20


def _refs_of_a_free_item() -> int:
    """What `sys.getrefcount(owners[i])` reads for an item only its list holds (measured
    once, with the same expression the recycler uses: interpreters differ)."""
    owners = [np.empty(1, np.uint8)]
    return sys.getrefcount(owners[0])


_FREE = _refs_of_a_free_item()


class ArrayRecycler:
    """Memory for received frames, reusing arrays nobody holds any more.

    A fresh 512 KiB array costs 128 page faults whenever malloc has handed that memory back to
    the system, which it does in bursts when several frames are freed together: measured
    3,200 instead of 6,000 frames/s at 512x512 uint16. So the receiver keeps the last few
    arrays it made and reuses one of the right size once its only reference is the
    recycler's own (the viewer let go of every view of it). Frames of RECYCLE_BELOW_BYTES
    and more get fresh memory. Idle memory is released by `release()`.
    """

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep  # arrays remembered (each under RECYCLE_BELOW_BYTES: < 64 MiB in all)
        self._owners: list[np.ndarray] = []  # flat uint8 arrays, oldest first

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> np.ndarray:
        """An array of `shape` and `dtype` (`nbytes` in all, as the validated header says)."""
        if nbytes == 0:
            try:
                return np.empty(shape, dtype)
            except ValueError:  # other dimensions NumPy cannot index: empty all the same
                return np.empty((0,) * len(shape), dtype)
        if nbytes >= RECYCLE_BELOW_BYTES:
            return np.empty(shape, dtype)
        owners = self._owners
        for i in range(len(owners) - 1, -1, -1):  # the most recent first: still in cache
            if owners[i].nbytes == nbytes and sys.getrefcount(owners[i]) == _FREE:
                owner = owners.pop(i)
                owners.append(owner)
                return owner.view(dtype).reshape(shape)
        owner = np.empty(nbytes, np.uint8)
        owners.append(owner)
        if len(owners) > self.keep:
            del owners[0]  # if still in use, it stays the viewer's
        return owner.view(dtype).reshape(shape)

    def release(self) -> None:
        """Forget every array (those in use stay their holders')."""
        self._owners.clear()


class _Mapping:
    __slots__ = ("fd", "map", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive; the GC unmaps it later
        os.close(self.fd)


class SegmentReader:
    """Cached read-only mappings of other processes' segments (at most `max_cached`)."""

    def __init__(self, max_cached: int = 64) -> None:
        self.max_cached = max_cached
        self.arrays = ArrayRecycler()
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self._uid = os.getuid()
        self._lock = threading.Lock()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill `out` (a writable byte buffer) from `name` at `offset`, or raise SegmentError
        if the name is not a segment of this user or the bytes are not all there."""
        nbytes = out.nbytes
        with self._lock:
            mapping = self._mapping(name)
            size = os.fstat(mapping.fd).st_size  # now, not when it was mapped
            if size > mapping.size:  # it grew: map it again
                self._maps.pop(name).close()
                mapping = self._mapping(name)
                size = min(size, mapping.size)  # (another file may have taken the name)
            if offset < 0 or offset + nbytes > size:
                raise SegmentError(
                    f"segment {name} holds {size} bytes; offset {offset} + nbytes {nbytes} "
                    "would read past its end"
                )
            with memoryview(mapping.map) as source:  # released at once: close() can unmap
                if out.format != "B" or out.ndim != 1:
                    out = out.cast("B")
                with source[offset:offset + nbytes] as piece:
                    copy_bytes(out, piece)

    def copy_frame(self, frame: p.Frame, payload) -> np.ndarray:
        """A validated frame's pixels in an array of our own, out of its segment or its
        inline `payload`; raises ProtocolError (bad_segment, segment_missing)."""
        array = self.arrays.empty(tuple(frame.shape), WIRE_DTYPES[frame.dtype], frame.nbytes)
        if frame.segment is None and not frame.nbytes:
            return array
        # an empty frame still names a segment to check (and a view with a 0 in its shape
        # cannot be cast)
        target = memoryview(array).cast("B") if frame.nbytes else memoryview(bytearray())
        if frame.segment is None:
            copy_bytes(target, payload.buffer)
            return array
        try:
            self.read_into(frame.segment, frame.offset, target)
        except SegmentError as exc:
            code = p.SEGMENT_MISSING if exc.missing else p.BAD_SEGMENT
            raise p.ProtocolError(code, str(exc), frame.seq) from None
        return array

    def read(self, name: str, offset: int, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        self.read_into(name, offset, memoryview(out))
        return bytes(out)

    def _mapping(self, name: str) -> _Mapping:
        mapping = self._maps.get(name)
        if mapping is not None:
            self._maps.move_to_end(name)
            return mapping
        fd = self._open(name)
        try:
            mapping = _Mapping(fd, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        self._maps[name] = mapping
        while len(self._maps) > self.max_cached:
            self._maps.popitem(last=False)[1].close()
        return mapping

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
        """Unmap segments their sender has unlinked (st_nlink drops to 0)."""
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
