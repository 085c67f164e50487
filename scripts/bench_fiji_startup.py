#!/usr/bin/env python3
"""Seconds from starting the Fiji receiver to "listening", with and without its compile cache.

Starts viewers/fiji/polystore_receiver.groovy headless through run_headless.sh (a new JVM each
time, as a first run in a new Fiji) and times it until it prints "listening on", three ways
per round, alternating so that other load on the machine hits all alike:

* in memory -- the cache is refused (a polystore folder others can write), so the bootstrap
  compiles the receiver in memory, as the script did before it had a cache
* cold      -- an empty cache: compile into the cache (the first run of a version)
* cached    -- the cache that cold run made: load the classes from it

and, in viewers/fiji/script_editor.groovy (the script run as Fiji's Script Editor runs it, in
one JVM), a first run with an empty cache and a re-run after Kill (cached, compiler warm),
timed by the harness from the start of the run to "listening".

It prints the median of each and the ratio cached/cold, per stack, with the load average
(`os.getloadavg()`) before and after.

    python scripts/bench_fiji_startup.py                      # both stacks, 5 rounds
    python scripts/bench_fiji_startup.py --stack modern --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fiji_helpers import STACKS, ScriptEditor, free_port, start_receiver  # noqa: E402

WAYS = ("in memory", "cold", "cached", "editor first", "editor re-run")
COMPILED = "compiled the receiver into"
LOADED = "loaded the receiver from"


def seconds_to_listening(stack, cache: Path, expect: str) -> float:
    """Start a receiver with XDG_CACHE_HOME=`cache`; seconds until it listens. `expect` is
    the bootstrap's line that says it took the path meant."""
    t0 = time.perf_counter()
    receiver = start_receiver(stack=stack, cache=cache, timeout=600)
    seconds = time.perf_counter() - t0
    rc = receiver.stop()
    if rc != 0 or expect not in receiver.log:
        raise RuntimeError(f"expected {expect!r} and a clean stop (rc={rc}):\n{receiver.log}")
    return seconds


def editor_seconds(stack, cache: Path) -> list[float]:
    """The Script Editor harness: a first run (empty cache), Kill, a re-run (cached)."""
    editor = ScriptEditor(stack, cache=cache)
    try:
        seconds = []
        for _ in range(2):
            params = f'endpoint="tcp://127.0.0.1:{free_port()}"'
            if not stack.curve:
                params += ",allow_unauthenticated=true"
            answer = editor.command(f"run {params}", timeout=600)
            if not answer.startswith("listening"):
                raise RuntimeError(f"the run did not start:\n{editor.log}")
            seconds.append(float(answer.split()[1]))
            editor.command("kill", timeout=60)
        if editor.log.count(COMPILED) != 1 or editor.log.count(LOADED) != 1:
            raise RuntimeError(f"expected one compile, then one load:\n{editor.log}")
        return seconds
    finally:
        editor.close()


def bench(stack, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="polystore-bench-startup-") as tmp:
        refused = Path(tmp, "refused")
        (refused / "polystore").mkdir(parents=True)
        (refused / "polystore").chmod(0o777)
        for n in range(rounds):
            cache = Path(tmp, f"round{n}")  # empty: the cold run fills it
            times["in memory"].append(
                seconds_to_listening(stack, refused, "compiling the receiver in memory")
            )
            times["cold"].append(seconds_to_listening(stack, cache, COMPILED))
            times["cached"].append(seconds_to_listening(stack, cache, LOADED))
            first, rerun = editor_seconds(stack, Path(tmp, f"editor{n}"))
            times["editor first"].append(first)
            times["editor re-run"].append(rerun)
            print(f"  {stack.name} round {n + 1}: "
                  + ", ".join(f"{w} {times[w][-1]:.2f} s" for w in WAYS), flush=True)  # fmt: skip
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=[*STACKS, "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    stacks = list(STACKS.values()) if args.stack == "both" else [STACKS[args.stack]]
    missing = [f"{s.name}: {s.missing()}" for s in stacks if s.missing()]
    if missing:
        print("cannot run: " + "; ".join(missing), file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    results = {stack.name: bench(stack, args.rounds) for stack in stacks}
    load_after = os.getloadavg()
    before, after = (", ".join(f"{v:.2f}" for v in load) for load in (load_before, load_after))
    print(f"\nload average (1, 5, 15 min) before: {before}; after: {after}; {os.cpu_count()} CPUs")
    print(f"median of {args.rounds} rounds, seconds from start to 'listening':\n")
    print("| stack | in memory (no cache) | cold (compile + store) | cached | cached / cold "
          "| Script Editor: first run | re-run (cached) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, times in results.items():
        median = {way: statistics.median(times[way]) for way in WAYS}
        print(f"| {name} | {median['in memory']:.1f} | {median['cold']:.1f} | "
              f"{median['cached']:.1f} | {median['cached'] / median['cold']:.2f} | "
              f"{median['editor first']:.1f} | {median['editor re-run']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
