"""A sender's link to its receiver: the socket that makes it (`create_dealer_socket`) and
what its monitor says about it (`LinkState`): is it up, is the authentication handshake under
way, did it fail, and was it refused.

ZeroMQ reports a protocol or authentication failure (``HANDSHAKE_FAILED_PROTOCOL`` /
``_AUTH``) once and gives the endpoint up: the sender must connect again. A peer that hangs up
mid-handshake gives ``HANDSHAKE_FAILED_NO_DETAIL`` and ZeroMQ relinks by itself: that is a
CURVE server with another key, but also a receiver restarting, at its connection limit or past
its handshake deadline, so only several in a row count as a refusal. After a hang-up the
sender must not connect again itself: the receiver may still hold the old link under the
same routing id, and a ROUTER never reads a second link with a routing id in use.
Hang-ups refuse only while no new handshake is under way: ZeroMQ keeps relinking, and when
the peer that hung up is replaced (an impostor stopped, the user's receiver started, a
connection limit no longer reached), the handshake under way may well succeed.
JeroMQ 0.3 speaks ZMTP 2.0, whose handshake ZeroMQ never reports as succeeded: every
disconnect from it reads as a hang-up mid-handshake, so a welcome (`welcomed`) also counts
as a handshake that succeeded.
"""

from __future__ import annotations

import zmq

from polystore.streaming.auth import client_keys
from polystore.streaming.endpoints import wants_ipv6
from polystore.streaming.options import SenderOptions

_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_HANDSHAKE_FAILED = _REFUSED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
#: the events a sender's monitor subscribes to
LINK_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | _HANDSHAKE_FAILED)
#: hang-ups mid-handshake in a row, with no handshake succeeding between them, that refuse
HANGUPS_BEFORE_REFUSAL = 3


class LinkState:
    """Updated from each monitor event; read by the connection's handshake."""

    def __init__(self) -> None:
        self.up = False  # ZeroMQ has a TCP/IPC link
        self.handshaking = False  # linked, the ZMTP/CURVE handshake not (yet) succeeded
        self.forget_failures()

    def forget_failures(self) -> None:
        """A fresh connect, a new handshake or a welcome: earlier failures no longer count."""
        self.failed = False  # a handshake failed (or the peer hung up in it) since then
        self.dropped = False  # refused outright: ZeroMQ gave the endpoint up, connect again
        self._hangups = 0

    def welcomed(self) -> None:
        """The receiver answered a hello: whatever ZeroMQ said, the handshake succeeded."""
        self.handshaking = False
        self.forget_failures()

    @property
    def refused(self) -> bool:
        """The peer cannot complete our authentication handshake: stop waiting for it."""
        return self.dropped or (self._hangups >= HANGUPS_BEFORE_REFUSAL
                                and not self.handshaking)

    def update(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # earlier hang-ups were another peer's
            self.handshaking = self.failed = False
            self._hangups = 0
            return
        self.dropped |= bool(event & _REFUSED)
        self._hangups += event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        # a peer that hangs up mid-handshake failed it too
        self.failed |= bool(event & _HANDSHAKE_FAILED) or (
            event == zmq.EVENT_DISCONNECTED and self.handshaking)
        self.handshaking = self.up = event == zmq.EVENT_CONNECTED


def create_dealer_socket(identity: str, endpoint: str, options: SenderOptions) -> zmq.Socket:
    """The one place a sender's socket is made and configured (authentication included);
    not yet connected, so that a monitor can be attached first (`Channel.open`)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, identity.encode())
    sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a receiver that isn't there
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
    if wants_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    keys = client_keys(options.auth, options.curve_server_key)  # see streaming/auth.py
    if keys is not None:
        keys.apply(sock)
    return sock
