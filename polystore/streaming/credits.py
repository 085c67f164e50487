"""The credit window: which messages are in flight, and what a new one may take.

Credit-based flow control as in the ZeroMQ guide's ``fileio3``: each unacknowledged message
holds one credit (and, when it travels inline, its bytes; by shared memory, a pool segment).
The receiver's ack returns the credit. When none is left the sender's policy decides:
``block`` waits, ``latest`` gives up the oldest frame, ``raise`` raises. No sockets here: the
window is told about acks and losses, and asks its owner to wait for replies.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import shared_memory

from polystore.streaming import protocol as p
from polystore.streaming.errors import (
    BackpressureError,
    FrameRejectedError,
    ReceiverLostError,
    UnstreamableDataError,
)
from polystore.streaming.options import SenderOptions, SenderStats
from polystore.streaming.shm import SegmentPool

log = logging.getLogger(__name__)


class CreditWindow:
    """In-flight table (seq -> send time), inline bytes and the segment pool of one sender,
    plus what the caller must hear about next (losses, rejections).

    Not thread-safe: the sender serialises access.
    """

    def __init__(self, options: SenderOptions, shm_prefix: str, *, stats: SenderStats,
                 latencies: deque[float], describe: str, start_hint: str = "") -> None:
        self.options = options
        self.stats = stats
        self.latencies = latencies
        self.describe = describe  # "the napari receiver at tcp://...", for messages
        self.start_hint = start_hint
        self.pool = SegmentPool(shm_prefix, options.max_inflight_bytes)
        self._sent_at: dict[int, float] = {}  # seq -> perf_counter() when save() began
        self._inline: dict[int, int] = {}  # seq -> bytes of an inline payload
        self.inline_bytes = 0
        self.answered_at = 0.0  # time.perf_counter() of the receiver's last answer
        self._lost = 0  # unacknowledged messages lost since the caller last heard of it
        self._lost_why = ""
        self._rejections: list[p.Error] = []

    def __len__(self) -> int:
        return len(self._sent_at)

    def __contains__(self, seq: int) -> bool:
        return seq in self._sent_at

    def oldest(self) -> int:
        return min(self._sent_at)

    def reserve(
        self,
        seq: int,
        nbytes: int,
        use_shm: bool,
        wait: Callable[[float | None], None],
        wait_for_leases: Callable[[int], bool],
    ) -> shared_memory.SharedMemory | None:
        """Wait (or drop, or raise, per policy) until message `seq` may go; returns its
        segment when it travels by shared memory (None: dropped). `wait(seconds)` handles
        the replies that arrive within that time (acks return credits) and raises if the
        receiver is lost or the time is up; `wait(None)` only handles those already there.
        `wait_for_leases(nbytes)` is asked when open leases hold the memory and nothing is
        in flight, so no ack can free it: True once a lease ended, False to drop."""
        options = self.options
        if nbytes > options.max_inflight_bytes:
            raise UnstreamableDataError(
                f"a frame of {nbytes} bytes exceeds max_inflight_bytes="
                f"{options.max_inflight_bytes}; raise max_inflight_bytes when creating the backend"
            )
        waiting_since = None
        waited_once = False
        while True:
            if len(self._sent_at) < options.max_inflight:
                if use_shm:
                    segment = self.pool.acquire(seq, nbytes)
                    if segment is not None:
                        return segment
                    if not self._sent_at:
                        if not wait_for_leases(nbytes):
                            return None
                        continue
                elif self.inline_bytes + nbytes <= options.max_inflight_bytes:
                    return None
            if not waited_once:  # acks that already arrived free credits: count them first
                waited_once = True
                wait(None)
                continue
            if options.policy == "latest" and self._sent_at:
                self.abandon(self.oldest())
                self.stats.dropped += 1
                continue
            if options.policy == "raise":
                raise BackpressureError(
                    f"{self.describe} is {len(self._sent_at)} messages behind "
                    f"(max_inflight={options.max_inflight}); use policy='block' or 'latest' or "
                    "save less often"
                )
            if waiting_since is None:
                waiting_since = time.perf_counter()
            # policy 'block': only a silent receiver ends it
            wait(self.silence_ends(waiting_since, options.timeout) - time.perf_counter())

    def silence_ends(self, since: float, timeout: float) -> float:
        """When (`time.perf_counter()`) a wait for replies begun at `since` gives up:
        `timeout` after the later of `since` and the last answer, so a receiver that is slow
        but still answering is waited for."""
        return max(since, self.answered_at) + timeout

    def track(self, seq: int, started: float, inline_bytes: int = 0) -> None:
        """Message `seq` is about to be sent (its segment, if any, is already reserved)."""
        self._sent_at[seq] = started
        if inline_bytes:
            self._inline[seq] = inline_bytes
            self.inline_bytes += inline_bytes

    def complete(self, seq: int) -> bool:
        """The receiver is done with `seq` (answered or rejected it): free its credit and
        segment for reuse. False if `seq` was not in flight."""
        if self._untrack(seq) is None:
            return False
        self.pool.release(seq)
        self.answered_at = time.perf_counter()
        return True

    def ack(self, seq: int) -> bool:
        """The receiver holds its copy of `seq`; False for a message already given up."""
        started = self._untrack(seq)
        if started is None:
            return False
        self.pool.release(seq)
        self.answered_at = now = time.perf_counter()
        self.latencies.append(now - started)
        self.stats.acked += 1
        return True

    def reject(self, error: p.Error) -> None:
        """The receiver refused message `error.seq`; the caller hears of it next."""
        self.stats.rejected += 1
        if error.seq is not None:  # an answer to a message in flight (not one without seq:
            self.answered_at = time.perf_counter()  # repeated, it would never let a wait end)
            if error.code == p.SEGMENT_MISSING:  # a vanished segment is never reused
                self.abandon(error.seq)
            else:
                self.complete(error.seq)
        log.warning("%s rejected message %s: %s", self.describe, error.seq, error.message)
        self._rejections.append(error)

    def lose_all(self, why: str) -> None:
        """The receiver is gone or silent: give up everything in flight. Policy 'latest'
        counts the frames as dropped; the others raise at the next call (`raise_pending`)."""
        lost = self.abandon_all()
        log.warning("%s lost (%s); %d message(s) unacknowledged", self.describe, why, lost)
        if self.options.policy == "latest":
            self.stats.dropped += lost
        else:
            self._lost += lost
            self._lost_why = why
        self.stats.lost += lost

    def raise_pending(self) -> None:
        """Raise the loss or rejection the caller has not heard about yet, once."""
        if self._lost:
            lost, self._lost = self._lost, 0
            raise ReceiverLostError(
                f"{self.describe} was lost ({self._lost_why}); {lost} message(s) were not "
                f"acknowledged. The next save reconnects; restart the viewer if it was "
                f"closed. {self.start_hint}".strip()
            )
        if self._rejections:
            errors, self._rejections = self._rejections, []
            error, more = errors[0], ""
            if len(errors) > 1:  # every rejection is heard of, not only the first
                seqs = ", ".join("?" if e.seq is None else str(e.seq) for e in errors[1:6])
                seqs += ", ..." if len(errors) > 6 else ""
                more = f" (and {len(errors) - 1} more since: {seqs})"
            which = ("a message it could not read (no seq)" if error.seq is None
                     else f"message {error.seq}")
            raise FrameRejectedError(f"{self.describe} rejected {which}: {error.message}{more}",
                                     error.code)

    def abandon(self, seq: int) -> None:
        """Give up on `seq` without its ack: free its credit, unlink (never rewrite) its
        segment, since the receiver may still read it."""
        self._untrack(seq)
        self.pool.abandon(seq)

    def release_unsent(self, seq: int) -> None:
        """A reserved segment that was never sent (the caller's block failed): reuse it."""
        self._untrack(seq)
        self.pool.release(seq)

    def abandon_all(self) -> int:
        """The receiver is gone: give up every message in flight; returns how many."""
        lost = list(self._sent_at)
        for seq in lost:
            self.abandon(seq)
        return len(lost)

    def close(self) -> None:
        self.abandon_all()
        self.pool.close()

    def _untrack(self, seq: int) -> float | None:
        started = self._sent_at.pop(seq, None)
        inline = self._inline.pop(seq, 0)
        self.inline_bytes -= inline
        return started
