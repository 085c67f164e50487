"""Value objects of the sending side, each built and validated once.

`SenderOptions` is a backend's whole transport configuration: checked when the backend is
made (so a typo fails there, not at the first save), stored once, and pickled as plain
configuration when a backend travels to a worker process. `SenderStats` counts what one
sender did. What every frame of one stream repeats (`StreamMeta`) is in stream_meta.py.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np

from polystore.streaming.auth import AUTH_MODES, Auth, resolve_auth

Policy = Literal["block", "latest", "raise"]
Transport = Literal["auto", "shm", "inline"]
POLICIES: tuple[str, ...] = get_args(Policy)
TRANSPORTS: tuple[str, ...] = get_args(Transport)


@dataclass(frozen=True)
class SenderOptions:
    """How a sender talks to its receiver. Limits: at most `max_inflight` unacknowledged
    messages and `max_inflight_bytes` of shared memory; when they are reached `policy`
    decides: ``block`` waits up to `timeout` seconds for credits, ``latest`` gives up the
    oldest unacknowledged frame (live preview), ``raise`` raises `BackpressureError`."""

    policy: Policy = "block"
    max_inflight: int = 16
    max_inflight_bytes: int = 512 * 1024**2
    timeout: float = 5.0
    connect_timeout: float = 1.0
    transport: Transport = "auto"
    curve_server_key: bytes | None = None
    auth: Auth = field(default_factory=lambda: resolve_auth(None))

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, got {self.auth!r}")
        for name in ("max_inflight", "max_inflight_bytes"):  # stored as int, seconds as
            value = getattr(self, name)  # float: so NumPy numbers travel and compare alike
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
                    or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("timeout", "connect_timeout"):
            object.__setattr__(self, name, checked_seconds(name, getattr(self, name)))


def checked_seconds(name: str, value: object, zero_ok: bool = False) -> float:
    """`value` as a float number of seconds > 0 (>= 0 with `zero_ok`; NumPy numbers too;
    float('inf') or a whole number too large for a float: no limit), else ValueError."""
    seconds = math.nan
    if not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if not (seconds >= 0 if zero_ok else seconds > 0):  # NaN fails both
        raise ValueError(f"{name} must be a number of seconds {'>= 0' if zero_ok else '> 0'} "
                         f"(float('inf'): no limit), got {value!r}")
    return seconds


@dataclass
class SenderStats:
    """What one sender did; `dropped` counts frames given up by policy ``latest``."""

    frames: int = 0
    rois: int = 0
    bytes: int = 0
    acked: int = 0
    rejected: int = 0
    dropped: int = 0
    unsent: int = 0  # dropped before sending: what the next header's `dropped` tells
    lost: int = 0  # unacknowledged when the receiver went away
    handshakes: int = 0

    def __getitem__(self, name: str) -> int:
        """``stats["dropped"]`` reads like ``stats.dropped`` (scripts written for a dict)."""
        return getattr(self, name)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
