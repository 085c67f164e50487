#!/usr/bin/env python
"""Display throughput of the napari plugin: frames/s shown while a sender streams at full rate.

    python scripts/bench_napari.py [--frames 5000] [--size 2048] [--mode replace]

A sender *process* streams `--frames` uint16 frames of size x size through
``backend="napari_stream"`` as fast as its credits allow, while a real napari viewer (with
the receiver widget docked) displays them. Reported: frames received, layer updates/s (each
shows the newest frame), canvas draws/s (vispy draw events), and the RSS of the napari process
sampled along the run. Without $DISPLAY the script re-runs itself under ``xvfb-run -a``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- the sender process ------------------------------------------------------------------------


def sender(endpoint: str, frames: int, size: int, policy: str) -> None:
    import numpy as np

    from polystore.streaming import NapariStreamingBackend

    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 4000, (size, size), dtype=np.uint16) for _ in range(8)]
    backend = NapariStreamingBackend(endpoint, policy=policy, timeout=30)
    t0 = time.perf_counter()
    try:
        for i in range(frames):
            frame = pool[i % len(pool)]
            frame[0, 0] = i % 65536  # frame index, checked on the display side
            backend.save(frame, f"bench/t{i:05d}.tif")
        backend.flush()
        elapsed = time.perf_counter() - t0
        stats = backend.sender.stats
        print(json.dumps({"sent": int(stats["frames"]), "dropped": int(stats["dropped"]),
                          "seconds": elapsed, "rss_mib": rss_mib()}), flush=True)
    finally:
        backend.close()


# -- the napari side -------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict:
    import napari
    from polystore_napari.widget import ReceiverWidget
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 900)
    widget = ReceiverWidget(viewer, endpoint="tcp://127.0.0.1:0", auto_start=False,
                            mode=args.mode, stack_capacity=args.capacity)
    viewer.window.add_dock_widget(widget, name="polystore receiver", area="right")
    widget.start()
    receiver, buffer = widget.receiver, widget.buffer  # quitting the app stops the receiver
    app = QApplication.instance()

    draws = [0]
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.events.draw.connect(lambda _event: draws.__setitem__(0, draws[0] + 1))

    proc = subprocess.Popen(
        [sys.executable, __file__, "--sender", widget.endpoint, "--frames", str(args.frames),
         "--size", str(args.size), "--policy", args.policy],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    samples: list[tuple[float, int, float]] = []  # (t, frames received, rss MiB)
    marks: dict[str, tuple] = {}
    t_start = time.perf_counter()

    def sample() -> None:
        received = receiver.stats.frames
        now = time.perf_counter()
        samples.append((now - t_start, received, rss_mib()))
        if received and "first" not in marks:
            marks["first"] = (now, received, draws[0], widget.manager.updates)
        if received >= args.frames and "last" not in marks:
            marks["last"] = (now, received, draws[0], widget.manager.updates)
        if proc.poll() is not None and (received >= args.frames or now - t_start > args.timeout):
            app.quit()
        elif now - t_start > args.timeout + 30:
            app.quit()

    timer = QTimer()
    timer.timeout.connect(sample)
    timer.start(100)
    napari.run()
    timer.stop()
    out = proc.communicate(timeout=60)[0]
    sent = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    QApplication.processEvents()
    stats = receiver.stats
    layer = widget.manager.layer("bench")
    last_index = int(layer.data.reshape(-1)[0]) if args.mode == "replace" else None
    first, last = marks["first"], marks.get("last", marks["first"])
    seconds = last[0] - first[0]
    warm = [rss for _, received, rss in samples if received >= min(500, args.frames // 10)]
    result = {
        "frames": args.frames, "size": args.size, "mode": args.mode,
        "received": stats.frames, "dropped_by_policy": stats.dropped,
        "seconds": seconds,
        "received_fps": (last[1] - first[1]) / seconds if seconds else 0.0,
        "displayed_fps": (last[3] - first[3]) / seconds if seconds else 0.0,
        "draws_fps": (last[2] - first[2]) / seconds if seconds else 0.0,
        "coalesced": buffer.stats.coalesced,
        "rss_start_mib": samples[0][2],
        "rss_after_warmup_mib": warm[0] if warm else samples[-1][2],
        "rss_peak_mib": max(rss for *_, rss in samples),
        "rss_end_mib": samples[-1][2],
        "sender_seconds": sent.get("seconds"),
        "sender_rss_mib": sent.get("rss_mib"),
        "last_frame_shown": last_index,
        "display_busy_fraction": widget.display.busy_s / max(seconds, 1e-9),
    }  # fmt: skip
    widget.stop()  # already stopped by the application's quit; harmless
    return result


def table(r: dict) -> str:
    rows = [
        ("frames sent / received", f"{r['frames']} / {r['received']}"),
        ("frame", f"{r['size']}x{r['size']} uint16 ({r['size'] ** 2 * 2 / 2**20:.0f} MiB), "
                  f"mode {r['mode']}"),
        ("stream duration", f"{r['seconds']:.1f} s"),
        ("frames/s received", f"{r['received_fps']:.1f}"),
        ("frames/s displayed (layer updates)", f"{r['displayed_fps']:.1f}"),
        ("canvas draws/s", f"{r['draws_fps']:.1f}"),
        ("coalesced (newest shown instead)", str(r["coalesced"])),
        ("dropped by policy", str(r["dropped_by_policy"])),
        ("napari RSS: start / after warm-up / peak / end",
         f"{r['rss_start_mib']:.0f} / {r['rss_after_warmup_mib']:.0f} / "
         f"{r['rss_peak_mib']:.0f} / {r['rss_end_mib']:.0f} MiB"),
        ("sender RSS at end", f"{r['sender_rss_mib']:.0f} MiB" if r["sender_rss_mib"] else "-"),
        ("main thread busy applying frames", f"{100 * r['display_busy_fraction']:.0f} %"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--mode", default="replace", choices=["replace", "stack"])
    parser.add_argument("--capacity", type=int, default=50, help="stack capacity (mode stack)")
    parser.add_argument("--policy", default="block", choices=["block", "latest"],
                        help="sender policy (block: every frame is delivered)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sender", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        sender(args.sender, args.frames, args.size, args.policy)
        return 0
    if not os.environ.get("DISPLAY") and not os.environ.get("POLYSTORE_BENCH_XVFB"):
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            print("no $DISPLAY and no xvfb-run: install xvfb or run under a display",
                  file=sys.stderr)
            return 2
        env = dict(os.environ, POLYSTORE_BENCH_XVFB="1")
        cmd = [xvfb, "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv]
        return subprocess.call(cmd, env=env)
    result = bench(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    ok = result["displayed_fps"] >= 30 and result["received"] == args.frames
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
