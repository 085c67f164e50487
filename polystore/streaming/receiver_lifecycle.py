"""A receiver's lifecycle: it serves once, in its own thread, from `start` to `stop`.

`start` returns only once the receiver is bound (and raises what binding raised: a port in
use, a bad key), so nobody streams to a receiver that is not listening yet; `stop` sets the
event the message loop polls and waits for the thread. What the receiver does while it serves
(bind, the message loop, each message) is receiver.py's.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

# the receiver's own logger: its messages keep the name they always had
log = logging.getLogger("polystore.streaming.receiver")


class ReceiverLifecycle:
    """Start, stop and ``with`` for `Receiver`, whose `run` binds, sets `_ready` (after
    `_bind_error` if binding failed) and serves until `_stop` is set."""

    viewer: str
    endpoint: str

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._bind_error: BaseException | None = None

    def run(self) -> None:
        """Serve in the thread `start` made (`Receiver.run`)."""
        raise NotImplementedError

    def start(self, timeout: float = 5.0) -> Self:
        """Bind and serve in a daemon thread; returns once bound (raises if binding failed).
        A receiver serves once: after `stop()`, make a new one."""
        if self._thread is not None:
            raise RuntimeError(f"this {self.viewer} receiver was already started"
                               f"{' and stopped' if self._stop.is_set() else ''}; create a "
                               f"new Receiver to listen again")
        self._thread = threading.Thread(target=self.run, name=f"polystore-{self.viewer}-rx",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self._stop.set()  # it ends as soon as it is bound, unused
            raise TimeoutError(f"the {self.viewer} receiver was not listening on "
                               f"{self.endpoint} within {timeout:g} s (its start-up sweep of "
                               "shared memory, or the bind, took longer); create a new "
                               "Receiver and start it with a longer timeout")
        if self._bind_error is not None:  # never served: it may be started again
            error, self._bind_error, self._thread = self._bind_error, None, None
            self._ready.clear()
            raise error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; acks already queued still leave (see `Outbox.close`)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s receiver thread did not stop within %g s", self.viewer, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
