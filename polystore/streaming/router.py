"""The receiver's ROUTER socket: bound and configured here, each message read whole, and
replies sent in order per sender, with frame acks batched under load.

A frame's ack may be held back while the receiver goes on with messages that are already
queued (the receiver releases them after at most `ACK_BATCH` frames or `ACK_BATCH_BYTES` of
pixels, so a sender of large frames never waits on copies of later ones): one ``ack`` then
returns several credits, so a busy pipe carries fewer messages (fewer CURVE boxes to seal and
open, fewer thread wake-ups on both sides). Held acks leave before any other reply to the
same sender and whenever the receiver releases them; an idle pipe is never delayed. Only
senders whose hello set ``batch_acks`` get batched acks.
"""

from __future__ import annotations

import errno
import time

import zmq

from polystore.streaming import protocol as p
from polystore.streaming.auth import ServerAuth
from polystore.streaming.endpoints import claim_ipc_path, wants_ipv6

#: Complete messages ZeroMQ queues per connection before it stops reading that connection
#: (senders keep at most `max_inflight`, 16 by default, unacknowledged).
RECEIVE_HWM = 32
#: Unauthenticated handshakes are closed after this long.
HANDSHAKE_TIMEOUT_MS = 5000

#: Frames whose acks (and display) may wait for the next ones already queued (senders keep
#: 16 messages in flight by default, so they never run dry).
ACK_BATCH = 4
#: ...and at most this many pixel bytes: holding an ack costs the sender the time the receiver
#: takes to copy the frames after it (about 0.2 ms here), while the ack itself costs far less
#: than copying one large frame.
ACK_BATCH_BYTES = 2 << 20

_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
_ACK_PREFIX = p.encode(p.Ack(v=p.VERSION, seq=0))[: -len(b"0}")]


def open_router(endpoint: str, server_auth: ServerAuth, max_message_bytes: int,
                viewer: str) -> zmq.Socket:
    """A bound, authenticating ROUTER socket; OSError says why it cannot listen."""
    sock = server_auth.context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
    # a reply to a connection that closed fails (EHOSTUNREACH) instead of vanishing, even
    # while its last messages are still queued here: see `Outbox.reply`
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if wants_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    server_auth.apply(sock)
    try:
        with claim_ipc_path(endpoint):
            sock.bind(endpoint)
    except OSError:
        sock.close()
        raise
    except zmq.ZMQError as exc:
        sock.close()
        hint = (f"Is another {viewer} receiver already running there? Stop it or choose "
                "another endpoint" if exc.errno == errno.EADDRINUSE else "Check the endpoint")
        raise OSError(f"cannot listen on {endpoint}: {exc}. {hint}") from None
    return sock


def read_rest(sock: zmq.Socket) -> tuple[zmq.Frame, zmq.Frame | None, int]:
    """The parts after a message's routing identity (ZeroMQ delivers a message's parts
    together, so they are all there): header, payload if any, and how many parts there
    were. Parts past the second are read and dropped at once, never kept."""
    header = sock.recv(zmq.NOBLOCK, copy=False)
    payload, count, more = None, 1, header.more
    while more:
        part = sock.recv(zmq.NOBLOCK, copy=False)
        count += 1
        more = part.more
        if count == 2:
            payload = part
    return header, payload, count


def encode_ack(seq: int, also: list[int] | tuple[()] = ()) -> bytes:
    """``p.encode(p.Ack(v=VERSION, seq=seq, also=also))`` without building a struct (one per
    frame)."""
    if not also:
        return b"%s%d}" % (_ACK_PREFIX, seq)
    return b'%s%d,"also":[%s]}' % (_ACK_PREFIX, seq, b",".join(b"%d" % s for s in also))


#: Acks still queued at shutdown get this long to leave.
CLOSE_LINGER_MS = 1000
#: ...and senders this long to read them: a sender socket (ZMQ_IMMEDIATE) discards what it
#: has not read yet when the connection closes.
CLOSE_GRACE_S = 0.25


class Outbox:
    """Replies of one ROUTER socket: `ack` per frame, `reply` for everything else."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.last_sent = 0.0  # time.monotonic() of the last reply
        self._held: dict[bytes, list[int]] = {}  # routing identity -> seqs not acked yet

    def ack(self, identity: bytes, seq: int, batch: bool) -> None:
        """The receiver holds its copy of frame `seq` of `identity`."""
        if not batch:
            self._send(identity, encode_ack(seq))
            return
        held = self._held.get(identity)
        if held is None:  # not setdefault: that builds a list on every frame
            self._held[identity] = [seq]
        else:
            held.append(seq)

    def reply(self, identity: bytes, data: bytes) -> bool:
        """Any other reply; the acks held for `identity` leave first, so order is kept.
        False if `identity`'s connection is known to be closed (a message it sent before
        closing may still be read after that): the reply went nowhere."""
        held = self._held.pop(identity, None)
        if held:
            self._send_acks(identity, held)
        return self._send(identity, data)

    def flush(self) -> None:
        """Send every held ack."""
        while self._held:
            self._send_acks(*self._held.popitem())

    def close(self) -> None:
        """Close the socket once senders had CLOSE_GRACE_S to read the last reply; what is
        still queued gets CLOSE_LINGER_MS to leave."""
        self.flush()
        time.sleep(max(0.0, self.last_sent + CLOSE_GRACE_S - time.monotonic()))
        self.sock.close(linger=CLOSE_LINGER_MS)

    def _send_acks(self, identity: bytes, held: list[int]) -> None:
        self._send(identity, encode_ack(held[0], held[1:]))

    def _send(self, identity: bytes, data: bytes) -> bool:
        """False only if the connection of `identity` is gone (ROUTER_MANDATORY)."""
        self.last_sent = time.monotonic()
        try:
            self.sock.send(identity, _SNDMORE_NOBLOCK)
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # gone, or not reading (EAGAIN: its queue is full); it will time out on its own
            return exc.errno != zmq.EHOSTUNREACH
        return True
