"""The widget's *Status* box: what the receiver and the display are doing, as labels.

The widget refreshes it 4 times a second from the receiver's and the buffer's counters and
the `LayerManager`'s; here are the rules for *Display updates/s* (a rate over at least half a
second) and *Last error* (a display problem while it holds, else the receiver's last rejected
message for `ERROR_SHOWN_S` seconds).
"""

from __future__ import annotations

import time

from qtpy.QtWidgets import QFormLayout, QGroupBox, QLabel, QWidget

from polystore.streaming import Receiver
from polystore_napari.buffer import CoalescingBuffer
from polystore_napari.layers import LayerManager

#: how long the receiver's last rejected message stays in *Last error*
ERROR_SHOWN_S = 60.0


class StatusBox(QGroupBox):
    """Labels for the receiver's state and counters, the display's rate and the last error."""

    def __init__(self, manager: LayerManager, parent: QWidget | None = None) -> None:
        super().__init__("Status", parent)
        self.manager = manager
        self._rate_mark = (time.monotonic(), 0)
        self.displayed_fps = 0.0
        self._receiver_error: tuple[str, float] = ("", 0.0)  # (text, first seen)
        grid = QFormLayout(self)
        self.labels: dict[str, QLabel] = {}
        for key, title in (("state", "State"), ("senders", "Connected senders"),
                           ("frames", "Frames received"), ("fps", "Frames/s"),
                           ("displayed", "Display updates/s"),
                           ("dropped", "Dropped by policy"), ("coalesced", "Coalesced"),
                           ("error", "Last error")):
            label = QLabel("-")
            label.setWordWrap(True)
            self.labels[key] = label
            grid.addRow(title, label)

    def refresh(
        self, receiver: Receiver | None, buffer: CoalescingBuffer | None, start_error: str
    ) -> None:
        """Show the state of `receiver` (None: stopped); `start_error`: why it could not
        start (shown while it is stopped)."""
        now = time.monotonic()
        t0, updates0 = self._rate_mark
        if now - t0 >= 0.5:
            self.displayed_fps = (self.manager.updates - updates0) / (now - t0)
            self._rate_mark = (now, self.manager.updates)
        labels = self.labels
        if receiver is not None and receiver.running:
            s = receiver.stats
            labels["state"].setText(f"listening on {receiver.endpoint}")
            labels["senders"].setText(str(s.senders))
            labels["frames"].setText(str(s.frames))
            labels["fps"].setText(f"{s.fps:.1f}")
            labels["dropped"].setText(str(s.dropped))
            labels["coalesced"].setText(str(buffer.stats.coalesced if buffer else 0))
            error = self.manager.last_error or self._recent_receiver_error(s.last_error, now)
        else:
            labels["state"].setText("stopped")
            for key in ("senders", "fps"):
                labels[key].setText("-")
            error = start_error or self.manager.last_error
        labels["displayed"].setText(f"{self.displayed_fps:.1f}")
        labels["error"].setText(error or "-")

    def _recent_receiver_error(self, text: str, now: float) -> str:
        """The receiver's last rejected message, with its age, for `ERROR_SHOWN_S` seconds:
        it is about one message, and must not stay on screen forever."""
        if text != self._receiver_error[0]:
            self._receiver_error = (text, now)
        age = now - self._receiver_error[1]
        if not text or age > ERROR_SHOWN_S:
            return ""
        return f"{text} ({age:.0f} s ago)"
