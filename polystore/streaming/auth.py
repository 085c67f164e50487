"""Who may talk to whom: CURVE at the ZeroMQ handshake, checked by a ZAP handler.

``auth="user"`` (the default): receivers are CURVE servers with the user's credential
(`polystore.streaming.credential`) and accept only clients presenting the same public key;
senders are CURVE clients that expect that same key from the server. So a peer without the
credential file can neither send (refused at the handshake, before any message is buffered)
nor pose as a receiver (the sender's handshake with it fails and nothing is sent).
``auth="none"`` (or ``POLYSTORE_AUTH=none``) turns this off for old Fiji installations whose
JeroMQ has no CURVE. Explicit keys (`polystore keys`) are for receivers reached from
other machines; see docs/protocol.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import zmq
from zmq.auth.thread import ThreadAuthenticator

from polystore.streaming.credential import load_credential
from polystore.streaming.keys import public_key, secret_key

log = logging.getLogger(__name__)

Auth = Literal["user", "none"]
AUTH_MODES = ("user", "none")
ZAP_DOMAIN = "polystore"


def resolve_auth(auth: str | None) -> Auth:
    """The `auth` argument, else ``$POLYSTORE_AUTH``, else ``"user"``; anything else raises."""
    source = "auth"
    if auth is None:
        auth, source = os.environ.get("POLYSTORE_AUTH") or "user", "POLYSTORE_AUTH"
    if auth not in AUTH_MODES:
        raise ValueError(f"{source} must be 'user' (only your account may connect) or 'none' "
                         f"(no authentication, for Fiji on JeroMQ 0.3), got {auth!r}")
    return auth  # type: ignore[return-value]


@dataclass(frozen=True)
class ClientKeys:
    """A sender's CURVE settings: the server key it insists on and its own key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def client_keys(auth: Auth, curve_server_key: bytes | None = None) -> ClientKeys | None:
    """A sender's keys: the user's credential for ``auth="user"``; for an explicit remote
    server key, the credential too when there is one (so a receiver that allows only the
    user's key accepts it), else a throwaway pair."""
    if curve_server_key is not None:
        if auth == "user":
            credential = load_credential()
            return ClientKeys(curve_server_key, credential.curve_public, credential.curve_secret)
        public, secret = zmq.curve_keypair()
        return ClientKeys(curve_server_key, public, secret)
    if auth == "none":
        return None
    credential = load_credential()
    return ClientKeys(credential.curve_public, credential.curve_public, credential.curve_secret)


class ServerAuth:
    """A receiver's own ZeroMQ context with a ZAP handler that admits the allowed keys.

    One context per receiver, because ZeroMQ allows one ZAP handler per context and each
    receiver decides for itself (its own allowed keys, its own lifetime).
    """

    def __init__(self, auth: Auth, curve_secret_key: bytes | None = None,
                 allowed_client_keys: tuple[bytes, ...] = (), allow_any_client: bool = False,
                 ) -> None:
        self.auth = auth
        self.context = zmq.Context()
        self._authenticator: ThreadAuthenticator | None = None
        self.server_secret: bytes | None = None
        self.allowed: set[bytes] = set(allowed_client_keys)
        self.allow_any_client = allow_any_client
        self.rejected = 0
        if auth == "user":
            credential = load_credential()
            self.allowed.add(credential.curve_public)
            self.server_secret = credential.curve_secret
        if curve_secret_key is not None:
            self.server_secret = curve_secret_key
        if self.server_secret is not None:
            self._authenticator = ThreadAuthenticator(self.context, log=log.getChild("zap"))
            self._authenticator.start()
            self._authenticator.configure_curve_callback(ZAP_DOMAIN, self)

    @property
    def enabled(self) -> bool:
        return self.server_secret is not None

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP's question: may the client with this (Z85) public key connect?"""
        if self.allow_any_client or client_key in self.allowed:
            return True
        self.rejected += 1
        if self.rejected in (1, 10, 100, 1000) or self.rejected % 10000 == 0:
            log.warning("refused %d connection(s) without this user's polystore credential "
                        "(another account, or a sender with auth='none')", self.rejected)
        return False

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server checked by this handler (before bind)."""
        if self.server_secret is None:
            return
        sock.curve_server = True
        sock.curve_secretkey = self.server_secret
        sock.zap_domain = ZAP_DOMAIN.encode()

    def close(self) -> None:
        """Stop the handler and end the context (sockets must be closed first)."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self.context.term()


class ReceiverKeys:
    """A receiver's authentication, checked once when it is made: its mode, its own CURVE
    secret key if given, and the client keys it admits besides the user's."""

    def __init__(self, auth: str | None, curve_secret_key: str | bytes | None,
                 curve_client_keys: list[str | bytes] | None, *, exposed: bool,
                 describe: str) -> None:
        self.auth = resolve_auth(auth)
        self.secret_key = secret_key(curve_secret_key) if curve_secret_key is not None else None
        self.client_keys = tuple(public_key(k) for k in curve_client_keys or ())
        if exposed and self.secret_key is None and self.auth == "none":
            log.warning("%s without CURVE keys: anyone who can reach this port can send "
                        "frames (see `polystore keys`)", describe)

    def server(self) -> ServerAuth:
        """Start the ZAP handler. Explicit keys without a client list keep the remote model:
        knowing the server's public key is the permission to connect."""
        return ServerAuth(self.auth, self.secret_key, self.client_keys,
                          allow_any_client=self.secret_key is not None and not self.client_keys)

