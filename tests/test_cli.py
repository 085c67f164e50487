"""The `polystore` command line, run as a real subprocess: every subcommand and its errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from polystore.streaming import (
    FijiStreamingBackend,
    NapariStreamingBackend,
    ViewerNotRunningError,
    receiver_for,
)
from polystore.streaming.orphans import pid_alive
from tests import needs

ROOT = Path(__file__).resolve().parent.parent


def cli(
    *args: str, env: dict | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polystore.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def wait_listening(backend_cls, endpoint: str, proc: subprocess.Popen, timeout: float) -> dict:
    """Poll with `report` requests until a receiver answers at `endpoint`."""
    deadline = time.monotonic() + timeout
    with backend_cls(endpoint, connect_timeout=0.5) as probe:
        while True:
            try:
                return probe.request("report", timeout=5)
            except ViewerNotRunningError:
                assert proc.poll() is None, f"the receiver exited with {proc.returncode}"
                assert time.monotonic() < deadline, f"nothing listened on {endpoint}"


def report(backend_cls, endpoint: str) -> dict:
    with backend_cls(endpoint) as probe:
        return probe.request("report", timeout=10)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """plate/ with TIFFs and an NPY to stream, and files every viewer must skip."""
    root = tmp_path / "plate"
    (root / "A01").mkdir(parents=True)
    (root / "B02").mkdir()
    for t in range(3):
        tifffile.imwrite(root / "A01" / f"t{t:03d}.tif", np.full((32, 48), t, np.uint16))
    np.save(root / "B02" / "stack.npy", np.arange(2 * 16 * 16, dtype=np.float32)
            .reshape(2, 16, 16))  # fmt: skip
    (root / "A01" / "cells.csv").write_text("cell,area\n1,20\n")
    (root / "meta.json").write_text("{}")
    Image.fromarray(np.full((8, 12), 200, np.uint8)).save(root / "snapshot.png")
    return root


class Collector:
    """A real receiver in this process that records what it got."""

    def __init__(self, backend_cls) -> None:
        self.frames: list = []
        self.rois: list = []
        self.receiver = receiver_for(backend_cls, "tcp://127.0.0.1:0", on_frame=self.frames.append,
                                     on_rois=self.rois.append)

    def __enter__(self) -> Collector:
        self.receiver.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.stop()

    @property
    def endpoint(self) -> str:
        return self.receiver.endpoint


# -- top level ------------------------------------------------------------------------------


def test_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "polystore 0.1.0"


def test_console_script_is_installed():
    result = subprocess.run(["polystore", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "napari", "fiji", "send", "shm", "bench"):
        assert command in result.stdout


def test_python_dash_m_polystore_is_the_command():
    result = subprocess.run([sys.executable, "-m", "polystore", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "usage: polystore" in result.stdout, result.stderr


def test_the_library_never_imports_the_applications_or_the_plugin():
    package = ROOT / "polystore"
    for source in package.rglob("*.py"):
        if source.is_relative_to(package / "apps") or source in (package / "cli.py",
                                                                 package / "__main__.py"):
            continue  # the applications (and the python -m polystore[.cli] shims)
        text = source.read_text()
        assert "polystore_napari" not in text, source
        assert "polystore.apps" not in text, source
    code = (
        "import sys, polystore, polystore.streaming; from polystore import FileManager; "
        "print(sorted(m for m in sys.modules if m.startswith(('polystore_napari', "
        "'polystore.apps'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_polystore_napari_comes_from_the_plugins_entry_point():
    from importlib.metadata import entry_points

    needs.module("polystore_napari")
    (entry,) = [e for e in entry_points(group="polystore.cli") if e.name == "napari"]
    assert entry.value == "polystore_napari.cli:add_napari_command"
    result = cli("napari", "--help")
    assert result.returncode == 0 and "--stack-capacity" in result.stdout


def test_no_command_says_what_to_do():
    result = cli()
    assert result.returncode == 2
    assert "choose a command" in result.stderr and "polystore demo" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["send"], "the following arguments are required: PATH, --to"),
        (["send", "a.tif", "--to", "disk"], "argument --to: invalid choice: 'disk'"),
        (
            ["send", "definitely/not/here", "--to", "napari_stream"],
            "no such file or folder: definitely/not/here",
        ),
        (
            ["send", ".", "--to", "fiji_stream", "--policy", "maybe"],
            "argument --policy: invalid choice: 'maybe'",
        ),
        (["demo", "--frames", "0"], "--frames: expected a whole number >= 1, got '0'"),
        (["demo", "--frames", "many"], "--frames: expected a whole number >= 1, got 'many'"),
        (["demo", "--fps", "-2"], "--fps: expected a number >= 0, got '-2'"),
        # an OverflowError traceback out of time.sleep
        (["demo", "--fps", "1e-300"], "--fps: expected 0 (as fast as possible) or 0.001"),
        (["send", ".", "--to", "napari_stream", "--max-inflight-bytes", "lots"],
         "--max-inflight-bytes: expected a size such as 2G"),
        # a traceback (ValueError out of check_bind_endpoint) until the endpoint was checked
        # as an argument
        (["demo", "--no-napari", "--endpoint", "foo"],
         "argument --endpoint: endpoint must look like tcp://127.0.0.1:PORT"),
        (["demo", "--no-napari", "--endpoint", "tcp://0.0.0.0:5555"],
         "argument --endpoint: refusing to listen on 0.0.0.0"),
        (["demo", "--endpoint", "inproc://demo"], "inproc:// reaches only sockets of one"),
        (["napari", "--mode", "sideways"], "argument --mode: invalid choice: 'sideways'"),
        (["shm"], "choose what to do: `polystore shm ls` or `polystore shm clean`"),
        (["shm", "rm"], "invalid choice: 'rm'"),
        (["bench", "--slow"], "unrecognized arguments: --slow"),
        (["bench", "--rounds", "0"], "--rounds: expected a whole number >= 1, got '0'"),
        (["send", ".", "--to", "napari_stream", "--stream", "s" * 257],
         "--stream: expected a stream key of 1 to 256 characters"),
        (["send", ".", "--to", "napari_stream", "--stream", ""],
         "--stream: expected a stream key of 1 to 256 characters"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, expected):
    result = cli(*args)
    assert result.returncode == 2, result
    assert expected in result.stderr
    assert "--help' for help" in result.stderr


# -- send -----------------------------------------------------------------------------------


def test_send_folder_to_a_real_receiver(images):
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(images), "--to", "napari_stream", "--endpoint", rx.endpoint)
    assert result.returncode == 0, result.stderr
    got = {f.header.path: f for f in rx.frames}
    assert sorted(got) == [
        "plate/A01/t000.tif",
        "plate/A01/t001.tif",
        "plate/A01/t002.tif",
        "plate/B02/stack.npy",
        "plate/snapshot.png",  # napari takes PNG: read as an array (it was skipped as not)
    ]
    for t in range(3):
        frame = got[f"plate/A01/t{t:03d}.tif"]
        assert frame.stream == "plate/A01"
        assert frame.array.dtype == np.uint16 and (frame.array == t).all()
    stack = got["plate/B02/stack.npy"].array
    assert stack.shape == (2, 16, 16) and stack[1, 15, 15] == 511
    assert got["plate/snapshot.png"].array.shape == (8, 12)
    assert "sent 5 file(s)" in result.stdout and rx.endpoint in result.stdout
    # skipped files are reported, with the reason
    assert "skipped 2 file(s) napari_stream does not stream (.csv, .json)" in result.stderr
    assert "send -> napari_stream" in result.stderr  # the progress bar


def test_send_of_a_roi_file_keeps_each_roi_on_its_plane(tmp_path):
    """send loaded a .roi.zip without the ROIs' planes (c, z, t), so every ROI of a time
    series or stack landed on every plane."""
    from polystore import DiskBackend
    from polystore.rois import PositionedRoi, Roi

    rois = [PositionedRoi(Roi("point", [[1, 2]], "a"), {"t": 0}),
            PositionedRoi(Roi("point", [[3, 4]], "b"), {"t": 1}),
            PositionedRoi(Roi("rectangle", [[0, 0], [5, 5]], "c"), {"t": 1})]
    DiskBackend().save(rois, tmp_path / "cells.roi.zip")
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(tmp_path / "cells.roi.zip"), "--to", "napari_stream",
                     "--endpoint", rx.endpoint, "--stream", "cells")
        deadline = time.monotonic() + 10
        while len(rx.rois) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert result.returncode == 0, result.stderr
    got = {tuple(item.header.axes.items()): [r.label for r in item.header.rois]
           for item in rx.rois}
    assert got == {(("t", 0),): ["a"], (("t", 1),): ["b", "c"]}


def test_send_files_with_one_stream_key_to_fiji_stream(images):
    files = sorted(str(p) for p in (images / "A01").glob("*.tif"))
    with Collector(FijiStreamingBackend) as rx:
        result = cli("send", *files, str(images / "snapshot.png"), "--to", "fiji_stream",
                     "--endpoint", rx.endpoint, "--stream", "preview", "--policy", "latest",
                     "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [f.header.path for f in rx.frames] == ["t000.tif", "t001.tif", "t002.tif"]
    assert {f.stream for f in rx.frames} == {"preview"}
    # fiji_stream does not take PNG at all: its own extension filter says so
    assert (
        "fiji_stream does not stream (.png); it takes .npy, .roi.zip, .tif, .tiff" in result.stderr
    )
    assert "send -> fiji_stream" not in result.stderr  # --quiet


def test_send_with_nothing_listening_fails_naming_the_endpoint(images):
    endpoint = free_endpoint()
    t0 = time.monotonic()
    result = cli("send", str(images), "--to", "napari_stream", "--endpoint", endpoint)
    assert result.returncode == 1
    assert f"no napari receiver answered at {endpoint}" in result.stderr
    assert "polystore napari" in result.stderr  # how to start the viewer
    assert "Traceback" not in result.stderr
    assert time.monotonic() - t0 < 30


def test_send_reports_unreadable_files_and_sends_the_rest(images):
    (images / "A01" / "broken.tif").write_bytes(b"this is not a TIFF")
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(images / "A01"), "--to", "napari_stream",
                     "--endpoint", rx.endpoint, "-q")  # fmt: skip
    assert result.returncode == 1
    assert len(rx.frames) == 3
    assert "broken.tif: cannot load it" in result.stderr
    assert "sent 3 file(s)" in result.stdout


def test_send_with_nothing_sendable_says_so(tmp_path):
    (tmp_path / "table.csv").write_text("a\n1\n")
    result = cli("send", str(tmp_path), "--to", "napari_stream")
    assert result.returncode == 1
    assert "nothing to send" in result.stderr and ".tif" in result.stderr


def test_send_passes_over_fifos_and_linked_folders_and_says_so(images, tmp_path):
    """A FIFO in a folder was read as a file: send blocked on it forever. A FIFO named on the
    command line was 'no such file or folder'; a linked folder was skipped silently."""
    os.mkfifo(images / "A01" / "pipe.tif")
    (images / "linked").symlink_to(images / "B02", target_is_directory=True)
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(images / "A01"), str(images / "linked"), "--to",
                     "napari_stream", "--endpoint", rx.endpoint, "-q", timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(rx.frames) == 4  # A01's three TIFFs, and the link named on the command line
    assert "pipe.tif (not a regular file)" in result.stderr
    (images / "A01" / "pipe.tif").unlink()
    result = cli("send", str(images), "--to", "napari_stream", "--endpoint", free_endpoint(),
                 timeout=60)
    assert "linked/ (a link to a folder)" in result.stderr
    os.mkfifo(tmp_path / "named.tif")
    result = cli("send", str(tmp_path / "named.tif"), "--to", "napari_stream", timeout=60)
    assert result.returncode == 2 and "is not a regular file or a folder" in result.stderr


@pytest.mark.parametrize("args, says", [
    (["--endpoint", "foo"], "argument --endpoint: cannot stream to endpoint 'foo'"),
    (["--endpoint", "tcp://127.0.0.1:99999"], "its port 99999 is not from 1 to 65535"),
    (["--endpoint", "localhost:47001"], "the transport must be tcp:// or ipc://"),
    (["--endpoint", "http://127.0.0.1:47001"], "the transport must be tcp:// or ipc://"),
    # an unset $VAR: it streamed to the default endpoint without a word
    (["--endpoint", ""], "argument --endpoint: an empty endpoint (an unset shell variable?)"),
])
def test_send_to_a_bad_endpoint_is_a_usage_error(images, args, says):
    """They exited 1 (found when the backend was made), not 2 as usage errors do."""
    result = cli("send", str(images), "--to", "napari_stream", *args)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert "--help' for help" in result.stderr and "Traceback" not in result.stderr


def test_send_of_a_missing_zarr_store_is_a_usage_error(tmp_path):
    result = cli("send", str(tmp_path / "none.zarr"), "--to", "napari_stream")
    assert result.returncode == 2, result.stderr
    assert f"no such zarr store: {tmp_path / 'none.zarr'}" in result.stderr


def test_send_of_a_file_larger_than_a_frame_says_which_option_to_raise(images):
    """The advice was 'raise max_inflight_bytes when creating the backend', which the command
    line had no way to do."""
    with Collector(NapariStreamingBackend) as rx:
        small = cli("send", str(images / "B02"), "--to", "napari_stream", "--endpoint",
                    rx.endpoint, "--max-inflight-bytes", "1k", "-q")
        assert small.returncode == 1
        assert "stack.npy: 2.0 KiB is more than one frame may be (1.0 KiB): raise " \
               "--max-inflight-bytes" in small.stderr, small.stderr
        enough = cli("send", str(images / "B02"), "--to", "napari_stream", "--endpoint",
                     rx.endpoint, "--max-inflight-bytes", "2KiB", "-q")
    assert enough.returncode == 0, enough.stderr
    assert [f.header.path for f in rx.frames] == ["B02/stack.npy"]


def test_send_reads_a_file_inside_a_folder_named_like_a_zarr_store_as_a_file(images, tmp_path):
    """tifs.zarr/t000.tif was taken for a node of a zarr store: 'nothing at ... on backend
    zarr'."""
    folder = tmp_path / "tifs.zarr"
    folder.mkdir()
    (images / "A01" / "t000.tif").rename(folder / "t000.tif")
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(folder / "t000.tif"), "--to", "napari_stream", "--endpoint",
                     rx.endpoint, "-q")
    assert result.returncode == 0, result.stderr
    # a name that is nothing but an index keeps its folder's name (the stream is the folder)
    assert [f.header.path for f in rx.frames] == ["tifs.zarr/t000.tif"]


def test_send_streams_a_file_whose_name_is_not_utf8(tmp_path):
    """Refused with advice for the Python API (os.fsencode...), which the command line user
    could not follow."""
    folder = tmp_path / "nu"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.tif")
    tifffile.imwrite(folder / name, np.ones((4, 4), np.uint8))
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(folder), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q")
    assert result.returncode == 0, result.stderr
    assert [f.header.path for f in rx.frames] == ["nu/caf\ufffd.tif"]


def test_send_of_an_empty_path_is_refused(images):
    """'' was read as '.' and streamed the current folder."""
    result = cli("send", "", "--to", "napari_stream", cwd=images)
    assert result.returncode == 2 and "an empty path" in result.stderr, result.stderr


# -- shm ------------------------------------------------------------------------------------


def make_segment(name: str, size: int) -> Path:
    path = Path("/dev/shm") / name
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def skip_if_swept(orphan: Path) -> None:
    """Every receiver that starts sweeps the orphans of its prefix: one started by another
    program on this machine may have removed ours before the command under test ran."""
    if not orphan.exists():
        pytest.skip(f"{orphan.name} was swept by another process meanwhile")


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_shm_ls_and_clean_with_a_real_orphan():
    orphan_pid = dead_pid()
    orphan = make_segment(f"napari_{orphan_pid}_deadbeef_0", 3 * 4096)
    live = make_segment(f"fiji_{os.getpid()}_c0ffee00_7", 4096)
    try:
        listed = cli("shm", "ls")
        assert listed.returncode == 0, listed.stderr
        if orphan.name not in listed.stdout:
            skip_if_swept(orphan)
        lines = {line.split()[0]: line.split() for line in listed.stdout.splitlines()}
        assert lines[orphan.name][1:] == [str(orphan_pid), "dead", "12.0", "KiB"]
        assert lines[live.name][1:] == [str(os.getpid()), "alive", "4.0", "KiB"]
        assert "polystore shm clean" in listed.stdout  # the hint for the orphan

        skip_if_swept(orphan)
        cleaned = cli("shm", "clean")
        assert cleaned.returncode == 0, cleaned.stderr
        if orphan.name not in cleaned.stdout:
            skip_if_swept(orphan)  # in the moment before clean ran; else clean missed it
        assert f"removed {orphan.name} (owner pid {orphan_pid}, 12.0 KiB)" in cleaned.stdout
        assert not orphan.exists()
        assert live.exists(), "a live owner's segment must never be removed"

        again = cli("shm", "ls")
        assert orphan.name not in again.stdout and live.name in again.stdout
        assert "no orphaned segments" in cli("shm", "clean").stdout
    finally:
        for path in (orphan, live):
            path.unlink(missing_ok=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_shm_all_covers_prefixes_of_backends_not_installed():
    # a prefix no installed backend (and no receiver that could sweep it) uses
    orphan = make_segment(f"pstest_{dead_pid()}_abad1dea_3", 4096)
    try:
        assert orphan.name not in cli("shm", "ls").stdout
        assert orphan.name in cli("shm", "ls", "--all").stdout
        assert orphan.exists()
        assert cli("shm", "clean").returncode == 0 and orphan.exists()
        assert orphan.name in cli("shm", "clean", "--all").stdout
        assert not orphan.exists()
    finally:
        orphan.unlink(missing_ok=True)


# -- bench ----------------------------------------------------------------------------------


def test_bench_quick_writes_json_that_plots(tmp_path):
    out = tmp_path / "build" / "bench.json"  # a folder not made yet, as in docs/performance.md
    result = cli("bench", "--quick", "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stderr
    assert "| frame | polystore fps | GB/s |" in result.stdout
    assert "torn: 0" in result.stdout
    data = json.loads(out.read_text())
    assert [r["frame"] for r in data["rows"]] == [
        "2048x2048 uint16",
        "512x512 uint16",
        "16x512x1024 uint16",
    ]
    assert all(r["polystore_fps"] > 0 and r["idle_p50_ms"] > 0 for r in data["rows"])
    assert data["torn_frames"] == 0 and data["verified_frames"] > 0
    # the raw shared-memory ring, measured in the same run, and polystore's ratios to it
    assert "| frame | polystore fps | raw ring fps | x raw ring |" in result.stdout
    ring = {r["frame"]: r for r in data["raw_ring"]}
    assert set(ring) == {r["frame"] for r in data["rows"]}
    for r in ring.values():
        assert r["x_raw_ring"] == pytest.approx(r["polystore_fps"] / r["ring_fps"])
        assert r["x_ring_idle_p50"] == pytest.approx(r["idle_p50_ms"] / r["ring_idle_p50_ms"])

    # the printed table and the JSON carry the same figures; both plot
    (tmp_path / "bench.md").write_text(result.stdout)
    for source in (out, tmp_path / "bench.md"):
        png = tmp_path / f"{source.name}.png"
        plotted = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_bench.py"),
                                  str(source), "--out", str(png)],
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert plotted.returncode == 0, plotted.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_script_is_a_thin_wrapper_with_the_same_output():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_stream.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# polystore streaming benchmark")
    assert "| frame | polystore fps | GB/s | x memcpy/2 (hot) |" in result.stdout
    assert "receiver verified" in result.stdout


def test_plot_bench_rejects_what_is_not_benchmark_output(tmp_path):
    bogus = tmp_path / "notes.md"
    bogus.write_text("# notes\n\nno table here\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_bench.py"),
                             str(bogus), "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1
    assert "no benchmark table found" in result.stderr


def test_bench_refuses_a_json_file_it_cannot_write_before_it_runs(tmp_path):
    """--json was opened only after the whole benchmark: a folder given as OUT lost minutes of
    figures to a traceback."""
    t0 = time.monotonic()
    result = cli("bench", "--json", str(tmp_path), timeout=60)
    assert result.returncode == 2 and f"--json {tmp_path}: cannot write it" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - t0 < 30


# -- fiji -----------------------------------------------------------------------------------


def test_fiji_prints_where_the_script_is_and_how_to_install_it():
    result = cli("fiji")
    assert result.returncode == 0, result.stderr
    script = ROOT / "viewers" / "fiji" / "polystore_receiver.groovy"
    assert f"Fiji receiver script: {script}" in result.stdout
    assert script.is_file()
    assert "Fiji.app/jars/" in result.stdout and "Fiji.app/scripts/" in result.stdout
    assert "tcp://127.0.0.1:55556" in result.stdout


def test_fiji_run_says_what_is_missing():
    env = {**os.environ, "IJ_JAR": "/nowhere/ij.jar"}
    result = cli("fiji", "--run", env=env)
    assert result.returncode == 1
    assert "missing" in result.stderr and "/nowhere/ij.jar" in result.stderr
    assert "scripts/install.sh" in result.stderr


@pytest.mark.parametrize("name, says", [("o\\x", "cannot carry a path with a quote, backslash"),
                                        ('q"r', "cannot carry a path with a quote, backslash"),
                                        ("a.txt", "cannot make the folder")],
                         ids=["backslash", "quote", "a-file"])
def test_fiji_run_refuses_an_output_dir_it_cannot_pass_on(tmp_path, name, says):
    """`o\\x` made the folder o\\x while the receiver saved into ox; a quote gave a Java
    stack trace; an existing file gave a Python traceback."""
    (tmp_path / "a.txt").write_text("x")
    result = cli("fiji", "--run", "--endpoint", free_endpoint(), "--output-dir", name,
                 cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "listening on" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("args, env, says", [
    (["--endpoint", "garbage"], {}, "argument --endpoint: endpoint must look like"),
    (["--endpoint", "ipc:///tmp/x"], {}, "listens on tcp:// only"),
    ([], {"POLYSTORE_FIJI_ENDPOINT": "garbage\"; rm -rf x"}, "$POLYSTORE_FIJI_ENDPOINT: "),
])
def test_fiji_checks_its_endpoint_before_anything_starts(args, env, says):
    """'garbage' failed only after the JVM had started, and was printed as the endpoint to
    keep."""
    result = cli("fiji", *args, env={**os.environ, **env}, timeout=60)
    assert result.returncode in (1, 2) and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "keep the endpoint" not in result.stdout


def _fiji_missing() -> str | None:
    from polystore.apps.fiji import fiji_missing

    missing = fiji_missing()
    return "; ".join(missing) if missing else None


@pytest.mark.fiji
def test_fiji_run_receives_what_send_streams(images, tmp_path, monkeypatch):
    if (why := _fiji_missing()) is not None:
        needs.missing(f"Fiji headless cannot run: {why}")
    monkeypatch.setenv("POLYSTORE_AUTH", "none")  # Debian's JeroMQ 0.3 has no CURVE
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the script's compile cache
    endpoint = free_endpoint()
    proc = subprocess.Popen(
        [sys.executable, "-m", "polystore.cli", "fiji", "--run", "--endpoint", endpoint,
         "--output-dir", str(tmp_path / "fiji_out")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wait_listening(FijiStreamingBackend, endpoint, proc, timeout=90)["frames"] == 0
        result = cli("send", str(images / "A01"), "--to", "fiji_stream", "--endpoint", endpoint)
        assert result.returncode == 0, result.stderr
        state = report(FijiStreamingBackend, endpoint)
        assert state["frames"] == 3
        assert [image["title"] for image in state["images"]] == ["A01"]
    finally:
        proc.send_signal(signal.SIGTERM)  # exec'd: the signal reaches the receiver itself
        output, _ = proc.communicate(timeout=30)
    assert "listening on" in output


# -- napari ---------------------------------------------------------------------------------


def test_napari_help():
    result = cli("napari", "--help")
    assert result.returncode == 0
    assert "--endpoint" in result.stdout and "--mode" in result.stdout


def test_napari_without_a_display_says_what_to_do():
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}  # fmt: skip
    result = cli("napari", env=env)
    assert result.returncode == 1
    assert "no display" in result.stderr and "polystore demo --headless" in result.stderr


@pytest.mark.parametrize(
    ("args", "env_endpoint", "expected"),
    [
        (["--endpoint", "foo"], None, "endpoint must look like tcp://127.0.0.1:PORT, got 'foo'"),
        (["--endpoint", "tcp://0.0.0.0:5555"], None, "refusing to listen on 0.0.0.0"),
        (["--stack-capacity", "999999"], None, "stack_capacity must be a whole number from 1"),
        ([], "nonsense", "got 'nonsense' (from $POLYSTORE_NAPARI_ENDPOINT)"),
    ],
)
def test_napari_bad_options_are_usage_errors_before_napari_starts(args, env_endpoint, expected):
    """A bad --endpoint or --stack-capacity was found only once napari had opened its
    window (exit 1 after a slow start); without a display the user was told to find one,
    and a wrong endpoint stayed unknown. Now it is a usage error (2), display or not."""
    needs.module("polystore_napari")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}  # fmt: skip
    if env_endpoint:
        env["POLYSTORE_NAPARI_ENDPOINT"] = env_endpoint
    result = cli("napari", *args, env=env)
    assert result.returncode == 2, result
    assert expected in result.stderr and "no display" not in result.stderr
    assert "'polystore napari --help' for help" in result.stderr


def test_napari_missing_plugin_says_how_to_install(tmp_path):
    shadow = tmp_path / "polystore_napari"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        'raise ImportError("No module named \'napari\'", name="napari")\n'
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DISPLAY": ":1"}
    result = cli("napari", env=env)
    assert result.returncode == 1
    assert "pip install -e viewers/napari" in result.stderr
    assert "bash scripts/install.sh" in result.stderr


def _plugin_env(root: Path, entry_points: str, modules: dict[str, str]) -> dict:
    """An environment whose Python sees one more installed distribution, `root`'s, with
    these `polystore.cli` entry points and modules."""
    info = root / "polystore_cli_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: polystore-cli-test-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[polystore.cli]\n" + entry_points)
    for name, code in modules.items():
        (root / f"{name}.py").write_text(code)
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def test_a_broken_cli_plugin_breaks_neither_the_command_nor_its_built_ins(tmp_path):
    """A plugin that takes a built-in name (before or after it is added), one that fails
    half-way through adding its parser, and one that calls sys.exit on import: every
    `polystore` command crashed with argparse's 'conflicting subparser' traceback, or exited
    with the plugin's message. Now the built-ins work, and the broken command says why."""
    env = _plugin_env(tmp_path, (
        "demo = cli_plugin_bad:add_demo\n"
        "send = cli_plugin_bad:add_send\n"
        "half = cli_plugin_bad:add_half\n"
        "quits = cli_plugin_quits:add\n"
    ), {
        "cli_plugin_bad": (
            "def add_demo(sub):\n    sub.add_parser('demo')\n\n"
            "def add_send(sub):\n    sub.add_parser('send').set_defaults(func=lambda a: 0)\n\n"
            "def add_half(sub):\n    sub.add_parser('half')\n"
            "    raise RuntimeError('half-way broken')\n"
        ),
        "cli_plugin_quits": "import sys\nsys.exit('this plugin quits on import')\n",
    })  # fmt: skip
    result = cli("shm", "ls", env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "ignoring the polystore.cli entry point demo" in result.stderr
    assert "ignoring the polystore.cli entry point send" in result.stderr
    result = cli("send", env=env)  # still the built-in send, not the plugin's
    assert result.returncode == 2 and "required: PATH, --to" in result.stderr
    result = cli("half", env=env)
    assert result.returncode == 1
    assert "RuntimeError: half-way broken" in result.stderr
    assert "polystore-cli-test-plugin" in result.stderr
    result = cli("quits", env=env)
    assert result.returncode == 1 and "this plugin quits on import" in result.stderr
    result = cli("--help", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_napari_starts_listening_and_shows_frames():
    needs.display()
    needs.module("napari")
    endpoint = free_endpoint()
    proc = subprocess.Popen(
        [sys.executable, "-m", "polystore.cli", "napari", "--endpoint", endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(NapariStreamingBackend, endpoint, proc, timeout=90)
        with NapariStreamingBackend(endpoint) as backend:
            backend.save(np.ones((16, 16), np.uint8), "cli/t000.tif")
            backend.flush()
            deadline = time.monotonic() + 30
            while True:  # the layer appears at the next display tick
                state = backend.request("report")
                if any(layer["stream"] == "cli" for layer in state.get("layers", [])):
                    break
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
        assert state["frames"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


# -- keys -------------------------------------------------------------------------------------


_WATCH_SECRET = """
import os, stat, sys
from pathlib import Path
secret = Path(sys.argv[1]) / "viewer.key_secret"
seen = []

def watch(event, args):
    if event in ("open", "os.chmod", "os.rename", "os.link") and secret.exists():
        seen.append(stat.S_IMODE(secret.stat().st_mode))

os.umask(0o022)
sys.addaudithook(watch)
from polystore.streaming.keys import create_keys
create_keys(sys.argv[1])
print(sorted({oct(m) for m in seen}))
"""


def test_a_secret_key_is_never_readable_by_others_while_it_is_written(tmp_path):
    """The secret was written with the umask's mode (0644) and only then made 0600: another
    account could open it in between. An audit hook looks at its mode at every file event."""
    out = subprocess.run([sys.executable, "-c", _WATCH_SECRET, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['0o600']"
    assert stat.S_IMODE((tmp_path / "viewer.key").stat().st_mode) == 0o644


@pytest.mark.parametrize("name, says", [("b" * 250, "too long"), ("../escape", "plain file name"),
                                        ("", "plain file name")],
                         ids=["too-long", "outside", "empty"])
def test_a_bad_key_name_is_refused_and_leaves_no_half_pair(tmp_path, name, says):
    """A 250-character name wrote NAME.key, then failed on NAME.key_secret (too long) and left
    the public half, which refused the next try; '../escape' wrote outside the folder."""
    out = cli("keys", str(tmp_path / "keys"), "--name", name)
    assert out.returncode == 1 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == []
    assert cli("keys", str(tmp_path / "keys")).returncode == 0


def test_keys_into_a_file_says_it_is_a_file(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    out = cli("keys", str(tmp_path / "a.txt"))
    assert out.returncode == 1 and "is a file; keys go into a folder" in out.stderr, out.stderr


def test_keys_prints_absolute_paths_to_copy(tmp_path):
    """`export POLYSTORE_NAPARI_SERVER_KEY=keys1/viewer.key` broke from any other folder."""
    result = cli("keys", "keys1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    public = tmp_path / "keys1" / "viewer.key"
    assert f"export POLYSTORE_NAPARI_SERVER_KEY={public} " in result.stdout
    assert f"--curve-secret {tmp_path / 'keys1' / 'viewer.key_secret'}\n" in result.stdout
    assert public.is_file()
