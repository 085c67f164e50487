"""Write a time series to local zarr and compare with per-plane TIFF and raw np.save.

    python scripts/bench_zarr.py                 # 60 x 3 x 2048 x 2048 uint16 (1.5 GB)
    python scripts/bench_zarr.py --quick         # 8 x 3 x 512 x 512, a smoke run

Every method writes the same frames (t, one 3 x Y x X array at a time, as a live pipeline
produces them) into a fresh folder; the figure is the best of ``--rounds`` rounds in
alternating order. Ratios are to np.save measured in the same run, so the machine's load
cancels out as far as it can. Written data stays in the page cache (no fsync), as it does
for a pipeline that keeps running; ``--sync`` adds an os.sync() to each timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from polystore.zarr import ZarrBackend  # noqa: E402


def make_frames(shape: tuple[int, ...], distinct: int = 4) -> list[np.ndarray]:
    """Microscopy-like frames (smooth background, bright cells, Poisson-ish noise), so the
    codecs see realistic data; ``distinct`` frames are made and reused to save time."""
    rng = np.random.default_rng(0)
    c, y, x = shape
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    frames = []
    for i in range(distinct):
        background = 200 + 50 * np.sin(xx / x * 3 + i) * np.cos(yy / y * 2)
        cells = np.zeros((y, x), np.float32)
        for cy, cx in rng.uniform(0, [y, x], size=(max(4, y * x // 40000), 2)):
            r = rng.uniform(5, 20) * y / 2048 + 2
            x0, x1, y0, y1 = int(cx - r), int(cx + r), int(cy - r), int(cy + r)
            cells[max(y0, 0):y1, max(x0, 0):x1] += rng.uniform(500, 3000)
        stack = np.stack([(background + cells * (ch + 1) / c) for ch in range(c)])
        noise = rng.normal(0, 12, size=stack.shape).astype(np.float32)
        frames.append(np.clip(stack + noise, 0, 65535).astype(np.uint16))
    return frames


def write_npy(frames: list[np.ndarray], n: int, folder: Path) -> None:
    for t in range(n):
        np.save(folder / f"t{t:03d}.npy", frames[t % len(frames)], allow_pickle=False)


def write_tiff_planes(frames: list[np.ndarray], n: int, folder: Path) -> None:
    for t in range(n):
        frame = frames[t % len(frames)]
        for c in range(frame.shape[0]):
            tifffile.imwrite(folder / f"t{t:03d}_c{c}.tif", frame[c], photometric="minisblack")


def zarr_writer(compression: str) -> Callable[[list[np.ndarray], int, Path], None]:
    def write(frames: list[np.ndarray], n: int, folder: Path) -> None:
        backend = ZarrBackend(compression=compression)
        for t in range(n):  # each time point grows the series, as a live pipeline does
            backend.save(frames[t % len(frames)], f"{folder}/bench.zarr/series/t{t:03d}")

    return write


METHODS: dict[str, Callable[[list[np.ndarray], int, Path], None]] = {
    "np.save (one .npy per t)": write_npy,
    "tifffile (one .tif per plane)": write_tiff_planes,
    "zarr, compression off": zarr_writer("none"),
    "zarr, Blosc-lz4": zarr_writer("lz4"),
    "zarr, Blosc-zstd (default)": zarr_writer("zstd"),
}


def stored_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 x 3 x 512 x 512")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="Y = X (default 2048)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--sync", action="store_true", help="os.sync() inside each timing")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    n = args.frames or (8 if args.quick else 60)
    size = args.size or (512 if args.quick else 2048)
    shape = (3, size, size)
    frames = make_frames(shape)
    total = n * frames[0].nbytes
    root = Path(tempfile.mkdtemp(prefix="bench_zarr_", dir=args.dir))
    print(f"{n} x {shape[0]} x {size} x {size} uint16 = {total / 1e9:.2f} GB per method, "
          f"{args.rounds} round(s), writing under {root}")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min), {os.cpu_count()} CPUs")
    best: dict[str, float] = {}
    sizes: dict[str, int] = {}
    try:
        for round_index in range(args.rounds):
            order = list(METHODS) if round_index % 2 == 0 else list(reversed(METHODS))
            for name in order:
                folder = root / f"r{round_index}_{len(best)}"
                folder.mkdir()
                started = time.perf_counter()
                METHODS[name](frames, n, folder)
                if args.sync:
                    os.sync()
                seconds = time.perf_counter() - started
                best[name] = min(best.get(name, float("inf")), seconds)
                sizes[name] = stored_bytes(folder)
                shutil.rmtree(folder)
                print(f"  round {round_index + 1}: {name:<32} {seconds:7.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = total / best["np.save (one .npy per t)"] / 1e6
    rows = []
    print(f"\n{'method':<32} {'MB/s':>8} {'x np.save':>10} {'stored':>9}")
    for name in METHODS:
        rate = total / best[name] / 1e6
        ratio = sizes[name] / total
        rows.append({"method": name, "seconds": round(best[name], 3), "mb_per_s": round(rate),
                     "ratio_to_np_save": round(rate / baseline, 2),
                     "stored_fraction": round(ratio, 3)})
        print(f"{name:<32} {rate:8.0f} {rate / baseline:10.2f} {ratio:8.0%}")
    off = next(r for r in rows if r["method"] == "zarr, compression off")
    slowdown = 1 / off["ratio_to_np_save"]
    print(f"\nzarr with compression off takes {slowdown:.2f}x np.save's time "
          f"(target <= 1.5x): {'met' if slowdown <= 1.5 else 'NOT met'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"shape": [n, *shape], "rows": rows,
                                               "load": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
