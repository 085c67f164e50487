"""The sending side of wire protocol v1: one persistent DEALER socket, one segment pool.

`save()` in a pipeline costs one copy into a reused shared-memory segment plus one small JSON
header; the receiver returns the segment (an `ack`) once it holds its own copy. Everything
runs in the caller's thread: no background thread, no sleeps.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Any, Literal

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from polystore.streaming import protocol as p
from polystore.streaming.auth import client_keys, resolve_auth
from polystore.streaming.errors import (
    BackpressureError,
    FrameRejectedError,
    ReceiverLostError,
    UnstreamableDataError,
    ViewerNotRunningError,
)
from polystore.streaming.shm import SegmentPool, create_probe, destroy

log = logging.getLogger(__name__)

Policy = Literal["block", "latest", "raise"]
Transport = Literal["auto", "shm", "inline"]
POLICIES = ("block", "latest", "raise")

_live_senders: weakref.WeakSet[StreamSender] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sender in list(_live_senders):
        sender.close(flush_timeout=0.5)


def to_wire_array(data: Any) -> np.ndarray:
    """View `data` as a NumPy array of an allowed dtype, copying only when unavoidable.

    Accepts NumPy arrays (any strides or byte order), torch tensors (CPU or CUDA), CuPy arrays
    and anything with ``__array__``. Booleans become uint8.
    """
    if not isinstance(data, np.ndarray):
        module = type(data).__module__.split(".")[0]
        if module == "torch":
            data = data.detach().cpu().numpy()
        elif module == "cupy":
            data = data.get()
        elif hasattr(data, "__array__"):
            data = np.asarray(data)
        else:
            raise UnstreamableDataError(
                f"cannot stream {type(data).__name__}: pass a NumPy array or an object with "
                "__array__ (torch and CuPy arrays work too)"
            )
    if data.dtype == np.bool_:
        data = data.view(np.uint8)
    if data.dtype.name not in p.DTYPES:  # .name ignores byte order
        raise UnstreamableDataError(
            f"cannot stream dtype {data.dtype}: allowed are {', '.join(p.DTYPES)}; convert first "
            "(e.g. np.abs(z).astype('float32') for complex data)"
        )
    if not 1 <= data.ndim <= p.MAX_NDIM:
        raise UnstreamableDataError(
            f"cannot stream a {data.ndim}-d array: 1 to {p.MAX_NDIM} dimensions are allowed"
        )
    return data


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _impostor_message(viewer: str, endpoint: str) -> str:
    return (f"the process listening at {endpoint} failed the authentication handshake, so "
            f"nothing was sent to it: it is not a {viewer} receiver of your account (it lacks "
            "your polystore credential, or runs with auth='none' while this sender uses "
            "auth='user'), or it closed the connection mid-handshake (at its connection "
            "limit?). Stop it, or pick the same auth on both sides (docs/protocol.md)")


class StreamSender:
    """Sends arrays and ROIs to one receiver endpoint with credit-based flow control.

    Limits: at most `max_inflight` unacknowledged messages and `max_inflight_bytes` of
    shared memory. When they are reached `policy` decides: ``block`` waits up to `timeout`
    seconds for credits, ``latest`` gives up the oldest unacknowledged frame (live preview),
    ``raise`` raises `BackpressureError` at once.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        viewer: str,
        shm_prefix: str,
        policy: Policy = "block",
        max_inflight: int = 16,
        max_inflight_bytes: int = 512 * 1024**2,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        transport: Transport = "auto",
        start_hint: str = "",
        curve_server_key: bytes | None = None,
        auth: str | None = None,
    ) -> None:
        self._curve = client_keys(resolve_auth(auth), curve_server_key)  # see streaming/auth.py
        self._check_options(policy=policy, transport=transport, max_inflight=max_inflight,
                            max_inflight_bytes=max_inflight_bytes)
        self.endpoint = endpoint
        self.viewer = viewer
        self.shm_prefix = shm_prefix
        self.policy = policy
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.transport = transport
        self.start_hint = start_hint
        self.curve_server_key = curve_server_key
        self.stats = collections.Counter()
        #: save()-to-ack times in seconds of the last 100k messages (benchmarks read this)
        self.latencies: collections.deque[float] = collections.deque(maxlen=100_000)
        self._lock = threading.RLock()
        self._reset_process_state()
        _live_senders.add(self)

    @staticmethod
    def _check_options(*, policy: str, transport: str, max_inflight: int,
                       max_inflight_bytes: int, **_: object) -> None:
        """Reject bad options when the backend is made, not at the first save."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if transport not in ("auto", "shm", "inline"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'inline', got {transport!r}")
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError("max_inflight and max_inflight_bytes must be positive")

    # -- lifecycle ---------------------------------------------------------------------------

    def _reset_process_state(self) -> None:
        """Fresh socket and pool for this process (also after a fork: never touch the
        parent's segments or ZeroMQ state)."""
        self._pid = os.getpid()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None
        self._pool = SegmentPool(self.shm_prefix, self.max_inflight_bytes)
        self._seq = itertools.count()
        self._inflight: dict[int, tuple[float, int]] = {}  # seq -> (t0, nbytes)
        self._inflight_bytes = 0
        self._connected = False
        self._use_shm = False
        self._lost = 0  # unacknowledged messages lost since the last report to the caller
        self._rejections: list[p.Error] = []
        self._replies: dict[int, dict | None] = {}  # control seq -> its answer
        self._max_frame_bytes = p.MAX_FRAME_BYTES  # the receiver's, from its welcome
        self.receiver_id: str | None = None
        self._hello: tuple | None = None  # (probe segment, deadline) of the pending hello
        self._refused = ""
        self._closed = False

    def close(self, flush_timeout: float | None = None) -> None:
        """Deliver what is in flight (best effort), say bye, unlink every segment."""
        with self._lock:
            if self._closed:
                return
            if self._pid != os.getpid():  # a forked child never owned the parent's state
                self._closed = True
                return
            if self._connected and self._inflight:
                try:
                    self._wait_until(lambda: not self._inflight, self._or_default(flush_timeout))
                except Exception:  # noqa: BLE001 - close must not raise over delivery
                    pass
            if self._sock is not None:
                if self._connected:
                    try:
                        self._sock.send(p.encode(p.Bye(v=p.VERSION)), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                self._close_socket(linger_ms=200)
            self._drop_probe()
            self._pool.close()
            self._closed = True

    def _or_default(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def __enter__(self) -> StreamSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_socket(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=linger_ms)
            self._sock = None
        self._connected = False

    def _open_socket(self) -> None:
        self._ctx = zmq.Context.instance()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._pool.token.encode())
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a receiver that isn't there
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self.endpoint)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                                | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                | _HANDSHAKE_FAILED)
        self._handshaking = False  # connected, handshake not (yet) succeeded
        self._transport_up = False
        self._handshake_failed = False  # ZeroMQ never retries after that: reopen the socket
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _reconnect(self) -> None:
        """ZeroMQ drops an endpoint whose handshake failed; connect to it again."""
        self._handshake_failed = False
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disconnect(self.endpoint)
        self._sock.connect(self.endpoint)

    def _ensure_connected(self) -> bool:
        """Handshake if needed. False means: drop this message (policy 'latest' while the
        receiver that was there is gone or not yet answering, so a live preview never
        stalls the pipeline; it reconnects in the background)."""
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._closed:
            raise RuntimeError(f"this {self.viewer} stream sender is closed")
        if self._monitor is not None:
            self._drain_monitor()  # notice a receiver that left before we send to nobody
        if self._connected:
            return True
        if self._sock is not None and self._handshake_failed:
            self._reconnect()
        if self._sock is None:
            self._open_socket()
        if self.policy == "latest" and self.stats["handshakes"]:
            self._drain()  # the welcome to an earlier hello may be here
            if self._connected:
                return True
            hello_expired = self._hello is None or time.monotonic() > self._hello[1]
            if self._transport_up and hello_expired:
                self._start_handshake()
            return False
        self._start_handshake()
        self._wait_for(p.Welcome, self._hello[1])
        if not self._connected:
            self._drop_probe()
            self._drain_monitor()
            if self._handshake_failed:
                self._refused = _impostor_message(self.viewer, self.endpoint)
            raise ViewerNotRunningError(self._refused or (
                f"no {self.viewer} receiver answered at {self.endpoint} within "
                f"{self.connect_timeout:g} s. {self.start_hint}".strip()
            ))
        return True

    def _start_handshake(self) -> None:
        """Send hello (with a fresh shared-memory probe); the welcome completes it."""
        self._drop_probe()
        self._refused = ""
        probe = token = None
        if self.transport != "inline":
            probe, token = create_probe(self._pool.prefix)
        hello = p.Hello(
            v=p.VERSION,
            sender=self._pool.token,
            pid=self._pid,
            viewer=self.viewer,
            segment_prefix=self._pool.prefix,
            versions=list(p.SUPPORTED_VERSIONS),
            probe=p.Probe(segment=probe.name, token=token) if probe else None,
        )
        deadline = time.monotonic() + self.connect_timeout
        self._hello = (probe, deadline)
        self._send_parts([p.encode(hello)], deadline)  # if nobody takes it, no welcome comes

    def _drop_probe(self) -> None:
        if self._hello is not None:
            if self._hello[0] is not None:
                destroy(self._hello[0])
            self._hello = None

    def _complete_handshake(self, welcome: p.Welcome) -> None:
        self._drop_probe()
        if self.transport == "shm" and not welcome.shm:
            self._refused = (
                f"the {self.viewer} receiver at {self.endpoint} cannot read this process's "
                "shared memory (another machine or container); use transport='auto' or 'inline'"
            )
            return
        self._use_shm = welcome.shm and self.transport != "inline"
        self._max_frame_bytes = welcome.max_frame_bytes
        self._connected = True
        self.receiver_id = welcome.receiver
        self.stats["handshakes"] += 1

    # -- sending -------------------------------------------------------------------------------

    def send_array(
        self,
        data: Any,
        path: str,
        *,
        stream: str,
        axes: dict[str, int] | None = None,
        axis_names: list[str] | None = None,
        display: p.Display | None = None,
    ) -> int:
        """Send one array; returns its sequence number (-1: dropped by policy 'latest')."""
        t0 = time.perf_counter()
        array = to_wire_array(data)
        nbytes = array.nbytes
        with self._lock:
            seq = self._admit()
            if seq < 0:
                return seq
            header = p.Frame(
                v=p.VERSION,
                seq=seq,
                stream=stream,
                path=str(path),
                shape=list(array.shape),
                dtype=array.dtype.name,
                nbytes=nbytes,
                sent_ns=time.time_ns(),
                axes=axes or {},
                axis_names=axis_names,
                display=display or p.Display(),
                dropped=self.stats["unsent"],
            )
            self._check(header)
            segment = self._reserve(seq, nbytes, self._use_shm and nbytes > 0)
            if segment is not None:
                header.segment = segment.name
                target = np.ndarray(array.shape, dtype=array.dtype.newbyteorder("<"),
                                    buffer=segment.buf)
                np.copyto(target, array, casting="equiv")
                del target
                parts = [p.encode(header)]
            else:
                payload = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                if payload is array or payload.base is not None:
                    payload = payload.copy()  # the caller may reuse its buffer after save()
                parts = [p.encode(header), payload]
            if not self._dispatch(seq, parts, t0, 0 if segment is not None else nbytes):
                return -1
            self.stats["frames"] += 1
            self.stats["bytes"] += nbytes
            self._drain()
            return seq

    def lease(
        self,
        shape: Any,
        dtype: Any,
        path: str,
        *,
        stream: str,
        axes: dict[str, int] | None = None,
        axis_names: list[str] | None = None,
        display: p.Display | None = None,
    ):
        """Yield an array in a reserved segment; send it (no copy) when the block ends.

        Falls back to an ordinary array sent with `send_array` when frames travel inline, and
        to a scratch array that is not sent when policy 'latest' drops the frame. An
        exception in the block releases the segment and sends nothing.
        """
        shape = tuple(int(n) for n in np.atleast_1d(shape))
        dtype = to_wire_array(np.empty((0,) * max(len(shape), 1), dtype)).dtype
        return self._lease(shape, dtype.newbyteorder("<"), path, stream=stream, axes=axes,
                           axis_names=axis_names, display=display)

    @contextlib.contextmanager
    def _lease(self, shape: tuple, dtype: np.dtype, path: str, *, stream: str,
               axes: dict[str, int] | None, axis_names: list[str] | None,
               display: p.Display | None):
        t0 = time.perf_counter()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            seq = self._admit()
            header = segment = None
        if seq < 0:
            yield np.empty(shape, dtype)  # dropped by policy: computed, not sent
            return
        with self._lock:
            header = p.Frame(
                v=p.VERSION, seq=seq, stream=stream, path=str(path), shape=list(shape),
                dtype=dtype.name, nbytes=nbytes, sent_ns=0, axes=axes or {},
                axis_names=axis_names, display=display or p.Display(),
            )  # fmt: skip
            self._check(header)
            if self._use_shm and nbytes:
                segment = self._reserve(seq, nbytes, True)
        if segment is None:  # inline transport: an ordinary array, sent on exit
            array = np.empty(shape, dtype)
            yield array
            self.send_array(array, path, stream=stream, axes=axes, axis_names=axis_names,
                            display=display)
            return
        try:
            yield np.ndarray(shape, dtype=dtype, buffer=segment.buf)
        except BaseException:
            with self._lock:
                self._pool.release(seq)
            raise
        with self._lock:
            try:
                connected = self._ensure_connected()
            except BaseException:  # viewer gone, sender closed: give the segment back
                self._pool.release(seq)
                raise
            if not connected:  # policy latest, receiver gone meanwhile
                self._pool.release(seq)
                self._count_unsent()
                return
            header.segment, header.sent_ns = segment.name, time.time_ns()
            header.dropped = self.stats["unsent"]
            if self._dispatch(seq, [p.encode(header)], t0, 0):
                self.stats["frames"] += 1
                self.stats["bytes"] += nbytes
                self._drain()

    def send_rois(
        self,
        rois: list[p.Roi],
        path: str,
        *,
        stream: str,
        axes: dict[str, int] | None = None,
        axis_names: list[str] | None = None,
    ) -> int:
        """Send regions of interest for image stream `stream` (-1: dropped by policy)."""
        t0 = time.perf_counter()
        with self._lock:
            seq = self._admit()
            if seq < 0:
                return seq
            message = p.Rois(
                v=p.VERSION, seq=seq, stream=stream, path=str(path), sent_ns=time.time_ns(),
                rois=rois, axes=axes or {}, axis_names=axis_names,
            )  # fmt: skip
            self._check(message)
            self._reserve(seq, 0, False)
            if not self._dispatch(seq, [p.encode(message)], t0, 0):
                return -1
            self.stats["rois"] += 1
            return seq

    def _check(self, message: p.Frame | p.Rois) -> None:
        """Judge the header exactly as a receiver will (field limits included), so bad
        input fails here, in the pipeline's own call, with nothing sent or reserved."""
        try:
            decoded = p.decode_sender_message(p.encode(message))
            if isinstance(decoded, p.Frame):
                p.check_frame(decoded, self._max_frame_bytes)
            else:
                p.check_rois(decoded)
        except p.ProtocolError as exc:
            raise UnstreamableDataError(f"cannot stream {message.path}: {exc}") from None

    def _admit(self) -> int:
        """The next sequence number, or -1 when policy 'latest' drops this message."""
        if not self._ensure_connected():
            self._count_unsent()
            return -1
        self._raise_pending()
        return next(self._seq)

    def _count_unsent(self) -> None:
        """A message dropped by policy before it was sent (the header's `dropped`)."""
        self.stats["dropped"] += 1
        self.stats["unsent"] += 1

    def _dispatch(self, seq: int, parts: list, t0: float, inline_bytes: int) -> bool:
        """Track message `seq` as in flight and send it; False if it was dropped."""
        self._inflight[seq] = (t0, inline_bytes)
        self._inflight_bytes += inline_bytes
        if self._send_parts(parts):
            return True
        self._connection_lost("could not send within the timeout")  # counts `seq` too
        self._raise_pending()  # policies block/raise: ReceiverLostError
        self.stats["unsent"] += 1  # policy latest: a live preview drops, never stalls
        return False

    def request(self, command: Literal["report", "clear"], timeout: float | None = None) -> dict:
        """Ask the receiver for its state (`report`) or to drop its streams (`clear`);
        raises if it does not answer within `timeout`."""
        t0 = time.perf_counter()
        with self._lock:
            if not self._ensure_connected():
                raise ViewerNotRunningError(
                    f"the {self.viewer} receiver at {self.endpoint} is not connected (yet)")
            seq = next(self._seq)
            self._replies[seq] = None  # answer wanted: Report (state) or Ack ({})
            try:
                message = p.Control(v=p.VERSION, seq=seq, command=command)
                if self._dispatch(seq, [p.encode(message)], t0, 0):
                    self._wait_until(lambda: seq not in self._inflight, self._or_default(timeout))
                self._raise_pending()
                answer = self._replies.get(seq)
            finally:
                self._replies.pop(seq, None)
            if answer is None:
                raise ReceiverLostError(
                    f"the {self.viewer} receiver at {self.endpoint} did not answer {command!r}")
            return answer

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the receiver holds every frame sent so far; raise if one was lost or
        rejected."""
        with self._lock:
            if self._pid != os.getpid() or not self._connected:
                self._raise_pending()
                return
            self._wait_until(lambda: not self._inflight, self._or_default(timeout))
            self._raise_pending()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- credits -------------------------------------------------------------------------------

    def _reserve(self, seq: int, nbytes: int, use_shm: bool):
        """Wait (or drop, or raise, per policy) until message `seq` may be sent; returns its
        segment when it travels by shared memory."""
        if nbytes > self.max_inflight_bytes:
            raise UnstreamableDataError(
                f"a frame of {nbytes} bytes exceeds max_inflight_bytes={self.max_inflight_bytes};"
                " raise max_inflight_bytes when creating the backend"
            )
        deadline = time.monotonic() + self.timeout
        drained = False
        while True:
            if len(self._inflight) < self.max_inflight and (
                use_shm or self._inflight_bytes + nbytes <= self.max_inflight_bytes
            ):
                if not use_shm:
                    return None
                segment = self._pool.acquire(seq, nbytes)
                if segment is not None:
                    return segment
            if not drained:  # acks that already arrived free credits: count them first
                drained = True
                self._drain()
                continue
            if self.policy == "latest" and self._inflight:
                self._forget(min(self._inflight), abandon=True)
                self.stats["dropped"] += 1
                continue
            if self.policy == "raise":
                raise BackpressureError(
                    f"the {self.viewer} receiver is {len(self._inflight)} messages behind "
                    f"(max_inflight={self.max_inflight}); use policy='block' or 'latest' or "
                    "save less often"
                )
            # policy 'block': wait for credits; only a lost receiver ends the wait early.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._connection_lost(
                    f"no acknowledgement from the receiver for {self.timeout:g} s"
                )
            else:
                self._poll(remaining)
            if not self._connected:
                self._raise_pending()
                raise ReceiverLostError(f"the {self.viewer} receiver at {self.endpoint} left")

    def _forget(self, seq: int, abandon: bool = False) -> None:
        entry = self._inflight.pop(seq, None)
        if entry is not None:
            self._inflight_bytes -= entry[1]
        if abandon:
            self._pool.abandon(seq)
        else:
            self._pool.release(seq)

    def _connection_lost(self, why: str) -> None:
        """The receiver is gone or silent: give up every unacknowledged segment (unlink,
        never rewrite) and handshake again on the next send."""
        lost = len(self._inflight)
        for seq in list(self._inflight):
            self._forget(seq, abandon=True)
        self._connected = False
        log.warning("%s receiver at %s lost (%s); %d message(s) unacknowledged",
                    self.viewer, self.endpoint, why, lost)
        if self.policy == "latest":
            self.stats["dropped"] += lost
        else:
            self._lost += lost
            self._lost_why = why
        self.stats["lost"] += lost

    def _raise_pending(self) -> None:
        if self._lost:
            lost, self._lost = self._lost, 0
            raise ReceiverLostError(
                f"the {self.viewer} receiver at {self.endpoint} was lost ({self._lost_why}); "
                f"{lost} message(s) were not acknowledged. The next save reconnects; restart "
                f"the viewer if it was closed. {self.start_hint}".strip()
            )
        if self._rejections:
            error, self._rejections = self._rejections[0], []
            raise FrameRejectedError(
                f"the {self.viewer} receiver rejected message {error.seq}: {error.message}",
                error.code,
            )

    # -- socket plumbing -----------------------------------------------------------------------

    def _send_parts(self, parts: list, deadline: float | None = None) -> bool:
        """Send without ever blocking past `deadline`; False if nobody took it in time."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        flags = zmq.NOBLOCK | (zmq.SNDMORE if len(parts) > 1 else 0)
        while True:
            try:
                self._sock.send(parts[0], flags, copy=len(parts[0]) < 65536)
                break
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._sock.poll(remaining * 1000, zmq.POLLOUT):
                    if time.monotonic() >= deadline:
                        return False
        for i, part in enumerate(parts[1:], start=2):
            last = i == len(parts)
            self._sock.send(part, 0 if last else zmq.SNDMORE, copy=False)
        return True

    def _poll(self, timeout: float) -> None:
        events = dict(self._poller.poll(max(0, timeout) * 1000))
        if self._monitor in events:
            self._drain_monitor()
        if self._sock in events:
            self._drain()

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaking = False
                continue
            # a peer that hangs up mid-handshake refused it too
            self._handshake_failed |= bool(event & _HANDSHAKE_FAILED) or (
                event == zmq.EVENT_DISCONNECTED and self._handshaking)
            self._handshaking = event == zmq.EVENT_CONNECTED
            self._transport_up = event == zmq.EVENT_CONNECTED
            if self._transport_up and not self._connected:
                self._drop_probe()  # a hello sent to an earlier peer will not be answered
            if event == zmq.EVENT_DISCONNECTED and self._connected:
                self._drain()  # acks that arrived before the disconnect still count
                self._connection_lost("the receiver disconnected")

    def _drain(self) -> None:
        """Handle every reply waiting on the socket, without blocking."""
        sock = self._sock
        while sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than catching zmq.Again
            self._handle_reply(sock.recv(zmq.NOBLOCK))

    def _handle_reply(self, data: bytes) -> p.ReceiverMessage | None:
        try:
            message = p.decode_receiver_message(data)
        except Exception as exc:  # noqa: BLE001 - a bad reply must not break the pipeline
            log.warning("ignoring unreadable reply from %s: %s", self.endpoint, exc)
            return None
        if isinstance(message, p.Ack):
            entry = self._inflight.get(message.seq)
            if entry is not None:
                self.latencies.append(time.perf_counter() - entry[0])
                self._forget(message.seq)
                self.stats["acked"] += 1
                if message.seq in self._replies:
                    self._replies[message.seq] = {}
        elif isinstance(message, p.Error):
            tracked = message.seq is None or message.seq in self._inflight
            if not tracked:
                return message  # a frame we already gave up on (policy latest): counted
            self.stats["rejected"] += 1
            if message.code == p.HELLO_REQUIRED:
                # a new receiver that never saw our hello: this frame is lost with the rest
                self._connection_lost("the receiver restarted")
                return message
            if message.seq is not None:  # a vanished segment is never reused
                self._forget(message.seq, abandon=message.code == p.SEGMENT_MISSING)
            if message.seq is None and self._hello is not None:
                self._refused = (f"the {self.viewer} receiver at {self.endpoint} refused the "
                                 f"handshake: {message.message}")
            else:
                log.warning("%s receiver rejected message %s: %s", self.viewer, message.seq,
                            message.message)
                self._rejections.append(message)
        elif isinstance(message, p.Welcome):
            if self._hello is not None:
                self._complete_handshake(message)
        elif isinstance(message, p.Report):
            if message.seq in self._replies and message.seq in self._inflight:
                self._replies[message.seq] = message.state
                self._forget(message.seq)
        return message

    def _wait_for(self, kind: type, deadline: float):
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._sock.poll(remaining * 1000, zmq.POLLIN):
                break
            message = self._handle_reply(self._sock.recv())
            if isinstance(message, kind) or self._refused:
                return message
        return None

    def _wait_until(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._drain()
        while not done():
            if not self._connected:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._connection_lost(f"no acknowledgement from the receiver for {timeout:g} s")
                return
            self._poll(remaining)
