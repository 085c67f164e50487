"""Streaming transport: real receiver processes, real sockets, real shared memory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import pytest
import zmq

from polystore import BackendRegistry, FileManager
from polystore.streaming import (
    BackpressureError,
    FijiStreamingBackend,
    FrameRejectedError,
    NapariStreamingBackend,
    ReceiverLostError,
    SenderOptions,
    StreamingBackend,
    UnstreamableDataError,
    ViewerNotRunningError,
    list_segments,
    receiver_for,
    stream_key,
    sweep,
)
from polystore.streaming import protocol as p
from polystore.streaming.auth import client_keys, resolve_auth
from polystore.streaming.connection import State
from polystore.streaming.router import ACK_BATCH, ACK_BATCH_BYTES
from polystore.streaming.shm import SHM_DIR
from tests.stream_helpers import ScriptedReceiver, digest, ipv6_loopback, start_receiver

DTYPES = list(p.DTYPES)


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def receiver_proc():
    proc = start_receiver()
    yield proc
    proc.stop()


@pytest.fixture
def backend(receiver_proc):
    b = NapariStreamingBackend(receiver_proc.endpoint)
    b.request("clear")
    yield b
    b.close()


def received(backend) -> list[dict]:
    backend.flush()
    return backend.request("report")["received"]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt) * 1000
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_round_trip_every_dtype_and_shape_is_bit_exact(receiver_proc, transport):
    arrays = []
    for i, dtype in enumerate(DTYPES):
        for shape in [(7, 9), (3, 5, 6), (2, 1, 3, 4, 5)]:
            arrays.append(sample(dtype, shape, seed=i))
    with NapariStreamingBackend(receiver_proc.endpoint, transport=transport) as b:
        start = len(b.request("report")["received"])
        for i, a in enumerate(arrays):
            b.save(a, f"rt/{transport}_{i:03d}.tif")
        got = received(b)[start:]
        assert b.sender.uses_shared_memory is (transport == "shm")
    assert [g["digest"] for g in got] == [digest(a) for a in arrays]


def test_frames_around_the_gil_free_copy_size_are_bit_exact(backend):
    """Shared-memory copies of 1 MiB and more go through numpy (without the GIL), smaller
    ones through a memoryview: both, and the boundary, arrive bit-exact."""
    from polystore.streaming.segment_reader import GIL_FREE_COPY_BYTES

    arrays = [sample("uint8", (GIL_FREE_COPY_BYTES - 1,), seed=1),
              sample("uint8", (1024, GIL_FREE_COPY_BYTES // 1024), seed=2),
              sample("uint16", (1023, 1031), seed=3)]
    start = len(backend.request("report")["received"])
    for i, a in enumerate(arrays):
        backend.save(a, f"gil/{i}.tif")
    assert backend.sender.uses_shared_memory
    assert [g["digest"] for g in received(backend)[start:]] == [digest(a) for a in arrays]


_FAULT_COUNTING_RECEIVER = """
import sys, numpy as np
from polystore.streaming import NapariStreamingBackend, receiver_for

def minor_faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

corners = []  # what a viewer does with a frame: look at it, then let it go
receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                        on_frame=lambda f: corners.append(int(f.array[-1, -1])),
                        report=lambda: {"minor_faults": minor_faults(), "corners": corners})
receiver.start()
print(receiver.endpoint, flush=True)
sys.stdin.read()
receiver.stop()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="counts faults in /proc")
def test_a_receiver_reuses_frame_memory_when_malloc_returns_it_to_the_system():
    """glibc hands freed 512 KiB blocks back to the system in bursts; a receiver that then
    allocates each frame afresh takes 128 page faults per frame (measured: about half the
    frame rate). Forced here for every frame (a fixed mmap threshold), the receiver still
    takes almost none, because it reuses the memory of frames its viewer let go of."""
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    child = subprocess.Popen([sys.executable, "-c", _FAULT_COUNTING_RECEIVER], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        endpoint = child.stdout.readline().strip()
        frame = np.zeros((512, 512), np.uint16)
        with NapariStreamingBackend(endpoint, max_inflight=8) as b:
            for _ in range(40):  # warm up
                b.save(frame, "faults/t.tif")
            b.flush()
            before = b.request("report")["minor_faults"]
            for i in range(200):
                frame[-1, -1] = i
                b.save(frame, "faults/t.tif")
            b.flush()
            report = b.request("report")
    finally:
        child.stdin.close()
        child.wait(30)
    assert report["corners"][-200:] == list(range(200))
    faults_per_frame = (report["minor_faults"] - before) / 200
    assert faults_per_frame < 8, f"{faults_per_frame:.0f} page faults per 512 KiB frame"


def test_frames_a_viewer_keeps_are_never_reused():
    """The receiver reuses only memory nobody holds: every frame (or view of one) a viewer
    keeps stays as it arrived while later frames come in."""
    kept: list[np.ndarray] = []
    seen = []

    def on_frame(item) -> None:
        seen.append(int(item.array[0, 0]))
        if len(seen) % 3 == 0:
            kept.append(item.array)
        elif len(seen) % 3 == 1:
            kept.append(item.array[1:, ::2])  # a view keeps its frame too

    receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=on_frame)
    with receiver, NapariStreamingBackend(receiver.endpoint) as b:
        frames = [np.full((256, 256), i, np.uint16) for i in range(90)]
        for i, f in enumerate(frames):
            b.save(f, f"keep/{i}.tif")
        b.flush()
        deadline = time.monotonic() + 10
        while len(seen) < 90 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == list(range(90))
    expected = [f if i % 3 == 2 else f[1:, ::2] for i, f in enumerate(frames) if i % 3 != 1]
    assert len(kept) == len(expected) == 60
    for got, want in zip(kept, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_non_contiguous_big_endian_and_bool_inputs(backend):
    base = sample("uint16", (64, 80))
    inputs = [
        base[::2, ::3],                    # strided view
        base.T,                            # Fortran order
        base.astype(">u2"),                # big-endian
        base.astype(">f8")[5:9],           # big-endian float slice
        base > 30000,                      # bool -> uint8
    ]
    expected = [
        base[::2, ::3], base.T, base, base.astype("f8")[5:9], (base > 30000).astype(np.uint8),
    ]
    for i, a in enumerate(inputs):
        backend.save(a, f"odd/{i}.tif")
    assert [g["digest"] for g in received(backend)] == [digest(e) for e in expected]


def test_array_like_and_torch_inputs(backend):
    class ArrayLike:
        def __array__(self, dtype=None, copy=None):
            return np.arange(12, dtype=np.int32).reshape(3, 4)

    backend.save(ArrayLike(), "like/a.tif")
    expected = [np.arange(12, dtype=np.int32).reshape(3, 4)]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.arange(20, dtype=torch.float32).reshape(4, 5)[:, 1:]
        backend.save(t, "like/t.tif")
        expected.append(t.numpy())
    assert [g["digest"] for g in received(backend)] == [digest(e) for e in expected]


def test_metadata_axes_hints_and_stream_keys(backend):
    backend.save(np.zeros((4, 4), np.uint16), "well_A01/t003.tif", axes={"t": 3, "c": 1},
                 axis_names=["t", "c"])
    backend.save(np.zeros((4, 4), np.uint8), "seg/mask_001.tif", labels=True, stream="masks")
    got = received(backend)
    assert got[0]["stream"] == "well_A01" and got[0]["axes"] == {"t": 3, "c": 1}
    assert got[1]["stream"] == "masks" and got[1]["kind"] == "labels"


def test_rois_round_trip(backend):
    rois = [
        {"kind": "polygon", "coords": [[0, 0], [0, 5], [5, 5]], "label": "cell 1"},
        {"kind": "rectangle", "coords": [[1, 1], [4, 6]]},
        {"kind": "ellipse", "coords": [[1, 1], [4, 6]]},
        {"kind": "line", "coords": [[0, 0], [9, 9]]},
        p.Roi(kind="point", coords=[[3, 3]]),
    ]
    backend.save(rois, "well_A01/t003.roi.zip", axes={"t": 3})
    backend.flush()
    sets = backend.request("report")["roi_sets"]
    assert sets[-1] == {"stream": "well_A01", "n": 5,
                        "kinds": ["polygon", "rectangle", "ellipse", "line", "point"]}
    with pytest.raises(UnstreamableDataError, match="kind"):
        backend.save([{"kind": "blob", "coords": [[0, 0]]}], "x.roi.zip")
    with pytest.raises(UnstreamableDataError, match="needs 3"):
        backend.save([{"kind": "polygon", "coords": [[0, 0]]}], "x.roi.zip")


def test_a_roi_set_too_large_for_one_message_is_refused_at_save_and_loses_nothing(backend):
    """A ROI message over the receiver's 64 KiB header limit used to be sent anyway: the
    receiver refused it without its sequence number, so its credit never came back and the
    sender declared the healthy receiver lost 5 s later, taking the frames in flight with it."""
    ring = [[100 * np.sin(a), 100 * np.cos(a)] for a in np.linspace(0, 6.2, 40)]
    many = [{"kind": "polygon", "coords": ring, "label": f"cell {i}"} for i in range(300)]
    frame = sample("uint16", (32, 32))
    backend.save(frame, "big/t000.tif")
    started = time.monotonic()
    with pytest.raises(UnstreamableDataError, match=r"300 ROIs .* at most 65,536.*tolerance"):
        backend.save(many, "big/t000.roi.zip")
    assert time.monotonic() - started < 1.0  # said at once, not after a timeout
    backend.save(many[:20], "big/t000.roi.zip")  # a set that fits still goes
    backend.save(frame, "big/t001.tif")
    got = received(backend)
    assert [g["digest"] for g in got[-2:]] == [digest(frame)] * 2
    assert backend.request("report")["roi_sets"][-1]["n"] == 20
    assert backend.sender.stats.lost == 0


def test_a_roi_set_too_large_for_one_message_is_refused_at_save_saying_what_to_do(backend):
    """A multi-point of 10,000 points (as ImageJ files hold) is beyond a message's header
    limit: save() says how many bytes, and to split the set, not only to simplify outlines
    (which a multi-point has none of); the stream goes on."""
    points = [[float(i % 100), float(i // 100)] for i in range(10_000)]
    with pytest.raises(UnstreamableDataError, match=r"1 ROIs with 10000 points in all encode "
                                                    r"to [\d,]+ bytes.*several sets"):
        backend.save([{"kind": "point", "coords": points}], "big/t000.roi.zip")
    backend.save([{"kind": "point", "coords": points[:1000]}], "big/t000.roi.zip")
    backend.flush()
    assert backend.request("report")["roi_sets"][-1]["n"] == 1


def test_positioned_rois_stream_as_one_set_per_plane(backend):
    """A ROI file loaded with positions=True (PositionedRoi items) could not be streamed:
    msgspec said "Expected `object`, got `array`". Each plane's ROIs now go as one set
    at that plane, as the file places them."""
    from polystore.rois import PositionedRoi, Roi

    items = [PositionedRoi(Roi("point", [[1, 2]]), {"z": 0}),
             PositionedRoi(Roi("point", [[3, 4]]), {"t": 1, "z": 2}),
             PositionedRoi(Roi("line", [[0, 0], [5, 5], [9, 1]]), {"z": 2, "t": 1})]
    backend.save(items, "pos/cells.roi.zip", stream="pos")
    backend.flush()
    sets = backend.request("report")["roi_sets"][-2:]
    assert [(s["n"], s["kinds"]) for s in sets] == [(1, ["point"]), (2, ["point", "line"])]
    with pytest.raises(UnstreamableDataError, match="PositionedRoi items carry their own"):
        backend.save(items, "pos/cells.roi.zip", stream="pos", axes={"t": 0})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_roi_with_a_non_finite_coordinate_is_refused_at_save(backend, bad):
    """JSON has no NaN or infinity: the set travelled with null and the receiver refused it
    ("Expected float, got null") after save() had returned."""
    with pytest.raises(UnstreamableDataError, match=r"ROI 1 \(rectangle 'r'\).*NaN or infinite"):
        backend.save([{"kind": "point", "coords": [[1, 1]]},
                      {"kind": "rectangle", "coords": [[0, 0], [bad, 5]], "label": "r"}],
                     "nan/t000.roi.zip")
    backend.save([{"kind": "point", "coords": [[1, 1]]}], "nan/t001.roi.zip")
    backend.flush()
    assert backend.request("report")["roi_sets"][-1]["n"] == 1
    assert backend.sender.stats.rejected == 0


@pytest.mark.parametrize("limits", [(0.0, float("inf")), (float("nan"), 1.0)])
def test_non_finite_contrast_limits_are_refused_at_save(backend, limits):
    """JSON has no NaN or infinity: msgspec wrote them as null, and the receiver rejected every
    frame of the stream, long after save() had returned."""
    with pytest.raises(UnstreamableDataError, match="contrast_limits must be finite"):
        backend.save(sample("float32", (8, 8)), "drift/t000.tif", contrast_limits=limits)
    backend.save(sample("float32", (8, 8)), "drift/t001.tif", contrast_limits=(0, 1))
    assert received(backend)[-1]["stream"] == "drift"


@pytest.mark.parametrize("limits", [(100, 10), (5, 5)])
def test_contrast_limits_without_a_range_are_refused_at_save(backend, limits):
    """A reversed or empty range was sent, and napari's layer refused it later ("must be
    monotonically increasing"), long after save() had returned; receivers refuse it too
    (the conformance suite's contrast_limits cases)."""
    with pytest.raises(UnstreamableDataError, match=r"contrast_limits must be \[low, high\] "
                                                    r"with low below high.*swap"):
        backend.save(sample("float32", (8, 8)), "range/t000.tif", contrast_limits=limits)
    backend.save(sample("float32", (8, 8)), "range/t001.tif", contrast_limits=(0, 1))
    assert [g["path"] for g in received(backend)] == ["range/t001.tif"]


def test_rgb_labels_are_refused_at_save_and_by_every_receiver(backend):
    """rgb=True on labels: napari's receiver took it and its display failed later (a *Last
    error*), Fiji's answered bad_message. Labels are never RGB (docs/protocol.md): save() says
    so at once, and the conformance suite holds every receiver to bad_message."""
    colour = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(UnstreamableDataError, match="labels are never RGB"):
        backend.save(colour, "seg/t000.png", labels=True, rgb=True)
    backend.save(colour, "seg/t001.png", labels=True, rgb=False)  # three planes of labels
    assert received(backend)[-1]["stream"] == "seg"


@pytest.mark.parametrize("where", [{"axes": {"t": 0, "Time": 1}},
                                   {"axis_names": ["channel", "c"]}])
def test_two_names_of_one_axis_are_refused_at_save_and_by_every_receiver(backend, where):
    """Fiji read `time`/`channel`/`slice` (any case) as t, c, z and napari took names
    literally, so `axes={"t": 0, "Time": 1}` was two axes in napari and one (plus a window
    title) in Fiji. Both read the synonyms now (docs/protocol.md), and naming one axis twice
    is refused: at save(), and as bad_message by every receiver (the conformance suite)."""
    with pytest.raises(UnstreamableDataError, match="name one axis twice.*time"):
        backend.save(sample("uint16", (2, 4, 4)), "syn/t000.tif", **where)
    backend.save(sample("uint16", (2, 4, 4)), "syn/t001.tif", axes={"Time": 1})
    assert received(backend)[-1]["axes"] == {"Time": 1}


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_a_path_that_is_not_utf8_is_refused_clearly_and_keeps_no_segment(receiver_proc,
                                                                         transport):
    """A file name from os.listdir that is not UTF-8 holds lone surrogates. Encoding its header
    raised a bare UnicodeEncodeError after the frame's segment was reserved, and the segment
    stayed reserved for good: a few such saves and the sender waited for credits that never
    came."""
    bad = os.fsdecode(b"plate/caf\xe9_t000.tif")
    frame = sample("uint16", (16, 16))
    with NapariStreamingBackend(receiver_proc.endpoint, transport=transport,
                                max_inflight=2, timeout=2) as b:
        b.save(frame, "utf8/t000.tif")
        b.flush()
        for _ in range(3):
            with pytest.raises(UnstreamableDataError, match="not valid UTF-8"):
                b.save(frame, bad, stream="utf8")
        assert b.sender.pool.busy_count == 0 and b.sender.inflight == 0
        b.save(frame, "utf8/t001.tif")
        b.flush()
        assert b.sender.stats.acked == 2


def test_stop_returns_promptly_while_a_slow_viewer_callback_is_fed():
    """The receiver read up to 256 queued messages between checks of stop(): with a viewer
    callback of 50 ms and a sender keeping the queue full, stop() took over 10 s."""
    def slow(frame) -> None:
        time.sleep(0.05)

    receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=slow).start()
    done = threading.Event()

    def stream() -> None:
        with contextlib.suppress(Exception), NapariStreamingBackend(
                receiver.endpoint, timeout=30) as b:
            while not done.is_set():
                b.save(np.zeros((64, 64), np.uint16), "slow/t.tif")

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 10
        while receiver.stats.frames < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.stats.frames >= 20
        started = time.monotonic()
        receiver.stop(timeout=10)
        assert time.monotonic() - started < 2.0
        assert not receiver.running
    finally:
        done.set()
        sender.join(10)
    with pytest.raises(RuntimeError, match="stopped; create a new Receiver"):
        receiver.start()  # it used to return as if listening, and served nothing


def test_stop_returns_after_a_connection_flood_while_the_viewer_was_busy():
    """Any account opening and closing connections in a loop while the receiver thread is
    busy in the viewer's callback fills ZeroMQ's monitor queue; ZeroMQ's I/O thread then
    waits to write the next event, holding the socket's monitor lock, and stop() called
    disable_monitor(), which waited for that lock for ever holding the GIL: the whole
    process (napari) froze. Run in a child, which the old code left hanging."""
    child_code = textwrap.dedent("""
        import sys, threading
        import numpy as np
        from polystore.streaming import NapariStreamingBackend, receiver_for
        gate = threading.Event()
        rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                          on_frame=lambda f: gate.wait(60)).start()
        with NapariStreamingBackend(rx.endpoint) as b:
            b.save(np.zeros((4, 4), np.uint8), "hold/t0.tif")
            b.flush()  # acked: the receiver thread is now in the callback
        print(rx.endpoint, flush=True)
        sys.stdin.readline()  # the flood is over
        stopper = threading.Thread(target=rx.stop, kwargs={"timeout": 10})
        stopper.start()
        gate.set()
        stopper.join()
        print("stopped", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", child_code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        host, port = child.stdout.readline().strip().removeprefix("tcp://").rsplit(":", 1)
        opened, deadline = 0, time.monotonic() + 4
        while time.monotonic() < deadline:  # no credential needed: plain TCP
            with socket.socket() as conn:
                conn.settimeout(0.2)
                with contextlib.suppress(OSError):
                    conn.connect((host, int(port)))
                    opened += 1
        assert opened > 600  # enough events to fill the monitor's queue
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
        assert child.stdout.read().strip() == "stopped"
    finally:
        child.kill()
        child.wait()


def test_a_receiver_whose_bind_failed_can_be_started_again():
    """start() after a failed bind raised "already started" (it never served); the port
    freed, the same receiver must be able to listen."""
    endpoint = free_endpoint()
    squatter = zmq.Context.instance().socket(zmq.ROUTER)
    squatter.bind(endpoint)
    receiver = receiver_for(NapariStreamingBackend, endpoint)
    try:
        with pytest.raises(OSError, match="cannot listen"):
            receiver.start()
        squatter.close(linger=0)
        deadline = time.monotonic() + 10
        while True:
            try:
                receiver.start()
                break
            except OSError:  # the port may take a moment to be free
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert receiver.running
    finally:
        squatter.close(linger=0)
        receiver.stop()


@pytest.mark.parametrize("name", ["path", "abstract"])
def test_a_second_receiver_on_an_ipc_path_is_refused_and_the_first_keeps_it(tmp_path, name):
    """ZeroMQ binds an ipc:// path by replacing the socket file there: a second receiver took
    the path from the first without a word, and its senders reached the newcomer. It is
    refused, as on a TCP port in use; a file left by a receiver that died is reused."""
    endpoint = (f"ipc://{tmp_path}/napari" if name == "path"
                else f"ipc://@polystore-test-{os.getpid()}-{time.monotonic_ns()}")
    first = receiver_for(NapariStreamingBackend, endpoint).start()
    second = receiver_for(NapariStreamingBackend, endpoint)
    try:
        with pytest.raises(OSError, match="cannot listen on .*another receiver"):
            second.start()
        assert not second.running
        with NapariStreamingBackend(endpoint) as backend:
            backend.save(np.ones((8, 8), np.uint16), "a/t0.tif")
            backend.flush()
        assert first.stats.frames == 1
    finally:
        first.stop()
        second.stop()
    if name == "path":  # what a killed receiver leaves: a socket file nobody listens on
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(f"{tmp_path}/stale")
        stale.close()
        receiver = receiver_for(NapariStreamingBackend, f"ipc://{tmp_path}/stale").start()
        receiver.stop()


def test_a_stopped_receiver_removes_its_ipc_socket_file_and_nothing_else(tmp_path):
    """ZeroMQ leaves the socket file behind: `polystore napari --endpoint ipc://...` and the
    demo left theirs in the user's folder after every run."""
    path = tmp_path / "viewer.sock"
    receiver = receiver_for(NapariStreamingBackend, f"ipc://{path}").start()
    with NapariStreamingBackend(f"ipc://{path}") as backend:
        backend.save(np.ones((8, 8), np.uint16), "a/t0.tif")
        backend.flush()
    assert path.exists()
    receiver.stop()
    assert not path.exists() and receiver.stats.frames == 1
    receiver = receiver_for(NapariStreamingBackend, f"ipc://{path}").start()
    path.unlink()
    path.write_text("someone else's file, made after the receiver started")
    receiver.stop()
    assert path.read_text().startswith("someone else's")


def test_an_ipc_path_that_is_a_file_or_a_busy_listener_is_refused(tmp_path):
    """ZeroMQ deletes whatever is at an ipc path it binds: a user's file of that name was
    lost, and a listener whose accept queue was full (EAGAIN) counted as free."""
    data = tmp_path / "results.csv"
    data.write_text("keep me")
    with pytest.raises(OSError, match="exists and is not a socket"):
        receiver_for(NapariStreamingBackend, f"ipc://{data}").start()
    assert data.read_text() == "keep me"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued = []
    try:
        busy.bind(f"{tmp_path}/busy")
        busy.listen(0)  # never accepts: its queue fills at once
        for _ in range(4):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.setblocking(False)
            queued.append(conn)
            with contextlib.suppress(BlockingIOError):
                conn.connect(f"{tmp_path}/busy")
        with pytest.raises(OSError, match="another receiver .or program. is listening"):
            receiver_for(NapariStreamingBackend, f"ipc://{tmp_path}/busy").start()
    finally:
        for conn in queued:
            conn.close()
        busy.close()
    with pytest.raises(ValueError, match="inproc:// reaches only sockets of one"):
        receiver_for(NapariStreamingBackend, "inproc://napari")


def test_two_receivers_starting_on_one_ipc_path_at_once_do_not_both_listen(tmp_path):
    """The check for a receiver already on an ipc:// path and the bind were two steps: two
    receivers starting at the same instant both found the path free, and the second bind
    took the path (and its senders) from the first; it happened in about 1 start in 6 here.
    The pair is now serialized by a lock on the path's directory."""
    def start(endpoint: str, together: threading.Barrier, started: list) -> None:
        receiver = receiver_for(NapariStreamingBackend, endpoint)
        together.wait()
        with contextlib.suppress(OSError):
            started.append(receiver.start())

    for attempt in range(100):
        started: list = []
        pair = (f"ipc://{tmp_path}/viewer{attempt}", threading.Barrier(2), started)
        threads = [threading.Thread(target=start, args=pair) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for receiver in started:
            receiver.stop()
        assert len(started) == 1, f"attempt {attempt}: {len(started)} receivers listening"


def test_a_lock_held_on_the_ipc_directory_does_not_keep_a_receiver_from_starting(tmp_path):
    """Receivers lock an ipc:// path's directory while they check and bind it; any account
    can lock a directory it can read (/tmp), and must not hang a receiver that way."""
    holder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        receiver = receiver_for(NapariStreamingBackend, f"ipc://{tmp_path}/viewer").start(10)
        receiver.stop()
        assert time.monotonic() - started < 8
    finally:
        os.close(holder)


def test_a_tcp_port_out_of_range_is_refused_on_both_sides():
    """ZeroMQ takes a TCP port modulo 65536: a receiver asked for port 99999 listened on
    34463, and a sender told 99999 connected there, both without a word."""
    with pytest.raises(ValueError, match="needs a TCP port from 0 to 65535"):
        receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:99999")
    with pytest.raises(ValueError, match="its port 99999 is not from 1 to 65535"):
        NapariStreamingBackend("tcp://127.0.0.1:99999")
    with pytest.raises(ValueError, match="and it names none"):
        receiver_for(NapariStreamingBackend, "tcp://127.0.0.1")
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0") as receiver:  # any free one
        with NapariStreamingBackend(receiver.endpoint) as backend:
            backend.save(np.ones((4, 4), np.uint16), "a.tif")
            backend.flush()
        assert receiver.stats.frames == 1


@pytest.mark.parametrize("kind", ["dgram", "seqpacket"])
def test_an_ipc_path_bound_by_another_programs_datagram_socket_is_refused(tmp_path, kind):
    """check_ipc_path probed with a stream socket only: connecting to another program's
    datagram (or seqpacket) socket fails with EPROTOTYPE, which counted as "nobody there",
    so the receiver's bind deleted that program's socket and took its path (the program
    could no longer be reached). It is refused; a stale one nobody holds is still reused."""
    path = f"{tmp_path}/{kind}.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if kind == "dgram"
                          else socket.SOCK_SEQPACKET)  # fmt: skip
    try:
        other.bind(path)
        if kind == "seqpacket":
            other.listen()
        inode = os.stat(path).st_ino
        with pytest.raises(OSError, match="another program's socket .*Choose another path"):
            receiver_for(NapariStreamingBackend, f"ipc://{path}").start()
        assert os.stat(path).st_ino == inode  # the program's socket is still its own
    finally:
        other.close()
    receiver = receiver_for(NapariStreamingBackend, f"ipc://{path}").start()  # now stale
    receiver.stop()


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_frames_stream_over_the_ipv6_loopback():
    """tcp://[::1]:PORT counts as loopback, yet a receiver could not listen there ("No such
    device": ZeroMQ sockets speak IPv4 only unless told otherwise), nor a sender connect."""
    with receiver_for(NapariStreamingBackend, "tcp://[::1]:0") as receiver:
        assert receiver.endpoint.startswith("tcp://[::1]:")
        with NapariStreamingBackend(receiver.endpoint) as backend:
            backend.save(np.arange(16, dtype=np.uint16).reshape(4, 4), "a.tif")
            backend.flush()
        assert receiver.stats.frames == 1


def test_a_start_that_does_not_finish_binding_in_time_says_so():
    """start() ignored its own timeout: it returned a receiver that was not listening yet
    (its endpoint still "tcp://127.0.0.1:*"), and a bind error after that was never told."""
    receiver = receiver_for(NapariStreamingBackend, free_endpoint())
    with pytest.raises(TimeoutError, match="was not listening on .* within 0 s"):
        receiver.start(timeout=0)
    deadline = time.monotonic() + 10
    while receiver.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not receiver.running


def test_stream_key_derivation():
    exts = NapariStreamingBackend.SUPPORTED_EXTENSIONS
    assert stream_key("well_A01/t003.tif", exts) == "well_A01"
    assert stream_key("out/smooth_007.tif", exts) == "out/smooth"
    assert stream_key("frame_001.tiff", exts) == "frame"
    assert stream_key("well_A01/t003.roi.zip", exts) == "well_A01"
    assert stream_key("/abs/path/img.tif", exts) == "abs/path/img"
    assert stream_key("live/t0c1.tif", exts) == "live"
    assert stream_key("plate/well_A01_t003_c2.tif", exts) == "plate/well_A01"
    assert stream_key("img_z05.npy", exts) == "img"
    assert stream_key("t003.tif", exts) == "t003"  # nothing left: keep the name
    assert stream_key("r/1.tif", exts) == "r"
    assert stream_key("plate/well_C01_t003.tif", exts) == "plate/well_C01"
    assert stream_key("img001.tif", exts) == "img"
    # a number that is part of the name stays: stripping stops at a second index of one
    # axis (before: "d/ex", the "p" of "exp" read as a position axis, and a date lost)
    assert stream_key("d/exp20240501_t001.tif", exts) == "d/exp20240501"
    assert stream_key("d/run2_t001.tif", exts) == "d/run2"
    assert stream_key("d/img_2024_05_01.tif", exts) == "d/img_2024_05"
    assert stream_key("d/cells001.tif", exts) == "d/cells"


def test_filemanager_routes_to_streaming_backends(receiver_proc):
    registry = BackendRegistry()
    assert "napari_stream" in registry and "fiji_stream" in registry
    registry["napari_stream"] = b = NapariStreamingBackend(receiver_proc.endpoint)
    fm = FileManager(registry)
    try:
        a = sample("uint16", (16, 16))
        fm.save_batch([a, {"x": 1}, a], ["fm/a_1.tif", "fm/meta.json", "fm/a_2.tif"],
                      backend="napari_stream")
        got = [g for g in received(b) if g["path"].startswith("fm/")]
        assert [g["path"] for g in got] == ["fm/a_1.tif", "fm/a_2.tif"]
        with pytest.raises(Exception, match="write-only"):
            fm.load("fm/a_1.tif", backend="napari_stream")
    finally:
        b.close()


# -- the guide's streaming example -------------------------------------------------------------


class MyStreamingBackend(StreamingBackend):
    """Custom streaming backend with extension filtering."""

    _backend_type = 'my_stream'
    VIEWER_TYPE = 'myviewer'
    SHM_PREFIX = 'myviewer_'

    # Declare which extensions this backend can stream
    SUPPORTED_EXTENSIONS = {
        '.tif', '.tiff', '.png', '.jpg', '.jpeg',
        '.roi.zip',  # Compound extensions work too
    }

    def save_batch(self, data_list, file_paths, **kwargs):
        """Stream data, automatically filtering unsupported files."""
        # Filter to only supported file types
        data_list, file_paths, skipped = self._filter_streamable_files(
            data_list, file_paths
        )

        if not data_list:
            return

        # Now stream only the supported files...
        for data, path in zip(data_list, file_paths):
            self._stream_data(data, path, **kwargs)


class RestrictedNapariBackend(NapariStreamingBackend):
    """Napari backend that only supports TIFF files."""
    SUPPORTED_EXTENSIONS = {'.tif', '.tiff'}


def test_guide_streaming_example_filters_extensions(monkeypatch, caplog):
    endpoint = free_endpoint()
    monkeypatch.setenv("POLYSTORE_MYVIEWER_ENDPOINT", endpoint)
    proc = start_receiver(endpoint, prefix="myviewer_", viewer="myviewer")
    try:
        backend = MyStreamingBackend()
        assert backend.endpoint == endpoint
        img = sample("uint8", (8, 8))
        paths = ["s/a_1.tif", "s/table.csv", "s/meta.json", "s/cells.roi.zip", "s/b_2.TIFF"]
        data = [img, "a,b", {"k": 1}, [{"kind": "point", "coords": [[1, 1]]}], img]
        with caplog.at_level("INFO"):
            backend.save_batch(data, paths)
        assert "skipped 2 file(s)" in caplog.text
        backend.flush()
        report = backend.request("report")
        assert [g["path"] for g in report["received"]] == ["s/a_1.tif", "s/b_2.TIFF"]
        assert report["roi_sets"][0]["n"] == 1
        backend.save_batch([img], ["only.csv"])  # nothing streamable: returns quietly
        backend.close()
        # Subclass narrowing the set: .png is no longer streamed (and not registered anew)
        kept, paths_kept, skipped = RestrictedNapariBackend()._filter_streamable_files(
            [1, 2, 3], ["a.tif", "b.png", "c.tiff"])
        assert paths_kept == ["a.tif", "c.tiff"] and skipped == ["b.png"]
        assert "my_stream" in BackendRegistry()
    finally:
        proc.stop()


# -- flow control ------------------------------------------------------------------------------


def test_policy_block_delivers_everything_from_a_slow_receiver():
    proc = start_receiver(delay=0.02)
    try:
        with NapariStreamingBackend(proc.endpoint, max_inflight=2, timeout=10) as b:
            arrays = [sample("uint16", (32, 32), seed=i) for i in range(30)]
            for i, a in enumerate(arrays):
                b.save(a, f"slow/{i}.tif")
                assert b.sender.inflight <= 2
            got = received(b)
            assert [g["digest"] for g in got] == [digest(a) for a in arrays]
            assert b.sender.stats["dropped"] == 0
    finally:
        proc.stop()


def test_policy_latest_never_blocks_and_counts_drops():
    proc = start_receiver(delay=0.05)
    try:
        with NapariStreamingBackend(proc.endpoint, policy="latest", max_inflight=2) as b:
            t = time.perf_counter()
            for i in range(40):
                b.save(sample("uint16", (64, 64), seed=i), f"live/{i}.tif")
            elapsed = time.perf_counter() - t
            b.flush(10)
            got = b.request("report")
            dropped = b.sender.stats["dropped"]
        assert elapsed < 1.0, "latest must not wait for a slow receiver (40 x 50 ms = 2 s)"
        assert dropped > 0
        # every frame was either received or counted as dropped (by sender or as missing)
        assert len(got["received"]) + dropped >= 40
        assert got["dropped"] > 0  # the receiver saw the drop count too
    finally:
        proc.stop()


def test_policy_raise_raises_backpressure():
    proc = start_receiver(delay=0.2)
    try:
        with NapariStreamingBackend(proc.endpoint, policy="raise", max_inflight=1) as b:
            with pytest.raises(BackpressureError, match="behind"):
                for i in range(10):
                    b.save(np.zeros((8, 8), np.uint8), f"r/{i}.tif")
    finally:
        proc.stop()


def test_block_times_out_on_a_stalled_receiver():
    proc = start_receiver(delay=5)
    try:
        b = NapariStreamingBackend(proc.endpoint, max_inflight=1, timeout=0.5)
        b.save(np.zeros((8, 8), np.uint8), "a.tif")  # accepted, receiver now stalls
        b.save(np.zeros((8, 8), np.uint8), "b.tif")  # queued behind it
        t = time.perf_counter()
        with pytest.raises(ReceiverLostError, match="acknowledg"):
            b.save(np.zeros((8, 8), np.uint8), "c.tif")
        assert time.perf_counter() - t < 1.5
        b.close()
        assert not list_segments(["napari_"]) or all(
            s.pid != os.getpid() for s in list_segments(["napari_"]))
    finally:
        proc.kill()


def test_inflight_bytes_bound_and_oversized_frame():
    proc = start_receiver()
    try:
        with NapariStreamingBackend(proc.endpoint, max_inflight_bytes=1 << 20) as b:
            for i in range(20):
                b.save(np.full((256, 1024), i, np.uint16), f"big/{i}.tif")  # 512 KiB each
                assert b.sender.pool.total_bytes <= 1 << 20
            with pytest.raises(UnstreamableDataError, match="max_inflight_bytes"):
                b.save(np.zeros((1024, 1024), np.uint16), "too_big.tif")
            b.flush()
    finally:
        proc.stop()


# -- viewer absent -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [NapariStreamingBackend, FijiStreamingBackend])
def test_viewer_absent_fails_fast_with_instructions(cls):
    endpoint = free_endpoint()
    b = cls(endpoint)
    t = time.perf_counter()
    with pytest.raises(ViewerNotRunningError) as info:
        b.save(np.zeros((4, 4), np.uint8), "x.tif")
    elapsed = time.perf_counter() - t
    assert elapsed < 1.5
    message = str(info.value)
    assert endpoint in message and ("polystore napari" in message or "polystore fiji" in message)
    b.close()


def test_bad_options_are_rejected_up_front():
    with pytest.raises(ValueError, match="policy"):
        NapariStreamingBackend(policy="sometimes")
    with pytest.raises(UnstreamableDataError, match="dtype"):
        from polystore.streaming.sender import to_wire_array

        to_wire_array(np.zeros(3, complex))
    with pytest.raises(UnstreamableDataError, match="cannot stream str"):
        from polystore.streaming.sender import to_wire_array

        to_wire_array("not an array")


# -- hostile and broken messages ---------------------------------------------------------------


@pytest.fixture
def local_receiver():
    r = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", queue_size=1000).start()
    yield r
    r.stop()


class RawClient:
    """A hand-driven DEALER socket, to send what no honest sender would."""

    def __init__(self, endpoint: str, token: str = "raw0001") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, token.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        user_keys = client_keys(resolve_auth(None))  # the same user as the receiver
        if user_keys is not None:
            user_keys.apply(self.sock)
        self.sock.connect(endpoint)
        self.token = token
        self.prefix = f"napari_{os.getpid()}_{token}_"

    def request(self, header: dict | bytes, *extra: bytes):
        data = header if isinstance(header, bytes) else json.dumps(header).encode()
        self.sock.send_multipart([data, *extra])
        assert self.sock.poll(3000), "receiver did not answer"
        return p.decode_receiver_message(self.sock.recv())

    def hello(self):
        """An honest hello: with the probe that lets frames name segments (issue 11)."""
        probe = shared_memory.SharedMemory(name=self.prefix + "probe", create=True, size=4096)
        probe.buf[:8] = b"probe123"
        try:
            return self.request({"v": 1, "type": "hello", "sender": self.token,
                                 "pid": os.getpid(), "viewer": "napari",
                                 "segment_prefix": self.prefix,
                                 "probe": {"segment": self.prefix + "probe", "token": "probe123"}})
        finally:
            probe.close()
            probe.unlink()

    def close(self):
        self.sock.close(0)


def frame(**overrides) -> dict:
    header = {"v": 1, "type": "frame", "seq": 1, "stream": "s", "path": "s.tif",
              "shape": [4, 4], "dtype": "uint8", "nbytes": 16, "sent_ns": 0}
    header.update(overrides)
    return header


def test_receiver_rejects_every_bad_message_and_keeps_serving(local_receiver):
    client = RawClient(local_receiver.endpoint)
    segment = shared_memory.SharedMemory(name=client.prefix + "0", create=True, size=4096)
    other = shared_memory.SharedMemory(name="fiji_1_other_0", create=True, size=4096)
    mine_elsewhere = shared_memory.SharedMemory(name=f"napari_{os.getpid()}_someoneelse_0",
                                                create=True, size=4096)
    try:
        assert isinstance(client.request(frame(segment=client.prefix + "0")), p.Error)
        cases = [
            (b"{not json", "bad_json"),
            (b"[1, 2]", "bad_message"),
            ({"v": 2, "type": "frame", "seq": 1}, "unsupported_version"),
            ({"v": 1, "type": "teleport", "seq": 1}, "bad_message"),
            (frame(segment=client.prefix + "0"), "hello_required"),
        ]
        for header, code in cases:
            reply = client.request(header)
            assert isinstance(reply, p.Error) and reply.code == code, (header, reply)
        assert isinstance(client.hello(), p.Welcome)
        seg = client.prefix + "0"
        cases = [
            (frame(segment="fiji_1_other_0"), "bad_segment"),
            (frame(segment=f"napari_{os.getpid()}_someoneelse_0"), "bad_segment"),
            (frame(segment="../../etc/passwd"), "bad_message"),
            (frame(segment=seg + "/x"), "bad_message"),
            (frame(segment=seg, shape=[4096, 4096], nbytes=4096 * 4096), "bad_segment"),
            (frame(segment=seg, offset=4090), "bad_segment"),
            (frame(segment=seg, shape=[-4, 4], nbytes=-16), "bad_message"),
            (frame(segment=seg, shape=[2**40, 2**40], nbytes=2**80), "bad_message"),
            (frame(segment=seg, shape=[2**30, 2**30], nbytes=2**60), "too_large"),
            (frame(segment=seg, shape=[4, 4], nbytes=17), "bad_shape"),
            (frame(segment=seg, dtype="object"), "bad_message"),
            (frame(segment=seg, dtype="V16"), "bad_message"),
            (frame(segment=seg, shape=[]), "bad_message"),
            (frame(segment=seg, shape=[1] * 9, nbytes=1), "bad_message"),
            (frame(segment=client.prefix + "99"), "segment_missing"),
            (frame(), "bad_shape"),  # inline without payload
            (frame(stream=""), "bad_message"),
            (frame(segment=seg, axes={"t": 1}, axis_names=["z"]), "bad_message"),
            (frame(segment=seg, axes={"t": -1}), "bad_message"),
            ({"v": 1, "type": "rois", "seq": 2, "stream": "s", "path": "p", "sent_ns": 0,
              "rois": [{"kind": "line", "coords": [[1, 1]]}]}, "bad_message"),
            (b"{" + b'"pad":"' + b"x" * 70000 + b'"}', "too_large"),
        ]
        for header, code in cases:
            reply = client.request(header)
            assert isinstance(reply, p.Error) and reply.code == code, (header, reply)
        # payload together with a segment, and too many parts
        reply = client.request(frame(segment=seg), b"x" * 16)
        assert reply.code == "bad_message"
        reply = client.request(frame(), b"x" * 16, b"extra")
        assert reply.code == "bad_message"
        # a hello claiming another receiver's prefix
        reply = client.request({"v": 1, "type": "hello", "sender": "x1", "pid": 1,
                                "viewer": "fiji", "segment_prefix": "fiji_1_x1_"})
        assert reply.code == "bad_segment"
        # ...and an honest frame still works
        segment.buf[:16] = bytes(range(16))
        assert isinstance(client.request(frame(segment=seg)), p.Ack)
        item = local_receiver.queue.get(timeout=2)
        assert item.array.tobytes() == bytes(range(16))
        assert local_receiver.running
        assert local_receiver.stats.rejected >= 30
    finally:
        client.close()
        for s in (segment, other, mine_elsewhere):
            s.close()
            s.unlink()


def test_foreign_user_segment_is_refused(local_receiver, tmp_path):
    """A name in our prefix that is not a regular file of our user (here: a directory made
    under /dev/shm) is refused, not followed."""
    client = RawClient(local_receiver.endpoint, token="dirtest")
    path = f"/dev/shm/{client.prefix}0"
    os.mkdir(path)
    try:
        client.hello()
        reply = client.request(frame(segment=client.prefix + "0"))
        assert reply.code in ("bad_segment", "segment_missing")
    finally:
        os.rmdir(path)
        client.close()


# -- segments: ownership and sweep -------------------------------------------------------------


def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def test_a_segment_name_with_an_impossible_pid_neither_stops_a_receiver_nor_is_removed():
    """Any account can create /dev/shm/napari_<huge number>_x_0; os.kill of that pid raised
    OverflowError out of the start-up sweep, so no receiver could start (nor `polystore shm
    list` run)."""
    name = "napari_99999999999999999999_x_0"
    (SHM_DIR / name).write_bytes(b"")
    try:
        receiver = receiver_for(NapariStreamingBackend, free_endpoint()).start()
        receiver.stop()
        assert [s.owner_alive for s in list_segments(["napari_"]) if s.name == name] == [True]
        assert (SHM_DIR / name).exists()  # not a name polystore makes: not ours to remove
    finally:
        (SHM_DIR / name).unlink(missing_ok=True)


def test_sweep_removes_only_dead_owners_segments():
    dead = _dead_pid()
    orphan = shared_memory.SharedMemory(name=f"napari_{dead}_abcd_0", create=True, size=4096)
    live = shared_memory.SharedMemory(name=f"napari_{os.getpid()}_abcd_0", create=True,
                                      size=4096)
    try:
        infos = {s.name: s for s in list_segments(["napari_"])}
        assert not infos[orphan.name].owner_alive and infos[live.name].owner_alive
        removed = [s.name for s in sweep(["napari_"])]
        assert orphan.name in removed and live.name not in removed
        assert not os.path.exists(f"/dev/shm/{orphan.name}")
    finally:
        orphan.close()
        live.close()
        live.unlink()
        from multiprocessing import resource_tracker

        resource_tracker.unregister(orphan._name, "shared_memory")  # swept already


def _save_in_child(backend, queue) -> None:
    try:
        backend.save(np.full((8, 8), 7, np.uint8), "fork/child.tif")
        backend.flush()
        backend.close()
        queue.put("ok")
    except Exception as exc:  # noqa: BLE001
        queue.put(repr(exc))


def test_backend_survives_fork(backend):
    backend.save(np.zeros((8, 8), np.uint8), "fork/parent.tif")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_save_in_child, args=(backend, queue))
    child.start()
    assert queue.get(timeout=20) == "ok"
    child.join(10)
    backend.save(np.ones((8, 8), np.uint8), "fork/parent2.tif")
    paths = [g["path"] for g in received(backend)]
    assert sorted(paths) == ["fork/child.tif", "fork/parent.tif", "fork/parent2.tif"]


_KEPT: list = []  # what a worker keeps to the end (so the garbage collector cannot close it)


def _save_without_close(endpoint: str, pipe) -> None:
    backend = NapariStreamingBackend(endpoint)
    backend.save(np.full((8, 8), 3, np.uint8), "fork/worker.tif")
    backend.flush()
    pipe.send(backend.sender.pool.prefix)
    _KEPT.append(backend)  # no close(): left to the end of the process


def test_a_forked_worker_that_ends_leaves_no_segments(receiver_proc):
    """multiprocessing ends a forked child with os._exit, which skips atexit: its senders
    were never closed and their segments stayed in /dev/shm until someone swept them."""
    ctx = mp.get_context("fork")
    parent, child_end = ctx.Pipe()
    worker = ctx.Process(target=_save_without_close, args=(receiver_proc.endpoint, child_end))
    worker.start()
    prefix = parent.recv() if parent.poll(30) else None
    worker.join(30)
    assert prefix and worker.exitcode == 0
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


@contextlib.contextmanager
def slow_viewer(delay: float, count: int, timeout: float):
    """A receiver process whose viewer takes `delay` s per frame, a backend with `timeout`, and
    `count` frames already saved to it: yields (backend, frames); on leaving, checks that
    every frame arrived, bit-exact, with nothing given up."""
    rx = start_receiver(delay=delay)
    try:
        frames = [sample("uint16", (16, 16), seed=i) for i in range(count)]
        with NapariStreamingBackend(rx.endpoint, timeout=timeout) as b:
            for i, frame in enumerate(frames):
                b.save(frame, f"slow/t{i}.tif")
            yield b, frames
            b.flush()
            assert b.sender.stats.lost == 0
            got = b.request("report")["received"]
        assert [g["digest"] for g in got] == [digest(f) for f in frames]
    finally:
        rx.stop()


def test_close_waits_for_a_slow_viewer_but_not_for_ever():
    """close() waits while acknowledgements come, but at most 4x its timeout in all: it also
    runs at process exit, where a viewer that answers slowly must not hold the pipeline."""
    rx = start_receiver(delay=0.1)
    try:
        b = NapariStreamingBackend(rx.endpoint, max_inflight=40, timeout=0.5)
        for i in range(40):  # 4 s of viewer time, acknowledged 4 at a time
            b.save(np.full((8, 8), i, np.uint16), f"exit/t{i}.tif")
        started = time.monotonic()
        b.close()
        assert time.monotonic() - started < 3.0
    finally:
        rx.stop()


def test_a_request_that_times_out_gives_up_only_itself():
    """request() on a receiver busy with a slow viewer gave up every frame in flight when it
    timed out (the receiver was called lost), although the receiver was fine."""
    with slow_viewer(delay=0.3, count=8, timeout=30) as (b, _frames):
        with pytest.raises(ReceiverLostError, match="given up"):
            b.request("report", timeout=0.5)
        assert b.sender.inflight > 0


def test_flush_waits_for_a_slow_receiver_that_keeps_answering():
    """flush() gave up after `timeout` in all, and so lost the frames still in flight at a
    receiver that was slow but kept acknowledging; now only `timeout` without an answer
    gives up."""
    with slow_viewer(delay=0.2, count=16, timeout=2) as (b, _frames):
        started = time.monotonic()
        b.flush()
        assert time.monotonic() - started > 2  # longer than `timeout` in all


def test_close_unlinks_every_segment(receiver_proc):
    b = NapariStreamingBackend(receiver_proc.endpoint)
    for i in range(5):
        b.save(np.zeros((100 * (i + 1), 100), np.float64), f"c/{i}.tif")
    mine = [s for s in list_segments(["napari_"]) if s.pid == os.getpid()]
    assert mine, "the pool should hold segments while open"
    b.close()
    assert not [s for s in list_segments(["napari_"]) if s.pid == os.getpid()]


@pytest.mark.parametrize("ending", ["exit", "gc"])
def test_segments_released_at_interpreter_exit_and_on_garbage_collection(receiver_proc, ending):
    """No close() at all: the atexit hook (or the pool's finalizer) still unlinks."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import gc, os, numpy as np
        from polystore.streaming import NapariStreamingBackend, list_segments
        b = NapariStreamingBackend({receiver_proc.endpoint!r})
        for i in range(3):
            b.save(np.zeros((256, 256), np.uint16), f"exit/{{i}}.tif")
        mine = [s for s in list_segments(["napari_"]) if s.pid == os.getpid()]
        assert mine, "segments exist while streaming"
        if {ending!r} == "gc":
            b.flush()
            del b
            gc.collect()
            left = [s for s in list_segments(["napari_"]) if s.pid == os.getpid()]
            assert not left, left
        print(os.getpid())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())
    assert [s for s in list_segments(["napari_"]) if s.pid == pid] == []


def test_numpy_roi_coordinates_and_pickled_backend_for_workers(backend):
    import pickle

    coords = np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    backend.save([{"kind": "polygon", "coords": coords}, {"kind": "point",
                  "coords": [[np.float64(1), np.int64(2)]]}], "np/t1.roi.zip")
    backend.save(np.zeros((4, 4), np.uint8), "np/t1.tif")
    backend.flush()
    clone = pickle.loads(pickle.dumps(backend))  # what Dask does with a task's arguments
    try:
        assert clone.endpoint == backend.endpoint and clone.options == backend.options
        clone.save(np.ones((4, 4), np.uint8), "np/t2.tif")
        clone.flush()
    finally:
        clone.close()
    report = backend.request("report")
    assert report["roi_sets"][-1]["n"] == 2
    assert [g["path"] for g in report["received"]] == ["np/t1.tif", "np/t2.tif"]


def test_lease_computes_in_shared_memory_and_sends_without_a_copy(backend):
    a = sample("uint16", (64, 80), seed=3)
    with backend.lease("lease/t001.tif", a.shape, "uint16", axes={"t": 1}) as frame:
        assert frame.shape == a.shape and frame.dtype == np.uint16
        mine = [s.name for s in list_segments(["napari_"]) if s.pid == os.getpid()]
        assert any(n.startswith(backend.sender.pool.prefix) for n in mine)
        np.copyto(frame, a)  # a pipeline would compute into it (out=frame)
    with pytest.raises(RuntimeError, match="boom"):  # an error sends nothing
        with backend.lease("lease/t002.tif", (4, 4), "float32") as frame:
            raise RuntimeError("boom")
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    with backend.lease("lease/t003.tif", b.shape, "float32") as frame:
        frame[...] = b
    got = received(backend)
    assert [g["path"] for g in got] == ["lease/t001.tif", "lease/t003.tif"]
    assert [g["digest"] for g in got] == [digest(a), digest(b)]
    assert got[0]["axes"] == {"t": 1}
    assert backend.sender.inflight == 0 and backend.sender.pool.busy_count == 0
    with pytest.raises(UnstreamableDataError, match="lease"):
        backend.lease("lease/table.csv", (4, 4))
    with pytest.raises(UnstreamableDataError, match="dtype"):
        backend.lease("lease/c.tif", (4, 4), "complex64")
    for shape in [(), (-1, 3), 3.5, (2,) * 9]:  # a bare ValueError, or truncated to 3
        with pytest.raises(UnstreamableDataError, match=r"shape must be 1 to 8 whole numbers"):
            backend.lease("lease/s.tif", shape)


def test_lease_falls_back_to_a_copy_for_inline_transport(receiver_proc):
    with NapariStreamingBackend(receiver_proc.endpoint, transport="inline") as b:
        b.request("clear")
        with b.lease("inl/t0.tif", (5, 6), "uint8") as frame:
            frame[...] = 7
        got = received(b)
    assert [g["digest"] for g in got] == [digest(np.full((5, 6), 7, np.uint8))]


def test_close_in_another_thread_during_a_lease_leaves_the_lease_usable():
    """close() unmapped a segment a lease in another thread was still writing into, and the
    process died of SIGSEGV on the next write (a Ctrl-C leaving `with backend:` while a worker
    thread computes into its lease). The write must land, the block must end with the
    sender's "closed" error, and no segment may stay behind."""
    script = textwrap.dedent("""
        import sys, threading, time
        import numpy as np
        from polystore.streaming import NapariStreamingBackend, receiver_for
        rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                          on_frame=lambda f: None).start()
        backend = NapariStreamingBackend(rx.endpoint)
        backend.save(np.zeros((4, 4), np.uint8), "warm/t0.tif")  # handshake done
        inside, outcome = threading.Event(), []
        def worker():
            try:
                with backend.lease("l/t0.tif", (512, 512), "uint16") as frame:
                    inside.set()
                    time.sleep(0.5)
                    frame[...] = 7  # after close(): must still be mapped
                    outcome.append(int(frame[-1, -1]))
            except RuntimeError as exc:
                outcome.append(str(exc))
        thread = threading.Thread(target=worker)
        thread.start()
        inside.wait(10)
        backend.close()
        thread.join(10)
        rx.stop()
        print(outcome)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    written, error = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own print
    assert written == 7
    assert "closed" in error


def test_the_end_of_a_lease_raises_an_earlier_rejection_and_sends_nothing():
    """With shared memory the end of a lease() block sent its frame without raising the
    receiver's rejection of an earlier one, which inline transport (and save()) raised
    first, as docs/streaming.md says."""
    bad = {"type": "error", "v": 1, "seq": 0, "code": "bad_shape", "message": "frame 0 is wrong"}

    class SharedMemoryReceiver(ScriptedReceiver):
        def answer(self, identity, message):
            reply = super().answer(identity, message)
            if message["type"] == "hello":
                reply["shm"] = True  # segments are never read here: only names matter
            if message.get("seq") == 0:
                time.sleep(0.3)  # the rejection comes back while the lease below is open
            return reply

    with SharedMemoryReceiver(answers={0: bad}) as rx:
        b = NapariStreamingBackend(rx.endpoint)
        try:
            b.save(np.zeros((4, 4), np.uint8), "r/t0.tif")
            with pytest.raises(FrameRejectedError, match="frame 0 is wrong"):
                with b.lease("r/t1.tif", (4, 4), "uint8") as frame:
                    frame[...] = 1
                    time.sleep(0.8)
            assert b.sender.stats.frames == 1
            assert b.sender.pool.busy_count == 0
            b.save(np.zeros((4, 4), np.uint8), "r/t2.tif")  # and the stream goes on
            b.flush()
        finally:
            b.close()
    assert [m["path"] for m in rx.seen if m["type"] == "frame"] == ["r/t0.tif", "r/t2.tif"]


def test_an_infinite_timeout_waits_without_limit():
    """timeout=float("inf") was accepted, then the first wait for credits overflowed
    ZeroMQ's int of milliseconds (OverflowError out of save()); flush(inf) too."""
    slow = receiver_for(NapariStreamingBackend, free_endpoint(),
                        on_frame=lambda frame: time.sleep(0.05)).start()
    try:
        with NapariStreamingBackend(slow.endpoint, max_inflight=2, timeout=float("inf"),
                                    connect_timeout=float("inf")) as b:
            for i in range(6):  # the window fills: every save from the third waits
                b.save(np.zeros((8, 8), np.uint8), f"inf/t{i}.tif")
            b.flush(timeout=float("inf"))
            assert b.sender.stats.acked == 6
        with pytest.raises(ValueError, match=r"timeout must be a number of seconds > 0"):
            NapariStreamingBackend(slow.endpoint, timeout=float("nan"))
    finally:
        slow.stop()


@pytest.mark.parametrize("policy", ["block", "latest", "raise"])
def test_a_save_that_needs_the_memory_of_its_own_open_lease_never_waits(receiver_proc, policy):
    """A save inside a lease() block whose segment holds the byte budget waited `timeout`
    for acks that could never come (nothing was in flight), then declared the healthy
    receiver lost and handshook again. It is refused at once (dropped under 'latest'), and
    the lease's own frame still goes."""
    frame = (1024, 1024)  # 2 MiB: two do not fit in 3 MiB
    with NapariStreamingBackend(receiver_proc.endpoint, policy=policy, timeout=3,
                                max_inflight_bytes=3 * 2**20) as b:
        b.request("clear")
        with b.lease("own/t0.tif", frame, "uint16") as leased:
            leased[...] = 1
            started = time.monotonic()
            if policy == "latest":
                b.save(np.zeros(frame, np.uint16), "own/t1.tif")
                assert b.sender.stats.dropped == 1
            else:
                with pytest.raises(BackpressureError, match="open lease.. blocks hold the "
                                   "shared memory .*max_inflight_bytes=3,145,728"):
                    b.save(np.zeros(frame, np.uint16), "own/t1.tif")
            assert time.monotonic() - started < 1.0
        got = received(b)
        assert [g["path"] for g in got] == ["own/t0.tif"]
        assert b.sender.stats.handshakes == 1 and b.sender.stats.lost == 0


@pytest.mark.parametrize("timeout", [5.0, float("inf")])
def test_threads_whose_leases_exceed_the_budget_wait_for_each_other(receiver_proc, timeout):
    """Threads leasing more than max_inflight_bytes at once: a lease that found the memory
    held by the others' blocks waited for acks that could not come, holding the sender's
    lock, so the other blocks could not end either; after `timeout` it declared the
    receiver lost and frames were lost. Now it waits for another block to end (without a
    limit too: a condition's wait overflows past threading.TIMEOUT_MAX)."""
    with NapariStreamingBackend(receiver_proc.endpoint, timeout=timeout,
                                max_inflight_bytes=2 * 2**20 + 8192) as b:  # two 1 MiB frames
        b.request("clear")
        errors = []

        def worker(k: int) -> None:
            for t in range(3):
                try:
                    with b.lease(f"th{k}/t{t}.tif", (512, 1024), "uint16") as leased:
                        leased[...] = 10 * k + t
                        time.sleep(0.1)  # a pipeline step computing into it
                except Exception as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        got = received(b)
        assert sorted(g["path"] for g in got) == sorted(
            f"th{k}/t{t}.tif" for k in range(3) for t in range(3))
        assert b.sender.stats.handshakes == 1 and b.sender.stats.lost == 0


# -- regressions found in review ---------------------------------------------------------------


def test_frame_answered_hello_required_makes_flush_raise():
    # a receiver that lost track of this sender (restarted) while the connection stayed up
    forgot = {"type": "error", "v": 1, "seq": 1, "code": "hello_required",
              "message": "send hello first (receiver restarted?)"}
    with ScriptedReceiver(answers={1: forgot}) as rx:
        b = NapariStreamingBackend(rx.endpoint)
        try:
            b.save(np.zeros((4, 4), np.uint8), "h/0.tif")
            b.flush()
            b.save(np.zeros((4, 4), np.uint8), "h/1.tif")
            with pytest.raises(ReceiverLostError, match="restarted"):
                b.flush()
            b.save(np.zeros((4, 4), np.uint8), "h/2.tif")  # handshakes again, then sends
            b.flush()
            assert [m["type"] for m in rx.seen] == ["hello", "frame", "frame", "hello", "frame"]
            assert b.sender.stats.handshakes == 2
        finally:
            b.close()


def test_every_rejected_frame_is_heard_of_not_only_the_first():
    """Four frames rejected together: flush raised for the first, and the next flush passed,
    so the other three rejections were never heard of."""

    class RejectsFourAtOnce(ScriptedReceiver):
        held: tuple = ()

        def answer(self, identity: bytes, message: dict) -> dict | None:
            if message["type"] != "frame":
                return super().answer(identity, message)
            self.held += (message["seq"],)
            if len(self.held) == 4:  # after the fourth frame: no save() sees these early
                for seq in self.held:
                    self.send(identity, {"type": "error", "v": 1, "seq": seq,
                                         "code": "bad_shape", "message": f"frame {seq} is wrong"})

    with RejectsFourAtOnce() as rx:
        b = NapariStreamingBackend(rx.endpoint)
        try:
            for n in range(4):
                b.save(np.zeros((4, 4), np.uint8), f"rej/{n}.tif")
            with pytest.raises(FrameRejectedError, match=r"message 0: frame 0 is wrong "
                                                         r"\(and 3 more since: 1, 2, 3\)"):
                b.flush()
            b.flush()  # each was said once
            assert b.sender.stats.rejected == 4
        finally:
            b.close()


def test_errors_without_a_seq_do_not_keep_a_silent_receiver_waited_for():
    """A receiver that acknowledges nothing but sends an error without `seq` now and then:
    each one counted as an answer, so flush() (and request(), and a save() waiting for
    credits) waited for ever instead of `timeout` seconds."""

    class ChatteringErrors(ScriptedReceiver):
        peer, last = None, 0.0

        def answer(self, identity: bytes, message: dict) -> dict | None:
            if message["type"] != "frame":
                return super().answer(identity, message)
            self.peer = identity  # never acked
            return None

        def tick(self) -> None:
            if self.peer is not None and time.monotonic() - self.last > 0.2:
                self.last = time.monotonic()
                self.send(self.peer, {"type": "error", "v": 1, "seq": None,
                                      "code": "bad_json", "message": "unreadable header"})

    with ChatteringErrors() as rx:
        b = NapariStreamingBackend(rx.endpoint, timeout=1)
        outcome: dict = {}

        def flush() -> None:
            try:
                b.flush()
            except Exception as exc:  # noqa: BLE001 - the outcome is checked below
                outcome["error"] = exc

        waiter = threading.Thread(target=flush, daemon=True)
        try:
            b.save(np.zeros((4, 4), np.uint8), "chat/0.tif")
            waiter.start()
            waiter.join(30)  # a generous bound: the fault is waiting for ever
            assert not waiter.is_alive(), "flush() still waits on a receiver that acks nothing"
            assert isinstance(outcome.get("error"), ReceiverLostError), outcome
        finally:
            rx.__exit__()
            if waiter.is_alive():
                waiter.join(10)
            b.close()


def test_an_error_without_seq_says_the_receiver_could_not_read_a_message():
    """It said 'rejected message None'."""
    unreadable = {"type": "error", "v": 1, "seq": None, "code": "too_large",
                  "message": "header of 70000 bytes exceeds 65536"}
    with ScriptedReceiver(answers={0: unreadable}) as rx:
        b = NapariStreamingBackend(rx.endpoint, timeout=1)
        try:
            b.save(np.zeros((4, 4), np.uint8), "u/0.tif")
            with pytest.raises(ReceiverLostError):  # its credit never comes back
                b.flush()
            with pytest.raises(FrameRejectedError, match=r"rejected a message it could not "
                                                         r"read \(no seq\): header of 70000"):
                b.flush()
        finally:
            b.close()


def test_the_save_after_a_receiver_left_says_what_was_lost_before_reconnecting():
    """The receiver closed with a frame unacknowledged: the next save() tried to reconnect and
    raised 'no napari receiver answered' after connect_timeout, and the loss of the frame
    came only at flush(). The next save() says so first (docs/streaming.md)."""

    class LeavesAtFrame3(ScriptedReceiver):
        gone = threading.Event()

        def answer(self, identity: bytes, message: dict) -> dict | None:
            if message["type"] != "frame" or message["seq"] < 3:
                return super().answer(identity, message)
            self._sock.close(linger=0)  # the viewer was closed with frame 3 unread
            self.gone.set()
            self._stop.set()
            return None

    with LeavesAtFrame3() as rx:
        b = NapariStreamingBackend(rx.endpoint, timeout=2, connect_timeout=2)
        try:
            for n in range(3):
                b.save(np.zeros((4, 4), np.uint8), f"gone/{n}.tif")
            b.flush()
            b.save(np.zeros((4, 4), np.uint8), "gone/3.tif")
            assert rx.gone.wait(10)
            first = None
            for n in range(4, 40):  # a save before the close is seen may still go (and be lost)
                try:
                    b.save(np.zeros((4, 4), np.uint8), f"gone/{n}.tif")
                except (ReceiverLostError, ViewerNotRunningError) as exc:
                    first = exc
                    break
                time.sleep(0.25)
            assert isinstance(first, ReceiverLostError), first  # the loss, before reconnecting
            assert re.search(r"\d+ message\(s\) were not acknowledged", str(first)), first
            with pytest.raises(ViewerNotRunningError):  # and then: nobody is there
                b.save(np.zeros((4, 4), np.uint8), "gone/last.tif")
        finally:
            b.close()


@pytest.mark.parametrize("policy", ["raise", "latest"])
def test_policies_count_acks_that_already_arrived(receiver_proc, policy):
    with NapariStreamingBackend(receiver_proc.endpoint, policy=policy, max_inflight=1) as b:
        for i in range(10):
            b.save(np.zeros((64, 64), np.uint16), f"pol/{i}.tif")
            time.sleep(0.02)  # the receiver has long acknowledged the previous frame
        b.flush()
        assert b.sender.stats["dropped"] == 0


def test_lease_gives_its_segment_back_when_the_viewer_left():
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None)
    rx.start()
    b = NapariStreamingBackend(rx.endpoint, connect_timeout=0.3)
    try:
        b.save(np.zeros((8, 8), np.uint8), "l/0.tif")
        b.flush()
        with pytest.raises((ReceiverLostError, ViewerNotRunningError)):
            with b.lease("l/1.tif", (512, 512), "uint16"):
                rx.stop()
                time.sleep(0.3)
        assert b.sender.pool.busy_count == 0
    finally:
        b.close()


def test_sender_applies_the_receivers_limits_before_sending():
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None,
                      max_frame_bytes=1000).start()
    try:
        with NapariStreamingBackend(rx.endpoint, transport="inline") as b:
            b.save(np.zeros(10, np.uint8), "lim/ok.tif")
            with pytest.raises(UnstreamableDataError, match="too_large|exceeds"):
                b.save(np.zeros(200_000, np.uint8), "lim/big.tif")
            with pytest.raises(UnstreamableDataError, match="stream"):
                b.save(np.zeros(10, np.uint8), "lim/long.tif", stream="x" * 300)
            with pytest.raises(UnstreamableDataError, match="axis_names"):
                b.save(np.zeros(10, np.uint8), "lim/ax.tif", axes={"t": 1}, axis_names=["c"])
            b.save(np.zeros(10, np.uint8), "lim/ok2.tif")  # still connected, nothing lost
            b.flush()
            assert rx.stats.frames == 2
    finally:
        rx.stop()


def test_refused_handshake_says_why(local_receiver):
    fiji = FijiStreamingBackend(local_receiver.endpoint)  # a napari receiver: wrong prefix
    try:
        with pytest.raises(ViewerNotRunningError, match="refused the handshake"):
            fiji.save(np.zeros((4, 4), np.uint8), "x.tif")
    finally:
        fiji.close()


def test_odd_byte_budget_and_zero_timeouts(receiver_proc):
    with NapariStreamingBackend(receiver_proc.endpoint, max_inflight_bytes=10_000) as b:
        b.save(np.zeros(9_000, np.uint8), "odd/0.tif")  # 9,000 B needs a 12 KiB segment
        b.flush()
        t = time.perf_counter()
        b.flush(timeout=0)
        assert time.perf_counter() - t < 0.5


def test_request_without_an_answer_raises():
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                      report=lambda: time.sleep(1.5) or {}).start()
    try:
        with NapariStreamingBackend(rx.endpoint, policy="latest") as b:
            with pytest.raises(ReceiverLostError, match="did not answer"):
                b.request("report", timeout=0.3)
    finally:
        rx.stop()


def test_threads_saving_first_share_one_sender(receiver_proc):
    import threading

    b = NapariStreamingBackend(receiver_proc.endpoint)
    senders = []
    barrier = threading.Barrier(4)

    def first_save(i: int) -> None:
        barrier.wait()
        b.save(np.zeros((8, 8), np.uint8), f"thr/{i}.tif")
        senders.append(b.sender)

    threads = [threading.Thread(target=first_save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    try:
        assert len({id(s) for s in senders}) == 1
        b.flush()
    finally:
        b.close()


# -- value objects: options and per-stream metadata, checked once ----------------------------


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"connect_timeout": -1}, {"max_inflight": True},
                                 {"max_inflight_bytes": 1.5}, {"policy": "newest"},
                                 {"transport": "udp"}, {"auth": "nobody"}])
def test_bad_sender_options_fail_when_the_backend_is_made(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        NapariStreamingBackend("tcp://127.0.0.1:9", **bad)


@pytest.mark.parametrize("endpoint", ["foo", 12, "tcp://localhost", "tcp://127.0.0.1:abc",
                                      "tcp://*:5555", "ipc://", "udp://127.0.0.1:5",
                                      "inproc://napari"])
def test_an_endpoint_no_receiver_can_be_at_fails_when_the_backend_is_made(endpoint,
                                                                          monkeypatch):
    """The endpoint was taken as given and the first save() raised ZeroMQ's own error
    (ZMQError 'Invalid argument (addr=...)', or TypeError for a non-str), saying neither
    what was wrong nor what to do; docs/streaming.md says bad values fail when the backend
    is made. The same for $POLYSTORE_NAPARI_ENDPOINT, which the error names."""
    with pytest.raises(ValueError, match=r"cannot stream to endpoint .*Use tcp://HOST:PORT"):
        NapariStreamingBackend(endpoint)
    if isinstance(endpoint, str):
        monkeypatch.setenv("POLYSTORE_NAPARI_ENDPOINT", endpoint)
        with pytest.raises(ValueError, match=r"from \$POLYSTORE_NAPARI_ENDPOINT"):
            NapariStreamingBackend()
    for good in ("tcp://localhost:9", "tcp://[::1]:9", "ipc:///tmp/x", "ipc://@x"):
        assert NapariStreamingBackend(good).endpoint == good


def test_numpy_numbers_and_huge_whole_numbers_are_good_sender_options(receiver_proc):
    """max_inflight=np.int64(4) and timeout=np.float32(5) were refused with "must be a whole
    number >= 1, got np.int64(4)" (a message that contradicts itself), and a whole number of
    seconds too large for a float (connect_timeout=10**400, "no limit") passed the check and
    made every save() raise OverflowError. They are stored as int and float."""
    import pickle

    options = SenderOptions(max_inflight=np.int64(4), max_inflight_bytes=np.uint32(2**20),
                            timeout=np.float32(5), connect_timeout=10**400)  # fmt: skip
    assert options == SenderOptions(max_inflight=4, max_inflight_bytes=2**20, timeout=5.0,
                                    connect_timeout=float("inf"))  # fmt: skip
    assert type(options.max_inflight) is int and type(options.timeout) is float
    original = NapariStreamingBackend(receiver_proc.endpoint, max_inflight=np.int64(4),
                                      timeout=np.float32(5), connect_timeout=10**400)
    with pickle.loads(pickle.dumps(original)) as b:  # as a worker process would get it
        b.save(np.ones((8, 8), np.uint16), "np/t0.tif")
        b.flush()
        assert b.sender.stats.acked == 1
    for bad in (np.bool_(True), np.float64("nan"), np.int64(0), "5"):
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
            SenderOptions(timeout=bad)


def test_a_call_timeout_that_is_not_seconds_is_refused_before_anything_is_given_up():
    """flush(timeout=-1) declared the receiver lost at once and gave up every frame in
    flight (stats.lost), though the receiver was answering; flush/request(timeout="5")
    raised TypeError from inside the wait loop, and 10**400 OverflowError. A call's own
    timeout is checked like the backend's (0 still means: do not wait)."""
    rx = start_receiver(delay=0.3)  # every frame is acknowledged 0.3 s after it arrives
    try:
        with NapariStreamingBackend(rx.endpoint) as b:
            for t in range(3):
                b.save(np.ones((8, 8), np.uint16), f"tmo/t{t}.tif")
            for bad in (-1, float("nan"), "5", True):
                with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
                    b.flush(timeout=bad)
                with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
                    b.request("report", timeout=bad)
            b.flush(timeout=10**400)
            assert b.sender.stats.lost == 0 and b.sender.stats.acked == 3
            assert b.request("report", timeout=np.float32(30))["frames"] == 3
    finally:
        rx.stop()


def test_options_are_stored_once_and_pickled_as_configuration():
    import pickle

    backend = NapariStreamingBackend("tcp://127.0.0.1:9", policy="latest", max_inflight=3)
    assert backend.options == SenderOptions(policy="latest", max_inflight=3)
    clone = pickle.loads(pickle.dumps(backend))
    assert clone.options == backend.options and clone.endpoint == backend.endpoint


def test_stream_metadata_is_built_once_per_stream_and_reused():
    backend = NapariStreamingBackend("tcp://127.0.0.1:9")
    first = backend.stream_meta("A01/t001.tif", axis_names=["t", "y", "x"], colormap="green")
    again = backend.stream_meta("A01/t002.tif", axis_names=["t", "y", "x"], colormap="green")
    assert again is first and first.stream == "A01" and first.display.colormap == "green"
    assert backend.stream_meta("A02/t001.tif") is not first
    with pytest.raises(UnstreamableDataError, match="B01/t001.tif"):
        backend.stream_meta("B01/t001.tif", opacity=2.0)
    with pytest.raises(TypeError, match="colourmap"):
        backend.stream_meta("B01/t001.tif", colourmap="red")


def test_whether_a_display_hint_is_refused_does_not_depend_on_earlier_saves():
    """The cache of checked stream metadata keyed hints by value, and True == 1: opacity=True
    and rgb=0 are refused on their own, but were accepted (as 1.0 and False) once a save
    with opacity=1 or rgb=False had been cached."""
    backend = NapariStreamingBackend("tcp://127.0.0.1:9")
    for good, bad in [({"opacity": 1}, {"opacity": True}), ({"rgb": False}, {"rgb": 0}),
                      ({"opacity": 0.0}, {"opacity": False})]:
        with pytest.raises(UnstreamableDataError, match="bad display hint"):
            backend.stream_meta("hint/t0.tif", **bad)
        backend.stream_meta("hint/t0.tif", **good)
        with pytest.raises(UnstreamableDataError, match="bad display hint"):
            backend.stream_meta("hint/t1.tif", **bad)
    same = backend.stream_meta("hint/t2.tif", contrast_limits=[0, 1])
    assert backend.stream_meta("hint/t3.tif", contrast_limits=(0.0, 1.0)) is same


def test_axis_names_as_a_string_or_a_generator(backend):
    """axis_names="tc" was split into letters (and "time" into t, i, m, e), and a generator
    was used up by the cache key, so the header got no names: both then failed with a
    puzzling "must name every key of axes", or not at all."""
    with pytest.raises(UnstreamableDataError, match="must be a list of names.*'time'"):
        backend.save(np.zeros((2, 2), np.uint8), "names/a.tif", axes={"time": 0},
                     axis_names="time")
    names = (name for name in ["t", "c"])
    backend.save(np.zeros((2, 2), np.uint8), "names/b.tif", axes={"t": 1, "c": 0},
                 axis_names=names)
    backend.flush()
    assert backend.stream_meta("names/c.tif", axis_names=["t", "c"]).axis_names == ["t", "c"]


def test_frame_positions_are_checked_per_frame_and_numpy_indices_travel(backend):
    img = np.zeros((4, 4), np.uint8)
    backend.save(img, "pos/t001.tif", axes={"t": np.int64(1), "c": np.uint8(2)})
    for axes, problem in [({"t": -1}, "0 to 1,000,000"), ({"t": 1.5}, "whole number"),
                          ({"": 1}, "1 to 32 characters"), ({"t": True}, "whole number")]:
        with pytest.raises(UnstreamableDataError, match=problem):
            backend.save(img, "pos/t002.tif", axes=axes)
    with pytest.raises(UnstreamableDataError, match="must name every key"):
        backend.save(img, "pos/t003.tif", axes={"z": 1}, axis_names=["t", "y", "x"])
    got = received(backend)
    assert [(g["path"], g["axes"]) for g in got] == [("pos/t001.tif", {"t": 1, "c": 2})]


def test_sender_state_follows_the_handshake_and_the_receiver():
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None)
    rx.start()
    backend = NapariStreamingBackend(rx.endpoint, timeout=2, connect_timeout=0.3)
    try:
        assert backend.sender.state is State.CLOSED
        backend.save(np.zeros((4, 4), np.uint8), "state/t0.tif")
        backend.flush()
        assert backend.sender.state is State.CONNECTED
        assert backend.sender.stats.handshakes == 1 and backend.sender.stats.acked == 1
        rx.stop()
        time.sleep(0.3)  # the socket's monitor reports the disconnect
        with pytest.raises(ViewerNotRunningError):  # noticed before sending; no one answers
            backend.save(np.zeros((4, 4), np.uint8), "state/t1.tif")
        assert backend.sender.state is State.CLOSED
    finally:
        backend.close()
        rx.stop()


@pytest.mark.parametrize("code", ["bad_segment", "hello_required"])
def test_a_hello_answered_by_an_error_leaves_the_sender_refused(code):
    """A receiver answering every hello with an error refuses the handshake, whatever the
    code. With hello_required the sender took it for a restarted receiver and said hello
    again at once, thousands of times a second (each with a probe segment made and
    unlinked), until connect_timeout said nobody answered."""
    refusal = {"type": "error", "v": 1, "seq": None, "code": code, "message": "not you"}

    class Refusing(ScriptedReceiver):
        def answer(self, identity: bytes, message: dict) -> dict:  # every hello: an error
            return refusal

    with Refusing() as rx:
        backend = NapariStreamingBackend(rx.endpoint, connect_timeout=2)
        try:
            with pytest.raises(ViewerNotRunningError, match="refused the handshake"):
                backend.save(np.zeros((4, 4), np.uint8), "r/t0.tif")
            assert backend.sender.state is State.REFUSED
            assert backend.sender.pool.busy_count == 0
            assert [m["type"] for m in rx.seen] == ["hello"]
        finally:
            backend.close()


def test_pool_reuses_the_segment_released_last():
    """An idle pipe keeps writing one warm segment (pages mapped, in cache) instead of
    cycling through all of them; a smaller segment that fits still wins over a larger one."""
    from polystore.streaming.shm import SegmentPool

    pool = SegmentPool("polystore_", 1 << 22)
    try:
        names = [pool.acquire(seq, 8192).name for seq in range(3)]
        for seq in range(3):
            pool.release(seq)
        assert pool.acquire(3, 8192).name == names[2]  # old code: names[0], the oldest
        pool.release(3)
        big = pool.acquire(4, 65536).name
        pool.release(4)  # released last, but larger than needed
        assert pool.acquire(5, 8192).name == names[2]
        assert pool.acquire(6, 65536).name == big
    finally:
        pool.close()


# -- acks batched under load (issue 10: fewer messages per frame) ------------------------------


@contextlib.contextmanager
def _stuck_receiver(batch_acks: bool, first_frame: list[bytes] | None = None):
    """A receiver whose viewer is stuck on the first frame (sent here by a raw client that
    said hello) until `release` is set, so the frames sent meanwhile queue up and are read in
    one go afterwards. Yields (receiver, client, release)."""
    release, first = threading.Event(), threading.Event()

    def on_frame(_frame):
        if not first.is_set():
            first.set()
            release.wait(10)

    receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=on_frame)
    receiver.start()
    client = RawClient(receiver.endpoint)
    try:
        assert isinstance(_inline_hello(client, batch_acks), p.Welcome)
        client.sock.send_multipart(first_frame or _inline_frame(1))
        assert first.wait(5)
        yield receiver, client, release
    finally:
        release.set()
        client.close()
        receiver.stop()


def _inline_hello(client: RawClient, batch_acks: bool):
    """A hello without a probe (frames travel inline), asking for batched acks or not."""
    return client.request({"v": 1, "type": "hello", "sender": client.token, "pid": os.getpid(),
                           "viewer": "napari", "segment_prefix": client.prefix,
                           "batch_acks": batch_acks})


def _inline_frame(seq: int) -> list[bytes]:
    return [json.dumps(frame(seq=seq)).encode(), bytes(16)]


def _replies(client: RawClient, count: int) -> list:
    replies = []
    while len(replies) < count:
        assert client.sock.poll(5000), f"receiver answered {len(replies)} of {count} replies"
        replies.append(p.decode_receiver_message(client.sock.recv()))
    return replies


@pytest.mark.parametrize("batch", [True, False])
def test_acks_of_queued_frames_are_batched_only_for_senders_that_ask(batch):
    with _stuck_receiver(batch) as (receiver, client, release):
        for seq in range(2, 11):  # queue up behind the stuck viewer
            client.sock.send_multipart(_inline_frame(seq))
        time.sleep(0.3)
        release.set()
        acks = [_replies(client, 1)[0]]
        while sum(1 + len(a.also) for a in acks) < 10:
            acks += _replies(client, 1)
        assert all(isinstance(a, p.Ack) for a in acks)
        assert sorted(s for a in acks for s in (a.seq, *a.also)) == list(range(1, 11))
        if batch:  # one ack for frame 1, then at most ACK_BATCH frames per ack
            assert len(acks) <= 1 + -(-9 // ACK_BATCH)
            assert max(1 + len(a.also) for a in acks) <= ACK_BATCH
        else:
            assert len(acks) == 10 and not any(a.also for a in acks)
        assert receiver.stats.frames == 10


def test_held_acks_leave_before_any_other_reply():
    with _stuck_receiver(True) as (_receiver, client, release):
        client.sock.send_multipart(_inline_frame(2))
        client.sock.send_multipart(_inline_frame(3))
        client.sock.send(json.dumps({"v": 1, "type": "control", "seq": 4,
                                     "command": "report"}).encode())
        client.sock.send_multipart([json.dumps(frame(seq=5, nbytes=15)).encode(), bytes(16)])
        time.sleep(0.3)
        release.set()
        replies = _replies(client, 4)
        assert [type(r) for r in replies] == [p.Ack, p.Ack, p.Report, p.Error]
        assert (replies[0].seq, replies[0].also) == (1, [])
        assert (replies[1].seq, replies[1].also) == (2, [3])
        assert replies[2].state["frames"] == 3  # the report counts the frames before it
        assert replies[3].seq == 5 and replies[3].code == p.BAD_SHAPE


def test_acks_of_large_frames_are_never_held():
    """Holding an ack makes its sender wait for the copies of the frames after it: for large
    frames that costs more than the ack saves (2048x2048 streamed at 0.7x its speed)."""
    big = ACK_BATCH_BYTES // 2  # two of them reach the bound
    header = frame(shape=[big], nbytes=big)

    def large(seq: int) -> list[bytes]:
        return [json.dumps({**header, "seq": seq}).encode(), bytes(big)]

    with _stuck_receiver(True, large(1)) as (_receiver, client, release):
        for seq in range(2, 6):
            client.sock.send_multipart(large(seq))
        time.sleep(0.5)
        release.set()
        acks = _replies(client, 3)
        assert [(a.seq, a.also) for a in acks] == [(1, []), (2, [3]), (4, [5])]




_RAW_SENDER = """
import sys, time
from polystore.testing.receiver import RawClient, user_curve
if sys.argv[2] == "arrive":
    sys.stdin.readline()  # connect when told
client = RawClient(sys.argv[1], curve=user_curve())
if sys.argv[2] == "leave":  # say hello, send ROIs (the viewer callback blocks), go away
    assert client.hello()["type"] == "welcome"
    client.send({"v": 1, "type": "rois", "seq": client.next_seq(), "stream": "x",
                 "path": "x.roi.zip", "sent_ns": 0,
                 "rois": [{"kind": "point", "coords": [[1, 1]]}]})
    time.sleep(0.2)
    client.close()
else:  # say hello while the receiver is still busy, then send a frame once welcomed
    client.send({"v": 1, "type": "hello", "sender": client.token, "pid": client.pid,
                 "viewer": "fiji", "segment_prefix": client.prefix, "versions": [1]})
    print("HELLO SENT", flush=True)
    assert client.recv(10)["type"] == "welcome"
    time.sleep(0.3)  # the receiver has read the departed connection's events by now
    print("REPLY", client.request(client.frame(), b"\\0" * 6)["type"], flush=True)
    client.close()
"""


def _socket_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:
            pass
    return fds



def test_a_sender_that_takes_over_a_closed_connections_descriptor_keeps_its_session():
    """A sender leaves while the receiver is busy (inside a viewer callback), and the next
    one connects, gets the same file descriptor and says hello before the receiver has read
    the first one's disconnect: the receiver must forget the sender that left, not the one
    that arrived (a CI run once saw `hello_required` here)."""
    from polystore.streaming import Receiver

    busy, resume = threading.Event(), threading.Event()

    def slow_viewer(rois) -> None:
        busy.set()
        resume.wait(20)

    receiver = Receiver("tcp://127.0.0.1:0", shm_prefix="fiji_", viewer="fiji",
                        on_frame=lambda f: None, on_rois=slow_viewer).start()
    fillers: list[int] = []
    try:
        before = _socket_fds()
        leaving = subprocess.Popen([sys.executable, "-c", _RAW_SENDER, receiver.endpoint,
                                    "leave"])
        assert busy.wait(20)
        (descriptor,) = _socket_fds() - before  # the receiver's end of that connection
        assert leaving.wait(30) == 0
        arriving = subprocess.Popen([sys.executable, "-c", _RAW_SENDER, receiver.endpoint,
                                     "arrive"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)  # its pipes opened before the numbers are filled
        time.sleep(0.3)  # ZeroMQ has closed the departed connection (its event is queued)
        while (fd := os.open(os.devnull, os.O_RDONLY)) != descriptor:
            fillers.append(fd)  # fill lower free numbers: the next accept gets `descriptor`
            assert fd < descriptor, "the departed connection's descriptor is still open"
        os.close(fd)
        arriving.stdin.write("go\n")
        arriving.stdin.flush()
        assert arriving.stdout.readline().strip() == "HELLO SENT"
        time.sleep(0.3)  # accepted and queued behind the callback
        resume.set()
        assert arriving.stdout.readline().split() == ["REPLY", "ack"]
        assert arriving.wait(30) == 0
    finally:
        resume.set()
        receiver.stop()
        for fd in fillers:
            os.close(fd)
