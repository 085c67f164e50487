"""Errors a pipeline sees from a streaming backend. Each message says what to do next."""

from __future__ import annotations

from polystore.errors import PolystoreError


class StreamingError(PolystoreError):
    """Base of every streaming failure."""


class ViewerNotRunningError(StreamingError, ConnectionError):
    """No receiver answered the handshake in time."""


def impostor_message(viewer: str, endpoint: str) -> str:
    """Why a sender sent nothing to whoever listens at `endpoint`."""
    return (f"the process listening at {endpoint} failed the authentication handshake, so "
            f"nothing was sent to it: it is not a {viewer} receiver of your account (it lacks "
            "your polystore credential, or runs with auth='none' while this sender uses "
            "auth='user'), or it closed the connection mid-handshake (at its connection "
            "limit?). Stop it, or pick the same auth on both sides (docs/protocol.md)")


class ReceiverLostError(StreamingError, ConnectionError):
    """The receiver went away (or stopped answering) with frames still unacknowledged."""


class BackpressureError(StreamingError):
    """policy='raise' and the receiver is as far behind as the limits allow."""


class FrameRejectedError(StreamingError, ValueError):
    """The receiver rejected a message; `code` is the protocol error code."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class UnstreamableDataError(StreamingError, TypeError):
    """The data cannot be sent as an array (wrong type, dtype or shape)."""
