"""`DisplayTimer`: a `QTimer` that drains the `CoalescingBuffer` into a `LayerManager`.

The receiver thread only fills the buffer; napari may be touched on the Qt main thread alone,
so this timer takes what arrived about 60 times a second and applies it there.
"""

from __future__ import annotations

import time

from qtpy.QtCore import QObject, Qt, QTimer

from polystore_napari.buffer import CoalescingBuffer
from polystore_napari.layers import LayerManager


class DisplayTimer(QObject):
    """Drains a `CoalescingBuffer` into a `LayerManager` on the main thread at ~60 Hz."""

    def __init__(self, manager: LayerManager, interval_ms: int = 16, parent=None) -> None:
        super().__init__(parent)
        self.manager = manager
        self.buffer: CoalescingBuffer | None = None
        self.ticks = 0
        self.busy_s = 0.0  # time spent applying updates
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.tick)

    def start(self, buffer: CoalescingBuffer) -> None:
        self.buffer = buffer
        buffer.display_state = self.manager.snapshot
        self._timer.start()

    def stop(self, drain: bool = True) -> None:
        self._timer.stop()
        if drain and self.buffer is not None:
            self.tick()  # show what arrived before the stop
        self.buffer = None

    @property
    def active(self) -> bool:
        return self._timer.isActive()

    def tick(self) -> None:
        buffer = self.buffer
        if buffer is None:
            return
        batch = buffer.take()
        if batch:
            t0 = time.perf_counter()
            self.manager.apply(batch)
            self.busy_s += time.perf_counter() - t0
        # also after a layer was deleted between batches
        buffer.display_state = self.manager.snapshot
        self.ticks += 1
