"""A sender's connection: one DEALER socket, its monitor, and the handshake's state machine.

    closed --send_hello()--> hello_sent --welcome--> connected
                                        --error or shm refused--> refused
    any --receiver lost / transport dropped--> closed

A hello that left stays pending until it is answered or its link drops, even past its
deadline: the receiver answers hellos in order, so a second hello on the same link would take
the first one's answer (whose probe it had unlinked: ``shm: false``) for its own.

The connection moves bytes and tracks its state; it knows nothing of credits or frames. Each
reply is handed to `on_reply` (the sender's dispatch table), and a receiver that disconnects
while connected is reported to `on_disconnect`.
"""

from __future__ import annotations

import enum
import os
import time
import weakref
from collections.abc import Callable

import zmq
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from polystore.streaming import protocol as p
from polystore.streaming.errors import ViewerNotRunningError, impostor_message
from polystore.streaming.link import LINK_EVENTS, LinkState, create_dealer_socket
from polystore.streaming.options import SenderOptions
from polystore.streaming.shm import create_probe, destroy, unlink_unless_forked

# zmq's flags as plain ints: enum arithmetic costs more than the send it configures.
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
#: The longest single wait; every wait loops until its own deadline, so a timeout of
#: ``float("inf")`` (or 1e20) means "no limit" instead of overflowing ZeroMQ's int of ms.
_MAX_POLL_S = 60.0


def _poll_ms(seconds: float) -> int:
    return int(min(max(0.0, seconds), _MAX_POLL_S) * 1000)


class State(enum.Enum):
    CLOSED = "closed"
    HELLO_SENT = "hello sent"
    CONNECTED = "connected"
    REFUSED = "refused"


class Connection:
    """The socket to one receiver endpoint and where its handshake stands."""

    def __init__(
        self,
        endpoint: str,
        options: SenderOptions,
        *,
        viewer: str,
        on_reply: Callable[[bytes], None],
        on_disconnect: Callable[[], None],
    ) -> None:
        self.endpoint = endpoint
        self.options = options
        self.viewer = viewer
        self.on_reply = on_reply
        self.on_disconnect = on_disconnect
        self.state = State.CLOSED
        self.refusal = ""  # why the receiver refused the last handshake
        self.receiver_id: str | None = None
        self.use_shm = False  # frames travel by shared memory (else inline)
        self.max_frame_bytes = p.MAX_FRAME_BYTES  # the receiver's, from its welcome
        self.link = LinkState()  # what the monitor says: up, handshaking, dropped, refused
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        # zmq_poll's lists, answered in order: link events first, then replies (or room to
        # send a hello)
        self._ready_items: list = []
        self._room_items: list = []
        self._probe = None  # the shared-memory probe of the pending hello
        self._probe_finalizer: weakref.finalize | None = None  # unlinks it if never closed
        self._hello_deadline = 0.0

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

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
        self.abandon_hello()
        self.state = State.CLOSED

    def still_connected(self) -> bool:
        """Connected, after handling the link's events (a receiver that left is noticed here,
        before anything is sent to nobody) and the replies already here, in one zmq_poll."""
        if self._sock is None:
            return False
        self.poll(0)
        return self.state is State.CONNECTED

    def ensure(self, *, identity: str, segment_prefix: str, pid: int, wait: bool,
               start_hint: str = "") -> bool:
        """Connected, or handshake now. With `wait` False (policy 'latest' after a first
        handshake) never wait: send a hello when the link is up and return False (drop this
        message) until the welcome is in, so a live preview never stalls its pipeline."""
        if self._sock is None:
            self.open(identity)
        else:
            self.check_link()
            if self.state is State.CONNECTED:
                return True
            if self.link.dropped:
                self._reconnect()
            else:  # this handshake is judged by its own link events, not by earlier ones
                self.link.forget_failures()
        hello = dict(identity=identity, segment_prefix=segment_prefix, pid=pid)
        if not wait:
            self.drain()  # the welcome to an earlier hello may be here
            if self.connected:
                return True
            if self.link.up and self.state is not State.HELLO_SENT:
                self.send_hello(**hello, wait_to_send=False)  # no room: try at the next one
            return False
        deadline = self._hello_deadline = time.monotonic() + self.options.connect_timeout
        while True:  # a hello still unanswered on this link is waited for again, never re-sent
            if self.state is not State.HELLO_SENT:
                self.send_hello(**hello, deadline=deadline)
            self.wait_for_welcome()
            # the hello's link dropped (the receiver restarted): again, on the next link
            if self.state is not State.CLOSED or self.link.refused or time.monotonic() >= deadline:
                break
        if not self.connected:
            self.check_link()
            if self.link.failed:
                self.refusal = impostor_message(self.viewer, self.endpoint)
            raise ViewerNotRunningError(self.refusal or (
                f"no {self.viewer} receiver answered at {self.endpoint} within "
                f"{self.options.connect_timeout:g} s. {start_hint}".strip()))
        return True

    # -- the handshake -------------------------------------------------------------------------

    def send_hello(self, *, identity: str, segment_prefix: str, pid: int,
                   wait_to_send: bool = True, deadline: float | None = None) -> None:
        """Send hello with a fresh shared-memory probe; a welcome completes it. The hello
        waits for the link's authentication handshake (ZMQ_IMMEDIATE): if that fails, this
        returns at once with the state still closed, instead of at the deadline. Without
        `wait_to_send` it is sent only if there is room now (a receiver that is frozen has a
        full queue, and policy 'latest' must not wait for it)."""
        self.abandon_hello()
        self.refusal = ""
        self.state = State.CLOSED  # not an earlier refusal, whatever happens to this hello
        segment = None
        if self.options.transport != "inline":
            segment, token = create_probe(segment_prefix)
            probe = p.Probe(segment=segment.name, token=token)
        else:
            probe = None
        hello = p.Hello(v=p.VERSION, sender=identity, pid=pid, viewer=self.viewer,
                        segment_prefix=segment_prefix, versions=list(p.SUPPORTED_VERSIONS),
                        probe=probe, batch_acks=True)  # fmt: skip
        self._hello_deadline = deadline or time.monotonic() + self.options.connect_timeout
        send_by = self._hello_deadline if wait_to_send else 0.0
        sent = False
        try:  # on a link that is up: one that just dropped may still take it, and lose it
            sent = (self.link.up or self._wait_for_link(send_by)) and self.send(
                [p.encode(hello)], send_by, until_refused=True)
        finally:
            if not sent and segment is not None:
                destroy(segment)
        if sent:  # only a hello that left can be abandoned (a link event) or welcomed
            if segment is not None:  # kept while the hello is pending, however long
                self._probe = segment
                self._probe_finalizer = weakref.finalize(self, unlink_unless_forked,
                                                         os.getpid(), [segment])
            self.state = State.HELLO_SENT

    def wait_for_welcome(self) -> None:
        """Handle replies and link events until the handshake ends (a welcome, a refusal, or
        the hello's link dropped, which abandons it) or its deadline passes."""
        while self.state is State.HELLO_SENT:
            remaining = self._hello_deadline - time.monotonic()
            if remaining <= 0:
                return
            self.poll(remaining)

    def accept(self, welcome: p.Welcome) -> bool:
        """Complete a pending handshake; False if none was pending or it is refused."""
        if self.state is not State.HELLO_SENT:
            return False
        self.abandon_hello()
        if self.options.transport == "shm" and not welcome.shm:
            self.refuse(f"the {self.viewer} receiver at {self.endpoint} cannot read this "
                        "process's shared memory (another machine or container); use "
                        "transport='auto' or 'inline'")  # fmt: skip
            return False
        self.use_shm = welcome.shm and self.options.transport != "inline"
        self.max_frame_bytes = welcome.max_frame_bytes
        self.receiver_id = welcome.receiver
        self.state = State.CONNECTED
        self.link.welcomed()
        return True

    def refuse(self, why: str) -> None:
        self.abandon_hello()
        self.refusal = why
        self.state = State.REFUSED

    def abandon_hello(self) -> None:
        """Forget the pending hello (its welcome will not be trusted) and unlink its probe."""
        if self._probe is not None:
            self._probe_finalizer.detach()
            destroy(self._probe)
            self._probe = self._probe_finalizer = None
        if self.state is State.HELLO_SENT:
            self.state = State.CLOSED

    def lost(self) -> None:
        """The receiver is gone: the next message needs a new handshake."""
        self.abandon_hello()
        self.state = State.CLOSED

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
            event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            self.link.update(event)
            if event == zmq.EVENT_DISCONNECTED and self.state is State.HELLO_SENT:
                self.abandon_hello()  # a hello sent on a link that dropped is never answered
            if event == zmq.EVENT_DISCONNECTED and self.connected:
                self.drain()  # acks that arrived before the disconnect still count
                self.on_disconnect()
