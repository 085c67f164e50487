"""The receiver's table of senders: who said hello, and which segments each may name.

A connection's segment prefix is not taken on its word: it must be the one its pid and token
spell, no other live connection may hold it, and frames may name segments only after the
hello's probe proved (by a token read back from a regular file owned by this user) that the
sender writes this /dev/shm. The table is bounded; a full table refuses newcomers and never
evicts a sender that is already there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from polystore.streaming import protocol as p
from polystore.streaming.segment_reader import SegmentError, SegmentReader

log = logging.getLogger(__name__)

MAX_SENDERS = 256


@dataclass
class Session:
    """One sender that completed its hello on one connection."""

    token: str
    pid: int
    prefix: str
    shm: bool
    connection: int = -1  # the connection's file descriptor in this process
    batch_acks: bool = False  # reads acks of several frames (Ack.also)
    dropped: int = 0
    frames: int = 0
    since: float = field(default_factory=time.monotonic)

    def check_source(self, frame: p.Frame, payload: object | None) -> None:
        """A frame's bytes must be exactly `nbytes` of inline payload, or in a segment of
        this sender's own (after its probe proved it shares our /dev/shm); else raise."""
        if frame.segment is None:
            got = None if payload is None else len(payload.buffer)
            if got != frame.nbytes:
                raise p.ProtocolError(p.BAD_SHAPE, f"inline frame needs exactly {frame.nbytes} "
                                      f"payload bytes, got {got or 'no payload'}", frame.seq)
        elif payload is not None:
            raise p.ProtocolError(p.BAD_MESSAGE, "a frame names a segment or carries a "
                                  "payload, not both", frame.seq)
        elif not self.shm:
            raise p.ProtocolError(p.BAD_SEGMENT, "this connection's hello did not prove it "
                                  "shares this machine's shared memory as this user (probe); "
                                  "send the pixels inline", frame.seq)
        elif not frame.segment.startswith(self.prefix):
            raise p.ProtocolError(p.BAD_SEGMENT, f"segment {frame.segment!r} is not one of "
                                  f"this sender's ({self.prefix}*)", frame.seq)


class SessionTable:
    """Sessions by ZeroMQ routing identity, at most `max_sessions` of them."""

    def __init__(self, shm_prefix: str, viewer: str, reader: SegmentReader,
                 max_sessions: int = MAX_SENDERS) -> None:
        self.shm_prefix = shm_prefix
        self.viewer = viewer
        self.reader = reader
        self.max_sessions = max_sessions
        self.refused_full = 0
        self._sessions: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def require(self, identity: bytes, seq: int | None) -> Session:
        """The session of `identity`; message `seq` without one is answered hello_required."""
        session = self._sessions.get(identity)
        if session is None:
            raise p.ProtocolError(p.HELLO_REQUIRED, "send hello first (receiver restarted?)", seq)
        return session

    def hello(self, identity: bytes, hello: p.Hello, connection: int = -1) -> Session:
        """The session that admits (or re-admits) the connection `identity`, to `admit` once
        its welcome could be sent; raises `ProtocolError` if it may not be admitted."""
        if p.VERSION not in hello.versions:
            raise p.ProtocolError(p.UNSUPPORTED_VERSION, f"sender speaks versions "
                                  f"{hello.versions}; this receiver speaks {p.VERSION}")
        expected = f"{self.shm_prefix}{hello.pid}_{hello.sender}_"
        if hello.segment_prefix != expected:
            raise p.ProtocolError(
                p.BAD_SEGMENT,
                f"segment_prefix must be {expected!r} (prefix {self.shm_prefix!r} of this "
                f"{self.viewer} receiver, then pid and sender token); got {hello.segment_prefix!r}",
            )
        holder = next((i for i, s in self._sessions.items() if s.prefix == expected), None)
        if holder is not None and holder != identity:
            raise p.ProtocolError(p.BAD_SEGMENT, f"segment prefix {expected!r} belongs to "
                                  "another connection; each sender needs its own token")
        known = self._sessions.get(identity)
        replaced = len(self._others_on(connection, identity))  # gone: see `admit`
        if known is None and len(self._sessions) - replaced >= self.max_sessions:
            self.refused_full += 1
            if self.refused_full in (1, 10, 100) or self.refused_full % 1000 == 0:
                log.warning("%s receiver serves %d senders already; refused %d more (the ones "
                            "connected keep streaming)", self.viewer, len(self._sessions),
                            self.refused_full)
            raise p.ProtocolError(p.TOO_LARGE, f"this {self.viewer} receiver serves at most "
                                  f"{self.max_sessions} senders; close one and retry")
        return Session(hello.sender, hello.pid, expected, self._probe(hello, expected),
                       connection, hello.batch_acks, dropped=known.dropped if known else 0)

    def admit(self, identity: bytes, session: Session) -> None:
        """Enter `session` (from `hello`), whose connection was still there when its welcome
        was sent. Other sessions on its descriptor go: a descriptor holds one connection at a
        time, and ZeroMQ (libzmq 4.3) closes a connection's queue before a newer connection's
        first message can be read, so theirs closed and the number was reused before their
        hello was read (nothing else would end them while this connection lasts)."""
        for other in self._others_on(session.connection, identity):
            self.bye(other)
        self._sessions[identity] = session

    def _others_on(self, connection: int, identity: bytes) -> list[bytes]:
        if connection < 0:
            return []
        return [i for i, s in self._sessions.items()
                if s.connection == connection and i != identity]

    def _probe(self, hello: p.Hello, expected: str) -> bool:
        """Whether the sender proved it writes our /dev/shm as this user (see module doc)."""
        probe = hello.probe
        if probe is None or probe.segment != expected + "probe":
            return False
        try:
            token = self.reader.read(probe.segment, 0, len(probe.token.encode()))
        except SegmentError:
            return False
        finally:
            self.reader.forget_prefix(probe.segment)
        return token == probe.token.encode()

    def bye(self, identity: bytes) -> None:
        session = self._sessions.pop(identity, None)
        if session is not None:
            self.reader.forget_prefix(session.prefix)

    def connections(self) -> set[int]:
        """The descriptors of the connections that completed a hello."""
        return {s.connection for s in self._sessions.values()}

    def clear(self) -> None:
        """Forget everyone (as a restarted receiver would)."""
        self._sessions.clear()

    def disconnected(self, connection: int) -> None:
        """Forget the sessions of a connection that closed."""
        for identity in [i for i, s in self._sessions.items() if s.connection == connection]:
            self.bye(identity)
