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
import multiprocessing as mp
import statistics

from polystore.apps.bench import bench_raw_ring, frame_arguments, idle_samples

PAD = 318  # 12-byte binary header + 318 = the size of polystore's frame header
VARIANTS = {"bare": (False, 0), "330-byte header": (False, PAD), "CURVE": (True, 0),
            "CURVE + 330-byte header": (True, PAD)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    frame_arguments(parser, frames=8000, rounds=3)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    shape = (args.size, args.size)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    samples = idle_samples(args.size * args.size * 2)
    for _ in range(args.rounds):  # alternated, so load from elsewhere hits all alike
        for name, (curve, pad) in VARIANTS.items():
            results[name].append(bench_raw_ring(context, shape, args.frames, samples, curve, pad))
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
