"""Stop the receiver when napari's main window closes.

Qt sends the close event to the window, not to the widgets docked in it, so the widget has
this watcher filter the events of the window it is docked in. A close by the user may still
be cancelled in a confirmation dialog: then the receiver stops only once the window is hidden.
"""

from __future__ import annotations

import functools
import weakref

from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QWidget

from polystore_napari.session import Session


class CloseWatcher(QObject):
    """Stops the session when the viewer's main window closes."""

    def __init__(self, session: Session, parent: QObject) -> None:
        super().__init__(parent)
        self._session = session
        self._watched: weakref.ref[QWidget] | None = None

    def watch(self, window: QWidget) -> None:
        """Watch `window` (napari's main window) for its close, and no other window."""
        watched = self._watched() if self._watched is not None else None
        if window is not watched:
            if watched is not None:
                try:
                    watched.removeEventFilter(self)
                except RuntimeError:
                    pass
            window.installEventFilter(self)
            # weakly: a strong reference would keep napari's closed window (and viewer) alive
            self._watched = weakref.ref(window)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Close:
            if event.spontaneous():  # the user may still cancel in a confirmation dialog
                QTimer.singleShot(0, functools.partial(_stop_if_hidden, obj, self._session))
            else:
                self._session.stop()
        return False


def _stop_if_hidden(window: QWidget, session: Session) -> None:
    try:
        visible = window.isVisible()
    except RuntimeError:  # already deleted
        visible = False
    if not visible:
        session.stop()
