#!/usr/bin/env python3
"""What the raw ring's figures would be if it paid what polystore pays on the wire.

`polystore bench` compares polystore with a raw shared-memory ring (12-byte binary header,
no authentication). This script runs that ring four ways, in alternating rounds of one run:
as is, with the header padded to the size of polystore's JSON frame header (about 330
bytes, with a reply of the same size), with CURVE on the socket (polystore's same-user
authentication, from the user's credential), and with both. If the padded, authenticated
ring is as fast as the bare one, the gap between polystore and the ring is not the wire
format or the encryption but the per-message work on both sides.

    python scripts/bench_ring_costs.py              # 512x512 uint16, 8000 frames, 3 rounds
    python scripts/bench_ring_costs.py --size 2048 --frames 1000
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import statistics
import struct
import time
from multiprocessing import shared_memory

import numpy as np
import zmq

from polystore.apps.bench import RING_SLOTS, stamp

HEADER = struct.Struct("<qi")  # seq, slot
VARIANTS = {"bare": (False, 0), "330-byte header": (False, 318), "CURVE": (True, 0),
            "CURVE + 330-byte header": (True, 318)}


def _router(curve: bool) -> tuple[zmq.Socket, object]:
    if not curve:
        return zmq.Context.instance().socket(zmq.ROUTER), None
    from polystore.streaming.auth import ServerAuth

    auth = ServerAuth("user", None, ())
    sock = auth.context.socket(zmq.ROUTER)
    auth.apply(sock)
    return sock, auth


def receiver(endpoint_q, stop, prefix: str, nbytes: int, curve: bool, pad: int) -> None:
    """The ring's receiving side, as in `polystore bench`: copy out, then acknowledge."""
    sock, auth = _router(curve)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint_q.put(f"tcp://127.0.0.1:{port}")
    views: dict[int, memoryview] = {}
    while not stop.is_set():
        if not sock.poll(100, zmq.POLLIN):
            continue
        while True:
            try:
                identity, header = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            _seq, slot = HEADER.unpack(header[:HEADER.size])
            view = views.get(slot)
            if view is None:
                with open(f"/dev/shm/{prefix}{slot}", "rb") as handle:
                    views[slot] = view = memoryview(
                        mmap.mmap(handle.fileno(), nbytes, prot=mmap.PROT_READ))
            copy = np.empty(nbytes, np.uint8)
            copy[:] = np.frombuffer(view, np.uint8)
            sock.send_multipart([identity, header[:HEADER.size] + bytes(pad)])
    sock.close(linger=0)
    if auth is not None:
        auth.close()
    endpoint_q.put("done")


def ring(context, shape: tuple[int, ...], count: int, curve: bool, pad: int) -> dict:
    frames = [np.random.default_rng(i).integers(0, 65535, shape, dtype=np.uint16)
              for i in range(4)]
    nbytes = frames[0].nbytes
    prefix = f"polystoreringcost_{os.getpid()}_"
    segments = [shared_memory.SharedMemory(f"{prefix}{i}", create=True, size=nbytes)
                for i in range(RING_SLOTS)]
    targets = [np.ndarray(shape, np.uint16, buffer=s.buf) for s in segments]
    endpoint_q, stop = context.Queue(), context.Event()
    proc = context.Process(target=receiver, args=(endpoint_q, stop, prefix, nbytes, curve, pad))
    proc.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    if curve:
        from polystore.streaming.auth import client_keys

        client_keys("user", None).apply(sock)
    sock.connect(endpoint_q.get(timeout=30))
    inflight: dict[int, float] = {}
    latencies: list[float] = []
    seq = 0

    def take_ack() -> None:
        acked, _slot = HEADER.unpack(sock.recv()[:HEADER.size])
        latencies.append(time.perf_counter() - inflight.pop(acked))

    def send(i: int) -> None:
        nonlocal seq
        while seq - RING_SLOTS in inflight:
            take_ack()
        slot = seq % RING_SLOTS
        inflight[seq] = time.perf_counter()
        stamp(frames[i % 4], seq)
        np.copyto(targets[slot], frames[i % 4])
        sock.send(HEADER.pack(seq, slot) + bytes(pad))
        seq += 1

    try:
        for i in range(200):
            send(i)
        while inflight:
            take_ack()
        latencies.clear()
        for i in range(300):  # idle pipe: one frame in flight
            send(i)
            take_ack()
        idle = statistics.median(latencies)
        started = time.perf_counter()
        for i in range(count):
            send(i)
        while inflight:
            take_ack()
        fps = count / (time.perf_counter() - started)
    finally:
        stop.set()
        endpoint_q.get(timeout=30)
        proc.join(30)
        sock.close(linger=0)
        targets.clear()
        for segment in segments:
            segment.close()
            segment.unlink()
    return {"fps": fps, "idle_p50_ms": 1e3 * idle}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="frames are SIZE x SIZE uint16")
    parser.add_argument("--frames", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    shape = (args.size, args.size)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):  # alternated, so load from elsewhere hits all alike
        for name, (curve, pad) in VARIANTS.items():
            results[name].append(ring(context, shape, args.frames, curve, pad))
    bare = statistics.median(r["fps"] for r in results["bare"])
    bare_idle = statistics.median(r["idle_p50_ms"] for r in results["bare"])
    print(f"# raw ring, {args.size}x{args.size} uint16, median of {args.rounds} rounds")
    print("| ring | fps | x bare | idle p50 ms | x bare idle p50 |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        fps = statistics.median(r["fps"] for r in runs)
        idle = statistics.median(r["idle_p50_ms"] for r in runs)
        print(f"| {name} | {fps:,.0f} | {fps / bare:.2f} | {idle:.3f} | {idle / bare_idle:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
