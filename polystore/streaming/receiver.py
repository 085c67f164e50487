"""The viewer-agnostic receiving side of wire protocol v1.

Bind, handshake, validate, attach read-only, copy out, return the credit, hand
``ReceivedFrame``/``ReceivedRois`` to a callback (or a bounded queue). The napari plugin and
tests use this class; the Fiji Groovy script mirrors it. A bad message is answered with an
``error`` reply and the loop goes on: no message can stop a receiver.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import zmq

from polystore.streaming import protocol as p
from polystore.streaming.auth import ServerAuth, resolve_auth
from polystore.streaming.keys import public_key, secret_key
from polystore.streaming.shm import SegmentError, SegmentReader, sweep

log = logging.getLogger(__name__)

MAX_SENDERS = 1024


@dataclass
class ReceivedFrame:
    array: np.ndarray
    header: p.Frame
    sender: str
    received_ns: int

    @property
    def stream(self) -> str:
        return self.header.stream


@dataclass
class ReceivedRois:
    header: p.Rois
    sender: str

    @property
    def stream(self) -> str:
        return self.header.stream


@dataclass
class ReceiverStats:
    frames: int = 0
    rois: int = 0
    bytes: int = 0
    rejected: int = 0
    missing: int = 0  # frames whose segment the sender had already given up (policy latest)
    sender_dropped: int = 0  # frames senders dropped by policy without sending them
    senders: int = 0
    fps: float = 0.0
    last_error: str = ""

    @property
    def dropped(self) -> int:
        return self.missing + self.sender_dropped


@dataclass
class _Sender:
    token: str
    pid: int
    prefix: str
    shm: bool
    dropped: int = 0
    frames: int = 0
    since: float = field(default_factory=time.monotonic)


def _is_loopback(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = parts.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_endpoint(endpoint: str, allow_remote: bool) -> str:
    """Refuse to listen beyond loopback unless asked; ``:0`` means any free port."""
    parts = urlsplit(endpoint)
    if parts.scheme == "ipc" or parts.scheme == "inproc":
        return endpoint
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"endpoint must look like tcp://127.0.0.1:PORT, got {endpoint!r}")
    host = parts.hostname
    if not _is_loopback(endpoint) and not allow_remote:
        raise ValueError(
            f"refusing to listen on {host}: that exposes the receiver beyond this machine. "
            "Pass allow_remote=True (and CURVE keys, see docs/streaming.md) to do it on purpose"
        )
    if endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    return endpoint


class Receiver:
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
    ) -> None:
        self.endpoint = check_bind_endpoint(endpoint, allow_remote)
        self.auth = resolve_auth(auth)
        if curve_secret_key is not None:
            curve_secret_key = secret_key(curve_secret_key)
        elif allow_remote and not _is_loopback(self.endpoint) and self.auth == "none":
            log.warning("%s receiver on %s without CURVE keys: anyone who can reach this port "
                        "can send frames (see `polystore keys`)", viewer, self.endpoint)
        self.curve_client_keys = tuple(public_key(k) for k in curve_client_keys or ())
        self.shm_prefix = shm_prefix
        self.viewer = viewer
        self.on_frame = on_frame
        self.on_rois = on_rois
        self.on_clear = on_clear
        self.report = report
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = max_header_bytes
        self.curve_secret_key = curve_secret_key
        self.sweep_orphans = sweep_orphans
        self.id = secrets.token_hex(6)
        self.stats = ReceiverStats()
        self._senders: dict[bytes, _Sender] = {}
        self._reader = SegmentReader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._server_auth: ServerAuth | None = None
        self._ready = threading.Event()
        self._bind_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> Receiver:
        """Bind and serve in a daemon thread; returns once bound (raises if binding failed)."""
        self._thread = threading.Thread(target=self.run, name=f"polystore-{self.viewer}-rx",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._bind_error is not None:
            raise self._bind_error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def bind(self) -> zmq.Socket:
        if self.sweep_orphans:
            sweep([self.shm_prefix])
        # Explicit keys without a client list keep the remote model: knowing the server's
        # public key is the permission to connect.
        server_auth = self._server_auth = ServerAuth(
            self.auth, self.curve_secret_key, self.curve_client_keys,
            allow_any_client=self.curve_secret_key is not None and not self.curve_client_keys,
        )
        sock = server_auth.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes + self.max_header_bytes)
        sock.setsockopt(zmq.RCVHWM, 1000)
        server_auth.apply(sock)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            self._close_auth()
            raise OSError(
                f"cannot listen on {self.endpoint}: {exc}. Is another {self.viewer} receiver "
                "already running there? Stop it or choose another endpoint"
            ) from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
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
        self._ready.set()
        last_tick, frames_at_tick = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                if sock.poll(100, zmq.POLLIN):
                    for _ in range(256):  # bounded so housekeeping and stop stay responsive
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(parts)
                now = time.monotonic()
                if now - last_tick >= 1.0:
                    self.stats.fps = (self.stats.frames - frames_at_tick) / (now - last_tick)
                    last_tick, frames_at_tick = now, self.stats.frames
                    self._reader.forget_unlinked()
        finally:
            sock.close(linger=0)
            self._sock = None
            self._close_auth()
            self._reader.close()

    def _close_auth(self) -> None:
        if self._server_auth is not None:
            self._server_auth.close()
            self._server_auth = None

    # -- messages ----------------------------------------------------------------------------

    def _handle(self, parts: list[zmq.Frame]) -> None:
        identity = parts[0].bytes
        seq = None
        try:
            if len(parts) not in (2, 3):
                raise p.ProtocolError(p.BAD_MESSAGE, f"expected 1 or 2 message parts, got "
                                      f"{len(parts) - 1}")
            message = p.decode_sender_message(parts[1].bytes, self.max_header_bytes)
            seq = getattr(message, "seq", None)
            payload = parts[2] if len(parts) == 3 else None
            if isinstance(message, p.Hello):
                self._reply(identity, self._hello(identity, message))
                return
            if isinstance(message, p.Bye):
                self._bye(identity)
                return
            sender = self._senders.get(identity)
            if sender is None:
                raise p.ProtocolError(p.HELLO_REQUIRED, "send hello first (receiver restarted?)",
                                      seq)
            if isinstance(message, p.Frame):
                p.check_frame(message, self.max_frame_bytes)
                self._frame(identity, sender, message, payload)
            elif isinstance(message, p.Rois):
                p.check_rois(message)
                self.stats.rois += 1
                self._deliver(self.on_rois, ReceivedRois(message, sender.token))
                self._reply(identity, p.Ack(v=p.VERSION, seq=message.seq))
            elif isinstance(message, p.Control):
                self._control(identity, message)
        except p.ProtocolError as exc:
            self._reject(identity, exc.code, str(exc), exc.seq if exc.seq is not None else seq)
        except Exception as exc:  # noqa: BLE001 - never die on a message
            log.exception("internal error handling a message")
            self._reject(identity, p.INTERNAL, f"internal receiver error: {exc}", seq)

    def _hello(self, identity: bytes, hello: p.Hello) -> p.Welcome:
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
        shm = False
        if hello.probe is not None and hello.probe.segment == expected + "probe":
            try:
                view = self._reader.view(hello.probe.segment, 0, len(hello.probe.token))
                shm = bytes(view) == hello.probe.token.encode()
                view.release()
            except SegmentError:
                shm = False
            self._reader.forget_prefix(hello.probe.segment)
        if identity not in self._senders and len(self._senders) >= MAX_SENDERS:
            oldest = min(self._senders, key=lambda k: self._senders[k].since)
            self._bye(oldest)
        known = self._senders.get(identity)
        self._senders[identity] = _Sender(hello.sender, hello.pid, expected, shm,
                                          dropped=known.dropped if known else 0)
        self.stats.senders = len(self._senders)
        return p.Welcome(v=p.VERSION, receiver=self.id, viewer=self.viewer, pid=os.getpid(),
                         shm=shm, max_frame_bytes=self.max_frame_bytes)

    def _bye(self, identity: bytes) -> None:
        sender = self._senders.pop(identity, None)
        if sender is not None:
            self._reader.forget_prefix(sender.prefix)
        self.stats.senders = len(self._senders)

    def _frame(self, identity: bytes, sender: _Sender, frame: p.Frame, payload) -> None:
        if frame.segment is None:
            if payload is None or len(payload.buffer) != frame.nbytes:
                got = "no payload" if payload is None else f"{len(payload.buffer)} bytes"
                raise p.ProtocolError(p.BAD_SHAPE, f"inline frame needs exactly {frame.nbytes} "
                                      f"payload bytes, got {got}", frame.seq)
            view = payload.buffer
        else:
            if payload is not None:
                raise p.ProtocolError(p.BAD_MESSAGE, "a frame names a segment or carries a "
                                      "payload, not both", frame.seq)
            if not frame.segment.startswith(sender.prefix):
                raise p.ProtocolError(
                    p.BAD_SEGMENT,
                    f"segment {frame.segment!r} is not one of this sender's ({sender.prefix}*)",
                    frame.seq,
                )
            try:
                view = self._reader.view(frame.segment, frame.offset, frame.nbytes)
            except SegmentError as exc:
                if exc.missing:
                    self.stats.missing += 1
                    raise p.ProtocolError(p.SEGMENT_MISSING, str(exc), frame.seq) from None
                raise p.ProtocolError(p.BAD_SEGMENT, str(exc), frame.seq) from None
        # Validated: only now allocate, then copy out of the sender's memory.
        array = np.empty(frame.shape, dtype=np.dtype(frame.dtype).newbyteorder("<"))
        try:
            array.reshape(-1).view(np.uint8)[:] = np.frombuffer(view, dtype=np.uint8)
        finally:
            view.release()
        sender.frames += 1
        if frame.dropped > sender.dropped:
            self.stats.sender_dropped += frame.dropped - sender.dropped
            sender.dropped = frame.dropped
        self.stats.frames += 1
        self.stats.bytes += frame.nbytes
        # The copy is ours: the sender may reuse its segment now (counted before the ack,
        # so whoever sees the ack sees the counts).
        self._reply(identity, p.Ack(v=p.VERSION, seq=frame.seq))
        self._deliver(self.on_frame, ReceivedFrame(array, frame, sender.token, time.time_ns()))

    def _control(self, identity: bytes, control: p.Control) -> None:
        if control.command == "clear":
            if self.on_clear is not None:
                self.on_clear()
            self._reply(identity, p.Ack(v=p.VERSION, seq=control.seq))
        else:
            self._reply(identity, p.Report(v=p.VERSION, seq=control.seq, state=self.state()))

    def state(self) -> dict:
        """What a `report` control message answers: counters plus the viewer's own state."""
        s = self.stats
        state = {
            "receiver": self.id, "viewer": self.viewer, "frames": s.frames, "rois": s.rois,
            "bytes": s.bytes, "rejected": s.rejected, "dropped": s.dropped,
            "senders": s.senders, "last_error": s.last_error,
        }  # fmt: skip
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
        try:
            self._sock.send_multipart([identity, p.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the sender is gone or not reading; it will time out on its own
