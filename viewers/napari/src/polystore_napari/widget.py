"""The "polystore receiver" dock widget: endpoint, start/stop, display options, live status.

Receiving runs in the core `Receiver`'s own thread and only fills a `CoalescingBuffer`;
`DisplayTimer` applies the buffer to layers on the Qt main thread. Closing the widget (or the
viewer, or the application) stops the receiver.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import weakref

from qtpy.QtCore import QEvent, QObject, QSettings, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from polystore.streaming import NapariStreamingBackend, Receiver, receiver_for
from polystore_napari.buffer import MODES, CoalescingBuffer
from polystore_napari.layers import DisplayTimer, LayerManager
from polystore_napari.options import ENV_ENDPOINT, REMEMBERED, ReceiverOptions

__all__ = ["ENV_ENDPOINT", "ReceiverWidget"]

SETTINGS = ("polystore", "polystore-napari")
ENV_NICE = "POLYSTORE_NAPARI_RECEIVER_NICE"
#: how long the receiver's last rejected message stays in *Last error*
ERROR_SHOWN_S = 60.0


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


class _Session:
    """A running receiver and the buffer it fills. Holds no Qt or napari object, so the
    stop hooks below can own it without keeping the viewer alive."""

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


class _CloseWatcher(QObject):
    """Stops the session when the viewer's main window closes."""

    def __init__(self, session: _Session, parent: QObject) -> None:
        super().__init__(parent)
        self._session = session

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Close:
            if event.spontaneous():  # the user may still cancel in a confirmation dialog
                QTimer.singleShot(0, functools.partial(_stop_if_hidden, obj, self._session))
            else:
                self._session.stop()
        return False


def _stop_if_hidden(window: QWidget, session: _Session) -> None:
    try:
        visible = window.isVisible()
    except RuntimeError:  # already deleted
        visible = False
    if not visible:
        session.stop()


class ReceiverWidget(QWidget):
    """Dock widget that receives frames streamed with ``backend="napari_stream"``."""

    def __init__(
        self,
        napari_viewer,
        *,
        options: ReceiverOptions | None = None,
        parent: QWidget | None = None,
        **changes,
    ) -> None:
        """`options`: how to listen and show (None: what the user chose in this widget last
        time, `ReceiverOptions.from_settings`); `changes`: fields of `ReceiverOptions` that
        override them (``endpoint=``, ``mode=``, ...)."""
        super().__init__(parent)
        self.viewer = napari_viewer
        if options is None:
            options = ReceiverOptions.from_settings(QSettings(*SETTINGS))
        options = options.replace(**changes)
        self.options = options
        #: whether changes of the options are remembered for the next napari session
        self.persist = True
        #: how much lower the receiver thread's CPU priority is than the display's
        self.receiver_nice = receiver_nice_default()
        endpoint, auto_start = options.listen_endpoint, options.auto_start
        mode, stack_capacity = options.mode, options.stack_capacity

        self._session = _Session()
        self.manager = LayerManager(napari_viewer, stack_capacity=stack_capacity)
        self.display = DisplayTimer(self.manager, parent=self)
        self._error = ""
        self._docked = False
        self._rate_mark = (time.monotonic(), 0)
        self.displayed_fps = 0.0
        self._receiver_error: tuple[str, float] = ("", 0.0)  # (text, first seen)
        self._build(endpoint, auto_start, mode, stack_capacity)

        # every way this widget can go away stops the receiver
        stop = functools.partial(_Session.stop, self._session)
        self.destroyed.connect(stop)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(stop)
        self._watcher = _CloseWatcher(self._session, self)
        self._watched: weakref.ref[QWidget] | None = None

        self._status_timer = QTimer(self)
        self._status_timer.setInterval(250)
        self._status_timer.timeout.connect(self.update_status)
        self._status_timer.start()
        if auto_start:
            QTimer.singleShot(0, self._auto_start)
        self.update_status()

    # -- UI ----------------------------------------------------------------------------------

    def _build(self, endpoint, auto_start, mode, capacity) -> None:
        self.endpoint_edit = QLineEdit(endpoint)
        self.endpoint_edit.setToolTip("tcp://127.0.0.1:PORT to listen on (port 0: any free "
                                      "port); senders use the same endpoint")
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.start_button.clicked.connect(self._start_clicked)
        self.stop_button.clicked.connect(self.stop)
        self.auto_start_box = QCheckBox("Start automatically")
        self.auto_start_box.setChecked(auto_start)
        self.auto_start_box.setToolTip("Start listening as soon as this widget opens")
        self.mode_box = QComboBox()
        self.mode_box.addItems(MODES)
        self.mode_box.setCurrentText(mode)
        self.mode_box.setToolTip(
            "How frames without a mode hint are shown. auto: placed by their axes if they "
            "have any, else replace. replace: newest frame only. stack: append along time "
            "(up to the capacity). place: position in an nD layer by axes.")
        self.capacity_box = QSpinBox()
        self.capacity_box.setRange(1, 100_000)
        self.capacity_box.setValue(capacity)
        self.capacity_box.setToolTip("Frames a stack layer keeps (oldest dropped)")

        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        form = QFormLayout()
        form.addRow("Endpoint", self.endpoint_edit)
        form.addRow(buttons)
        form.addRow(self.auto_start_box)
        form.addRow("Default mode", self.mode_box)
        form.addRow("Stack capacity", self.capacity_box)

        status = QGroupBox("Status")
        grid = QFormLayout(status)
        self.status_labels: dict[str, QLabel] = {}
        for key, title in (("state", "State"), ("senders", "Connected senders"),
                           ("frames", "Frames received"), ("fps", "Frames/s"),
                           ("displayed", "Display updates/s"),
                           ("dropped", "Dropped by policy"), ("coalesced", "Coalesced"),
                           ("error", "Last error")):
            label = QLabel("-")
            label.setWordWrap(True)
            self.status_labels[key] = label
            grid.addRow(title, label)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(status)
        layout.addStretch(1)

        self.mode_box.currentTextChanged.connect(self._options_changed)
        self.capacity_box.valueChanged.connect(self._options_changed)
        self.auto_start_box.toggled.connect(self._save_settings)

    def _options_changed(self, *_: object) -> None:
        self.manager.stack_capacity = self.capacity_box.value()
        buffer = self._session.buffer
        if buffer is not None:
            buffer.default_mode = self.mode_box.currentText()
            buffer.stack_capacity = self.capacity_box.value()
        self._save_settings()

    def _save_settings(self, *_: object, endpoint: bool = False) -> None:
        """Remember what the user chose in the widget (not options a program passed in);
        the endpoint only once the user started listening on it."""
        if self.persist:
            keys = REMEMBERED if endpoint else tuple(k for k in REMEMBERED if k != "endpoint")
            self.current_options().save(QSettings(*SETTINGS), keys)

    def apply_options(self, options: ReceiverOptions) -> None:
        """Show `options` in the widget's fields; listen again if the receiver runs with
        other listening options."""
        listening = (options.listen_endpoint, options.allow_remote, options.curve_secret_key)
        before = (self.options.listen_endpoint, self.options.allow_remote,
                  self.options.curve_secret_key)
        self.options = options
        self.endpoint_edit.setText(options.listen_endpoint)
        self.auto_start_box.setChecked(options.auto_start)
        self.mode_box.setCurrentText(options.mode)
        self.capacity_box.setValue(options.stack_capacity)
        if self._session.receiver is not None and (
                listening != before or self.endpoint != options.listen_endpoint):
            self.stop()

    def current_options(self) -> ReceiverOptions:
        """The options as the widget's fields show them now."""
        return self.options.replace(
            endpoint=self.endpoint_edit.text().strip() or None,
            auto_start=self.auto_start_box.isChecked(), mode=self.mode_box.currentText(),
            stack_capacity=self.capacity_box.value())

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def receiver(self) -> Receiver | None:
        return self._session.receiver

    @property
    def buffer(self) -> CoalescingBuffer | None:
        return self._session.buffer

    @property
    def running(self) -> bool:
        return self._session.receiver is not None and self._session.receiver.running

    @property
    def endpoint(self) -> str | None:
        """The endpoint actually listened on (a port 0 request resolved)."""
        return self._session.receiver.endpoint if self._session.receiver else None

    def _auto_start(self) -> None:
        if self.running or self._session.receiver is not None:
            return
        try:
            self.start()
        except Exception:  # noqa: BLE001 - shown in the status; the user can fix the endpoint
            pass

    def _start_clicked(self) -> None:
        try:
            self.start()
        except Exception:  # noqa: BLE001 - shown in the status
            return
        self._save_settings(endpoint=True)

    def start(self) -> None:
        """Listen on the endpoint in the field (raises OSError/ValueError if that fails)."""
        if self._session.receiver is not None:
            if self.running:
                return
            self.stop()
        options = self.options = self.current_options()
        buffer = CoalescingBuffer(default_mode=options.mode,
                                  stack_capacity=options.stack_capacity)
        try:
            receiver = receiver_for(
                NapariStreamingBackend, options.listen_endpoint,
                on_frame=at_lower_priority(buffer.put_frame, self.receiver_nice),
                on_rois=buffer.put_rois, on_clear=buffer.clear, report=buffer.report,
                allow_remote=options.allow_remote, curve_secret_key=options.curve_secret_key,
            )  # fmt: skip
            receiver.start()
        except Exception as exc:
            self._error = str(exc)
            self.update_status()
            raise
        self._error = ""
        self._session.receiver, self._session.buffer = receiver, buffer
        if self.receiver_nice > 0:
            self._session.favour_display()
        self.display.start(buffer)
        self.update_status()

    def stop(self, *_: object, drain: bool = True) -> None:
        """Stop listening; the layers stay. Every credit is released (the receiver holds
        none after its copy) and every mapped segment unmapped."""
        try:
            self.display.stop(drain=drain and self._session.buffer is not None)
        except RuntimeError:  # Qt objects already deleted (application quit)
            pass
        self._session.stop()
        try:
            self.update_status()
        except RuntimeError:
            pass

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        self.stop(drain=False)
        super().closeEvent(event)

    def event(self, event: QEvent) -> bool:
        # napari's dock close button calls remove_dock_widget, which un-parents this widget
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._session.stop()
                self.display.stop(drain=False)
        return super().event(event)

    # -- status ------------------------------------------------------------------------------

    def _watch_window(self) -> None:
        """Watch the top-level window we are docked in (napari's main window) for its close."""
        window = self.window()
        watched = self._watched() if self._watched is not None else None
        if window is not self and window is not watched:
            if watched is not None:
                try:
                    watched.removeEventFilter(self._watcher)
                except RuntimeError:
                    pass
            window.installEventFilter(self._watcher)
            # weakly: a strong reference would keep napari's closed window (and viewer) alive
            self._watched = weakref.ref(window)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._watch_window()
        super().showEvent(event)

    def update_status(self) -> None:
        self._watch_window()
        now = time.monotonic()
        t0, updates0 = self._rate_mark
        if now - t0 >= 0.5:
            self.displayed_fps = (self.manager.updates - updates0) / (now - t0)
            self._rate_mark = (now, self.manager.updates)
        labels = self.status_labels
        receiver, buffer = self._session.receiver, self._session.buffer
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
            error = self._error or self.manager.last_error
        labels["displayed"].setText(f"{self.displayed_fps:.1f}")
        labels["error"].setText(error or "-")
        self.start_button.setEnabled(receiver is None)
        self.stop_button.setEnabled(receiver is not None)

    def _recent_receiver_error(self, text: str, now: float) -> str:
        """The receiver's last rejected message, with its age, for `ERROR_SHOWN_S` seconds:
        it is about one message, and must not stay on screen forever."""
        if text != self._receiver_error[0]:
            self._receiver_error = (text, now)
        age = now - self._receiver_error[1]
        if not text or age > ERROR_SHOWN_S:
            return ""
        return f"{text} ({age:.0f} s ago)"
