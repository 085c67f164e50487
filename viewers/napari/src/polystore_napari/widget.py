"""The "polystore receiver" dock widget: endpoint, start/stop, display options, live status.

Receiving runs in the core `Receiver`'s own thread (`session.py`) and only fills a
`CoalescingBuffer`; `DisplayTimer` applies the buffer to layers on the Qt main thread, and
`StatusBox` (`status.py`) shows what both are doing. Closing the widget (or the viewer, or
the application) stops the receiver.
"""

from __future__ import annotations

import functools

from qtpy.QtCore import QEvent, QSettings, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFormLayout,
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
from polystore_napari.close_watcher import CloseWatcher
from polystore_napari.display_timer import DisplayTimer
from polystore_napari.layers import LayerManager
from polystore_napari.options import (
    ENV_ENDPOINT,
    MAX_STACK_CAPACITY,
    REMEMBERED,
    ReceiverOptions,
)
from polystore_napari.session import Session, at_lower_priority, receiver_nice_default
from polystore_napari.status import StatusBox

__all__ = ["ENV_ENDPOINT", "ReceiverWidget"]

SETTINGS = ("polystore", "polystore-napari")


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

        self._session = Session()
        # the viewer's: a widget opened again takes over the layers of the one closed before
        self.manager = LayerManager.for_viewer(napari_viewer, stack_capacity=stack_capacity)
        self.display = DisplayTimer(self.manager, parent=self)
        self._error = ""
        self._docked = False
        self._build(endpoint, auto_start, mode, stack_capacity)

        # every way this widget can go away stops the receiver
        stop = functools.partial(Session.stop, self._session)
        self.destroyed.connect(stop)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(stop)
        self._watcher = CloseWatcher(self._session, self)

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
            "How frames without a mode hint and without axes are shown (frames with axes "
            "are placed). auto and place: replace. replace: newest frame only. stack: "
            "append along time (up to the capacity).")
        self.capacity_box = QSpinBox()
        self.capacity_box.setRange(1, MAX_STACK_CAPACITY)
        self.capacity_box.setValue(capacity)
        # applied once typed (Enter, or focus leaving the box): taken at each keystroke,
        # typing 200 over 100 set a capacity of 2 on the way and threw a live stack away
        self.capacity_box.setKeyboardTracking(False)
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

        self.status_box = StatusBox(self.manager)
        self.status_labels: dict[str, QLabel] = self.status_box.labels

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.status_box)
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
        if window is not self:
            self._watcher.watch(window)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        self._watch_window()
        super().showEvent(event)

    def update_status(self) -> None:
        self._watch_window()
        receiver = self._session.receiver
        self.status_box.refresh(receiver, self._session.buffer, self._error)
        self.start_button.setEnabled(receiver is None)
        self.stop_button.setEnabled(receiver is not None)

    @property
    def displayed_fps(self) -> float:
        """Image/labels layer updates per second (*Display updates/s*)."""
        return self.status_box.displayed_fps
