"""The viewer-agnostic receiving side of wire protocol v1.

Bind, authenticate (`auth`), handshake (`sessions`), validate (`checks`), copy out of shared
memory (`segment_reader`), return the credit, hand ``ReceivedFrame``/``ReceivedRois`` to a
callback (or a bounded queue), in the thread `receiver_lifecycle` starts and stops. The napari
plugin and tests use this class; the Fiji Groovy script mirrors it. A bad message is answered
with an ``error`` reply and the loop goes on: no message can stop a receiver.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import time
from collections.abc import Callable

import zmq
from zmq.backend import zmq_poll

from polystore.streaming import protocol as p
from polystore.streaming.auth import ReceiverKeys, ServerAuth
from polystore.streaming.checks import check_frame, check_rois
from polystore.streaming.connections import ConnectionGuard, default_max_connections
from polystore.streaming.endpoints import (
    check_bind_endpoint,
    ipc_socket_file,
    is_loopback,
    remove_ipc_socket_file,
)
from polystore.streaming.orphans import sweep
from polystore.streaming.received import ReceivedFrame, ReceivedRois, ReceiverStats
from polystore.streaming.receiver_lifecycle import ReceiverLifecycle
from polystore.streaming.router import ACK_BATCH, ACK_BATCH_BYTES, Outbox, open_router, read_rest
from polystore.streaming.segment_reader import SegmentReader
from polystore.streaming.sessions import MAX_SENDERS, Session, SessionTable

log = logging.getLogger(__name__)

class Receiver(ReceiverLifecycle):
    """Receives frames for one viewer kind (its `shm_prefix`) on one endpoint.

    Give `on_frame`/`on_rois` callbacks (called in the receiver thread), or read
    `ReceivedFrame`/`ReceivedRois` items from `.queue`, which is bounded: a consumer that
    falls behind slows the senders through their credits instead of growing memory.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        shm_prefix: str,
        viewer: str = "generic",
        on_frame: Callable[[ReceivedFrame], None] | None = None,
        on_rois: Callable[[ReceivedRois], None] | None = None,
        on_clear: Callable[[], None] | None = None,
        report: Callable[[], dict] | None = None,
        queue_size: int = 64,
        max_frame_bytes: int = p.MAX_FRAME_BYTES,
        max_header_bytes: int = p.MAX_HEADER_BYTES,
        allow_remote: bool = False,
        curve_secret_key: str | bytes | None = None,
        curve_client_keys: list[str | bytes] | None = None,
        auth: str | None = None,
        sweep_orphans: bool = True,
        max_senders: int = MAX_SENDERS,
        max_connections: int | None = None,
    ) -> None:
        super().__init__()  # the serving thread's state (receiver_lifecycle.py)
        self.endpoint = check_bind_endpoint(endpoint, allow_remote)
        self.keys = ReceiverKeys(auth, curve_secret_key, curve_client_keys,
                                 exposed=allow_remote and not is_loopback(self.endpoint),
                                 describe=f"{viewer} receiver on {self.endpoint}")
        self.shm_prefix = shm_prefix
        self.viewer = viewer
        self.on_frame = on_frame
        self.on_rois = on_rois
        self.on_clear = on_clear
        self.report = report
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = max_header_bytes
        self.sweep_orphans = sweep_orphans
        self.id = secrets.token_hex(6)
        self.stats = ReceiverStats()
        self._reader = SegmentReader()
        self._sessions = SessionTable(shm_prefix, viewer, self._reader, max_senders)
        self.max_connections = max_connections or default_max_connections()
        self._guard: ConnectionGuard | None = None
        self._sock: zmq.Socket | None = None
        self._server_auth: ServerAuth | None = None
        self._outbox: Outbox | None = None
        self._ipc_file: tuple[str, int, int] | None = None  # the socket file bound, if ipc://
        self._undelivered: list[ReceivedFrame] = []  # copied, shown once their acks leave
        self._held_bytes = 0

    # -- serving (start, stop, with: receiver_lifecycle.py) ----------------------------------

    def bind(self) -> zmq.Socket:
        if self.sweep_orphans:
            sweep([self.shm_prefix])
        server_auth = self._server_auth = self.keys.server()
        try:
            sock = open_router(self.endpoint, server_auth,
                               self.max_frame_bytes + self.max_header_bytes, self.viewer)
        except OSError:
            self._close_auth()
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ipc_file = ipc_socket_file(self.endpoint)
        self._guard = ConnectionGuard(sock, self.max_connections, self.viewer)
        return sock

    def run(self) -> None:
        """Serve until `stop()`; the loop survives anything a message can do."""
        try:
            self._sock = sock = self.bind()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._close_auth()
            self._bind_error = exc
            self._ready.set()
            return
        self._outbox = outbox = Outbox(sock)
        self._ready.set()
        last_tick, frames_at_tick = time.monotonic(), 0
        guard = self._guard
        ready_items = [(guard.monitor, zmq.POLLIN), (sock, zmq.POLLIN)]  # answered in order
        try:
            while not self._stop.is_set():
                ready = zmq_poll(ready_items, 100)  # no Poller: it rebuilds its list each call
                if ready and ready[0][0] is guard.monitor:
                    self._connection_events()
                if ready and ready[-1][0] is sock:
                    for _ in range(256):  # bounded so housekeeping and stop stay responsive
                        try:
                            identity = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(identity, *read_rest(sock))
                        if (len(self._undelivered) >= ACK_BATCH
                                or self._held_bytes >= ACK_BATCH_BYTES):
                            self._release()
                            if self._stop.is_set():  # slow viewer callbacks must not delay it
                                break
                    self._release()  # drained: held acks leave before the next wait
                now = time.monotonic()
                if now - last_tick >= 1.0:
                    self.stats.fps = (self.stats.frames - frames_at_tick) / (now - last_tick)
                    if self.stats.frames == frames_at_tick:
                        self._reader.arrays.release()  # idle: hand the memory back
                    last_tick, frames_at_tick = now, self.stats.frames
                    self._reader.forget_unlinked()
        finally:
            self._release()
            guard.close()
            self._guard = None
            outbox.close()  # acks already queued still leave
            remove_ipc_socket_file(self._ipc_file)  # ZeroMQ leaves it behind
            self._sock = None
            self._close_auth()
            self._reader.close()

    def _connection_events(self) -> None:
        """Bound the connections; forget the sessions of connections that closed (a disconnect
        is seen before any message of a connection that reuses its descriptor)."""
        self._guard.handle_events(self._sessions.connections())
        for fd in self._guard.take_closed():
            self._sessions.disconnected(fd)
        self.stats.senders = len(self._sessions)

    def _close_auth(self) -> None:
        if self._server_auth is not None:
            self._server_auth.close()
            self._server_auth = None

    # -- messages ----------------------------------------------------------------------------

    def _handle(self, identity: bytes, header: zmq.Frame, payload: zmq.Frame | None,
                count: int) -> None:
        """One message of `count` parts after the routing identity: its header and, for an
        inline frame, its payload."""
        seq = None
        try:
            if count not in (1, 2):
                raise p.ProtocolError(p.BAD_MESSAGE, f"expected 1 or 2 message parts, got "
                                      f"{count}")
            message = p.decode_sender_message(header.bytes, self.max_header_bytes)
            seq = getattr(message, "seq", None)
            if type(message) is p.Frame:  # the common case first: held back, see router.py
                sender = self._sessions.require(identity, seq)
                check_frame(message, self.max_frame_bytes)
                self._frame(identity, sender, message, payload)
                return
            self._release()  # anything else comes after the frames before it
            if isinstance(message, p.Hello):
                # a connection that closed and left this one its descriptor is forgotten
                # first: its event may still wait in the monitor, and would forget this one
                self._connection_events()
                connection = header.get(zmq.SRCFD)  # to forget it when it closes
                if self._guard.is_closed(connection):
                    return  # gone before its hello was read: no session (none would end)
                self._hello(identity, message, connection)
                return
            if isinstance(message, p.Bye):
                self._bye(identity)
                return
            sender = self._sessions.require(identity, seq)
            if isinstance(message, p.Rois):
                check_rois(message)
                self.stats.rois += 1
                self._deliver(self.on_rois, ReceivedRois(message, sender.token))
                self._reply(identity, p.Ack(v=p.VERSION, seq=message.seq))
            elif isinstance(message, p.Control):
                self._control(identity, message)
        except p.ProtocolError as exc:
            self.stats.missing += exc.code == p.SEGMENT_MISSING
            self._reject(identity, exc.code, str(exc), exc.seq if exc.seq is not None else seq)
        except Exception as exc:  # noqa: BLE001 - never die on a message
            log.exception("internal error handling a message")
            self._reject(identity, p.INTERNAL, f"internal receiver error: {exc}", seq)

    def _hello(self, identity: bytes, hello: p.Hello, connection: int) -> None:
        """Welcome `identity`; keep its session only if the welcome left (ROUTER_MANDATORY: a
        connection that closed while its hello waited, its descriptor number maybe taken by a
        newer one so that `is_closed` said no, refuses it; see `SessionTable.admit`)."""
        session = self._sessions.hello(identity, hello, connection)
        welcome = p.Welcome(v=p.VERSION, receiver=self.id, viewer=self.viewer, pid=os.getpid(),
                            shm=session.shm, max_frame_bytes=self.max_frame_bytes)
        if self._outbox.reply(identity, p.encode(welcome)):
            self._sessions.admit(identity, session)
            self.stats.senders = len(self._sessions)

    def _bye(self, identity: bytes) -> None:
        self._sessions.bye(identity)
        self.stats.senders = len(self._sessions)

    def _frame(self, identity: bytes, sender: Session, frame: p.Frame, payload) -> None:
        sender.check_source(frame, payload)
        array = self._reader.copy_frame(frame, payload)  # validated: only now allocate, copy
        sender.frames += 1
        if frame.dropped > sender.dropped:
            self.stats.sender_dropped += frame.dropped - sender.dropped
            sender.dropped = frame.dropped
        self.stats.frames += 1
        self.stats.bytes += frame.nbytes
        # The copy is ours: the sender may reuse its segment now (counted before the ack,
        # so whoever sees the ack sees the counts).
        self._outbox.ack(identity, frame.seq, sender.batch_acks)
        self._held_bytes += frame.nbytes
        self._undelivered.append(ReceivedFrame(array, frame, sender.token, time.time_ns()))

    def _release(self) -> None:
        """Send the held acks, then hand their frames to the viewer (ack before display)."""
        self._outbox.flush()
        undelivered, self._undelivered = self._undelivered, []
        self._held_bytes = 0
        for item in undelivered:
            self._deliver(self.on_frame, item)

    def _control(self, identity: bytes, control: p.Control) -> None:
        if control.command == "clear":
            if self.on_clear is not None:
                self.on_clear()
            self._reply(identity, p.Ack(v=p.VERSION, seq=control.seq))
        else:
            self._reply(identity, p.Report(v=p.VERSION, seq=control.seq, state=self.state()))

    def state(self) -> dict:
        """What a `report` control message answers: counters plus the viewer's own state."""
        state = self.stats.report(receiver=self.id, viewer=self.viewer)
        if self.report is not None:
            state.update(self.report())
        return state

    def _deliver(self, callback, item) -> None:
        if callback is not None:
            try:
                callback(item)
            except Exception as exc:  # noqa: BLE001 - a viewer bug must not kill the receiver
                log.exception("%s receiver callback failed", self.viewer)
                self.stats.last_error = f"callback failed: {exc}"
            return
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _reject(self, identity: bytes, code: str, message: str, seq: int | None) -> None:
        self.stats.rejected += 1
        self.stats.last_error = f"{code}: {message}"
        log.info("rejected message %s: %s: %s", seq, code, message)
        self._reply(identity, p.Error(v=p.VERSION, seq=seq, code=code, message=message))

    def _reply(self, identity: bytes, message) -> None:
        self._outbox.reply(identity, p.encode(message))

