#!/usr/bin/env python3
"""Frames/s of 2048x2048 uint16 into an ImageJ ImagePlus, headless, next to the Python receiver.

Both receivers run in their own process and get the same stream from the same sender code
(`FijiStreamingBackend.save()`: copy into a reused shared-memory segment, JSON header, wait
for credits):

* fiji    -- viewers/fiji/polystore_receiver.groovy, headless through run_headless.sh (real
  ImageJ classes, JeroMQ): maps the segment read-only, copies it into the ImagePlus's
  pixel array (`replace` mode: one image updated in place), acks.
* python  -- `polystore.streaming.Receiver` with the Fiji prefix: maps the segment, copies it
  into a new NumPy array, acks, hands it to a no-op callback.

Throughput: after a warm-up (the JVM compiles the hot path), rounds of `--frames` saves back
to back then flush() (every frame acknowledged), alternating between the two receivers so
that other load on the machine hits both alike; the median round is reported, and each
round's count is checked against the receiver's own. Latency: save() -> ack as the sender
sees it, under that full load.

    python scripts/bench_fiji.py                       # 2048x2048 uint16, 5 x 500 frames each
    python scripts/bench_fiji.py --rounds 2 --frames 200   # quicker
    python scripts/bench_fiji.py --transport inline --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fiji_helpers import STACKS, missing_requirements, start_receiver  # noqa: E402


def python_receiver(endpoint_q, stop) -> None:
    from polystore.streaming import FijiStreamingBackend, receiver_for

    receiver = receiver_for(FijiStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None)
    receiver.start()
    endpoint_q.put(receiver.endpoint)
    stop.wait()
    receiver.stop()


class Sender:
    """One persistent FijiStreamingBackend to one receiver, with its source frames."""

    def __init__(self, endpoint: str, shape, dtype: str, transport: str, max_inflight: int,
                 auth: str | None = None):  # fmt: skip
        from polystore.streaming import FijiStreamingBackend

        self.sources = [np.random.default_rng(i).integers(0, 2**16 - 1, shape).astype(dtype)
                        for i in range(4)]  # fmt: skip
        self.backend = FijiStreamingBackend(endpoint, transport=transport, auth=auth,
                                            max_inflight=max_inflight, timeout=30)  # fmt: skip

    def send(self, count: int) -> None:
        for i in range(count):
            self.backend.save(self.sources[i % 4], f"bench/t{i:05d}.tif")
        self.backend.flush()

    def round(self, frames: int) -> dict:
        """`frames` saves back to back, then flush; checked against the receiver's count."""
        before = self.backend.request("report")["frames"]
        self.backend.sender.latencies.clear()
        t = time.perf_counter()
        self.send(frames)
        elapsed = time.perf_counter() - t
        state = self.backend.request("report")
        received = state["frames"] - before
        assert received == frames, f"receiver counted {received} frames, sent {frames}"
        latencies = sorted(self.backend.sender.latencies)
        return {
            "fps": frames / elapsed,
            "latency_p50_ms": 1e3 * statistics.median(latencies),
            "latency_p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
            "image": next((i for i in state.get("images", []) if i["title"] == "bench"), None),
        }

    def close(self) -> None:
        self.backend.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=500, help="frames per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per receiver, alternating")
    parser.add_argument("--warmup", type=int, default=500, help="frames before the first round")
    parser.add_argument("--size", type=int, default=2048, help="frames are SIZE x SIZE")
    parser.add_argument("--dtype", default="uint16")
    parser.add_argument("--transport", default="auto", choices=["auto", "shm", "inline"])
    parser.add_argument("--max-inflight", type=int, default=16, help="the backend's default")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--stack", choices=list(STACKS), default="debian",
                        help="Debian's Groovy 2.4 + JeroMQ 0.3.6 (unauthenticated), or Groovy 4 + "
                             "JeroMQ 0.6 from ../shared/vendor (CURVE)")  # fmt: skip
    args = parser.parse_args(argv)
    stack = STACKS[args.stack]
    if (why := missing_requirements(stack)) is not None:
        print(f"cannot run the Fiji receiver: {why}", file=sys.stderr)
        return 2
    options = dict(shape=(args.size, args.size), dtype=args.dtype, transport=args.transport,
                   max_inflight=args.max_inflight)  # fmt: skip

    fiji = start_receiver(stack=stack, timeout=300)
    ctx = mp.get_context("spawn")
    endpoint_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=python_receiver, args=(endpoint_q, stop))
    proc.start()
    senders = {}
    rounds: dict[str, list[dict]] = {"fiji": [], "python": []}
    try:
        senders["fiji"] = Sender(fiji.endpoint, **options, auth=None if stack.curve else "none")
        senders["python"] = Sender(endpoint_q.get(timeout=30), **options)
        for sender in senders.values():  # JIT, segment pools, page faults
            sender.send(args.warmup)
        # Alternate, so that load from elsewhere on the machine hits both alike.
        for _ in range(args.rounds):
            for name, sender in senders.items():
                rounds[name].append(sender.round(args.frames))
        transport = "shm" if senders["fiji"].backend.sender.uses_shared_memory else "inline"
    finally:
        for sender in senders.values():
            sender.close()
        stop.set()
        proc.join(10)
        if fiji.stop() != 0:
            print(fiji.log, file=sys.stderr)

    nbytes = int(np.prod(options["shape"])) * np.dtype(args.dtype).itemsize
    summary = {}
    for name, runs in rounds.items():
        fps = [r["fps"] for r in runs]
        summary[name] = {
            "fps_median": statistics.median(fps),
            "fps_best": max(fps),
            "gb_per_s_median": statistics.median(fps) * nbytes / 1e9,
            "latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in runs),
            "latency_p99_ms": statistics.median(r["latency_p99_ms"] for r in runs),
            "rounds_fps": fps,
        }
    label = f"{args.size}x{args.size} {args.dtype}"
    print(f"\n{label}: {args.rounds} rounds of {args.frames} frames per receiver (alternating, "
          f"after {args.warmup} warm-up), transport {transport}, max_inflight "
          f"{args.max_inflight}; {platform.machine()}, {mp.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'receiver':<10}{'median f/s':>11}{'best f/s':>10}{'GB/s':>7}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'vs python':>11}")  # fmt: skip
    base = summary["python"]["fps_median"]
    for name, r in summary.items():
        print(f"{name:<10}{r['fps_median']:>11.0f}{r['fps_best']:>10.0f}{r['gb_per_s_median']:>7.2f}"
              f"{r['latency_p50_ms']:>8.2f}{r['latency_p99_ms']:>8.2f}"
              f"{r['fps_median'] / base:>10.2f}x")  # fmt: skip
    image = rounds["fiji"][-1]["image"]
    if image:
        print(f"fiji image: {image['width']}x{image['height']}, {image['bitDepth']}-bit, "
              f"{image['channels']}x{image['slices']}x{image['frames']} (c x z x t), "
              f"{image['framesReceived']} frames received")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "summary": summary}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
