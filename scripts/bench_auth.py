"""What same-user authentication costs (issue 11): throughput and idle-pipe latency with
``auth="user"`` (CURVE + ZAP) against ``auth="none"``, measured in the same run, rounds
interleaved so machine load hits both alike; plus what the receiver's copy (size checked
with ``fstat``, then copied from its ``mmap``) costs against ``pread``, which would rule out
SIGBUS entirely.

    python scripts/bench_auth.py            # ~1 minute
    python scripts/bench_auth.py --quick    # fewer rounds

Prints ratios to the unauthenticated baseline; the acceptance bounds are <= 5 % throughput
and <= 0.1 ms latency.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("POLYSTORE_CREDENTIAL",
                      os.path.join(tempfile.mkdtemp(prefix="bench-auth-"), "credential.json"))

from polystore.streaming import NapariStreamingBackend, receiver_for  # noqa: E402


def throughput_fps(auth: str, frames: int, shape: tuple[int, int]) -> float:
    """Frames per second for `frames` saves of `shape` uint16, acknowledged, one pipe."""
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None,
                      auth=auth) as rx:
        with NapariStreamingBackend(rx.endpoint, auth=auth) as backend:
            frame = np.ones(shape, np.uint16)
            backend.save(frame, "warm/0.tif")
            backend.flush()
            start = time.perf_counter()
            for i in range(frames):
                backend.save(frame, f"s/{i}.tif")
            backend.flush()
            return frames / (time.perf_counter() - start)


def idle_latency_ms(auth: str, count: int) -> float:
    """Median save-to-ack time of a small frame on an otherwise idle pipe."""
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=lambda f: None,
                      auth=auth) as rx:
        with NapariStreamingBackend(rx.endpoint, auth=auth) as backend:
            frame = np.ones((64, 64), np.uint16)
            times = []
            for i in range(count + 10):
                start = time.perf_counter()
                backend.save(frame, f"l/{i}.tif")
                backend.flush()
                times.append(time.perf_counter() - start)
            return statistics.median(times[10:]) * 1000


def copy_cost(nbytes: int, repeats: int) -> tuple[float, float]:
    """Seconds per copy of `nbytes` out of a /dev/shm file: (pread, fstat + mmap copy)."""
    path = f"/dev/shm/bench-auth-copy-{os.getpid()}"  # not a segment name: no sweep takes it
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        os.pwrite(fd, b"\1" * nbytes, 0)
        out = np.empty(nbytes, np.uint8)
        mapping = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        source = np.frombuffer(mapping, np.uint8)
        pread_times, mmap_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            os.preadv(fd, [memoryview(out)], 0)
            pread_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            os.fstat(fd)
            out[:] = source
            mmap_times.append(time.perf_counter() - start)
        del source
        mapping.close()
        return statistics.median(pread_times), statistics.median(mmap_times)
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 7, quick 3)")
    args = parser.parse_args()
    rounds, frames, pings = (3, 60, 200) if args.quick else (7, 120, 500)
    rounds = args.rounds or rounds
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"on {os.cpu_count()} cpus")
    fps: dict[str, list[float]] = {"user": [], "none": []}
    latency: dict[str, list[float]] = {"user": [], "none": []}
    for i in range(rounds):
        for auth in ("none", "user") if i % 2 == 0 else ("user", "none"):  # neither always first
            fps[auth].append(throughput_fps(auth, frames, (2048, 2048)))
            latency[auth].append(idle_latency_ms(auth, pings))
    print("per-round fps ratios user/none:",
          " ".join(f"{u / n:.2f}" for u, n in zip(fps["user"], fps["none"], strict=True)))
    fps_user, fps_none = statistics.median(fps["user"]), statistics.median(fps["none"])
    lat_user, lat_none = statistics.median(latency["user"]), statistics.median(latency["none"])
    best_user, best_none = max(fps["user"]), max(fps["none"])
    print(f"2048x2048 uint16 throughput, median of {rounds} rounds x {frames} frames:")
    cost = 100 * (1 - fps_user / fps_none)
    print(f"  auth=none {fps_none:8.1f} fps   auth=user {fps_user:8.1f} fps   "
          f"ratio user/none {fps_user / fps_none:.3f} (cost {cost:+.1f} %)")
    print(f"  best round (least disturbed by load): auth=none {best_none:.1f} fps, auth=user "
          f"{best_user:.1f} fps, ratio {best_user / best_none:.3f}")
    print(f"idle-pipe save-to-ack latency of 64x64 uint16, median of {rounds} x {pings}:")
    print(f"  auth=none {lat_none:.3f} ms   auth=user {lat_user:.3f} ms   "
          f"difference {lat_user - lat_none:+.3f} ms")
    pread_s, mmap_s = copy_cost(2048 * 2048 * 2, 50)
    print(f"copying 8 MiB out of /dev/shm, median of 50: fstat + mmap copy (used) "
          f"{mmap_s * 1000:.3f} ms, pread {pread_s * 1000:.3f} ms, ratio pread/used "
          f"{pread_s / mmap_s:.2f}")


if __name__ == "__main__":
    main()
