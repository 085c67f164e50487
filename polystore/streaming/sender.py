"""`StreamSender`: the sending side of wire protocol v1, as a thin facade.

A frame costs one copy into a reused shared-memory segment plus one small JSON header; the
receiver returns the segment (an ``ack``) once it holds its own copy. The facade only
sequences the parts that do the work: `connection.Connection` (socket, monitor, handshake
state), `credits.CreditWindow` (what is in flight, the segment pool, the policies),
`replies.ReplyHandler` (one handler per reply type) and `options` (values checked once).
Everything runs in the caller's thread: no background thread, no sleeps.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from polystore.streaming import protocol as p
from polystore.streaming.connection import Connection, State
from polystore.streaming.credits import CreditWindow
from polystore.streaming.errors import (
    ReceiverLostError,
    ViewerNotRunningError,
)
from polystore.streaming.options import SenderOptions, SenderStats, StreamMeta, to_wire_array
from polystore.streaming.replies import ReplyHandler
from polystore.streaming.shm import SegmentPool

log = logging.getLogger(__name__)

_live_senders: weakref.WeakSet[StreamSender] = weakref.WeakSet()
_BYE = p.encode(p.Bye(v=p.VERSION))


@atexit.register
def _close_all() -> None:
    for sender in list(_live_senders):
        sender.close(flush_timeout=0.5)


def _after_fork_in_child() -> None:
    """A forked child must never touch its parent's sockets or segments: start afresh."""
    for sender in list(_live_senders):
        sender._inherited = True
        sender._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class StreamSender:
    """Sends arrays and ROIs to one receiver endpoint with credit-based flow control (see
    `SenderOptions` for the limits and policies)."""

    def __init__(self, endpoint: str, *, viewer: str, shm_prefix: str,
                 options: SenderOptions | None = None, start_hint: str = "") -> None:
        self.endpoint = endpoint
        self.viewer = viewer
        self.shm_prefix = shm_prefix
        self.options = options or SenderOptions()
        self.start_hint = start_hint
        self.stats = SenderStats()
        #: save()-to-ack times in seconds of the last 100k messages (benchmarks read this)
        self.latencies: deque[float] = deque(maxlen=100_000)
        self._lock = threading.RLock()
        self._closed = False
        self._reset_process_state()
        _live_senders.add(self)

    def _reset_process_state(self) -> None:
        """Fresh connection and credits for this process (also after a fork)."""
        self._inherited = False
        self._pid = os.getpid()
        describe = f"the {self.viewer} receiver at {self.endpoint}"
        self._credits = CreditWindow(self.options, self.shm_prefix, stats=self.stats,
                                     latencies=self.latencies, describe=describe,
                                     start_hint=self.start_hint)  # fmt: skip
        self._connection = Connection(
            self.endpoint, self.options, viewer=self.viewer, on_reply=lambda data: None,
            on_disconnect=lambda: self._receiver_lost("the receiver disconnected"))
        self._replies = ReplyHandler(self._connection, self._credits, self.stats,
                                     describe=describe, receiver_lost=self._receiver_lost)
        self._connection.on_reply = self._replies
        self._seq = itertools.count()

    # -- public state ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._connection.state

    @property
    def receiver_id(self) -> str | None:
        return self._connection.receiver_id

    @property
    def uses_shared_memory(self) -> bool:
        """True once a receiver on this machine confirmed it reads our segments."""
        return self._connection.use_shm

    @property
    def inflight(self) -> int:
        return len(self._credits)

    @property
    def pool(self) -> SegmentPool:
        """This process's segments: `.prefix`, `.busy_count` (reserved for messages in
        flight or leased), `.total_bytes` (at most max_inflight_bytes)."""
        return self._credits.pool

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self, flush_timeout: float | None = None) -> None:
        """Deliver what is in flight (best effort), say bye, unlink every segment."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._inherited or self._pid != os.getpid():
                return  # a forked child never owned the parent's state
            if self._connection.connected and len(self._credits):
                with contextlib.suppress(Exception):  # close must not raise over delivery
                    self._wait_until(lambda: not self._credits, self._or_default(flush_timeout))
            self._connection.close(goodbye=_BYE, linger_ms=200)
            self._credits.close()

    def __enter__(self) -> StreamSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _or_default(self, timeout: float | None) -> float:
        return self.options.timeout if timeout is None else timeout

    def _ensure_connected(self) -> bool:
        """Handshake if needed. False means: drop this message (policy 'latest' while the
        receiver that was there is gone or not yet answering, so a live preview never
        stalls the pipeline; it reconnects in the background)."""
        if self._inherited:
            self._reset_process_state()
        if self._closed:
            raise RuntimeError(f"this {self.viewer} stream sender is closed")
        if self._connection.still_connected():  # the common case, once per frame
            return True
        return self._connection.ensure(
            identity=self.pool.token, segment_prefix=self.pool.prefix, pid=self._pid,
            wait=not (self.options.policy == "latest" and self.stats.handshakes),
            start_hint=self.start_hint)

    # -- sending -------------------------------------------------------------------------------

    def send_array(self, data: Any, path: str, meta: StreamMeta,
                   axes: dict[str, int] | None = None) -> int:
        """Send one array of stream `meta` at position `axes`; returns its sequence number
        (-1: dropped by policy 'latest')."""
        started = time.perf_counter()
        array = to_wire_array(data)
        axes = meta.checked_axes(axes, path)
        with self._lock:
            seq, header = self._admit_frame(path, meta, axes, array.shape, array.dtype)
            if seq < 0:
                return seq
            wire_dtype = array.dtype.newbyteorder("<")
            if self._connection.use_shm and header.nbytes:
                segment = self._reserve(seq, header.nbytes, True)
                header.segment = segment.name
                np.copyto(np.ndarray(array.shape, wire_dtype, segment.buf), array,
                          casting="equiv")
                return self._send_frame(seq, header, [p.encode(header)], started, 0)
            self._reserve(seq, header.nbytes, False)
            payload = np.ascontiguousarray(array, dtype=wire_dtype)
            if payload is array or payload.base is not None:
                payload = payload.copy()  # the caller may reuse its buffer after save()
            return self._send_frame(seq, header, [p.encode(header), payload], started,
                                    header.nbytes)

    def lease(self, shape: Any, dtype: Any, path: str, meta: StreamMeta,
              axes: dict[str, int] | None = None
              ) -> contextlib.AbstractContextManager[np.ndarray]:
        """Yield an array in a reserved segment; send it (no copy) when the block ends.

        Falls back to an ordinary array sent with `send_array` when frames travel inline, and
        to a scratch array that is not sent when policy 'latest' drops the frame. An
        exception in the block releases the segment and sends nothing.
        """
        shape = tuple(int(n) for n in np.atleast_1d(shape))
        dtype = to_wire_array(np.empty((0,) * max(len(shape), 1), dtype)).dtype
        return self._lease(shape, dtype.newbyteorder("<"), path, meta,
                           meta.checked_axes(axes, path))

    @contextlib.contextmanager
    def _lease(self, shape: tuple, dtype: np.dtype, path: str, meta: StreamMeta,
               axes: dict[str, int]) -> Iterator[np.ndarray]:
        started = time.perf_counter()
        with self._lock:
            seq, header = self._admit_frame(path, meta, axes, shape, dtype)
            shm = seq >= 0 and self._connection.use_shm and header.nbytes > 0
            segment = self._reserve(seq, header.nbytes, True) if shm else None
        if segment is None:  # dropped by policy (not sent) or inline (sent on exit)
            array = np.empty(shape, dtype)
            yield array
            if seq >= 0:
                self.send_array(array, path, meta, axes)
            return
        try:
            yield np.ndarray(shape, dtype=dtype, buffer=segment.buf)
            with self._lock:
                connected = self._ensure_connected()  # the viewer may have left meanwhile
        except BaseException:
            with self._lock:
                self._credits.release_unsent(seq)
            raise
        with self._lock:
            if not connected:  # policy latest
                self._credits.release_unsent(seq)
                self._count_unsent()
                return
            header.segment, header.sent_ns = segment.name, time.time_ns()
            header.dropped = self.stats.unsent
            self._send_frame(seq, header, [p.encode(header)], started, 0)

    def _admit_frame(self, path: str, meta: StreamMeta, axes: dict[str, int], shape: tuple,
                     dtype: np.dtype) -> tuple[int, p.Frame | None]:
        """A sequence number and header for a frame, or (-1, None) if policy drops it."""
        seq = self._admit()
        if seq < 0:
            return seq, None
        return seq, meta.frame_header(seq, path, shape, dtype, axes,
                                      self._connection.max_frame_bytes, self.stats.unsent)

    def _send_frame(self, seq: int, header: p.Frame, parts: list, started: float,
                    inline_bytes: int) -> int:
        if not self._dispatch(seq, parts, started, inline_bytes):
            return -1
        self.stats.frames += 1
        self.stats.bytes += header.nbytes
        self._connection.drain()
        return seq

    def send_rois(self, rois: list[p.Roi], path: str, meta: StreamMeta,
                  axes: dict[str, int] | None = None) -> int:
        """Send regions of interest for image stream `meta.stream` at position `axes` (-1:
        dropped by policy)."""
        started = time.perf_counter()
        axes = meta.checked_axes(axes, path)
        with self._lock:
            seq = self._admit()
            if seq < 0:
                return seq
            message = meta.rois_message(seq, path, rois, axes)
            self._reserve(seq, 0, False)
            if not self._dispatch(seq, [p.encode(message)], started, 0):
                return -1
            self.stats.rois += 1
            return seq

    def request(self, command: Literal["report", "clear"], timeout: float | None = None) -> dict:
        """Ask the receiver for its state (`report`) or to drop its streams (`clear`);
        raises if it does not answer within `timeout`."""
        started = time.perf_counter()
        with self._lock:
            if not self._ensure_connected():
                raise ViewerNotRunningError(
                    f"the {self.viewer} receiver at {self.endpoint} is not connected (yet)")
            seq = next(self._seq)
            answers = self._replies.answers
            answers[seq] = None  # answer wanted: Report (state) or Ack ({})
            try:
                message = p.encode(p.Control(v=p.VERSION, seq=seq, command=command))
                if self._dispatch(seq, [message], started, 0):
                    self._wait_until(lambda: seq not in self._credits, self._or_default(timeout))
                self._credits.raise_pending()
                answer = answers.get(seq)
            finally:
                answers.pop(seq, None)
            if answer is None:
                raise ReceiverLostError(
                    f"the {self.viewer} receiver at {self.endpoint} did not answer {command!r}")
            return answer

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the receiver holds every frame sent so far; raise if one was lost or
        rejected."""
        with self._lock:
            if not self._inherited and self._connection.connected:
                self._wait_until(lambda: not self._credits, self._or_default(timeout))
            self._credits.raise_pending()

    # -- credits and delivery ----------------------------------------------------------------

    def _admit(self) -> int:
        """The next sequence number, or -1 when policy 'latest' drops this message."""
        if not self._ensure_connected():
            self._count_unsent()
            return -1
        self._credits.raise_pending()
        return next(self._seq)

    def _count_unsent(self) -> None:
        self.stats.dropped += 1
        self.stats.unsent += 1

    def _reserve(self, seq: int, nbytes: int, use_shm: bool):
        return self._credits.reserve(seq, nbytes, use_shm, self._wait_for_credits)

    def _wait_for_credits(self, timeout: float | None) -> None:
        if timeout is None:
            self._connection.drain()
            return
        if timeout <= 0:
            self._receiver_lost(f"no acknowledgement from the receiver for "
                                f"{self.options.timeout:g} s")
        else:
            self._connection.poll(timeout)
        if not self._connection.connected:
            self._credits.raise_pending()
            raise ReceiverLostError(f"the {self.viewer} receiver at {self.endpoint} left")

    def _dispatch(self, seq: int, parts: list, started: float, inline_bytes: int) -> bool:
        """Track message `seq` as in flight and send it; False if it was dropped."""
        self._credits.track(seq, started, inline_bytes)
        if self._connection.send(parts, time.monotonic() + self.options.timeout):
            return True
        self._receiver_lost("could not send within the timeout")  # counts `seq` too
        self._credits.raise_pending()  # policies block/raise: ReceiverLostError
        self.stats.unsent += 1  # policy latest: a live preview drops, never stalls
        return False

    def _wait_until(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._connection.drain()
        while not done() and self._connection.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._receiver_lost(f"no acknowledgement from the receiver for {timeout:g} s")
                return
            self._connection.poll(remaining)

    def _receiver_lost(self, why: str) -> None:
        """Give up everything in flight; the next message handshakes again."""
        self._credits.lose_all(why)
        self._connection.lost()
