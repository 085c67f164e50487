"""Fiji/ImageJ as a backend: ``fm.save(img, "A01/t003.tif", backend="fiji_stream")``."""

from __future__ import annotations

from polystore.streaming.backend import StreamingBackend


class FijiStreamingBackend(StreamingBackend):
    _backend_type = "fiji_stream"
    VIEWER_TYPE = "fiji"
    SHM_PREFIX = "fiji_"
    DEFAULT_PORT = 55556
    SUPPORTED_EXTENSIONS = {".tif", ".tiff", ".npy", ".roi.zip"}
    START_HINT = (
        "Run the receiver script in Fiji: `polystore fiji` shows where it is and how to "
        "install it (viewers/fiji/polystore_receiver.groovy)."
    )
