"""`StreamSender`: the sending side of wire protocol v1, as a thin facade.

A frame costs one copy into a reused shared-memory segment plus one small JSON header; the
receiver returns the segment (an ``ack``) once it holds its own copy. The facade says what
to send (arrays, leased arrays, ROIs, requests); `delivery.Delivery` takes each message
through the parts that do the work: `connection.Connection` (the handshake's state, on the
socket and monitor of `channel.Channel`), `credits.CreditWindow` (what is in flight, the
segment pool, the policies), `replies.ReplyHandler` (one handler per reply type); `options`
and `stream_meta` hold the values checked once. Everything runs in the caller's thread: no
background thread, no sleeps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from polystore.streaming import protocol as p
from polystore.streaming.connection import State
from polystore.streaming.delivery import Delivery
from polystore.streaming.errors import ReceiverLostError, UnstreamableDataError
from polystore.streaming.shm import SegmentPool
from polystore.streaming.stream_meta import StreamMeta, to_wire_array


class StreamSender(Delivery):
    """Sends arrays and ROIs to one receiver endpoint with credit-based flow control (see
    `SenderOptions` for the limits and policies). Constructed as `Delivery` is."""

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

    def __enter__(self) -> StreamSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------

    def send_array(self, data: Any, path: str, meta: StreamMeta,
                   axes: dict[str, int] | None = None) -> int:
        """Send one array of stream `meta` at position `axes`; returns its sequence number
        (-1: dropped by policy 'latest')."""
        started = time.perf_counter()
        array = to_wire_array(data)
        axes = meta.checked_axes(axes, path)
        with self._lock:
            seq, template = self._admit_frame(path, meta, array.shape, array.dtype)
            if seq < 0:
                return seq
            wire_dtype = array.dtype.newbyteorder("<")
            nbytes = template.nbytes
            if self._connection.use_shm and nbytes:
                segment = self._reserve(seq, nbytes, True)
                if segment is None:  # dropped (policy latest): open leases hold the memory
                    return -1
                try:  # the segment is ours until the message is tracked: give it back
                    np.copyto(np.ndarray(array.shape, wire_dtype, segment.buf), array,
                              casting="equiv")
                    encoded = template.encode(seq, time.time_ns(), segment.name, axes,
                                              self.stats.unsent)
                except BaseException:
                    self._credits.release_unsent(seq)
                    raise
                return self._send_frame(seq, nbytes, [encoded], started, 0)
            encoded = template.encode(seq, time.time_ns(), None, axes, self.stats.unsent)
            self._reserve(seq, nbytes, False)
            payload = np.ascontiguousarray(array, dtype=wire_dtype)
            if payload is array or payload.base is not None:
                payload = payload.copy()  # the caller may reuse its buffer after save()
            return self._send_frame(seq, nbytes, [encoded, payload], started, nbytes)

    def lease(self, shape: Any, dtype: Any, path: str, meta: StreamMeta,
              axes: dict[str, int] | None = None
              ) -> contextlib.AbstractContextManager[np.ndarray]:
        """Yield an array in a reserved segment; send it (no copy) when the block ends.

        Falls back to an ordinary array sent with `send_array` when frames travel inline, and
        to a scratch array that is not sent when policy 'latest' drops the frame. An
        exception in the block releases the segment and sends nothing.
        """
        dims = tuple(np.atleast_1d(shape)) if np.ndim(shape) <= 1 else ()
        if not 1 <= len(dims) <= p.MAX_NDIM or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0
                for n in dims):
            raise UnstreamableDataError(f"cannot lease {path}: its shape must be 1 to "
                                        f"{p.MAX_NDIM} whole numbers >= 0, got {shape!r}")
        shape = tuple(int(n) for n in dims)
        dtype = to_wire_array(np.empty((0,) * len(shape), dtype)).dtype
        return self._lease(shape, dtype.newbyteorder("<"), path, meta,
                           meta.checked_axes(axes, path))

    @contextlib.contextmanager
    def _lease(self, shape: tuple, dtype: np.dtype, path: str, meta: StreamMeta,
               axes: dict[str, int]) -> Iterator[np.ndarray]:
        started = time.perf_counter()
        with self._lock:
            seq, template = self._admit_frame(path, meta, shape, dtype)
            shm = seq >= 0 and self._connection.use_shm and template.nbytes > 0
            segment = self._reserve(seq, template.nbytes, True) if shm else None
            if shm and segment is None:  # dropped (policy latest): open leases hold the memory
                seq = -1
            if segment is not None:
                self._lease_owners[seq] = threading.get_ident()
        if segment is None:  # dropped by policy (not sent) or inline (sent on exit)
            array = np.empty(shape, dtype)
            yield array
            if seq >= 0:
                self.send_array(array, path, meta, axes)
            return
        sent = False
        try:
            # frombuffer holds the mapping open while the array lives: close() in another
            # thread then leaves it mapped (np.ndarray(buffer=...) let it be unmapped under
            # the block, which crashed the process on its next write)
            yield np.frombuffer(segment.buf, dtype, template.nbytes // dtype.itemsize
                                ).reshape(shape)
            with self._lock:
                if not self._ensure_connected():  # the viewer left meanwhile (policy latest)
                    self._count_unsent()
                    return
                self._credits.raise_pending()  # as send_array does: rejections first
                encoded = template.encode(seq, time.time_ns(), segment.name, axes,
                                          self.stats.unsent)
                sent = True  # from here on the segment is the message's (or given up)
                self._send_frame(seq, template.nbytes, [encoded], started, 0)
        finally:
            with self._lock:
                if not sent:
                    self._credits.release_unsent(seq)
                self._lease_owners.pop(seq, None)
                self._lease_ended.notify_all()  # a save waiting for the memory tries again

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
            message = meta.encoded_rois(seq, path, rois, axes)
            self._reserve(seq, 0, False)
            if not self._dispatch(seq, [message], started, 0):
                return -1
            self.stats.rois += 1
            return seq

    def request(self, command: Literal["report", "clear"], timeout: float | None = None) -> dict:
        """Ask the receiver for its state (`report`) or to drop its streams (`clear`);
        raises if it does not answer within `timeout`."""
        started = time.perf_counter()
        waited = self._or_default(timeout)
        with self._lock:
            self._ensure_connected(wait=True)  # raises if no receiver answers in time
            seq = next(self._seq)
            answers = self._replies.answers
            answers[seq] = None  # answer wanted: Report (state) or Ack ({})
            try:
                message = p.encode(p.Control(v=p.VERSION, seq=seq, command=command))
                if self._dispatch(seq, [message], started, 0) and not self._wait_until(
                        lambda: seq not in self._credits, waited):
                    # a receiver busy with a slow viewer: give up the request, not the frames
                    self._credits.complete(seq)
                    raise ReceiverLostError(
                        f"the {self.viewer} receiver at {self.endpoint} did not answer "
                        f"{command!r}, nor anything else, for {waited:g} s; the request was "
                        f"given up, the {len(self._credits)} earlier message(s) in flight "
                        f"were not. Ask again with a longer timeout")
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
        waited = self._or_default(timeout)
        with self._lock:
            if not self._inherited and self._connection.connected:
                self._wait_or_lose(lambda: not self._credits, waited)
            self._credits.raise_pending()
