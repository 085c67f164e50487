"""StreamingBackend: a viewer as a write-only storage backend.

A subclass only names its viewer: ``VIEWER_TYPE``, ``SHM_PREFIX``, ``SUPPORTED_EXTENSIONS``
and a default port. The transport (`StreamSender`) is the same for every viewer, so a custom
``MyStreamingBackend`` streams to any receiver that speaks protocol v1 with its prefix.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from polystore import rois  # to_rois; a module: rois.py imports this package too
from polystore.base import WriteOnlyBackend, check_batch_lengths
from polystore.streaming.auth import resolve_auth
from polystore.streaming.endpoints import check_connect_endpoint
from polystore.streaming.errors import UnstreamableDataError
from polystore.streaming.keys import public_key
from polystore.streaming.options import Auth, Policy, SenderOptions, Transport
from polystore.streaming.sender import StreamSender
from polystore.streaming.stream_keys import matching_extension, stream_key
from polystore.streaming.stream_meta import StreamMeta, display_hints

log = logging.getLogger(__name__)

ROI_EXTENSION = ".roi.zip"
_SENDER_CREATION = threading.Lock()


class StreamingBackend(WriteOnlyBackend):
    """Write-only backend that streams arrays (and ROIs) live to a viewer process."""

    VIEWER_TYPE: ClassVar[str] = "generic"
    SHM_PREFIX: ClassVar[str] = "polystore_"
    SUPPORTED_EXTENSIONS: ClassVar[set[str]] = {
        ".tif", ".tiff", ".npy", ".png", ".jpg", ".jpeg", ROI_EXTENSION,
    }  # fmt: skip
    #: Default TCP port on 127.0.0.1; None derives a stable one from VIEWER_TYPE.
    DEFAULT_PORT: ClassVar[int | None] = None
    #: Appended to "viewer not running" errors: how to start this viewer.
    START_HINT: ClassVar[str] = ""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        policy: Policy = "block",
        max_inflight: int = 16,
        max_inflight_bytes: int = 512 * 1024**2,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        transport: Transport = "auto",
        curve_server_key: str | bytes | None = None,
        auth: Auth | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9]+_", self.SHM_PREFIX):
            raise ValueError(f"SHM_PREFIX must be letters/digits ending in '_', got "
                             f"{self.SHM_PREFIX!r}")
        self.endpoint = endpoint or self.default_endpoint()
        env_name = f"POLYSTORE_{self.VIEWER_TYPE.upper()}_ENDPOINT"
        check_connect_endpoint(self.endpoint, "" if endpoint else f"${env_name}")
        if curve_server_key is None:
            curve_server_key = os.environ.get(f"POLYSTORE_{self.VIEWER_TYPE.upper()}_SERVER_KEY")
        #: the transport configuration, checked here once (pickled with the backend)
        self.options = SenderOptions(
            policy=policy, max_inflight=max_inflight, max_inflight_bytes=max_inflight_bytes,
            timeout=timeout, connect_timeout=connect_timeout, transport=transport,
            curve_server_key=public_key(curve_server_key) if curve_server_key else None,
            auth=resolve_auth(auth),
        )  # fmt: skip
        self._sender: StreamSender | None = None
        self._streams: dict[tuple, StreamMeta] = {}
        self._path_keys: dict[str, str] = {}  # path -> stream key ('' if not streamed)
        self._plain_saves: dict[str, StreamMeta] = {}  # image path saved with no options

    def __getstate__(self) -> dict:
        """Pickle the configuration, not the connection: a backend (or a FileManager holding
        one) sent to a Dask or multiprocessing worker opens its own socket and pool there."""
        state = self.__dict__.copy()
        state["_sender"] = None
        state["_streams"] = {}
        state["_path_keys"] = {}
        state["_plain_saves"] = {}
        return state

    @classmethod
    def default_port(cls) -> int:
        if cls.DEFAULT_PORT is not None:
            return cls.DEFAULT_PORT
        return 50000 + zlib.crc32(cls.VIEWER_TYPE.encode()) % 10000

    @classmethod
    def default_endpoint(cls) -> str:
        """``$POLYSTORE_<VIEWER>_ENDPOINT``, else tcp://127.0.0.1:<default port>."""
        env = os.environ.get(f"POLYSTORE_{cls.VIEWER_TYPE.upper()}_ENDPOINT")
        return env or f"tcp://127.0.0.1:{cls.default_port()}"

    @property
    def sender(self) -> StreamSender:
        """The persistent connection, opened on first use (so registries stay cheap)."""
        if self._sender is None:
            with _SENDER_CREATION:  # threads saving for the first time share one sender
                if self._sender is None:
                    self._sender = StreamSender(
                        self.endpoint, viewer=self.VIEWER_TYPE, shm_prefix=self.SHM_PREFIX,
                        options=self.options, start_hint=self.START_HINT,
                    )  # fmt: skip
        return self._sender

    # -- the storage API ---------------------------------------------------------------------

    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Stream one array (or a list of ROIs for ``*.roi.zip``). See `_stream_data`."""
        path = str(file_path)
        if not kwargs and (meta := self._plain_saves.get(path)) is not None:
            self.sender.send_array(data, path, meta)  # a name saved before: checked then
        elif self._path_key(path) is not None:
            self._stream_data(data, path, **kwargs)
        else:
            self._log_skipped([path])

    def _path_key(self, path: str) -> str | None:
        """`path`'s stream key, or None if its extension is not streamed. Remembered per path
        (bounded): a pipeline that saves to the same names again skips the string work."""
        key = self._path_keys.get(path)
        if key is None:
            supported = matching_extension(path, self.SUPPORTED_EXTENSIONS)
            key = stream_key(path, self.SUPPORTED_EXTENSIONS) if supported else ""
            if len(self._path_keys) >= 4096:
                self._path_keys.clear()
            self._path_keys[path] = key
        return key or None

    def save_batch(self, data_list: Sequence[Any], file_paths: Sequence[Any], **kwargs: Any):
        """Stream each supported item; unsupported extensions are skipped and logged."""
        data_list, file_paths, _ = self._filter_streamable_files(data_list, file_paths)
        for data, path in zip(data_list, file_paths, strict=True):
            self._stream_data(data, path, **kwargs)

    def _filter_streamable_files(
        self, data_list: Sequence[Any], file_paths: Sequence[Any]
    ) -> tuple[list[Any], list[Any], list[Any]]:
        """Keep the items whose path ends with one of SUPPORTED_EXTENSIONS (compound ones
        like '.roi.zip' included); return (data, paths, skipped paths)."""
        data_list, file_paths = list(data_list), list(file_paths)
        check_batch_lengths(data_list, file_paths)
        kept_data, kept_paths, skipped = [], [], []
        for data, path in zip(data_list, file_paths, strict=True):
            if matching_extension(path, self.SUPPORTED_EXTENSIONS):
                kept_data.append(data)
                kept_paths.append(path)
            else:
                skipped.append(path)
        self._log_skipped(skipped)
        return kept_data, kept_paths, skipped

    def _log_skipped(self, skipped: list[Any]) -> None:
        if skipped:
            log.info(
                "%s: skipped %d file(s) with unsupported extensions (supported: %s): %s",
                self._backend_type or type(self).__name__, len(skipped),
                ", ".join(sorted(self.SUPPORTED_EXTENSIONS)), [str(s) for s in skipped[:10]],
            )  # fmt: skip

    def _stream_data(self, data: Any, file_path: Any, **options: Any) -> int:
        """Send one item. `stream` overrides the layer key derived from the path; `axes`
        (e.g. ``{"t": 3, "c": 1}``) places the frame in an nD layer; `kind="labels"` (or
        ``labels=True``) shows an integer mask as labels; `colormap`, `contrast_limits`,
        `mode`, `opacity`, `rgb` (None: uint8 (..., 3|4) frames are colour) and every other
        field of `protocol.Display` are display hints."""
        path = str(file_path)
        axes = options.pop("axes", None)
        meta = self.stream_meta(path, **options)
        if path.lower().endswith(ROI_EXTENSION):
            return self._stream_rois(data, path, meta, axes)
        if not options and axes is None:  # save() skips the key and meta lookups next time
            if len(self._plain_saves) >= 4096:
                self._plain_saves.clear()
            self._plain_saves[path] = meta
        return self.sender.send_array(data, path, meta, axes)

    def _stream_rois(self, data: Any, path: str, meta: Any, axes: Any) -> int:
        """Plain ROIs as one set at `axes`; `PositionedRoi` items (a file loaded with
        ``positions=True``) as one set per position, as the file places them."""
        items = data if isinstance(data, list | tuple) else [data]
        if not items or not all(isinstance(item, rois.PositionedRoi) for item in items):
            return self.sender.send_rois(rois.to_rois(data), path, meta, axes)
        if axes:
            raise UnstreamableDataError(f"cannot stream {path}: axes= places plain ROIs; "
                                        "PositionedRoi items carry their own")
        sets: dict[tuple, list] = {}
        for roi, where in items:
            sets.setdefault(tuple(sorted(where.items())), []).append(roi)
        seq = -1
        for where, group in sets.items():
            seq = self.sender.send_rois(rois.to_rois(group), path, meta, dict(where))
        return seq

    def lease(self, file_path: Any, shape: Sequence[int], dtype: Any = "uint16",
              **options: Any):
        """A context manager giving a NumPy array that lives in shared memory: compute the
        frame straight into it, and it is sent when the block ends, with no copy on the
        sender's side. The options are those of `save`. Don't keep the array after the
        block: its memory is reused for later frames.

        >>> with viewer.lease("well_A01/t003.tif", (2048, 2048), "uint16") as frame:
        ...     np.multiply(raw, gain, out=frame, casting="unsafe")
        """
        path = str(file_path)
        if not matching_extension(path, self.SUPPORTED_EXTENSIONS) or \
                path.lower().endswith(ROI_EXTENSION):
            raise UnstreamableDataError(
                f"cannot lease a frame for {path}: use an image extension of "
                f"{sorted(self.SUPPORTED_EXTENSIONS - {ROI_EXTENSION})}")
        axes = options.pop("axes", None)
        return self.sender.lease(shape, dtype, path, self.stream_meta(path, **options), axes)

    def stream_meta(
        self,
        file_path: str,
        *,
        stream: str | None = None,
        axis_names: Sequence[str] | None = None,
        **display: Any,
    ) -> StreamMeta:
        """The stream, axis names and display hints of one `save` call, validated the first
        time they are seen and reused for every later frame that repeats them (a frame's
        `axes` are its own). `display` takes labels and the fields of `protocol.Display`."""
        stream = stream or self._path_key(file_path) or stream_key(
            file_path, self.SUPPORTED_EXTENSIONS)
        if axis_names is not None and not isinstance(axis_names, (list, tuple)):
            if isinstance(axis_names, (str, bytes)):  # would be split into letters
                raise UnstreamableDataError(f"cannot stream {file_path}: axis_names must be a "
                                            "list of names, one per axis (e.g. ['t', 'z']), "
                                            f"got the string {axis_names!r}")
            axis_names = list(axis_names)  # a generator: read once, for key and header alike
        try:
            key = (stream, tuple(axis_names) if axis_names is not None else None,
                   tuple(sorted((k, _hashable(v)) for k, v in display.items())))
            meta = self._streams.get(key)
        except TypeError:  # unhashable hints: validate without remembering
            key, meta = None, None
        if meta is None:
            hints = display_hints(what=file_path, **display)
            meta = StreamMeta.build(stream, axis_names, hints, what=file_path)
            if key is not None:
                if len(self._streams) >= 4096:
                    self._streams.clear()
                self._streams[key] = meta
        return meta

    # -- lifecycle -----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the viewer holds every frame saved so far."""
        if self._sender is not None:
            self._sender.flush(timeout)

    def request(self, command: str, timeout: float | None = None) -> dict:
        """Ask the receiver for its state (``"report"``) or to drop its streams (``"clear"``)."""
        return self.sender.request(command, timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        """Deliver what is in flight, then release every shared-memory segment."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def __enter__(self) -> StreamingBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hashable(value: Any) -> Any:
    """Display hints as a cache key: sequences (contrast limits) as tuples of floats (as
    `display_hints` reads them), other values with their type (True == 1, but rgb=1 and
    opacity=True are refused: an earlier valid hint must not let them through)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(float(v) for v in value)
    return type(value), value
