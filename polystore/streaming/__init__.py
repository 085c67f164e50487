"""Live streaming of arrays into viewers (napari, Fiji) over wire protocol v1.

Data path: `backend` (the storage API) -> `sender` (a facade over `options`, `credits` and
`connection`) -> `shm` (segment pool) -> `receiver` (validate, copy out, ack) -> a viewer.
`protocol` defines every message. docs/architecture.md says which module to change for what.
"""

from polystore.streaming.backend import StreamingBackend
from polystore.streaming.errors import (
    BackpressureError,
    FrameRejectedError,
    ReceiverLostError,
    StreamingError,
    UnstreamableDataError,
    ViewerNotRunningError,
)
from polystore.streaming.fiji import FijiStreamingBackend
from polystore.streaming.napari import NapariStreamingBackend
from polystore.streaming.options import SenderOptions, SenderStats
from polystore.streaming.orphans import list_segments, sweep
from polystore.streaming.protocol import Roi
from polystore.streaming.receiver import ReceivedFrame, ReceivedRois, Receiver
from polystore.streaming.sender import StreamSender
from polystore.streaming.stream_keys import stream_key
from polystore.streaming.stream_meta import StreamMeta

#: Every segment prefix polystore's own backends use.
PREFIXES = (NapariStreamingBackend.SHM_PREFIX, FijiStreamingBackend.SHM_PREFIX)


def receiver_for(backend: type[StreamingBackend] | StreamingBackend, endpoint: str | None = None,
                 **kwargs) -> Receiver:
    """A `Receiver` matching a backend class: its prefix, viewer name and default endpoint."""
    return Receiver(
        endpoint or getattr(backend, "endpoint", None) or backend.default_endpoint(),
        shm_prefix=backend.SHM_PREFIX,
        viewer=backend.VIEWER_TYPE,
        **kwargs,
    )


__all__ = [
    "BackpressureError",
    "FijiStreamingBackend",
    "FrameRejectedError",
    "NapariStreamingBackend",
    "PREFIXES",
    "ReceivedFrame",
    "ReceivedRois",
    "Receiver",
    "ReceiverLostError",
    "Roi",
    "SenderOptions",
    "SenderStats",
    "StreamMeta",
    "StreamSender",
    "StreamingBackend",
    "StreamingError",
    "UnstreamableDataError",
    "ViewerNotRunningError",
    "list_segments",
    "receiver_for",
    "stream_key",
    "sweep",
]
