#!/usr/bin/env python
"""Display rate of the napari plugin as a ratio of bare napari's ceiling, measured in one run.

    python scripts/bench_napari.py [--frames 1500] [--size 2048] [--mode replace]

Four phases, each in its own napari process, one after the other:

* ``bare``: no plugin; a Qt callback sets ``layer.data`` to the next of 8 frames each time
  the canvas has drawn the previous one: the most frames/s this napari can show here;
* ``bare + ROI``: the same with a Shapes layer of 20 rectangles on top;
* ``plugin``: a sender *process* streams `--frames` uint16 frames of size x size through
  ``backend="napari_stream"`` as fast as its credits allow into the docked receiver widget;
* ``plugin + ROI``: the same, the sender also sending 20 rectangles once.

Reported: frames/s displayed (layer updates that show a new frame), canvas draws/s, the
plugin's ratios to the bare ceiling, and the napari process's RSS. Without $DISPLAY the
script re-runs itself under ``xvfb-run -a``.
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


ROIS = [{"kind": "rectangle", "coords": [[40 + 90 * (i // 5), 40 + 90 * (i % 5)],
                                         [100 + 90 * (i // 5), 100 + 90 * (i % 5)]]}
        for i in range(20)]


def sender(endpoint: str, frames: int, size: int, policy: str, roi: bool) -> None:
    import numpy as np

    from polystore.streaming import NapariStreamingBackend

    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 4000, (size, size), dtype=np.uint16) for _ in range(8)]
    backend = NapariStreamingBackend(endpoint, policy=policy, timeout=30)
    t0 = time.perf_counter()
    try:
        if roi:
            backend.save(ROIS, "bench/rois.roi.zip", stream="bench")
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
    widget.persist = False
    viewer.window.add_dock_widget(widget, name="polystore receiver", area="right")
    widget.start()
    receiver, buffer = widget.receiver, widget.buffer  # quitting the app stops the receiver
    app = QApplication.instance()

    draws = [0]
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.events.draw.connect(lambda _event: draws.__setitem__(0, draws[0] + 1))

    proc = subprocess.Popen(
        [sys.executable, __file__, "--sender", widget.endpoint, "--frames", str(args.frames),
         "--size", str(args.size), "--policy", args.policy, *(["--roi"] if args.roi else [])],
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


def bare(args: argparse.Namespace) -> dict:
    """The ceiling: napari alone, `layer.data` set anew as soon as the canvas drew."""
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 4000, (args.size, args.size), dtype=np.uint16) for _ in range(8)]
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 900)
    layer = viewer.add_image(pool[0], name="bench", contrast_limits=[0, 4000])
    if args.roi:
        shapes = [np.array(r["coords"], float) for r in ROIS]
        viewer.add_shapes(shapes, shape_type="rectangle", edge_color="yellow",
                          face_color="transparent", edge_width=2, name="bench ROIs")
    app = QApplication.instance()
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    counts = {"draws": 0, "updates": 0, "pending": False}
    marks: dict[str, tuple] = {}

    def next_frame() -> None:
        counts["pending"] = False
        counts["updates"] += 1
        layer.data = pool[counts["updates"] % len(pool)]

    def drawn(_event) -> None:
        counts["draws"] += 1
        if not counts["pending"]:
            counts["pending"] = True
            QTimer.singleShot(0, next_frame)

    canvas.events.draw.connect(drawn)
    t0 = time.perf_counter()

    def sample() -> None:
        now = time.perf_counter() - t0
        if now >= args.warmup and "first" not in marks:
            marks["first"] = (now, counts["updates"], counts["draws"], rss_mib())
        if now >= args.warmup + args.seconds:
            marks["last"] = (now, counts["updates"], counts["draws"], rss_mib())
            app.quit()

    timer = QTimer()
    timer.timeout.connect(sample)
    timer.start(100)
    QTimer.singleShot(0, next_frame)
    napari.run()
    timer.stop()
    first, last = marks["first"], marks["last"]
    seconds = last[0] - first[0]
    return {"size": args.size, "seconds": seconds, "roi": args.roi,
            "displayed_fps": (last[1] - first[1]) / seconds,
            "draws_fps": (last[2] - first[2]) / seconds, "rss_end_mib": last[3]}


def phase(args: argparse.Namespace, which: str, roi: bool) -> dict:
    """Run one phase in a fresh process (its own napari, its own memory)."""
    cmd = [sys.executable, __file__, "--phase", which, "--frames", str(args.frames),
           "--size", str(args.size), "--mode", args.mode, "--capacity", str(args.capacity),
           "--policy", args.policy, "--seconds", str(args.seconds),
           "--timeout", str(args.timeout), *(["--roi"] if roi else [])]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(runs: dict[str, dict], load: str) -> str:
    ceiling = runs["bare"]["displayed_fps"]
    ceiling_roi = runs["bare + ROI"]["displayed_fps"]
    lines = ["| phase | frames/s displayed | canvas draws/s | ratio to bare | "
             "ratio to bare + ROI | napari RSS at end |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ratio = r["displayed_fps"] / ceiling if ceiling else 0.0
        ratio_roi = r["displayed_fps"] / ceiling_roi if ceiling_roi else 0.0
        lines.append(f"| {name} | {r['displayed_fps']:.1f} | {r['draws_fps']:.1f} | "
                     f"{ratio:.2f}x | {ratio_roi:.2f}x | {r['rss_end_mib']:.0f} MiB |")
    plugin = runs["plugin"]
    lines += ["", f"{plugin['size']}x{plugin['size']} uint16, mode {plugin['mode']}; plugin "
              f"phases: {plugin['frames']} frames sent, {plugin['received']} received, "
              f"{plugin['coalesced']} coalesced, main thread busy applying frames "
              f"{100 * plugin['display_busy_fraction']:.0f} %. Load (uptime): {load}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--mode", default="replace", choices=["replace", "stack"])
    parser.add_argument("--capacity", type=int, default=50, help="stack capacity (mode stack)")
    parser.add_argument("--policy", default="block", choices=["block", "latest"],
                        help="sender policy (block: every frame is delivered)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="measured seconds of each bare phase (after 2 s warm-up)")
    parser.add_argument("--warmup", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sender", metavar="ENDPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["bare", "plugin"], help=argparse.SUPPRESS)
    parser.add_argument("--roi", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        sender(args.sender, args.frames, args.size, args.policy, args.roi)
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
    if args.phase:
        print(json.dumps(bare(args) if args.phase == "bare" else bench(args)))
        return 0
    runs = {"bare": phase(args, "bare", False), "bare + ROI": phase(args, "bare", True),
            "plugin": phase(args, "plugin", False), "plugin + ROI": phase(args, "plugin", True)}
    load = subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()
    print(json.dumps({"runs": runs, "uptime": load}, indent=2) if args.json
          else table(runs, load))
    ratio = runs["plugin"]["displayed_fps"] / max(runs["bare"]["displayed_fps"], 1e-9)
    return 0 if ratio >= 0.9 and runs["plugin"]["received"] == args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
