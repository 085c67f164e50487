"""A real receiver in a real separate process, for transport tests.

The child runs `polystore.streaming.Receiver`; what it received comes back over the wire
itself, through the `report` control message (digests of every frame), so a test checks
bit-exactness end to end without any side channel.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import time
from dataclasses import dataclass

import numpy as np


def digest(array: np.ndarray) -> str:
    """Shape, dtype and bytes (little-endian, C order) of an array."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    h = hashlib.sha256(f"{array.shape}|{array.dtype.name}|".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def _serve(endpoint: str, prefix: str, viewer: str, delay: float, conn) -> None:
    # Block SIGTERM before any thread starts, so terminate() wakes sigwait below and the
    # receiver stops cleanly instead of dying mid-copy.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    from polystore.streaming import Receiver

    frames: list[dict] = []
    rois: list[dict] = []

    def on_frame(frame) -> None:
        frames.append(
            {
                "path": frame.header.path,
                "stream": frame.header.stream,
                "digest": digest(frame.array),
                "axes": frame.header.axes,
                "kind": frame.header.display.kind,
                "sender": frame.sender,
                "seq": frame.header.seq,
            }
        )
        if delay:
            time.sleep(delay)

    def on_rois(item) -> None:
        rois.append({"stream": item.header.stream, "n": len(item.header.rois),
                     "kinds": [r.kind for r in item.header.rois]})

    def on_clear() -> None:
        frames.clear()
        rois.clear()

    receiver = Receiver(endpoint, shm_prefix=prefix, viewer=viewer, on_frame=on_frame,
                        on_rois=on_rois, on_clear=on_clear,
                        report=lambda: {"received": frames, "roi_sets": rois})
    try:
        receiver.start()
    except OSError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ok", receiver.endpoint))
    signal.sigwait({signal.SIGTERM})
    receiver.stop()


@dataclass
class ReceiverProcess:
    """Handle on a receiver child process."""

    process: mp.Process
    endpoint: str

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)


def start_receiver(endpoint: str = "tcp://127.0.0.1:0", prefix: str = "napari_",
                   viewer: str = "napari", delay: float = 0.0) -> ReceiverProcess:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(endpoint, prefix, viewer, delay, child),
                          daemon=True)
    process.start()
    if not parent.poll(60):
        process.kill()
        raise RuntimeError("receiver process did not start")
    status, value = parent.recv()
    if status != "ok":
        process.join(5)
        raise OSError(value)
    return ReceiverProcess(process, value)


def send_frames(endpoint: str, stream: str, count: int, shape=(64, 64), policy: str = "block",
                timeout: float = 10.0, conn=None) -> dict:
    """Sender body used in child processes (multiprocessing, dask workers): `count` frames
    whose first pixel is the frame index, to one stream; returns the sender's counters."""
    from polystore.streaming import NapariStreamingBackend

    result = {"sent": 0, "error": None}
    backend = NapariStreamingBackend(endpoint, policy=policy, timeout=timeout, max_inflight=8)
    try:
        frame = np.zeros(shape, np.uint16)
        for i in range(count):
            frame.flat[0] = i
            backend.save(frame, f"{stream}/f{i:05d}.tif", stream=stream)
            result["sent"] += 1
        backend.flush()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["stats"] = backend.sender.stats.as_dict()
        backend.close()
    if conn is not None:
        conn.send(result)
    return result


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ScriptedReceiver:
    """A real ROUTER socket (in a thread) that answers like a receiver: welcome to hello,
    ack to every message, except the message seqs in `answers`, which get that reply
    instead. For states a real receiver cannot be put into on demand (say, one that lost
    track of a sender while its connection stayed up)."""

    def __init__(self, answers: dict[int, dict] | None = None) -> None:
        import threading

        import zmq

        from polystore.streaming.auth import ServerAuth, resolve_auth

        self.answers = answers or {}
        self.seen: list[dict] = []
        self._auth = ServerAuth(resolve_auth(None))  # the same user's credential, as a receiver
        self._sock = self._auth.context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._auth.apply(self._sock)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import zmq

        while not self._stop.is_set():
            self.tick()
            if not self._sock.poll(50, zmq.POLLIN):
                continue
            identity, header, *_ = self._sock.recv_multipart()
            message = json.loads(header)
            self.seen.append(message)
            reply = self.answer(identity, message)
            if reply is not None:
                self.send(identity, reply)

    def answer(self, identity: bytes, message: dict) -> dict | None:
        """The reply to `message` (None: none). Subclasses answer by their own rules."""
        if message["type"] == "hello":
            return {"type": "welcome", "v": 1, "receiver": "scripted", "viewer": "napari",
                    "pid": os.getpid(), "shm": False}
        if "seq" in message:
            return self.answers.get(message["seq"], {"type": "ack", "v": 1, "seq": message["seq"]})
        return None

    def send(self, identity: bytes, reply: dict) -> None:
        self._sock.send_multipart([identity, json.dumps(reply).encode()])

    def tick(self) -> None:
        """Called between messages (about 20 times a second when idle)."""

    def __enter__(self) -> ScriptedReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._auth.close()


def ipv6_loopback() -> bool:
    """Whether this machine has an IPv6 loopback (::1) to listen on."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
