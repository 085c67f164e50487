"""The receiving side of the widget, without Qt: the running receiver and its buffer, and
what keeps the display ahead of receiving when the CPU is saturated.

The receiver thread runs at a lower CPU priority (`at_lower_priority`, nice +10 on Linux)
and, while it listens, Python's GIL switch interval is 1 ms instead of 5
(`Session.favour_display`): senders are slowed through their credits rather than the display.
``$POLYSTORE_NAPARI_RECEIVER_NICE=0`` turns both off.
"""

from __future__ import annotations

import os
import sys
import threading

from polystore.streaming import Receiver
from polystore_napari.buffer import CoalescingBuffer

ENV_NICE = "POLYSTORE_NAPARI_RECEIVER_NICE"


def receiver_nice_default() -> int:
    try:
        return int(os.environ.get(ENV_NICE, "10"))
    except ValueError:
        return 10


def at_lower_priority(callback, nice: int):
    """Wrap the receiver's frame callback so that, on its first call, it lowers the priority of
    the thread it runs in (the receiver thread) by `nice` (Linux: threads have their own nice
    value). When the CPU is saturated, drawing then wins over receiving: the display keeps
    its frame rate and the senders are slowed through their credits (or drop, with policy
    ``latest``). On an idle CPU nothing changes."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return callback
    lowered = False

    def on_frame(frame):
        nonlocal lowered
        if not lowered:
            lowered = True
            try:
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                         + nice))
            except OSError:
                pass
        callback(frame)

    return on_frame


class Session:
    """A running receiver and the buffer it fills. Holds no Qt or napari object, so the
    widget's stop hooks can own it without keeping the viewer alive."""

    def __init__(self) -> None:
        self.receiver: Receiver | None = None
        self.buffer: CoalescingBuffer | None = None
        self.switch_interval: tuple[float, float] | None = None  # (previous, ours)

    def favour_display(self) -> None:
        """Shorten Python's GIL switch interval while receiving, so the main thread waits
        at most 1 ms (not 5) for the GIL when the de-prioritised receiver thread holds it."""
        previous = sys.getswitchinterval()
        ours = min(previous, 0.001)
        sys.setswitchinterval(ours)
        self.switch_interval = (previous, ours)

    def stop(self, *_: object) -> None:
        receiver, buffer = self.receiver, self.buffer
        self.receiver = self.buffer = None
        if self.switch_interval is not None:
            previous, ours = self.switch_interval
            self.switch_interval = None
            if sys.getswitchinterval() == ours:  # nobody else changed it meanwhile
                sys.setswitchinterval(previous)
        if buffer is not None:
            buffer.close()  # wake the receiver thread if it waits for room
        if receiver is not None:
            receiver.stop()
