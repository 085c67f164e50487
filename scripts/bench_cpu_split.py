#!/usr/bin/env python3
"""Where the CPU of a streamed frame goes: per thread, polystore against the raw ring.

Streams 512x512 uint16 frames (``--size``) flat out, in alternating rounds: through
polystore (``NapariStreamingBackend.save()`` into a real receiver process, as
``bench_stream.py`` does); through the *protocol ring* of ``bench_sender_floor.py`` (a sender
with no more Python per frame than the raw ring, into the same real receiver), once as it is
and once with ``--busy-us`` of Python spin per frame (what a microsecond more of sender
Python costs in all); and through the raw ring of the same benchmark, with and without CURVE
and a 330-byte header. polystore against the protocol ring tells the sender's share of the
gap from the receiver's. For each it prints the frames/s and, per thread of the sending and
the receiving process (Python, and ZeroMQ's I/O thread), the CPU time and minor page faults
per frame, and the context switches per frame of the sender's ZeroMQ I/O thread (each a
sleep and a wake-up), read from /proc (Linux). On two cores the four threads share the
machine, so the total CPU per frame is what bounds the frame rate.

    python scripts/bench_cpu_split.py                 # 512x512, 3 rounds
    python scripts/bench_cpu_split.py --size 2048 --frames 1500
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import statistics
import threading
import time
from collections.abc import Iterator

from bench_sender_floor import protocol_ring  # this folder is on sys.path when run

from polystore.apps import bench


def thread_usage(pid: int) -> dict[str, tuple[float, int, int]]:
    """(CPU seconds, minor faults, context switches) so far of each thread group of `pid`
    (its Python threads, ZeroMQ's I/O thread)."""
    tick = os.sysconf("SC_CLK_TCK")
    usage: dict[str, tuple[float, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                switches = sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = "zmq I/O" if name.startswith("ZMQbg/IO") else "python" if name == "python" \
            else None
        if group is None:
            continue
        cpu, faults, before = usage.get(group, (0.0, 0, 0))
        usage[group] = (cpu + (int(fields[11]) + int(fields[12])) / tick,
                        faults + int(fields[7]), before + switches)
    return usage


def per_frame(before: dict, after: dict, frames: float) -> dict[str, tuple[float, ...]]:
    """Per frame, by thread group: CPU µs, minor faults, context switches."""
    zero = (0.0, 0, 0)
    return {k: (1e6 * (after[k][0] - before.get(k, zero)[0]) / frames,
                (after[k][1] - before.get(k, zero)[1]) / frames,
                (after[k][2] - before.get(k, zero)[2]) / frames) for k in after}


@contextlib.contextmanager
def real_receiver() -> Iterator[tuple[str, int]]:
    """The benchmark's real polystore receiver in a process of its own: (endpoint, pid)."""
    spawn = mp.get_context("spawn")
    endpoint_q, stop, result_q = spawn.Queue(), spawn.Event(), spawn.Queue()
    proc = spawn.Process(target=bench.receiver_process, args=(endpoint_q, stop, result_q))
    proc.start()
    try:
        yield endpoint_q.get(timeout=30), proc.pid
    finally:
        stop.set()
        result_q.get(timeout=30)
        proc.join(30)


def run_polystore(shape: tuple[int, int], count: int) -> dict:
    from polystore.streaming import NapariStreamingBackend

    frames = bench.sample_frames(shape)
    with real_receiver() as (endpoint, pid), \
            NapariStreamingBackend(endpoint, max_inflight=8) as backend:
        for i in range(50):
            backend.save(frames[i % 4], "bench/t.tif")
        backend.flush()
        sender0, receiver0 = thread_usage(os.getpid()), thread_usage(pid)
        started = time.perf_counter()
        for i in range(count):
            bench.stamp(frames[i % 4], i)
            backend.save(frames[i % 4], "bench/t.tif")
        backend.flush()
        elapsed = time.perf_counter() - started
        sender1, receiver1 = thread_usage(os.getpid()), thread_usage(pid)
    return {"fps": count / elapsed, "sender": per_frame(sender0, sender1, count),
            "receiver": per_frame(receiver0, receiver1, count)}


def run_protocol_ring(shape: tuple[int, int], count: int, busy_us: float = 0.0) -> dict:
    """The protocol ring into a real receiver, sampled as the rings are (`run_ring`);
    `busy_us` of Python spin per frame, as `protocol_ring` takes it."""
    window: dict = {}
    with real_receiver() as (endpoint, pid):
        sampler = threading.Thread(target=_sample, args=(window, pid), daemon=True)
        sampler.start()
        fps, _ = protocol_ring(endpoint, bench.sample_frames(shape), count, busy_us)
    sampler.join()
    return _window_result(fps, window)


def _sample(window: dict, pid: int) -> None:
    """CPU of this process and of `pid` from 1.5 s to 3.5 s (past start-up and the latency
    phase, inside the throughput phase)."""
    time.sleep(1.5)
    window["before"] = (thread_usage(os.getpid()), thread_usage(pid), time.perf_counter())
    time.sleep(2.0)
    window["after"] = (thread_usage(os.getpid()), thread_usage(pid), time.perf_counter())


def _window_result(fps: float, window: dict) -> dict:
    (s0, r0, t0), (s1, r1, t1) = window["before"], window["after"]
    frames = fps * (t1 - t0)
    return {"fps": fps, "sender": per_frame(s0, s1, frames),
            "receiver": per_frame(r0, r1, frames)}


class _Context:
    """The spawn context, remembering the ring's receiver process."""

    def __init__(self) -> None:
        self.spawn = mp.get_context("spawn")
        self.processes: list = []

    def Queue(self):  # noqa: N802 - multiprocessing's names
        return self.spawn.Queue()

    def Event(self):  # noqa: N802
        return self.spawn.Event()

    def Process(self, **kwargs):  # noqa: N802
        process = self.spawn.Process(**kwargs)
        self.processes.append(process)
        return process


def run_ring(shape: tuple[int, int], count: int, curve: bool) -> dict:
    """The raw ring, sampled over a window in the middle of its throughput phase (it runs
    in one call)."""
    context, window = _Context(), {}

    def sample() -> None:
        while not context.processes or context.processes[0].pid is None:
            time.sleep(0.01)
        _sample(window, context.processes[0].pid)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = bench.bench_raw_ring(context, shape, count, 10, curve=curve,
                                  pad=330 if curve else 0)
    sampler.join()
    return _window_result(result["fps"], window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.frame_arguments(parser, frames=10000, rounds=3)
    parser.add_argument("--busy-us", type=float, default=10.0,
                        help="Python spin per frame of the busy protocol ring's row, which "
                             "shows what a microsecond more of sender Python costs in all")
    args = parser.parse_args()
    shape = (args.size, args.size)
    busy = f"protocol ring + {args.busy_us:g} µs Python/frame"
    results: dict[str, list[dict]] = {"polystore": [], "protocol ring": [], busy: [],
                                      "ring + CURVE + header": [], "ring": []}
    for _ in range(args.rounds):
        results["polystore"].append(run_polystore(shape, args.frames))
        # the rings are sampled from 1.5 s to 3.5 s after they start: they must outlast that
        ring_frames = int(results["polystore"][-1]["fps"] * 2 * 5)
        results["protocol ring"].append(run_protocol_ring(shape, ring_frames))
        results[busy].append(run_protocol_ring(shape, ring_frames, args.busy_us))
        results["ring + CURVE + header"].append(run_ring(shape, ring_frames, True))
        results["ring"].append(run_ring(shape, ring_frames, False))
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"# CPU per frame, {args.size}x{args.size} uint16, median of {args.rounds} rounds; "
          f"load average {load} at the end\n")
    print("| run | frames/s | sender python µs | sender zmq I/O µs | receiver python µs | "
          "receiver zmq I/O µs | total CPU µs/frame | receiver minor faults/frame | "
          "sender zmq I/O context switches/frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rounds in results.items():
        def median(side: str, group: str, i: int, rounds=rounds) -> float:
            return statistics.median(r[side].get(group, (0.0, 0.0))[i] for r in rounds)

        cpu = [median(side, group, 0) for side in ("sender", "receiver")
               for group in ("python", "zmq I/O")]
        faults = median("receiver", "python", 1)
        switches = median("sender", "zmq I/O", 2)
        fps = statistics.median(r["fps"] for r in rounds)
        print(f"| {name} | {fps:,.0f} | " + " | ".join(f"{c:.0f}" for c in cpu)
              + f" | {sum(cpu):.0f} | {faults:.1f} | {switches:.2f} |")


if __name__ == "__main__":
    main()
