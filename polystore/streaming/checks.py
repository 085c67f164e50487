"""Validation step 6 of wire protocol v1: the rules a message's schema cannot express.

protocol.py decodes a header and checks each field on its own (steps 1-4); the rules here
relate fields to each other (shape x itemsize == nbytes, the frame size cap, axis names that
name every axis, a display hint that fits its frame, ROI point counts). The receiver applies
them once it has checked the handshake (step 5), as docs/protocol.md orders them, and the
sender checks ROIs with them before they leave. The Groovy receiver mirrors them in
`Messages.checkFrame` / `checkRois`.
"""

from __future__ import annotations

from polystore.streaming.axis_names import repeated_axis
from polystore.streaming.protocol import (
    BAD_MESSAGE,
    BAD_SHAPE,
    DTYPES,
    MAX_FRAME_BYTES,
    MAX_ROIS,
    ROI_POINT_COUNTS,
    TOO_LARGE,
    Frame,
    ProtocolError,
    Rois,
)


def check_frame(frame: Frame, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
    """Cross-field rules msgspec cannot express: shape x itemsize == nbytes, size caps."""
    expected = DTYPES[frame.dtype]
    for dim in frame.shape:
        expected *= dim
    if expected != frame.nbytes:
        raise ProtocolError(
            BAD_SHAPE,
            f"shape {frame.shape} x {frame.dtype} is {expected} bytes but nbytes={frame.nbytes}",
            frame.seq,
        )
    if frame.nbytes > max_frame_bytes:
        raise ProtocolError(
            TOO_LARGE, f"frame of {frame.nbytes} bytes exceeds {max_frame_bytes}", frame.seq
        )
    _check_axes(frame.axes, frame.axis_names, frame.seq)
    if frame.display.rgb and not (len(frame.shape) >= 3 and frame.shape[-1] in (3, 4)
                                  and frame.dtype == "uint8"):
        raise ProtocolError(
            BAD_MESSAGE,
            f"display.rgb=true needs a uint8 frame of shape (..., rows, columns, 3 or 4); got "
            f"{frame.shape} {frame.dtype}. Send colour values last as uint8, or drop rgb",
            frame.seq,
        )
    if frame.display.rgb and frame.display.kind == "labels":
        raise ProtocolError(BAD_MESSAGE, "display.rgb=true on a labels frame: labels are never "
                            "RGB; drop rgb, or send the colours as an image", frame.seq)
    limits = frame.display.contrast_limits
    if limits is not None and not limits[0] < limits[1]:  # napari refuses such a range
        raise ProtocolError(BAD_MESSAGE, f"display.contrast_limits {limits} must be [low, high] "
                            "with low below high", frame.seq)


def check_rois(message: Rois) -> None:
    for roi in message.rois:
        lo, hi = ROI_POINT_COUNTS.get(roi.kind, (3, MAX_ROIS))
        if not lo <= len(roi.coords) <= hi:
            raise ProtocolError(
                BAD_MESSAGE,
                f"a {roi.kind} ROI needs {lo}..{hi} points, got {len(roi.coords)}",
                message.seq,
            )
    _check_axes(message.axes, message.axis_names, message.seq)


def _check_axes(axes: dict[str, int], axis_names: list[str] | None, seq: int) -> None:
    if not axes and not axis_names:
        return  # the common case of a live stream: nothing to check
    if axis_names is not None and (
        len(set(axis_names)) != len(axis_names) or not set(axes) <= set(axis_names)
    ):
        raise ProtocolError(
            BAD_MESSAGE,
            f"axis_names {axis_names} must be unique and name every key of axes {list(axes)}",
            seq,
        )
    # the keys of axes are among axis_names when those are given: one list to check
    if problem := repeated_axis(list(axes) if axis_names is None else axis_names):
        raise ProtocolError(BAD_MESSAGE, problem, seq)
