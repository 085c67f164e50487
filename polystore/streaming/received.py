"""What a receiver hands to its viewer, and the counters it keeps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polystore.streaming import protocol as p


@dataclass
class ReceivedFrame:
    array: np.ndarray
    header: p.Frame
    sender: str
    received_ns: int

    @property
    def stream(self) -> str:
        return self.header.stream


@dataclass
class ReceivedRois:
    header: p.Rois
    sender: str

    @property
    def stream(self) -> str:
        return self.header.stream


@dataclass
class ReceiverStats:
    frames: int = 0
    rois: int = 0
    bytes: int = 0
    rejected: int = 0
    missing: int = 0  # frames whose segment the sender had already given up (policy latest)
    sender_dropped: int = 0  # frames senders dropped by policy without sending them
    senders: int = 0
    fps: float = 0.0
    last_error: str = ""

    @property
    def dropped(self) -> int:
        return self.missing + self.sender_dropped

    def report(self, **identity: str) -> dict:
        """The counters a `report` control message answers, after `identity`."""
        return {**identity, "frames": self.frames, "rois": self.rois, "bytes": self.bytes,
                "rejected": self.rejected, "dropped": self.dropped, "senders": self.senders,
                "last_error": self.last_error}
