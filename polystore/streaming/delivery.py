"""How a sender's messages get to the receiver, below `StreamSender`'s public API.

One message at a time: handshake on demand, admit the message or drop it by policy, reserve
its credit (waiting for acks if the window is full), send it, and give everything in flight
up when the receiver is lost. `StreamSender` (sender.py) says what to send; this class keeps
the connection (`connection.Connection`), the credit window (`credits.CreditWindow`) and the
reply table (`replies.ReplyHandler`) of the current process, made afresh after a fork.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from collections import deque

import numpy as np

from polystore.streaming import protocol as p
from polystore.streaming.connection import Connection
from polystore.streaming.credits import CreditWindow
from polystore.streaming.errors import BackpressureError, ReceiverLostError
from polystore.streaming.header_template import HeaderTemplate
from polystore.streaming.options import SenderOptions, SenderStats, checked_seconds
from polystore.streaming.replies import ReplyHandler
from polystore.streaming.shm import SHM_DIR
from polystore.streaming.stream_meta import StreamMeta

log = logging.getLogger(__name__)
#: Fresh segment prefixes one handshake tries when its probe name is taken (`SegmentPool.renew`).
_PROBE_ATTEMPTS = 4

_live_senders: weakref.WeakSet[Delivery] = weakref.WeakSet()
_BYE = p.encode(p.Bye(v=p.VERSION))


@atexit.register
def _close_all() -> None:
    for sender in list(_live_senders):
        sender.close(flush_timeout=0.5)


_closes_at_exit_in: int | None = None  # the process whose exit closes its senders


def _close_all_at_this_process_exit() -> None:
    """Also close senders when a multiprocessing child ends: it leaves by os._exit, which
    skips atexit, but runs the finalizers it registered itself (a forked worker would
    otherwise leave its segments in /dev/shm)."""
    global _closes_at_exit_in
    if _closes_at_exit_in != os.getpid():
        _closes_at_exit_in = os.getpid()
        multiprocessing.util.Finalize(None, _close_all, exitpriority=10)


def _after_fork_in_child() -> None:
    """A forked child must never touch its parent's sockets or segments: start afresh."""
    for sender in list(_live_senders):
        sender._inherited = True
        sender._lock = threading.RLock()
        sender._lease_ended = threading.Condition(sender._lock)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Delivery:
    """The connection, credits and replies of one sender, and the steps of a message."""

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
        self._lease_ended = threading.Condition(self._lock)  # notified as a lease() ends
        self._closed = False
        self._reset_process_state()
        _live_senders.add(self)

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
                    waited = self._or_default(flush_timeout)  # a bounded best effort
                    self._wait_or_lose(lambda: not self._credits, waited, 4 * waited)
            self._connection.close(goodbye=_BYE, linger_ms=200)
            self._credits.close()
            self._lease_ended.notify_all()  # a save waiting for leases hears of the close

    def _reset_process_state(self) -> None:
        """Fresh connection and credits for this process (also after a fork)."""
        _close_all_at_this_process_exit()
        self._inherited = False
        self._pid = os.getpid()
        self._lease_owners: dict[int, int] = {}  # seq of an open lease -> its thread's ident
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

    def _or_default(self, timeout: float | None) -> float:
        """A call's own `timeout` (checked: a negative or NaN one gave up everything in
        flight at once), else the backend's."""
        return self.options.timeout if timeout is None else checked_seconds("timeout", timeout,
                                                                            zero_ok=True)

    def _ensure_connected(self, wait: bool = False) -> bool:
        """Handshake if needed. False means: drop this message (policy 'latest' while the
        receiver that was there is gone or not yet answering, so a live preview never
        stalls the pipeline; it reconnects in the background). `wait`: a message that wants
        an answer (a request) waits for the welcome under every policy."""
        if self._inherited:
            self._reset_process_state()
        if self._closed:
            raise RuntimeError(f"this {self.viewer} stream sender is closed")
        if self._connection.still_connected():  # the common case, once per frame
            return True
        self._credits.raise_pending()  # the frames lost with the last receiver come first
        pool = self._credits.pool
        taken, renewed = "", 0
        for _ in range(_PROBE_ATTEMPTS):
            try:
                return self._connection.ensure(
                    identity=pool.token, segment_prefix=pool.prefix, pid=self._pid,
                    wait=wait or not (self.options.policy == "latest"
                                      and self.stats.handshakes),
                    start_hint=self.start_hint)
            except FileExistsError:
                # `<prefix>probe` was taken by another process (names in /dev/shm are
                # public; it may be another account's, which we can never remove). The
                # receiver insists on that probe name, so handshake under a fresh prefix,
                # on a new socket: the sender token is also the socket's routing id.
                taken = pool.prefix + "probe"
                if not pool.renew():  # frames still name this prefix (leased segments)
                    break
                renewed += 1
                self._connection.close()
                log.warning("%s exists and is not this sender's; handshaking as %s", taken,
                            pool.prefix)
        raise OSError(errno.EEXIST, (
            f"cannot handshake with the {self.viewer} receiver at {self.endpoint}: its "
            f"shared-memory probe name {SHM_DIR}/{taken} was taken by another process"
            + (f" (and so were those of the {renewed} fresh prefixes tried)" if renewed else
               " and this sender still has segments in use under its prefix") +
            ". Remove such files as their owner or root (`ls -l /dev/shm`), or stream with "
            "transport='inline'"))

    def _admit_frame(self, path: str, meta: StreamMeta, shape: tuple, dtype: np.dtype
                     ) -> tuple[int, HeaderTemplate | None]:
        """A sequence number and the header template of a frame, or (-1, None) if policy
        drops it."""
        seq = self._admit()
        if seq < 0:
            return seq, None
        return seq, meta.header_template(path, shape, dtype, self._connection.max_frame_bytes)

    def _send_frame(self, seq: int, nbytes: int, parts: list, started: float,
                    inline_bytes: int) -> int:
        if not self._dispatch(seq, parts, started, inline_bytes):
            return -1
        self.stats.frames += 1
        self.stats.bytes += nbytes
        return seq

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
        return self._credits.reserve(seq, nbytes, use_shm, self._wait_for_credits,
                                     self._wait_for_leases)

    def _wait_for_leases(self, nbytes: int) -> bool:
        """Open lease() blocks hold the shared memory a frame of `nbytes` needs, and nothing
        is in flight, so no ack can free it: wait (the lock released) for another thread's
        lease to end; False to drop the frame, counted (policy 'latest'); raise when
        waiting cannot help (this thread's own leases, policy 'raise') or `timeout` passes."""
        if self.options.policy == "latest":
            self._count_unsent()
            return False
        held = (f"open lease() blocks hold the shared memory a frame of {nbytes:,} bytes "
                f"needs (max_inflight_bytes={self.options.max_inflight_bytes:,})")
        me = threading.get_ident()
        if self.options.policy == "raise" or all(o == me for o in self._lease_owners.values()):
            raise BackpressureError(f"{held}: save it after the lease block ends, or raise "
                                    "max_inflight_bytes")
        ended = self._lease_ended.wait(min(self.options.timeout, threading.TIMEOUT_MAX))
        if self._closed:
            raise RuntimeError(f"this {self.viewer} stream sender is closed")
        if not ended:
            raise BackpressureError(f"{held}, and no other thread's lease block ended within "
                                    f"timeout={self.options.timeout:g} s: end lease blocks "
                                    "sooner, or raise max_inflight_bytes")
        return True

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
        if self.options.policy == "latest":
            # never wait for room: a queue with none left is a receiver that reads nothing
            # (frozen) or is far behind; drop this one message, keep the connection
            if self._connection.send(parts, 0.0):
                return True
            self._credits.abandon(seq)
            self._count_unsent()
            return False
        if self._connection.send(parts, time.monotonic() + self.options.timeout):
            return True
        if self._connection.connected:  # else it disconnected meanwhile: lost, and said why
            self._receiver_lost("it took no message within the timeout")  # counts `seq` too
        self._credits.raise_pending()  # policies block/raise: ReceiverLostError
        return False

    def _wait_until(self, done, timeout: float, at_most: float = float("inf")) -> bool:
        """Handle replies until `done()`; False once `timeout` s passed in which nothing was
        answered (a receiver that is slow but still answering is waited for), or `at_most`
        s in all."""
        since = time.perf_counter()
        self._connection.drain()
        while not done() and self._connection.connected:
            remaining = min(self._credits.silence_ends(since, timeout),
                            since + at_most) - time.perf_counter()
            if remaining <= 0:
                return False
            self._connection.poll(remaining)
        return True

    def _wait_or_lose(self, done, timeout: float, at_most: float = float("inf")) -> None:
        """`_wait_until`, and give everything in flight up if the receiver went silent."""
        if not self._wait_until(done, timeout, at_most):
            self._receiver_lost(f"no acknowledgement from the receiver for {timeout:g} s")

    def _receiver_lost(self, why: str) -> None:
        """Give up everything in flight; the next message handshakes again."""
        self._credits.lose_all(why)
        self._connection.lost()
