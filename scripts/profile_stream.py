#!/usr/bin/env python3
"""Where a streamed frame's time goes on the sending side: profile first, then cut.

Streams N frames with ``NapariStreamingBackend.save()`` into a real receiver in another
process (the benchmark's), twice:

1. under cProfile: Python calls per frame and the functions that cost the most;
2. with per-thread CPU clocks around each part of the sending path: the copy into shared
   memory, the ZeroMQ send, reading acks, link checks, waiting for credits, and the rest
   (polystore's own Python).

    python scripts/profile_stream.py                 # 512x512 uint16, 3000 frames
    python scripts/profile_stream.py --size 2048 --frames 300
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import multiprocessing as mp
import pstats
import time

import numpy as np

from polystore.apps.bench import frame_arguments, receiver_process
from polystore.streaming import NapariStreamingBackend
from polystore.streaming import connection as connection_module
from polystore.streaming import sender as sender_module

PARTS = {"send": "ZeroMQ send of the header", "drain": "reading acks",
         "check_link": "link events (monitor)",
         "poll": "zmq_poll of link and replies, waiting for credits"}  # fmt: skip


def stream(endpoint: str, frame: np.ndarray, count: int) -> None:
    with NapariStreamingBackend(endpoint, max_inflight=8) as backend:
        for _ in range(count):
            backend.save(frame, "profile/t.tif")
        backend.flush()


def cpu_breakdown(endpoint: str, frame: np.ndarray, count: int) -> dict[str, float]:
    """Main-thread CPU seconds per part of the sending path (timing wrappers, this run only;
    a part's time excludes the parts it calls, so the parts add up)."""
    spent: collections.Counter[str] = collections.Counter()
    inner = [0.0]  # time of timed parts called by the part now running

    def timed(function, label):
        def wrapper(*args, **kwargs):
            start, outer_inner, inner[0] = time.thread_time(), inner[0], 0.0
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - start
                spent[label] += elapsed - inner[0]
                inner[0] = outer_inner + elapsed
        return wrapper

    originals = {name: getattr(connection_module.Connection, name) for name in PARTS}
    for name, function in originals.items():
        setattr(connection_module.Connection, name, timed(function, PARTS[name]))
    original_copyto = sender_module.np.copyto
    sender_module.np.copyto = timed(original_copyto, "copy into shared memory")
    try:
        stream(endpoint, frame, 50)  # warm the pool
        spent.clear()
        start = time.thread_time()
        stream(endpoint, frame, count)
        spent["total"] = time.thread_time() - start
    finally:
        for name, function in originals.items():
            setattr(connection_module.Connection, name, function)
        sender_module.np.copyto = original_copyto
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    frame_arguments(parser, frames=3000)
    args = parser.parse_args(argv)
    spawn = mp.get_context("spawn")
    endpoint_q, result_q, stop = spawn.Queue(), spawn.Queue(), spawn.Event()
    proc = spawn.Process(target=receiver_process, args=(endpoint_q, stop, result_q))
    proc.start()
    endpoint = endpoint_q.get(timeout=30)
    frame = np.zeros((args.size, args.size), np.uint16)
    try:
        stream(endpoint, frame, 50)
        profile = cProfile.Profile()
        profile.runcall(stream, endpoint, frame, args.frames)
        spent = cpu_breakdown(endpoint, frame, args.frames)
    finally:
        stop.set()
        proc.join(30)
    stats = pstats.Stats(profile)
    print(f"# {args.size}x{args.size} uint16, {args.frames} frames")
    print(f"Python calls per frame (cProfile): {stats.total_calls / args.frames:.0f}")
    stats.sort_stats("tottime").print_stats(15)
    total = spent.pop("total")
    print("| part of save() | main-thread CPU us/frame |\n|---|---|")
    for label, seconds in spent.most_common():
        print(f"| {label} | {1e6 * seconds / args.frames:.1f} |")
    rest = total - sum(spent.values())
    print(f"| polystore's own Python (the rest) | {1e6 * rest / args.frames:.1f} |")
    print(f"| total | {1e6 * total / args.frames:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
