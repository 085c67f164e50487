"""Streaming benchmark: polystore save() -> a receiver process, next to memcpy and raw zmq.

Every figure comes from this one run on this machine, so the ratios are fair:

* memcpy     -- np.copyto of one frame between two warm buffers (one copy, one core)
* raw zmq    -- pyzmq PUSH -> PULL zero-copy send of the same frame to another process
* raw ring   -- the same transport with nothing else: the frame copied into the next of 8
  reused shared-memory segments, taken in turn (a ring), a 12-byte binary header over pyzmq
  DEALER -> ROUTER, the other process copies it out into a fresh array and acknowledges;
  no validation, no JSON, no policies, no authentication. Both sides do the same work on
  the pixels as in the polystore run (the sender stamps each frame, the receiver checks the
  stamp of its copy), so the ring is the floor polystore's per-frame cost is measured
  against.
* polystore  -- NapariStreamingBackend.save() into a real Receiver in another process;
  the receiver copies the frame out of shared memory, acknowledges it, then checks the
  frame's stamp (its index, written into the first and last 8 bytes by the sender).

Throughput: N saves back to back, then flush() (all acknowledged). Latency: save() call ->
the sender reads the receiver's ack (sent right after its copy is complete), measured on an
idle pipe (one frame at a time) and under full load.

    polystore bench                    # full run (about a minute)
    polystore bench --quick            # smoke run
    polystore bench --json bench.json  # also save the figures (scripts/plot_bench.py plots them)

``scripts/bench_stream.py`` runs the same code from a source checkout.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import multiprocessing as mp
import os
import platform
import queue
import secrets
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import zmq

from polystore.apps.arguments import positive_int

SHAPES = {
    "2048x2048 uint16": (2048, 2048),
    "512x512 uint16": (512, 512),
    "16x512x1024 uint16": (16, 512, 1024),
}


#: Where a run's receivers listen: TCP on loopback (the default, and all Fiji can use) or
#: a Unix socket (``--transport ipc``, napari on the same machine); the raw ring and
#: polystore always use the same one.
TRANSPORTS = ("tcp", "ipc")
LOOPBACK = "tcp://127.0.0.1:*"


def child_started() -> Any:
    """Set up a benchmark child process: Ctrl-C (sent to the whole process group by the
    terminal) is its parent's to handle, which then stops it; returns the parent, for
    `parent_gone`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return mp.parent_process()


def start_child(process: Any) -> None:
    """Start a benchmark child with Ctrl-C ignored from its first instruction (ignored
    signals stay ignored across exec; Python then installs no handler): one still importing
    when Ctrl-C comes would print a KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        process.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def parent_gone(parent: Any) -> bool:
    """The benchmark that started this child died (killed, or crashed) without stopping it:
    the child ends too instead of serving for ever. (Its pipe to the parent, not
    os.getppid(): a parent killed while the child was starting is already pid 1's.)"""
    return parent is not None and not parent.is_alive()


def wait_for_stop(stop, parent: Any) -> None:
    while not stop.wait(0.5) and not parent_gone(parent):
        pass


def receiver_process(endpoint_q, stop, result_q, listen: str = LOOPBACK) -> None:
    from polystore.streaming import NapariStreamingBackend, receiver_for

    parent = child_started()

    bad = [0, 0]

    def on_frame(frame) -> None:
        flat = frame.array.reshape(-1).view(np.uint8)
        head = int(flat[:8].view(np.int64)[0])
        tail = int(flat[-8:].view(np.int64)[0])
        bad[0] += 1
        if head != tail:
            bad[1] += 1

    receiver = receiver_for(NapariStreamingBackend, listen, on_frame=on_frame)
    receiver.start()
    endpoint_q.put(receiver.endpoint)
    wait_for_stop(stop, parent)
    receiver.stop()
    result_q.put({"checked": bad[0], "torn": bad[1]})


def stamp(frame: np.ndarray, index: int) -> None:
    flat = frame.reshape(-1).view(np.uint8)
    flat[:8].view(np.int64)[0] = index
    flat[-8:].view(np.int64)[0] = index


def sample_frames(shape, count: int = 4) -> list[np.ndarray]:
    """The random uint16 frames a run streams in turn (4: as many sources as a pipeline
    cycling through a few buffers)."""
    return [np.random.default_rng(i).integers(0, 65535, shape, dtype=np.uint16)
            for i in range(count)]


def idle_samples(nbytes: int, scale: float = 1.0) -> int:
    """How many frames the idle-pipe latency is the median of: 2,000 for frames up to 1 MiB,
    300 for larger ones. One frame at a time, the latency switches between modes that each
    last tens of milliseconds (on the 2-core VM, for the raw ring at 512²: about 110–140 and
    160–200 µs, `scripts/trace_idle.py`), so 300 small frames (about 45 ms) can all fall in
    one."""
    return max(20, int((2000 if nbytes <= 1 << 20 else 300) * scale))


def frame_arguments(parser: argparse.ArgumentParser, frames: int,
                    rounds: int | None = None) -> None:
    """The options the per-frame scripts in scripts/ share: `--size` (frames are SIZE x SIZE
    uint16), `--frames` and, given a default, `--rounds`."""
    parser.add_argument("--size", type=int, default=512, help="frames are SIZE x SIZE uint16")
    parser.add_argument("--frames", type=int, default=frames,
                        help="frames per round" if rounds else "frames")
    if rounds:
        parser.add_argument("--rounds", type=int, default=rounds)


def bench_memcpy(shape, repeats: int, working_set: bool) -> float:
    """One-core copy speed. working_set=False: the same two buffers (cache-hot, the most
    flattering baseline); True: 4 sources into 8 destinations, the memory footprint the
    streaming run has (4 frames, 8 segments, fresh receiver arrays)."""
    n_src, n_dst = (4, 8) if working_set else (1, 1)
    src = sample_frames(shape, n_src)
    dst = [np.empty_like(src[0]) for _ in range(n_dst)]
    for i in range(max(n_src, n_dst)):
        np.copyto(dst[i % n_dst], src[i % n_src])
    t = time.perf_counter()
    for i in range(repeats):
        np.copyto(dst[i % n_dst], src[i % n_src])
    return src[0].nbytes * repeats / (time.perf_counter() - t)


def _zmq_pull(endpoint: str, count: int, done: mp.Event) -> None:
    parent = child_started()
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(endpoint)
    received = 0
    while received < count:
        if sock.poll(500):
            sock.recv(copy=False)
            received += 1
        elif parent_gone(parent):  # checked only when idle: not a cost of the baseline
            break
    done.set()


def bench_raw_zmq(context, shape, count: int, listen: str = LOOPBACK) -> float:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.bind(listen)
    frame = np.random.default_rng(0).integers(0, 65535, shape, dtype=np.uint16)
    done = context.Event()
    proc = context.Process(target=_zmq_pull,
                           args=(sock.getsockopt_string(zmq.LAST_ENDPOINT), count + 5, done),
                           daemon=True)  # ended with the bench, whatever stops it
    start_child(proc)
    for _ in range(5):
        sock.send(frame, copy=False)
    t = time.perf_counter()
    for _ in range(count):
        sock.send(frame, copy=False)
    done.wait(120)
    elapsed = time.perf_counter() - t
    proc.join()
    sock.close(linger=0)
    return frame.nbytes * count / elapsed


RING_SLOTS = 8  # as many segments as polystore's max_inflight below
_RING_HEADER = struct.Struct("<qi")  # seq, slot
#: The raw ring's segments: ``<RING_PREFIX><pid>_<token>_<slot>``, shaped like a sender's, so
#: `polystore shm ls/clean` see them (and remove them if a run was killed)
RING_PREFIX = "polystoreringbench_"


def ring_prefix(name: str = RING_PREFIX) -> str:
    """A fresh prefix for one run's ring segments."""
    return f"{name}{os.getpid()}_{secrets.token_hex(4)}_"


def ring_receiver_process(endpoint_q, stop, prefix: str, nbytes: int, curve: bool = False,
                          pad: int = 0, listen: str = LOOPBACK) -> None:
    """The raw ring's receiving side: copy each frame out of its segment into a fresh array
    (as a receiver must before it acknowledges), acknowledge it, check the copy's stamp.
    `curve` and `pad` add what polystore's wire pays (scripts/bench_ring_costs.py): the
    user's CURVE authentication, and `pad` bytes on each header and ack."""
    parent = child_started()
    auth = None
    if curve:
        from polystore.streaming.auth import ServerAuth

        auth = ServerAuth("user", None, ())
        sock = auth.context.socket(zmq.ROUTER)
        auth.apply(sock)
    else:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(listen)
    endpoint_q.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    views: dict[int, memoryview] = {}
    checked = torn = 0
    while not stop.is_set():
        if not sock.poll(100, zmq.POLLIN):
            if parent_gone(parent):  # checked only when idle: not a cost of the baseline
                break
            continue
        while True:
            try:
                identity, header = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            seq, slot = _RING_HEADER.unpack(header[:_RING_HEADER.size])
            view = views.get(slot)
            if view is None:
                with open(f"/dev/shm/{prefix}{slot}", "rb") as handle:
                    views[slot] = view = memoryview(
                        mmap.mmap(handle.fileno(), nbytes, prot=mmap.PROT_READ))
            copy = np.empty(nbytes, np.uint8)
            copy[:] = np.frombuffer(view, np.uint8)
            sock.send_multipart([identity, header[:_RING_HEADER.size] + bytes(pad)])
            checked += 1
            if int(copy[:8].view(np.int64)[0]) != int(copy[-8:].view(np.int64)[0]):
                torn += 1
    sock.close(linger=0)
    if auth is not None:
        auth.close()
    endpoint_q.put({"checked": checked, "torn": torn})


def ring_segments(prefix: str, shape) -> tuple[list, list[np.ndarray]]:
    """The raw ring's RING_SLOTS segments, `<prefix><slot>` (`ring_prefix`), and a uint16
    array of `shape` on each; `close_ring_segments` unlinks them. Allocated as polystore's
    own are (a full /dev/shm is an OSError that says so, not a SIGBUS mid-run)."""
    from polystore.streaming.shm import Segment

    segments: list = []
    try:
        for i in range(RING_SLOTS):
            segments.append(Segment(f"{prefix}{i}", int(np.prod(shape)) * 2))
    except BaseException:
        close_ring_segments(segments, [])
        raise
    return segments, [np.ndarray(shape, np.uint16, buffer=s.buf) for s in segments]


def close_ring_segments(segments: list, targets: list[np.ndarray]) -> None:
    from polystore.streaming.shm import destroy

    targets.clear()  # the arrays go before the memory they view
    for segment in segments:
        destroy(segment)


def bench_raw_ring(context, shape, count: int, latency_samples: int, curve: bool = False,
                   pad: int = 0, listen: str = LOOPBACK) -> dict:
    """Throughput and idle-pipe latency of the raw ring (see the module docstring);
    `curve`, `pad` and `listen` as for `ring_receiver_process`."""
    frames = sample_frames(shape)
    nbytes = frames[0].nbytes
    prefix = ring_prefix()
    segments, targets = ring_segments(prefix, shape)
    endpoint_q, stop = context.Queue(), context.Event()
    proc = context.Process(target=ring_receiver_process,
                           args=(endpoint_q, stop, prefix, nbytes, curve, pad, listen),
                           daemon=True)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    inflight: dict[int, float] = {}  # seq -> send time; slot = seq % RING_SLOTS
    latencies: list[float] = []
    seq = 0

    def take_ack() -> None:
        acked, _slot = _RING_HEADER.unpack(sock.recv()[:_RING_HEADER.size])
        latencies.append(time.perf_counter() - inflight.pop(acked))

    def send(i: int) -> None:
        nonlocal seq
        while seq - RING_SLOTS in inflight:  # the slot's previous frame is not acked yet
            take_ack()
        slot = seq % RING_SLOTS
        inflight[seq] = time.perf_counter()
        stamp(frames[i % 4], seq)  # as bench_polystore does
        np.copyto(targets[slot], frames[i % 4])
        sock.send(_RING_HEADER.pack(seq, slot) + bytes(pad))
        seq += 1

    def drain() -> None:
        while inflight:
            take_ack()

    try:
        start_child(proc)
        if curve:
            from polystore.streaming.auth import client_keys

            client_keys("user", None).apply(sock)
        sock.connect(endpoint_q.get(timeout=30))
        for i in range(20):
            send(i)
        drain()
        latencies.clear()
        for i in range(latency_samples):
            send(i)
            drain()
        idle = sorted(latencies)
        t = time.perf_counter()
        for i in range(count):
            send(i)
        drain()
        elapsed = time.perf_counter() - t
    finally:
        stop.set()
        checked = {"checked": 0, "torn": 0}
        if proc.pid is not None:
            try:
                while "checked" not in (checked := endpoint_q.get(timeout=30)):
                    pass  # its endpoint, when the run failed before reading it
            except queue.Empty:  # the receiver died; whatever raised above says why
                checked = {"checked": 0, "torn": 0}
            proc.join(30)
        sock.close(linger=0)
        close_ring_segments(segments, targets)
    return {"fps": count / elapsed, "idle_p50_ms": 1e3 * statistics.median(idle),
            "torn": checked["torn"]}


def bench_polystore(endpoint: str, shape, count: int, latency_samples: int) -> dict:
    from polystore.streaming import NapariStreamingBackend

    frames = sample_frames(shape)
    with NapariStreamingBackend(endpoint, max_inflight=8) as backend:
        for i in range(20):  # warm the segment pool
            stamp(frames[i % 4], i)
            backend.save(frames[i % 4], "bench/t.tif")
        backend.flush()
        sender = backend.sender
        # idle-pipe latency: one frame in flight at a time
        sender.latencies.clear()
        for i in range(latency_samples):
            stamp(frames[i % 4], i)
            backend.save(frames[i % 4], "bench/t.tif")
            backend.flush()
        idle = sorted(sender.latencies)
        # throughput under full load
        sender.latencies.clear()
        t = time.perf_counter()
        for i in range(count):
            stamp(frames[i % 4], i)
            backend.save(frames[i % 4], "bench/t.tif")
        backend.flush()
        elapsed = time.perf_counter() - t
        loaded = sorted(sender.latencies)
    nbytes = frames[0].nbytes
    return {
        "fps": count / elapsed,
        "gbps": nbytes * count / elapsed / 1e9,
        "idle_p50_ms": 1e3 * statistics.median(idle),
        "idle_p99_ms": 1e3 * idle[int(0.99 * (len(idle) - 1))],
        "load_p50_ms": 1e3 * statistics.median(loaded),
        "load_p99_ms": 1e3 * loaded[int(0.99 * (len(loaded) - 1))],
    }


def bench_lease(endpoint: str, shape, count: int) -> dict:
    """A pipeline step (np.add into an output) streamed two ways: into a private array then
    save() (the sender copies it into shared memory), or straight into lease()'s
    shared-memory array (no sender copy)."""
    from polystore.streaming import NapariStreamingBackend

    src = np.random.default_rng(7).integers(0, 60000, shape, dtype=np.uint16)
    out = np.empty_like(src)
    result = {}
    with NapariStreamingBackend(endpoint, max_inflight=8) as backend:
        for variant in ("save", "lease", "save", "lease"):  # second round is measured
            t = time.perf_counter()
            for i in range(count):
                if variant == "save":
                    np.add(src, 1, out=out)
                    stamp(out, i)
                    backend.save(out, "bench/step.tif")
                else:
                    with backend.lease("bench/step.tif", shape, "uint16") as frame:
                        np.add(src, 1, out=frame)
                        stamp(frame, i)
            backend.flush()
            result[variant] = count / (time.perf_counter() - t)
    return result


def _table_row(label: str, nbytes: int, ours: dict, hot: float, cold: float,
               rawzmq: float) -> dict:
    """The figures of one frame size, as printed in the table (and saved by --json)."""
    return {
        "frame": label,
        "frame_bytes": nbytes,
        "polystore_fps": ours["fps"],
        "polystore_gbps": ours["gbps"],
        "x_memcpy_half_hot": ours["fps"] * nbytes / (hot / 2),
        "x_memcpy_half_working_set": ours["fps"] * nbytes / (cold / 2),
        "x_raw_zmq": ours["gbps"] * 1e9 / rawzmq,
        "idle_p50_ms": ours["idle_p50_ms"],
        "idle_p99_ms": ours["idle_p99_ms"],
        "load_p50_ms": ours["load_p50_ms"],
        "load_p99_ms": ours["load_p99_ms"],
        "memcpy_hot_gbps": hot / 1e9,
        "memcpy_working_set_gbps": cold / 1e9,
        "raw_zmq_gbps": rawzmq / 1e9,
    }


def _median_round(rounds: list[dict]) -> dict:
    """Each figure's median over rounds (a noisy machine slows single rounds)."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def _ring_row(label: str, ours: dict, ring: dict) -> dict:
    """polystore against the raw ring: > 1 means faster (fps) / slower (latency) than it."""
    return {
        "frame": label,
        "polystore_fps": ours["fps"],
        "ring_fps": ring["fps"],
        "x_raw_ring": ours["fps"] / ring["fps"],
        "idle_p50_ms": ours["idle_p50_ms"],
        "ring_idle_p50_ms": ring["idle_p50_ms"],
        "x_ring_idle_p50": ours["idle_p50_ms"] / ring["idle_p50_ms"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``polystore bench`` and scripts/bench_stream.py)."""
    parser.add_argument("--quick", action="store_true", help="few frames, for a smoke test")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="alternating rounds of polystore and the raw ring (default 3)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="tcp",
                        help="how both receivers listen: tcp://127.0.0.1 (default) or ipc:// "
                        "(a Unix socket, for napari on the same machine)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT "
                        "(input of scripts/plot_bench.py)")


def _writable(path: str) -> str | None:
    """Why the --json file cannot be written, checked before a run of minutes (without
    creating anything: an interrupted run leaves no empty file); else None."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return f"--json {path}: cannot write it: it is a folder; name a file"
    if os.path.exists(target):
        return None if os.access(target, os.W_OK) else f"--json {path}: cannot write it"
    folder = os.path.dirname(target)
    while not os.path.isdir(folder):  # created when the figures are written
        if os.path.exists(folder):
            return f"--json {path}: cannot write it: {folder} is not a folder"
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--json {path}: cannot write it: no permission to create it in {folder}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_stream.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed options; 1 if the receiver saw a torn frame."""
    scale = 0.05 if args.quick else 1.0
    rounds = 1 if args.quick else args.rounds
    if args.json and (why := _writable(args.json)):
        print(f"polystore bench: {why}", file=sys.stderr)
        return 2

    # spawn: the receiver process must not inherit this process's ZeroMQ state
    spawn = mp.get_context("spawn")
    endpoint_q, result_q, stop = spawn.Queue(), spawn.Queue(), spawn.Event()
    transport = getattr(args, "transport", "tcp")
    private = tempfile.mkdtemp(prefix="polystore-bench-")  # mode 0700: for ipc:// sockets

    def listen(name: str) -> str:
        return LOOPBACK if transport == "tcp" else f"ipc://{private}/{name}"

    proc = spawn.Process(target=receiver_process,
                         args=(endpoint_q, stop, result_q, listen("polystore")), daemon=True)

    title = (f"polystore streaming benchmark ({platform.machine()}, "
             f"{mp.cpu_count()} cores, Python {platform.python_version()}, {transport})")
    print(f"# {title}")
    rows, ring_rows, ring_torn = [], [], 0
    try:
        start_child(proc)
        endpoint = endpoint_q.get(timeout=30)
        for label, shape in SHAPES.items():
            nbytes = int(np.prod(shape)) * 2
            count = max(20, int(scale * min(20000, 8e9 / nbytes)))
            hot = bench_memcpy(shape, max(10, count // 4), working_set=False)
            cold = bench_memcpy(shape, max(10, count // 4), working_set=True)
            rawzmq = bench_raw_zmq(spawn, shape, max(10, count // 2), listen("zmq"))
            samples = idle_samples(nbytes, scale)
            ring_rounds, our_rounds = [], []
            for _ in range(rounds):  # alternated, so load from elsewhere hits both alike
                ring_rounds.append(bench_raw_ring(spawn, shape, count, samples,
                                                  listen=listen("ring")))
                our_rounds.append(bench_polystore(endpoint, shape, count, samples))
            ours = _median_round(our_rounds)
            ring_torn += sum(r.pop("torn") for r in ring_rounds)
            ring = _median_round(ring_rounds)
            rows.append((label, nbytes, ours, hot, cold, rawzmq))
            ring_rows.append(_ring_row(label, ours, ring))
        lease_shape = SHAPES["2048x2048 uint16"]
        lease = bench_lease(endpoint, lease_shape, max(20, int(scale * 2000)))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(f"polystore bench: {exc.strerror}", file=sys.stderr)  # says what to do
        return 1
    finally:
        stop.set()
        if proc.pid is not None:
            proc.join(30)
        shutil.rmtree(private, ignore_errors=True)
    checked = result_q.get(timeout=10)

    print()
    print("| frame | polystore fps | GB/s | x memcpy/2 (hot) | x memcpy/2 (working set) | "
          "x raw zmq | idle p50 / p99 ms | loaded p50 / p99 ms | memcpy hot / working set "
          "GB/s | raw zmq GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    table = [_table_row(*row) for row in rows]  # computed once: printed and saved
    for r in table:
        print(
            f"| {r['frame']} | {r['polystore_fps']:,.0f} | {r['polystore_gbps']:.2f} | "
            f"{r['x_memcpy_half_hot']:.2f} | {r['x_memcpy_half_working_set']:.2f} | "
            f"{r['x_raw_zmq']:.2f} | {r['idle_p50_ms']:.3f} / {r['idle_p99_ms']:.3f} | "
            f"{r['load_p50_ms']:.3f} / {r['load_p99_ms']:.3f} | "
            f"{r['memcpy_hot_gbps']:.1f} / {r['memcpy_working_set_gbps']:.1f} | "
            f"{r['raw_zmq_gbps']:.2f} |"
        )
    print()
    print(f"| frame | polystore fps | raw ring fps | x raw ring | idle p50 ms polystore / ring "
          f"| x ring idle p50 |   (median of {rounds} alternating rounds)")
    print("|---|---|---|---|---|---|")
    for r in ring_rows:
        print(f"| {r['frame']} | {r['polystore_fps']:,.0f} | {r['ring_fps']:,.0f} | "
              f"{r['x_raw_ring']:.2f} | {r['idle_p50_ms']:.3f} / {r['ring_idle_p50_ms']:.3f} | "
              f"{r['x_ring_idle_p50']:.2f} |")
    print()
    print("| pipeline step (np.add) + stream, 2048x2048 uint16 | fps |")
    print("|---|---|")
    print(f"| compute into an array, then save() | {lease['save']:,.0f} |")
    print(f"| compute straight into lease() (no sender copy) | {lease['lease']:,.0f} "
          f"(x{lease['lease'] / lease['save']:.2f}) |")
    print()
    print(f"receiver verified {checked['checked']} frames, torn: {checked['torn']} "
          f"(raw ring: torn {ring_torn})")
    if args.json:
        result = {
            "title": title,
            "quick": args.quick,
            "rows": table,
            "raw_ring": ring_rows,
            "pipeline_step_fps": lease,
            "verified_frames": checked["checked"],
            "torn_frames": checked["torn"],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
        print(f"figures written to {args.json}")
    return 1 if checked["torn"] or ring_torn else 0


if __name__ == "__main__":
    sys.exit(main())
