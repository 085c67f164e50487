"""What the ``polystore`` commands share: their argument types (each checks its value before
anything starts, and says what it expected) and the error a command reports without a
traceback."""

from __future__ import annotations

import argparse
import re


class CommandError(Exception):
    """A failure the user can fix: printed as ``polystore <cmd>: <message>``, exit 1."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def listen_endpoint(text: str) -> str:
    """An endpoint a receiver on this machine may listen on (checked before anything starts)."""
    from polystore.streaming.endpoints import check_bind_endpoint

    try:
        check_bind_endpoint(text, allow_remote=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def connect_endpoint(text: str) -> str:
    """An endpoint a sender connects to (``tcp://HOST:PORT`` or ``ipc://PATH``), checked
    before anything is read or sent. An empty one (``--endpoint "$UNSET"``) is refused: it
    would have streamed to the default endpoint without a word."""
    from polystore.streaming.endpoints import check_connect_endpoint

    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty endpoint (an unset shell variable?): give the one the viewer listens on, "
            "e.g. tcp://127.0.0.1:55555, or leave --endpoint out for the default")
    try:
        check_connect_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def fiji_endpoint(text: str) -> str:
    """`listen_endpoint`, over TCP: JeroMQ cannot speak ipc:// with ZeroMQ."""
    text = listen_endpoint(text)
    if not text.startswith("tcp://"):
        raise argparse.ArgumentTypeError(f"the Fiji receiver listens on tcp:// only (JeroMQ "
                                         f"cannot talk ipc:// to ZeroMQ), got {text!r}")
    return text


def frames_per_second(text: str) -> float:
    """0 (as fast as possible) or a pace a sleep can keep: 1e-300 overflowed time.sleep."""
    value = non_negative_float(text)
    if value != 0 and not 1e-3 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"expected 0 (as fast as possible) or 0.001 to "
                                         f"1000000 time points per second, got {text!r}")
    return value


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kmg])i?)?b?$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """A size such as 2G, 768MiB or 1048576 (bytes; binary units), up to 1 TiB."""
    match = _SIZE.match(text.strip())
    value = 0
    if match:
        value = int(float(match[1]) * 1024 ** " kmg".index((match[2] or " ").lower()))
    if not 1 <= value <= 1024**4:
        raise argparse.ArgumentTypeError(f"expected a size such as 2G, 768M or 1048576 "
                                         f"(bytes), up to 1T, got {text!r}")
    return value


def human_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"  # pragma: no cover


def stream_key(text: str) -> str:
    """A stream key as the protocol takes it (1 to 256 characters), checked once, not per
    file."""
    if not 1 <= len(text) <= 256:
        raise argparse.ArgumentTypeError(f"expected a stream key of 1 to 256 characters, got "
                                         f"{len(text)}")
    return text
