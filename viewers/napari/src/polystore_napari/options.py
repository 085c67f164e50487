"""The napari receiver's options, defined once: the widget, `launch`, the command line
(``polystore napari``) and the receiver all read them from `ReceiverOptions`.

Precedence: what a program or the command line passes wins, then
``$POLYSTORE_NAPARI_ENDPOINT``, then (only for a widget opened from napari's Plugins menu)
what the user chose in the widget last time, then the defaults below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from polystore_napari.buffer import MODES

ENV_ENDPOINT = "POLYSTORE_NAPARI_ENDPOINT"
#: The most frames a stack layer keeps (the widget's spin box goes no higher).
MAX_STACK_CAPACITY = 100_000
#: options the widget remembers between napari sessions (QSettings keys = field names)
REMEMBERED = ("endpoint", "auto_start", "mode", "stack_capacity")


def default_endpoint() -> str:
    """``$POLYSTORE_NAPARI_ENDPOINT``, else the napari backend's default endpoint."""
    from polystore.streaming import NapariStreamingBackend

    return os.environ.get(ENV_ENDPOINT) or NapariStreamingBackend.default_endpoint()


@dataclass(frozen=True)
class ReceiverOptions:
    """How the napari receiver listens and shows frames.

    `endpoint` None means `default_endpoint()`. `mode`: how frames without a mode hint are
    shown (``auto`` places frames that carry ``axes`` and replaces the others).
    `stack_capacity`: frames a stack layer keeps. `allow_remote` and `curve_secret_key`:
    listen beyond 127.0.0.1, for CURVE key holders only (docs/streaming.md)."""

    endpoint: str | None = None
    mode: str = "auto"
    stack_capacity: int = 100
    auto_start: bool = True
    allow_remote: bool = False
    curve_secret_key: str | bytes | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not isinstance(self.stack_capacity, int) or not 1 <= self.stack_capacity <= \
                MAX_STACK_CAPACITY:
            raise ValueError(f"stack_capacity must be a whole number from 1 to "
                             f"{MAX_STACK_CAPACITY:,} (frames a stack layer keeps); got "
                             f"{self.stack_capacity!r}")

    @property
    def listen_endpoint(self) -> str:
        return self.endpoint or default_endpoint()

    def replace(self, **changes) -> ReceiverOptions:
        """These options with `changes` (field names; None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    # -- saved widget settings (a QSettings-like object: value(key, default, type=)) ----------

    @classmethod
    def from_settings(cls, settings) -> ReceiverOptions:
        """The options the user chose in the widget last time; ``$POLYSTORE_NAPARI_ENDPOINT``
        wins over the saved endpoint, and a bad saved value falls back to the default."""
        default = cls()
        endpoint = os.environ.get(ENV_ENDPOINT) or settings.value("endpoint", None) or None
        mode = str(settings.value("mode", default.mode))
        try:
            capacity = int(settings.value("stack_capacity", default.stack_capacity))
        except (TypeError, ValueError):
            capacity = default.stack_capacity
        return cls(endpoint=None if endpoint is None else str(endpoint),
                   mode=mode if mode in MODES else default.mode,
                   stack_capacity=min(max(1, capacity), MAX_STACK_CAPACITY),
                   auto_start=settings.value("auto_start", default.auto_start, type=bool))

    def save(self, settings, keys: tuple[str, ...] = REMEMBERED) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                settings.setValue(key, value)

    # -- command line ----------------------------------------------------------------------

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The options as command-line flags (``polystore napari``, ``python -m
        polystore_napari``)."""
        parser.add_argument("--endpoint", help=f"where to listen (default ${ENV_ENDPOINT} or "
                            "tcp://127.0.0.1:55555); senders must use the same endpoint")
        parser.add_argument("--mode", choices=MODES, help="display mode for frames without a "
                            "mode hint or axes (default: auto; frames with axes are placed)")
        parser.add_argument("--stack-capacity", type=_positive_int,
                            help="frames a stack layer keeps, 1 to 100,000 (default 100)")
        parser.add_argument("--allow-remote", action="store_true", default=None,
                            help="allow an endpoint beyond 127.0.0.1 (use --curve-secret too)")
        parser.add_argument("--curve-secret", dest="curve_secret_key", metavar="FILE",
                            help="CURVE secret key file from `polystore keys DIR`: only "
                            "senders given the matching public key can connect")
        # contrast always follows the data until set by hand (docs/protocol.md); accepted so
        # that older command lines still start
        parser.add_argument("--follow-contrast", action="store_true", help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReceiverOptions:
        """Options from parsed flags: given flags, else the defaults (never saved widget
        settings: the command line and the environment win)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls().replace(**{k: v for k, v in vars(args).items() if k in names})


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
