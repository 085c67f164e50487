"""A sender's socket to one receiver and its monitor: opened, closed, and bytes moved.

The socket is monitored before it connects and read through one `zmq_poll` of both (link
events first, then replies); no wait ever blocks past its deadline, and every wait watches the
monitor too, so a receiver that left is noticed at once. `Channel` knows nothing of the
handshake, credits or frames: `Connection` (connection.py) builds its handshake on this class
and says what a link event means for it (`link_changed`) and when it is `connected`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from polystore.streaming.link import LINK_EVENTS, LinkState, create_dealer_socket
from polystore.streaming.options import SenderOptions

# zmq's flags as plain ints: enum arithmetic costs more than the send it configures.
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
#: The longest single wait; every wait loops until its own deadline, so a timeout of
#: ``float("inf")`` (or 1e20) means "no limit" instead of overflowing ZeroMQ's int of ms.
_MAX_POLL_S = 60.0


def _poll_ms(seconds: float) -> int:
    return int(min(max(0.0, seconds), _MAX_POLL_S) * 1000)


class Channel:
    """The DEALER socket to one receiver endpoint and its monitor. Each reply is handed to
    `on_reply`; a subclass says when messages may go (`connected`) and acts on link events
    (`link_changed`)."""

    def __init__(self, endpoint: str, options: SenderOptions, *,
                 on_reply: Callable[[bytes], None]) -> None:
        self.endpoint = endpoint
        self.options = options
        self.on_reply = on_reply
        self.link = LinkState()  # what the monitor says: up, handshaking, dropped, refused
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        # zmq_poll's lists, answered in order: link events first, then replies (or room to
        # send a hello)
        self._ready_items: list = []
        self._room_items: list = []

    @property
    def connected(self) -> bool:
        """Whether messages may go now (`Connection`: its handshake completed)."""
        raise NotImplementedError

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def open(self, identity: str) -> None:
        if self._sock is not None:
            return
        sock = create_dealer_socket(identity, self.endpoint, self.options)
        # monitored before it connects: a handshake refused at once (a receiver without
        # authentication) reports it only once, and a sender that missed it would wait for
        # its whole connect_timeout
        self._monitor = sock.get_monitor_socket(LINK_EVENTS)
        sock.connect(self.endpoint)
        self.link = LinkState()
        self._ready_items = [(self._monitor, zmq.POLLIN), (sock, zmq.POLLIN)]
        self._room_items = [(self._monitor, zmq.POLLIN), (sock, zmq.POLLOUT)]
        self._sock = sock

    def close(self, goodbye: bytes | None = None, linger_ms: int = 0) -> None:
        """Close the socket; say `goodbye` first when connected (best effort)."""
        if self._sock is not None:
            if goodbye is not None and self.connected:
                try:
                    self._sock.send(goodbye, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            # read what the monitor holds first: with its queue full (a sender idle while
            # the link flapped), ZeroMQ's I/O thread waits to write an event holding the
            # monitor lock, which disable_monitor() would wait for, holding the GIL
            while self._monitor.poll(0):
                self._monitor.recv_multipart(zmq.NOBLOCK)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=linger_ms)
            self._sock = self._monitor = None
            self._ready_items, self._room_items = [], []

    def _reconnect(self) -> None:
        """ZeroMQ gives up an endpoint whose handshake it refused; connect to it again. (Never
        after a hang-up, which ZeroMQ retries itself: link.py says why.)"""
        self.link.forget_failures()
        try:
            self._sock.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass
        self._sock.connect(self.endpoint)

    # -- bytes -----------------------------------------------------------------------------------

    def send(self, parts: list, deadline: float, *, until_refused: bool = False) -> bool:
        """Send without ever blocking past `deadline`; False if nobody took it in time (or,
        with `until_refused`, as soon as the link's authentication handshake fails)."""
        sock = self._sock
        first = parts[0]
        flags = (_NOBLOCK | _SNDMORE) if len(parts) > 1 else _NOBLOCK
        while True:
            try:
                sock.send(first, flags, copy=len(first) < 65536)
                break
            except zmq.Again:
                if not self._wait_writable(deadline, until_refused):
                    return False
        last = len(parts) - 1
        for i in range(1, len(parts)):
            sock.send(parts[i], 0 if i == last else _SNDMORE, copy=False)
        return True

    def _wait_for_link(self, deadline: float) -> bool:
        """Wait for a link (the monitor's CONNECTED) until `deadline`; False if none came or
        the handshake was refused. ZeroMQ reports a disconnect before it detaches the dead
        link's pipe: a hello sent right after it (ZMQ_IMMEDIATE or not) could go into that
        pipe and be lost, and would then be waited for until the deadline."""
        while not self.link.up and not self.link.refused:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._monitor is None:
                return False
            if self._monitor.poll(_poll_ms(remaining)):
                self.check_link()
        return self.link.up

    def _wait_writable(self, deadline: float, until_refused: bool) -> bool:
        """Wait for room to send (ZMQ_IMMEDIATE: an authenticated link); False once
        `deadline` has passed or, `until_refused`, the handshake was refused (link.py: a
        single hang-up is retried)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready = zmq_poll(self._room_items, _poll_ms(remaining))
        if ready and ready[0][0] is self._monitor:
            self.check_link()  # a receiver that left is lost now, not at the deadline
        return not self.link.refused if until_refused else self.connected

    def drain(self) -> None:
        """Hand every reply already waiting to `on_reply`, without blocking."""
        sock = self._sock
        while sock is not None and sock.get(_EVENTS) & _POLLIN:
            self.on_reply(sock.recv(_NOBLOCK))
            sock = self._sock  # a handler may have closed it

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for link events or replies, and handle them (one
        zmq_poll: no per-socket ``EVENTS`` reads, which cost about a microsecond each)."""
        for sock, _ in zmq_poll(self._ready_items, _poll_ms(timeout)):
            if sock is self._monitor:
                self.check_link()
            elif sock is self._sock:
                self.drain()  # asks EVENTS first: check_link may have read (or ZeroMQ dropped) it

    def check_link(self) -> None:
        """Notice a receiver that left (or a link that came up) before sending to nobody."""
        monitor = self._monitor
        while monitor is not None and monitor.get(_EVENTS) & _POLLIN:
            self.link_changed(recv_monitor_message(monitor, zmq.NOBLOCK)["event"])

    def link_changed(self, event: int) -> None:
        """One event of the monitor: `link` follows it (`Connection` acts on it too)."""
        self.link.update(event)
