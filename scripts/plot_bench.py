#!/usr/bin/env python3
"""Plot the streaming benchmark for docs/performance.md.

Input: the JSON written by ``polystore bench --json OUT`` or the benchmark's printed output
(its markdown table) saved to a file. Output: a PNG with throughput per frame size next to the
baselines (memcpy/2, raw ZeroMQ) and the save-to-ack latencies.

    polystore bench --json build/bench.json
    python scripts/plot_bench.py build/bench.json                 # -> docs/images/bench.png
    polystore bench | tee build/bench.md && python scripts/plot_bench.py build/bench.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "images" / "bench.png"

#: table columns (as printed by polystore.bench) -> JSON keys; "a / b" cells hold two values
COLUMNS = [
    ("frame",),
    ("polystore_fps",),
    ("polystore_gbps",),
    ("x_memcpy_half_hot",),
    ("x_memcpy_half_working_set",),
    ("x_raw_zmq",),
    ("idle_p50_ms", "idle_p99_ms"),
    ("load_p50_ms", "load_p99_ms"),
    ("memcpy_hot_gbps", "memcpy_working_set_gbps"),
    ("raw_zmq_gbps",),
]


def _number(text: str) -> float:
    return float(text.replace(",", "").strip())


def parse_markdown(text: str) -> dict:
    """The benchmark's printed output -> the same structure as its --json file."""
    title, rows = "", []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# ") and not title:
            title = line[2:].strip()
        if not line.startswith("|") and rows:
            break  # the main table ended (a later table has other columns)
        if not line.startswith("|") or line.startswith("|---") or "polystore fps" in line:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(COLUMNS):
            raise ValueError(f"expected {len(COLUMNS)} columns, got {len(cells)}: {line!r}")
        row: dict = {}
        for keys, cell in zip(COLUMNS, cells, strict=True):
            if keys == ("frame",):
                row["frame"] = cell
                continue
            values = cell.split("/")
            if len(values) != len(keys):
                raise ValueError(f"cannot read {cell!r} as {' / '.join(keys)}")
            row.update({k: _number(v) for k, v in zip(keys, values, strict=True)})
        rows.append(row)
    if not rows:
        raise ValueError("no benchmark table found (expected the output of `polystore bench`)")
    return {"title": title, "rows": rows}


def load(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        if "rows" not in data:
            raise ValueError(f"{path}: not a `polystore bench --json` file (no 'rows')")
        return data
    return parse_markdown(text)


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = data["rows"]
    labels = [re.sub(r"\s+uint16$", "\nuint16", r["frame"]) for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)

    series = [
        ("polystore save() -> receiver", [r["polystore_gbps"] for r in rows], "#1f77b4"),
        ("raw ZeroMQ PUSH/PULL", [r["raw_zmq_gbps"] for r in rows], "#ff7f0e"),
        ("memcpy / 2, working set", [r["memcpy_working_set_gbps"] / 2 for r in rows], "#2ca02c"),
        ("memcpy / 2, cache-hot", [r["memcpy_hot_gbps"] / 2 for r in rows], "#98df8a"),
    ]
    width = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        bars = left.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name,
                        color=color)
        if i == 0:
            left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(x, labels)
    left.set_ylabel("GB/s (higher is better)")
    left.set_title("Throughput")
    left.legend(fontsize=8)

    lat = [
        ("idle p50", "idle_p50_ms", "#9ecae1"),
        ("idle p99", "idle_p99_ms", "#3182bd"),
        ("under load p50", "load_p50_ms", "#fc9272"),
        ("under load p99", "load_p99_ms", "#de2d26"),
    ]
    width = 0.8 / len(lat)
    for i, (name, key, color) in enumerate(lat):
        right.bar(x + (i - (len(lat) - 1) / 2) * width, [r[key] for r in rows], width,
                  label=name, color=color)
    right.set_yscale("log")
    right.set_xticks(x, labels)
    right.set_ylabel("save() -> ack, ms (lower is better)")
    right.set_title("Latency")
    right.legend(fontsize=8)
    if data.get("title"):
        fig.suptitle(data["title"], fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path,
                        help="`polystore bench --json` file or its saved printed output")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT,
                        help=f"PNG to write (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        data = load(args.input)
    except (OSError, ValueError) as exc:
        parser.exit(1, f"plot_bench.py: {exc}\n")
    plot(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
