#!/usr/bin/env python3
"""How much of polystore's gap to the raw ring is its sender: a ring that speaks the protocol.

Three ways of streaming 512x512 uint16 frames (``--size``) into another process, in
alternating rounds of one run (median of ``--rounds``):

* ``polystore``: ``NapariStreamingBackend.save()`` into a real polystore receiver, measured
  by ``bench_stream.py``'s own function (window of 8 frames);
* ``protocol ring``: the same real receiver (CURVE, every header decoded and validated,
  the copy, batched acks), fed by a sender with no more Python per frame than the raw ring:
  it says hello once, then for each frame copies into the next of 8 segments taken in turn,
  sets `seq` and `segment` on one reused `Frame` header, encodes and sends it, and reads
  whatever acks have arrived. No policies, statistics, path handling or link checks;
* ``raw ring``: the raw ring of ``bench_stream.py`` (no protocol, no CURVE).

If the protocol ring is no faster than polystore, the per-frame Python of polystore's
sender is not what bounds its frame rate: the receiver and the wire are.

    python scripts/bench_sender_floor.py                  # 512x512, 3 rounds
    python scripts/bench_sender_floor.py --size 2048 --frames 2000
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import secrets
import statistics
import time

import numpy as np
import zmq

from polystore.apps import bench
from polystore.streaming import NapariStreamingBackend
from polystore.streaming import protocol as p
from polystore.streaming.link import create_dealer_socket
from polystore.streaming.options import SenderOptions
from polystore.streaming.shm import Segment, create_probe, destroy

SLOTS = bench.RING_SLOTS


def protocol_ring(endpoint: str, frames: list[np.ndarray], count: int,
                  busy_us: float = 0.0) -> tuple[float, float]:
    """(frames/s, idle-pipe p50 latency in ms) of the minimal protocol-speaking sender (see
    the module docstring); `busy_us`: spin that long after each send, as a sender with more
    Python per frame would spend it."""
    token = secrets.token_hex(8)
    prefix = f"{NapariStreamingBackend.SHM_PREFIX}{os.getpid()}_{token}_"
    sock = create_dealer_socket(token, endpoint, SenderOptions())
    sock.connect(endpoint)
    probe, probe_token = create_probe(prefix)
    nbytes = frames[0].nbytes
    segments = [Segment(f"{prefix}{i}", nbytes) for i in range(SLOTS)]
    targets = [np.ndarray(frames[0].shape, "<u2", s.buf) for s in segments]
    try:
        sock.send(p.encode(p.Hello(
            v=p.VERSION, sender=token, pid=os.getpid(), viewer="napari", segment_prefix=prefix,
            probe=p.Probe(segment=probe.name, token=probe_token), batch_acks=True)))
        welcome = p.decode_receiver_message(sock.recv())
        if not isinstance(welcome, p.Welcome) or not welcome.shm:
            raise RuntimeError(f"the receiver did not welcome the protocol ring: {welcome}")
        header = p.Frame(v=p.VERSION, seq=0, stream="bench", path="bench/t.tif",
                         shape=list(frames[0].shape), dtype="uint16", nbytes=nbytes,
                         sent_ns=time.time_ns())
        inflight: set[int] = set()

        def take_acks(block: bool) -> None:
            flags = 0 if block else zmq.NOBLOCK
            while True:
                try:
                    ack = p.decode_receiver_message(sock.recv(flags))
                except zmq.Again:
                    return
                inflight.difference_update((ack.seq, *ack.also))
                flags = zmq.NOBLOCK

        seqs = itertools.count()

        def send(i: int) -> None:
            seq = next(seqs)
            while seq - SLOTS in inflight:  # the slot's previous frame is not acked yet
                take_acks(True)
            slot = seq % SLOTS
            bench.stamp(frames[i % len(frames)], seq)
            np.copyto(targets[slot], frames[i % len(frames)])
            header.seq, header.segment = seq, segments[slot].name
            sock.send(p.encode(header))
            if busy_us:
                until = time.perf_counter() + busy_us / 1e6
                while time.perf_counter() < until:
                    pass
            inflight.add(seq)
            take_acks(False)

        idle = []
        for i in range(bench.idle_samples(nbytes)):  # one at a time, as bench_stream does
            started = time.perf_counter()
            send(i)
            while inflight:
                take_acks(True)
            idle.append(time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(count):
            send(i)
        while inflight:
            take_acks(True)
        return count / (time.perf_counter() - started), 1e3 * statistics.median(idle)
    finally:
        sock.close(linger=0)
        destroy(probe)
        targets.clear()
        for segment in segments:
            destroy(segment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.frame_arguments(parser, frames=10000, rounds=3)
    args = parser.parse_args()
    shape = (args.size, args.size)
    frames = bench.sample_frames(shape)
    samples = bench.idle_samples(frames[0].nbytes)
    spawn = mp.get_context("spawn")
    fps: dict[str, list[float]] = {"polystore": [], "protocol ring": [], "raw ring": []}
    idle: dict[str, list[float]] = {name: [] for name in fps}
    for _ in range(args.rounds):
        for name in fps:
            if name == "raw ring":
                ring = bench.bench_raw_ring(spawn, shape, args.frames, samples)
                fps[name].append(ring["fps"])
                idle[name].append(ring["idle_p50_ms"])
                continue
            endpoint_q, stop, result_q = spawn.Queue(), spawn.Event(), spawn.Queue()
            receiver = spawn.Process(target=bench.receiver_process,
                                     args=(endpoint_q, stop, result_q))
            receiver.start()
            try:
                endpoint = endpoint_q.get(timeout=30)
                if name == "polystore":  # exactly as bench_stream.py measures it
                    ours = bench.bench_polystore(endpoint, shape, args.frames, samples)
                    rate, latency = ours["fps"], ours["idle_p50_ms"]
                else:
                    rate, latency = protocol_ring(endpoint, frames, args.frames)
                fps[name].append(rate)
                idle[name].append(latency)
            finally:
                stop.set()
                torn = result_q.get(timeout=30)["torn"]
                receiver.join(30)
            if torn:
                raise SystemExit(f"{name}: the receiver saw {torn} torn frame(s)")
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    ring = statistics.median(fps["raw ring"])
    ring_idle = statistics.median(idle["raw ring"])
    print(f"# {args.size}x{args.size} uint16, {args.frames} frames, median of {args.rounds} "
          f"alternating rounds; load average {load} at the end\n")
    print("| sender → receiver | frames/s (all rounds) | × raw ring | idle p50 ms | "
          "× raw ring idle p50 |")
    print("|---|---|---|---|---|")
    for name, rounds in fps.items():
        median, latency = statistics.median(rounds), statistics.median(idle[name])
        print(f"| {name} | {median:,.0f} ({', '.join(f'{r:,.0f}' for r in rounds)}) | "
              f"{median / ring:.2f} | {latency:.3f} | {latency / ring_idle:.2f} |")


if __name__ == "__main__":
    main()
