"""A bound on the receiver's open connections, so idle or half-open floods cannot use up its
file descriptors (and with them the segments it must open).

ZeroMQ has no connection limit of its own. Its socket monitor reports each accepted
connection's file descriptor; past `max_connections` the newest is shut down at once (the
descriptor stays ZeroMQ's: ``shutdown`` only makes it see end-of-file and close it itself).
Connections already there, among them every authenticated sender, are never touched.
Handshakes that do not finish within ZeroMQ's handshake interval are closed by ZeroMQ.
"""

from __future__ import annotations

import logging
import os
import resource
import socket

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def default_max_connections() -> int:
    """A quarter of this process's file-descriptor limit, at most 512."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(512, soft // 4))


class ConnectionGuard:
    """Watches `sock` (a bound ROUTER) and keeps at most `max_connections` open."""

    def __init__(self, sock: zmq.Socket, max_connections: int, viewer: str) -> None:
        self.max_connections = max_connections
        self.viewer = viewer
        self.open: set[int] = set()
        self.refused = 0
        self.failed_handshakes = 0
        self.closed: list[int] = []  # descriptors gone since the last `take_closed()`
        self._gone: set[int] = set()  # descriptors closed and not (yet) accepted again
        self._sock = sock
        self.monitor = sock.get_monitor_socket(_EVENTS)

    def handle_events(self, authenticated: set[int] = frozenset()) -> None:
        """Drain the monitor without blocking; never close a descriptor in `authenticated`
        (a late event about a number an authenticated sender's connection now holds)."""
        while True:
            try:
                message = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event, fd = message["event"], message["value"]
            if event == zmq.EVENT_ACCEPTED:
                self._gone.discard(fd)
                if fd in authenticated:
                    self.open.add(fd)
                else:
                    self._accepted(fd)
            elif event == zmq.EVENT_DISCONNECTED:
                self.open.discard(fd)
                self.closed.append(fd)
                self._gone.add(fd)
            else:
                self.failed_handshakes += 1

    def is_closed(self, fd: int) -> bool:
        """Whether the connection on descriptor `fd` closed (as of the events read so far) and
        no other connection has been accepted on that number since."""
        return fd in self._gone

    def take_closed(self) -> list[int]:
        closed, self.closed = self.closed, []
        return closed

    def _accepted(self, fd: int) -> None:
        if len(self.open) < self.max_connections:
            self.open.add(fd)
            return
        self.refused += 1
        if self.refused in (1, 10, 100, 1000) or self.refused % 10000 == 0:
            log.warning(
                "%s receiver: %d connections open, the limit; closed %d newer one(s). Is a "
                "process opening connections in a loop? (limit: max_connections)",
                self.viewer, len(self.open), self.refused,
            )
        try:
            with socket.socket(fileno=os.dup(fd)) as conn:
                conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone

    def close(self) -> None:
        """Stop watching, without `disable_monitor()`: when a flood of connections filled
        the monitor's queue while the receiver was busy, ZeroMQ's I/O thread waits to write
        the next event holding the socket's monitor lock, and `disable_monitor()` would
        wait for that lock for ever, holding the GIL (every thread of the viewer frozen).
        Closing the socket and terminating its context (which lets go of the GIL) ends the
        monitor instead."""
        self.monitor.close(linger=0)

