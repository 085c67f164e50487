"""A sender's connection: the handshake's state machine, on its socket and monitor (channel.py).

    closed --send_hello()--> hello_sent --welcome--> connected
                                        --error or shm refused--> refused
    any --receiver lost / transport dropped--> closed

A hello that left stays pending until it is answered or its link drops, even past its
deadline: the receiver answers hellos in order, so a second hello on the same link would take
the first one's answer (whose probe it had unlinked: ``shm: false``) for its own.

The connection tracks its state and moves bytes (`Channel`, which opens the socket and its
monitor, sends and waits); it knows nothing of credits or frames. Each reply is handed to
`on_reply` (the sender's dispatch table), and a receiver that disconnects while connected is
reported to `on_disconnect` (`link_changed`).
"""

from __future__ import annotations

import enum
import os
import time
import weakref
from collections.abc import Callable

import zmq

from polystore.streaming import protocol as p
from polystore.streaming.channel import Channel
from polystore.streaming.errors import ViewerNotRunningError, impostor_message
from polystore.streaming.options import SenderOptions
from polystore.streaming.shm import create_probe, destroy, unlink_unless_forked


class State(enum.Enum):
    CLOSED = "closed"
    HELLO_SENT = "hello sent"
    CONNECTED = "connected"
    REFUSED = "refused"


class Connection(Channel):
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
        super().__init__(endpoint, options, on_reply=on_reply)  # the socket, its monitor, link
        self.viewer = viewer
        self.on_disconnect = on_disconnect
        self.state = State.CLOSED
        self.refusal = ""  # why the receiver refused the last handshake
        self.receiver_id: str | None = None
        self.use_shm = False  # frames travel by shared memory (else inline)
        self.max_frame_bytes = p.MAX_FRAME_BYTES  # the receiver's, from its welcome
        self._probe = None  # the shared-memory probe of the pending hello
        self._probe_finalizer: weakref.finalize | None = None  # unlinks it if never closed
        self._hello_deadline = 0.0

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    def close(self, goodbye: bytes | None = None, linger_ms: int = 0) -> None:
        """Close the socket (`goodbye` first when connected); the handshake starts over."""
        super().close(goodbye, linger_ms)
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
                self.refusal = impostor_message(
                    self.viewer, self.endpoint, self.options.auth,
                    self.options.curve_server_key is not None)
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

    def link_changed(self, event: int) -> None:
        """One event of the monitor: the link's state, then what it means for the handshake."""
        super().link_changed(event)
        if event == zmq.EVENT_DISCONNECTED and self.state is State.HELLO_SENT:
            self.abandon_hello()  # a hello sent on a link that dropped is never answered
        if event == zmq.EVENT_DISCONNECTED and self.connected:
            self.drain()  # acks that arrived before the disconnect still count
            self.on_disconnect()
