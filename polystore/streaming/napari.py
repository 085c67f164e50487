"""The napari viewer as a backend: ``fm.save(img, "A01/t003.tif", backend="napari_stream")``."""

from __future__ import annotations

from polystore.streaming.backend import StreamingBackend


class NapariStreamingBackend(StreamingBackend):
    _backend_type = "napari_stream"
    VIEWER_TYPE = "napari"
    SHM_PREFIX = "napari_"
    DEFAULT_PORT = 55555
    START_HINT = (
        "Start napari with the receiver docked: `polystore napari` "
        "(or in napari: Plugins > polystore receiver > Start)."
    )
