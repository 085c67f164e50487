"""Streaming benchmark: polystore save() -> a receiver process, next to memcpy and raw zmq.

Every figure comes from this one run on this machine, so the ratios are fair:

* memcpy     -- np.copyto of one frame between two warm buffers (one copy, one core)
* raw zmq    -- pyzmq PUSH -> PULL zero-copy send of the same frame to another process
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
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time

import numpy as np
import zmq

SHAPES = {
    "2048x2048 uint16": (2048, 2048),
    "512x512 uint16": (512, 512),
    "16x512x1024 uint16": (16, 512, 1024),
}


def receiver_process(endpoint_q, stop, result_q) -> None:
    from polystore.streaming import NapariStreamingBackend, receiver_for

    bad = [0, 0]

    def on_frame(frame) -> None:
        flat = frame.array.reshape(-1).view(np.uint8)
        head = int(flat[:8].view(np.int64)[0])
        tail = int(flat[-8:].view(np.int64)[0])
        bad[0] += 1
        if head != tail:
            bad[1] += 1

    receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=on_frame)
    receiver.start()
    endpoint_q.put(receiver.endpoint)
    stop.wait()
    receiver.stop()
    result_q.put({"checked": bad[0], "torn": bad[1]})


def stamp(frame: np.ndarray, index: int) -> None:
    flat = frame.reshape(-1).view(np.uint8)
    flat[:8].view(np.int64)[0] = index
    flat[-8:].view(np.int64)[0] = index


def bench_memcpy(shape, repeats: int, working_set: bool) -> float:
    """One-core copy speed. working_set=False: the same two buffers (cache-hot, the most
    flattering baseline); True: 4 sources into 8 destinations, the memory footprint the
    streaming run has (4 frames, 8 segments, fresh receiver arrays)."""
    n_src, n_dst = (4, 8) if working_set else (1, 1)
    src = [np.random.default_rng(i).integers(0, 65535, shape, dtype=np.uint16)
           for i in range(n_src)]
    dst = [np.empty_like(src[0]) for _ in range(n_dst)]
    for i in range(max(n_src, n_dst)):
        np.copyto(dst[i % n_dst], src[i % n_src])
    t = time.perf_counter()
    for i in range(repeats):
        np.copyto(dst[i % n_dst], src[i % n_src])
    return src[0].nbytes * repeats / (time.perf_counter() - t)


def _zmq_pull(endpoint: str, count: int, done: mp.Event) -> None:
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(endpoint)
    for _ in range(count):
        sock.recv(copy=False)
    done.set()


def bench_raw_zmq(context, shape, count: int) -> float:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 4)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    frame = np.random.default_rng(0).integers(0, 65535, shape, dtype=np.uint16)
    done = context.Event()
    proc = context.Process(target=_zmq_pull, args=(f"tcp://127.0.0.1:{port}", count + 5, done))
    proc.start()
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


def bench_polystore(endpoint: str, shape, count: int, latency_samples: int) -> dict:
    from polystore.streaming import NapariStreamingBackend

    frames = [np.random.default_rng(i).integers(0, 65535, shape, dtype=np.uint16)
              for i in range(4)]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polystore bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few frames, for a smoke test")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT "
                        "(input of scripts/plot_bench.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scale = 0.05 if args.quick else 1.0

    # spawn: the receiver process must not inherit this process's ZeroMQ state
    spawn = mp.get_context("spawn")
    endpoint_q, result_q, stop = spawn.Queue(), spawn.Queue(), spawn.Event()
    proc = spawn.Process(target=receiver_process, args=(endpoint_q, stop, result_q))
    proc.start()
    endpoint = endpoint_q.get(timeout=30)

    title = (f"polystore streaming benchmark ({platform.machine()}, "
             f"{mp.cpu_count()} cores, Python {platform.python_version()})")
    print(f"# {title}")
    rows = []
    try:
        for label, shape in SHAPES.items():
            nbytes = int(np.prod(shape)) * 2
            count = max(20, int(scale * min(20000, 8e9 / nbytes)))
            hot = bench_memcpy(shape, max(10, count // 4), working_set=False)
            cold = bench_memcpy(shape, max(10, count // 4), working_set=True)
            rawzmq = bench_raw_zmq(spawn, shape, max(10, count // 2))
            ours = bench_polystore(endpoint, shape, count, max(20, int(300 * scale)))
            rows.append((label, nbytes, ours, hot, cold, rawzmq))
        lease_shape = SHAPES["2048x2048 uint16"]
        lease = bench_lease(endpoint, lease_shape, max(20, int(scale * 2000)))
    finally:
        stop.set()
        proc.join(30)
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
    print("| pipeline step (np.add) + stream, 2048x2048 uint16 | fps |")
    print("|---|---|")
    print(f"| compute into an array, then save() | {lease['save']:,.0f} |")
    print(f"| compute straight into lease() (no sender copy) | {lease['lease']:,.0f} "
          f"(x{lease['lease'] / lease['save']:.2f}) |")
    print()
    print(f"receiver verified {checked['checked']} frames, torn: {checked['torn']}")
    if args.json:
        result = {
            "title": title,
            "quick": args.quick,
            "rows": table,
            "pipeline_step_fps": lease,
            "verified_frames": checked["checked"],
            "torn_frames": checked["torn"],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
        print(f"figures written to {args.json}")
    return 1 if checked["torn"] else 0


if __name__ == "__main__":
    sys.exit(main())
