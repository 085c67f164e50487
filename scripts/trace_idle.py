#!/usr/bin/env python3
"""Where an idle frame's time goes: a timestamp at each hop of one frame at a time.

Streams N frames one at a time (save, then wait for the ack) through polystore, then
through the raw ring of `polystore.apps.bench`, and stamps each hop on the monotonic clock,
which both processes share: the sender's Python up to the ZeroMQ send, the send, the wire
to the receiving thread's wake-up, the receiver's work up to its ack, the ack's send, and
the wire back. Prints the median of each hop (medians do not add up to the median total),
then the median total of each 300 frames in turn, which shows the latency's modes. The
stamps are timing wrappers around polystore's own functions (as
``scripts/profile_stream.py`` does), so they cost a little themselves.

    python scripts/trace_idle.py                 # 512x512 uint16, 3000 frames
    python scripts/trace_idle.py --size 2048 --frames 600
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import mmap
import multiprocessing as mp
import statistics
import time

import numpy as np
import zmq

from polystore.apps.bench import (
    _RING_HEADER,
    close_ring_segments,
    frame_arguments,
    ring_prefix,
    ring_segments,
    sample_frames,
    stamp,
)

now = time.perf_counter_ns  # CLOCK_MONOTONIC: one clock for both processes


def stamped(owner, name: str, label: str, log: list, after: bool = False) -> None:
    """Wrap `owner.name` to log (label, time) when it is called (or, `after`, returns)."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not after:
            log.append((label, now()))
            return function(*args, **kwargs)
        result = function(*args, **kwargs)
        log.append((label, now()))
        return result

    setattr(owner, name, wrapper)


def polystore_receiver(endpoint_q, stop, log_q) -> None:
    from polystore.streaming import NapariStreamingBackend, receiver_for, router, segment_reader
    from polystore.streaming import receiver as receiver_module

    log: list = []
    stamped(receiver_module, "zmq_poll", "receiver wakes", log, after=True)
    stamped(receiver_module.Receiver, "_handle", "reads the message", log)
    stamped(segment_reader.SegmentReader, "copy_frame", "decodes, checks", log)
    stamped(segment_reader.SegmentReader, "copy_frame", "copies out", log, after=True)
    stamped(router.Outbox, "flush", "bookkeeping", log)
    stamped(router.Outbox, "flush", "sends the ack", log, after=True)
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                      on_frame=lambda frame: None) as receiver:
        endpoint_q.put(receiver.endpoint)
        stop.wait()
    log_q.put(log)


def trace_polystore(context, shape, count: int) -> tuple[list, list]:
    from polystore.streaming import NapariStreamingBackend, credits

    endpoint_q, stop, log_q = context.Queue(), context.Event(), context.Queue()
    proc = context.Process(target=polystore_receiver, args=(endpoint_q, stop, log_q))
    proc.start()
    frames = sample_frames(shape)
    log: list = []
    with NapariStreamingBackend(endpoint_q.get(timeout=30), max_inflight=8) as backend:
        for i in range(50):
            backend.save(frames[i % 4], "trace/t.tif")
        backend.flush()
        stamped(zmq.Socket, "send", "sender's Python", log)
        stamped(zmq.Socket, "send", "send", log, after=True)
        stamped(credits.CreditWindow, "ack", "wire back", log)
        for i in range(count):
            stamp(frames[i % 4], i)
            log.append(("start", now()))
            backend.save(frames[i % 4], "trace/t.tif")
            backend.flush()
    stop.set()
    receiver_log = log_q.get(timeout=30)
    proc.join(30)
    return log, receiver_log


def ring_receiver(endpoint_q, stop, log_q, prefix: str, nbytes: int) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    endpoint_q.put(f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}")
    views: dict[int, memoryview] = {}
    log: list = []
    while not stop.is_set():
        if not sock.poll(100, zmq.POLLIN):
            continue
        log.append(("receiver wakes", now()))
        while True:
            try:
                identity, header = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            log.append(("reads the message", now()))
            _seq, slot = _RING_HEADER.unpack(header)
            if slot not in views:
                with open(f"/dev/shm/{prefix}{slot}", "rb") as handle:
                    views[slot] = memoryview(mmap.mmap(handle.fileno(), nbytes,
                                                       prot=mmap.PROT_READ))
            copy = np.empty(nbytes, np.uint8)
            copy[:] = np.frombuffer(views[slot], np.uint8)
            log.append(("copies out", now()))
            sock.send_multipart([identity, header])
            log.append(("sends the ack", now()))
    sock.close(linger=0)
    log_q.put(log)


def trace_ring(context, shape, count: int) -> tuple[list, list]:
    frames = sample_frames(shape)
    nbytes = frames[0].nbytes
    prefix = ring_prefix("polystoretrace_")
    segments, targets = ring_segments(prefix, shape)
    endpoint_q, stop, log_q = context.Queue(), context.Event(), context.Queue()
    proc = context.Process(target=ring_receiver, args=(endpoint_q, stop, log_q, prefix, nbytes))
    proc.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint_q.get(timeout=30))
    log: list = []
    try:
        for i in range(count + 50):
            slot = i % len(targets)
            start = now()
            stamp(frames[i % 4], i)
            np.copyto(targets[slot], frames[i % 4])
            sent = now()
            sock.send(_RING_HEADER.pack(i, slot))
            done = now()
            sock.recv()
            if i >= 50:
                log += [("start", start), ("sender's Python", sent), ("send", done),
                        ("wire back", now())]
    finally:
        stop.set()
        receiver_log = log_q.get(timeout=30)
        proc.join(30)
        sock.close(linger=0)
        close_ring_segments(segments, targets)
    return log, receiver_log


CHUNK = 300  # frames per median of the total over time (about 45 ms at 512²)
SENDER_HOPS = ["start", "sender's Python", "send"]
RECEIVER_HOPS = ["receiver wakes", "reads the message", "decodes, checks", "copies out",
                 "bookkeeping", "sends the ack"]


def by_frame(log: list, first: str) -> list[dict]:
    """Group a log into one dict per frame, each starting at a `first` entry."""
    frames: list[dict] = []
    for label, t in log:
        if label == first:
            frames.append({label: t})
        elif frames and label not in frames[-1]:
            frames[-1][label] = t
    return frames


def hops(sender_log: list, receiver_log: list) -> dict[str, list[float]]:
    """Microseconds of each hop, per frame matched across the two processes (each frame's
    receiver wake-up is the first one after its send)."""
    received = [f for f in by_frame(receiver_log, "receiver wakes") if "sends the ack" in f]
    wakes = [f["receiver wakes"] for f in received]
    spent: dict[str, list[float]] = {}
    for frame in by_frame(sender_log, "start"):
        if not all(k in frame for k in [*SENDER_HOPS, "wire back"]):
            continue
        j = bisect.bisect_left(wakes, frame["send"])
        if j == len(received) or received[j]["sends the ack"] > frame["wire back"]:
            continue
        there = received[j]
        chain = [(k, frame[k]) for k in SENDER_HOPS]
        chain += [(k, there[k]) for k in RECEIVER_HOPS if k in there]
        chain.append(("wire back", frame["wire back"]))
        for (_, t0), (label, t1) in itertools.pairwise(chain):
            spent.setdefault("wire to the receiver" if label == "receiver wakes" else label,
                             []).append((t1 - t0) / 1e3)
        spent.setdefault("total", []).append((frame["wire back"] - frame["start"]) / 1e3)
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    frame_arguments(parser, frames=3000)
    args = parser.parse_args(argv)
    shape = (args.size, args.size)
    fork = mp.get_context("fork")  # the receivers must inherit no wrapper: they start first
    results = {"polystore": hops(*trace_polystore(fork, shape, args.frames)),
               "raw ring": hops(*trace_ring(fork, shape, args.frames))}
    labels = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"# idle pipe, {args.size}x{args.size} uint16, {args.frames} frames, median µs per hop")
    print("| hop | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for label in labels:
        cells = [f"{statistics.median(r[label]):.1f}" if label in r else "" for r in
                 results.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\ntotal µs, median of each {CHUNK} frames in turn (latency switches between modes "
          "that last tens of ms):")
    for name, result in results.items():
        totals = result.get("total", [])
        print(f"  {name}: " + " ".join(f"{statistics.median(totals[i:i + CHUNK]):.0f}"
                                       for i in range(0, len(totals), CHUNK)))
    print("matched frames: " + ", ".join(f"{k} {len(r.get('total', []))}"
                                         for k, r in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
