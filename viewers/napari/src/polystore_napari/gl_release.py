"""A workaround for a segfault of napari + vispy on Mesa's llvmpipe after a layer removal.

`LayerManager` (`layers.py`) calls `release_deleted_gl_program` after any layer removal in its
viewer; docs/napari.md ("A napari crash, and what the plugin does about it") tells the story.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def release_deleted_gl_program(viewer) -> None:
    """Make no GL program current, right after napari deleted a removed layer's programs.

    Why: removing the selected layer changes the selection, which re-uploads a Shapes (or
    Points) layer's highlight markers and so makes that layer's Markers program the current
    one; napari then deletes the layer's programs (gc.collect + context.finish). OpenGL only
    flags a current program for deletion; it is freed when another program is made current:
    the next layer's, at its draw. With Mesa's llvmpipe (22.3: Xvfb, CI, cluster nodes) the
    second draw of an image added after a Shapes layer with text (labels) was removed then
    segfaults in glDrawArrays. vispy (0.17) never unbinds a program it deletes (vispy/vispy
    #1611 is an access violation on the second draw after a program was removed; napari
    #6472 and #8471, after a Points/Shapes layer was deleted, look alike). ``glUseProgram(0)``
    here completes the deletion before any other program is used. Private napari API
    (``_qt_viewer.canvas._scene_canvas``, reached through the viewer behind the proxy napari
    gives plugins, which warns on private names): without it (or a GL context), this does
    nothing.
    """
    try:
        viewer = getattr(viewer, "__wrapped__", viewer)  # napari's PublicOnlyProxy
        canvas = viewer.window._qt_viewer.canvas._scene_canvas
        if not canvas.native.isValid():
            return  # never shown: no GL context, nothing was drawn
        canvas.set_current()
        canvas.context.glir.command("FUNC", "glUseProgram", 0)
        canvas.context.flush_commands()
        # vispy skips glUseProgram for the program it believes current: forget it
        canvas.context.shared.parser.env.pop("current_program", None)
    except Exception:  # noqa: BLE001 - a workaround must never break a layer removal
        log.debug("could not unbind the GL program after a layer removal", exc_info=True)
