"""Errors a pipeline sees from a streaming backend. Each message says what to do next."""

from __future__ import annotations

from polystore.errors import PolystoreError


class StreamingError(PolystoreError):
    """Base of every streaming failure."""


class ViewerNotRunningError(StreamingError, ConnectionError):
    """No receiver answered the handshake in time."""


def impostor_message(viewer: str, endpoint: str, auth: str = "user",
                     server_key_given: bool = False) -> str:
    """Why a sender sent nothing to whoever listens at `endpoint`, for how this sender
    authenticates (`auth`; `server_key_given`: a receiver's public CURVE key was given)."""
    failed = (f"the process listening at {endpoint} failed the authentication handshake, so "
              "nothing was sent to it")
    if server_key_given:
        env = f"POLYSTORE_{viewer.upper()}_SERVER_KEY"
        return (f"{failed}: the receiver's public key given to this sender ({env} or "
                "curve_server_key) is not the key of the receiver listening there, or that "
                "receiver does not admit this client's key (its curve_client_keys). Give the "
                "public key that `polystore keys` printed for that receiver, or check that "
                "you reach the right machine and port (docs/streaming.md, Security)")
    if auth == "none":
        return (f"{failed}: this sender runs with auth='none' (POLYSTORE_AUTH=none?), and the "
                f"{viewer} receiver there wants your polystore credential. Unset "
                "POLYSTORE_AUTH (or pass auth='user') here, or start the receiver with "
                "auth='none' too (docs/protocol.md)")
    return (f"{failed}: it is not a {viewer} receiver of your account (it lacks your polystore "
            "credential: another user's, or one started with auth='none'), or it closed the "
            "connection mid-handshake (at its connection limit?). If it is yours, restart it "
            "without auth='none'; if it has CURVE keys of its own (a remote receiver), give "
            f"this sender its public key (POLYSTORE_{viewer.upper()}_SERVER_KEY); else use "
            "another port (docs/streaming.md, Security)")


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
