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
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath
from typing import Any, ClassVar

import msgspec
import numpy as np

from polystore.base import WriteOnlyBackend, check_batch_lengths
from polystore.streaming import protocol as p
from polystore.streaming.auth import resolve_auth
from polystore.streaming.errors import UnstreamableDataError
from polystore.streaming.keys import public_key
from polystore.streaming.sender import Policy, StreamSender, Transport

log = logging.getLogger(__name__)

ROI_EXTENSION = ".roi.zip"
_SENDER_CREATION = threading.Lock()
# A trailing index: digits after a separator (_007) or a lowercase word (img001), or after a
# lowercase axis letter (t003, c1, z05, s2, f1, p4, ch2). Uppercase-letter ids such as the
# well A01 are names, not indices.
_INDEX_SUFFIX = re.compile(r"(?:^\d+|[_\-. ]+\d+|(?<=[a-z])\d+|[_\-. ]*(?:[tczsfp]|ch)\d+)$")


def matching_extension(path: Any, extensions: Iterable[str]) -> str | None:
    """The longest of `extensions` that `path` ends with (so '.roi.zip' beats '.zip')."""
    name = PurePosixPath(str(path).replace("\\", "/")).name.lower()
    best = None
    for ext in extensions:
        if name.endswith(ext.lower()) and (best is None or len(ext) > len(best)):
            best = ext.lower()
    return best


def stream_key(path: Any, extensions: Iterable[str] = ()) -> str:
    """The layer/window a path streams into: its folder plus its name without extension and
    without trailing indices (``t003``, ``c1``, ``z05``, ``s2``, ``_007``), so
    ``well_A01/t003c1.tif`` and ``well_A01/t004c0.tif`` update one ``well_A01`` layer and
    ``out/smooth_007.tif`` goes to ``out/smooth``. Pass ``stream=`` to choose the key."""
    pure = PurePosixPath(str(path).replace("\\", "/"))
    ext = matching_extension(pure, extensions) or pure.suffix
    stem = pure.name[: len(pure.name) - len(ext)] if ext else pure.name
    base = stem
    while (stripped := _INDEX_SUFFIX.sub("", base)) != base:
        base = stripped
    parent = "" if str(pure.parent) in (".", "/") else str(pure.parent).lstrip("/")
    key = "/".join(part for part in (parent, base) if part)
    return (key or stem or "stream")[:256]


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
        auth: str | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9]+_", self.SHM_PREFIX):
            raise ValueError(f"SHM_PREFIX must be letters/digits ending in '_', got "
                             f"{self.SHM_PREFIX!r}")
        self.endpoint = endpoint or self.default_endpoint()
        if curve_server_key is None:
            curve_server_key = os.environ.get(f"POLYSTORE_{self.VIEWER_TYPE.upper()}_SERVER_KEY")
        if curve_server_key is not None:
            curve_server_key = public_key(curve_server_key)
        self._sender_options = dict(
            policy=policy, max_inflight=max_inflight, max_inflight_bytes=max_inflight_bytes,
            timeout=timeout, connect_timeout=connect_timeout, transport=transport,
            curve_server_key=curve_server_key, auth=resolve_auth(auth),
        )  # fmt: skip
        StreamSender._check_options(**self._sender_options)
        self._sender: StreamSender | None = None

    def __getstate__(self) -> dict:
        """Pickle the configuration, not the connection: a backend (or a FileManager holding
        one) sent to a Dask or multiprocessing worker opens its own socket and pool there."""
        state = self.__dict__.copy()
        state["_sender"] = None
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
                        start_hint=self.START_HINT, **self._sender_options,
                    )  # fmt: skip
        return self._sender

    # -- the storage API ---------------------------------------------------------------------

    def save(self, data: Any, file_path: Any, **kwargs: Any) -> None:
        """Stream one array (or a list of ROIs for ``*.roi.zip``). See `_stream_data`."""
        self.save_batch([data], [file_path], **kwargs)

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
        if skipped:
            log.info(
                "%s: skipped %d file(s) with unsupported extensions (supported: %s): %s",
                self._backend_type or type(self).__name__, len(skipped),
                ", ".join(sorted(self.SUPPORTED_EXTENSIONS)), [str(s) for s in skipped[:10]],
            )  # fmt: skip
        return kept_data, kept_paths, skipped

    def _stream_data(self, data: Any, file_path: Any, **options: Any) -> int:
        """Send one item. `stream` overrides the layer key derived from the path; `axes`
        (e.g. ``{"t": 3, "c": 1}``) places the frame in an nD layer; `kind="labels"` (or
        ``labels=True``) shows an integer mask as labels; `colormap`, `contrast_limits`,
        `mode` and `opacity` are display hints."""
        if str(file_path).lower().endswith(ROI_EXTENSION):
            frame = self._frame_options(file_path, **options)
            return self.sender.send_rois(to_rois(data), str(file_path), stream=frame["stream"],
                                         axes=frame["axes"], axis_names=frame["axis_names"])
        return self.sender.send_array(data, str(file_path),
                                      **self._frame_options(file_path, **options))

    def lease(self, file_path: Any, shape: Sequence[int], dtype: Any = "uint16",
              **options: Any):
        """A context manager giving a NumPy array that lives in shared memory: compute the
        frame straight into it, and it is sent when the block ends, with no copy on the
        sender's side. The options are those of `save`. Don't keep the array after the
        block: its memory is reused for later frames.

        >>> with viewer.lease("well_A01/t003.tif", (2048, 2048), "uint16") as frame:
        ...     np.multiply(raw, gain, out=frame, casting="unsafe")
        """
        if not matching_extension(file_path, self.SUPPORTED_EXTENSIONS) or \
                str(file_path).lower().endswith(ROI_EXTENSION):
            raise UnstreamableDataError(
                f"cannot lease a frame for {file_path}: use an image extension of "
                f"{sorted(self.SUPPORTED_EXTENSIONS - {ROI_EXTENSION})}")
        return self.sender.lease(shape, dtype, str(file_path),
                                 **self._frame_options(file_path, **options))

    def _frame_options(
        self,
        file_path: Any,
        *,
        stream: str | None = None,
        axes: dict[str, int] | None = None,
        axis_names: Sequence[str] | None = None,
        kind: str | None = None,
        labels: bool = False,
        colormap: str | None = None,
        contrast_limits: Sequence[float] | None = None,
        mode: str | None = None,
        opacity: float | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments `save` accepts, as the sender's stream/axes/display."""
        try:
            display = p.Display(
                kind="labels" if labels else (kind or "image"),
                colormap=colormap,
                contrast_limits=[float(v) for v in contrast_limits] if contrast_limits else None,
                mode=mode,
                opacity=opacity,
            )
            display = msgspec.convert(msgspec.to_builtins(display), p.Display)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise UnstreamableDataError(f"bad display hint for {file_path}: {exc}") from None
        return {
            "stream": stream or stream_key(file_path, self.SUPPORTED_EXTENSIONS),
            "axes": axes,
            "axis_names": list(axis_names) if axis_names is not None else None,
            "display": display,
        }

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


def to_rois(data: Any) -> list[p.Roi]:
    """ROIs from `p.Roi` structs or dicts like ``{"kind": "polygon", "coords": [[y, x], ...],
    "label": "cell 1"}``."""
    if isinstance(data, (p.Roi, dict)):
        data = [data]
    try:
        rois = [r if isinstance(r, p.Roi) else msgspec.convert(_plain(r), p.Roi) for r in data]
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise UnstreamableDataError(
            f"ROIs must be polystore Roi objects or dicts with kind (polygon, rectangle, "
            f"ellipse, line, point), coords [[y, x], ...] and optional label: {exc}"
        ) from None
    return rois


def _plain(roi: Any) -> Any:
    """NumPy coordinates (arrays, float64 scalars) as plain lists of floats."""
    if isinstance(roi, dict) and "coords" in roi:
        return {**roi, "coords": np.asarray(roi["coords"], dtype=float).tolist()}
    return roi
