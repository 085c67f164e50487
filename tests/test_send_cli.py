"""`polystore send` against real receivers: what a user sees for a time series, a slow
viewer, a file too large, a folder that cannot be read, an error while sending, a zarr
store in a folder, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from polystore.streaming import NapariStreamingBackend, receiver_for
from tests.test_cli import Collector, cli, free_endpoint


class SlowReceiver(Collector):
    """A real receiver that takes `delay` seconds over each frame, as a busy viewer does."""

    def __init__(self, delay: float) -> None:
        self.frames: list = []
        self.rois: list = []

        def on_frame(frame) -> None:
            self.frames.append(frame)
            time.sleep(delay)

        self.receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                                     on_frame=on_frame)


def time_points(folder: Path, n: int, shape=(64, 64)) -> Path:
    folder.mkdir(parents=True)
    for t in range(n):
        np.save(folder / f"t{t:03d}.npy", np.full(shape, t, np.uint16))
    return folder


# -- 1: frames dropped by --policy latest ------------------------------------------------------


def test_policy_latest_counts_the_frames_it_dropped_and_never_claims_all_were_sent(tmp_path):
    """A slow viewer with --policy latest: 'sent 60 file(s)' and exit 0 while 42 frames were
    dropped. The summary now says how many were dropped, and a warning why."""
    run = time_points(tmp_path / "run", 30)
    with SlowReceiver(0.1) as rx:  # two 8 KiB frames in flight at most: it falls behind
        result = cli("send", str(run), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "--policy", "latest", "--max-inflight-bytes", "16K", "-q")
        match = re.search(r"streamed 30 file\(s\) .* but (\d+) of their 30 frame\(s\) were "
                          r"dropped by --policy latest", result.stdout)
        assert match, (result.stdout, result.stderr)
        dropped = int(match[1])
        deadline = time.monotonic() + 10  # every frame not dropped was acknowledged: it is
        while len(rx.frames) + dropped < 30 and time.monotonic() < deadline:  # or will be
            time.sleep(0.05)
        received = len(rx.frames)
    assert result.returncode == 0, result.stderr  # dropping is what --policy latest means
    assert "sent 30 file(s)" not in result.stdout
    assert 1 <= dropped and received < 30 and received + dropped >= 30, (received, dropped)
    assert (f"warning: the viewer fell behind, and {dropped} of 30 frame(s) were dropped"
            in result.stderr)
    assert "--policy block" in result.stderr  # what to do to deliver every frame


def test_policy_block_delivers_every_frame_and_says_sent(tmp_path):
    run = time_points(tmp_path / "run", 5)
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(run), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent 5 file(s)") and "dropped" not in result.stdout
    assert len(rx.frames) == 5 and "warning" not in result.stderr


# -- 2: files of one stream are placed along an axis ----------------------------------------


def test_a_folder_of_time_points_arrives_as_a_time_series(tmp_path):
    """t000.npy ... went to one stream without axes: each replaced the one before, and
    napari showed only the last. Each now carries its index on the axis its letter names."""
    root = tmp_path / "exp"
    time_points(root / "run", 4)
    (root / "stack").mkdir()
    for z in range(2):
        for c in range(2):
            tifffile.imwrite(root / "stack" / f"img_z{z:02d}_c{c}.tif",
                             np.full((8, 8), 10 * z + c, np.uint16))
    (root / "cam").mkdir()
    for n in (1, 2, 3):  # a bare number is a time point
        np.save(root / "cam" / f"frame{n}.npy", np.full((4, 4), n, np.uint8))
    (root / "sparse").mkdir()
    for n in (100, 300):  # t=100, t=300 would leave the axis mostly empty
        np.save(root / "sparse" / f"img_{n:04d}.npy", np.zeros((4, 4), np.uint8))
    np.save(root / "single_t005.npy", np.zeros((4, 4), np.uint8))  # alone: a plain image
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(root), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q")
    assert result.returncode == 0, result.stderr
    got = {f.header.path: (f.stream, f.header.axes) for f in rx.frames}
    for t in range(4):
        assert got[f"exp/run/t{t:03d}.npy"] == ("exp/run", {"t": t})
    for z in range(2):
        for c in range(2):
            assert got[f"exp/stack/img_z{z:02d}_c{c}.tif"] == ("exp/stack/img", {"c": c, "z": z})
    assert got["exp/cam/frame3.npy"] == ("exp/cam/frame", {"t": 3})
    assert got["exp/sparse/img_0100.npy"] == ("exp/sparse/img", {"t": 0})
    assert got["exp/sparse/img_0300.npy"] == ("exp/sparse/img", {"t": 1})
    assert "stream exp/sparse/img: its t indices 100..300 would leave most of the axis " \
           "empty" in result.stderr
    assert got["exp/single_t005.npy"] == ("exp/single", {})
    assert "warning" not in result.stderr


def test_one_stream_key_for_every_file_still_places_them(tmp_path):
    run = time_points(tmp_path / "run", 3)
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(run), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "--stream", "preview", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted((f.stream, f.header.axes["t"]) for f in rx.frames) == [
        ("preview", 0), ("preview", 1), ("preview", 2)]


def test_a_number_in_the_name_does_not_collapse_a_time_series(tmp_path):
    """exp20240501_t001.tif, exp20240501_t002.tif: the date glued to the name was read as a
    second time index, so both files got no position, went to the stream 'ex' and replaced
    each other in the viewer."""
    folder = tmp_path / "d"
    folder.mkdir()
    for t in (1, 2):
        np.save(folder / f"exp20240501_t{t:03d}.npy", np.full((4, 4), t, np.uint16))
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(folder), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q")
    assert result.returncode == 0, result.stderr
    assert sorted((f.stream, f.header.axes.get("t")) for f in rx.frames) == [
        ("d/exp20240501", 1), ("d/exp20240501", 2)]
    assert "replace each other" not in result.stderr


def test_files_named_one_by_one_are_a_time_series_too(tmp_path):
    """`send run1/t*.tif` (a shell glob) or `send t000.npy ...` inside the folder: each file
    kept only its name, t000, and so was a stream of its own: one layer per time point."""
    run = time_points(tmp_path / "run1", 3)
    names = [f"t{t:03d}.npy" for t in range(3)]
    for args, cwd in (([str(run / n) for n in names], None), (names, run)):
        with Collector(NapariStreamingBackend) as rx:
            result = cli("send", *args, "--to", "napari_stream", "--endpoint", rx.endpoint,
                         "-q", cwd=cwd)
        assert result.returncode == 0, result.stderr
        assert sorted((f.stream, f.header.axes.get("t")) for f in rx.frames) == [
            ("run1", 0), ("run1", 1), ("run1", 2)], args


def test_files_that_would_replace_each_other_are_warned_about(tmp_path):
    """snap.png and snap.jpg share the stream 'snap' and no index: one replaced the other
    in the viewer without a word."""
    folder = tmp_path / "shots"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "snap.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "snap.jpg")
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(folder), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q")
    assert result.returncode == 0, result.stderr
    assert len(rx.frames) == 2
    assert ("warning: 2 files go to stream shots/snap and replace each other in the viewer "
            "(only the last stays): shots/snap.jpg, shots/snap.png") in result.stderr


def test_send_help_states_the_placement_rule():
    result = cli("send", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "t003 -> t=3, z05 -> z=5, c1 or ch1 -> c=1" in text
    assert "a bare number (img_007, img007) -> t=7" in text
    assert "replace each other in the viewer: send warns" in text


# -- 3: a file too large is refused from its header -------------------------------------------


def test_a_file_too_large_is_refused_before_it_is_read(tmp_path):
    """A .npy whose header claims 100 GiB gave MemoryError ('cannot load it'); a TIFF was
    read whole before it was refused. Both headers are true here, their pixels missing:
    reading them would fail."""
    folder = tmp_path / "big"
    folder.mkdir()
    with open(folder / "huge.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "|u1", "fortran_order": False, "shape": (100 * 2**30,)})
        handle.write(b"x" * 64)
    tifffile.imwrite(folder / "wide.tif", np.ones((1024, 1024), np.uint16))
    os.truncate(folder / "wide.tif", 4096)  # 2 MiB of pixels claimed, none there
    t0 = time.monotonic()
    result = cli("send", str(folder), "--to", "napari_stream", "--endpoint", free_endpoint(),
                 "--max-inflight-bytes", "1M", "-q")
    assert result.returncode == 1
    assert "huge.npy: 100.0 GiB is more than one frame may be (1.0 MiB): raise " \
           "--max-inflight-bytes" in result.stderr, result.stderr
    assert "wide.tif: 2.0 MiB is more than one frame may be (1.0 MiB)" in result.stderr
    assert "cannot load it" not in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - t0 < 60


# -- 4: folders that cannot be read -------------------------------------------------------------


def _unprivileged(locked: Path) -> list[str]:
    """A command prefix under which permissions apply: none for a user, for root one
    without the capabilities that override them (setpriv); skip where `locked` (mode 000)
    can still be listed under it."""
    prefix = [] if os.geteuid() != 0 else [
        "setpriv", "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search"]
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    probe = subprocess.run([*prefix, sys.executable, "-c",
                            "import os, sys; os.listdir(sys.argv[1])",
                            str(locked)], capture_output=True, text=True)
    if "PermissionError" not in probe.stderr:
        pytest.skip("cannot drop the capability to read any folder here")
    return prefix


@pytest.fixture
def perm(tmp_path):
    root = tmp_path / "perm"
    (root / "sub").mkdir(parents=True)
    np.save(root / "ok.npy", np.ones((4, 4), np.uint8))
    np.save(root / "sub" / "x.npy", np.ones((4, 4), np.uint8))
    (root / "sub").chmod(0)
    yield root
    (root / "sub").chmod(0o755)


def send_as_unprivileged(perm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_unprivileged(perm / "sub"), sys.executable, "-m", "polystore.cli",
                           "send", *args], capture_output=True, text=True, timeout=120)


def test_a_file_in_a_folder_that_cannot_be_searched_is_reported(perm):
    """A traceback: Path.is_dir() raised PermissionError."""
    result = send_as_unprivileged(perm, str(perm / "sub" / "x.npy"), "--to", "napari_stream",
                                  "--endpoint", free_endpoint())
    assert result.returncode == 1, result.stderr
    assert f"cannot read {perm}/sub/x.npy: Permission denied" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_folder_inside_is_reported_and_the_rest_is_sent(perm):
    """Everything under perm/sub was left out without a word, and the exit status was 0."""
    with Collector(NapariStreamingBackend) as rx:
        result = send_as_unprivileged(perm, str(perm), "--to", "napari_stream", "--endpoint",
                                      rx.endpoint, "-q")
    assert result.returncode == 1, result.stderr
    assert [f.header.path for f in rx.frames] == ["perm/ok.npy"]
    assert "sent 1 file(s)" in result.stdout
    assert (f"not sent: cannot read folder {perm}/sub: Permission denied; check its "
            "permissions") in result.stderr
    assert "its files were not sent" in result.stderr


def test_an_unreadable_folder_named_says_it_cannot_be_read(perm):
    """It said no file there 'is one napari_stream accepts'."""
    result = send_as_unprivileged(perm, str(perm / "sub"), "--to", "napari_stream",
                                  "--endpoint", free_endpoint())
    assert result.returncode == 1
    assert f"nothing to send: cannot read folder {perm}/sub: Permission denied" in result.stderr
    assert "accepts" not in result.stderr and "takes" not in result.stderr


# -- 5: errors while sending are not load errors; global ones stop at once ----------------------


def test_a_bad_credential_stops_at_the_first_file_with_one_message(tmp_path):
    """Each file said 'cannot load it: CredentialError ...', once per file."""
    from polystore.streaming.credential import load_credential

    credential = tmp_path / "credential.json"
    load_credential(credential)
    credential.chmod(0o644)
    run = time_points(tmp_path / "run", 5)
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(run), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q", env={**os.environ, "POLYSTORE_CREDENTIAL": str(credential)})
    assert result.returncode == 1
    assert result.stderr.count("has mode 644") == 1, result.stderr
    assert "cannot send run/t000.npy: CredentialError" in result.stderr
    assert "stopped there, nothing more was sent (0 of 5 file(s)" in result.stderr
    assert "cannot load it" not in result.stderr and not rx.frames


_SEND_WITH_LITTLE_SHARED_MEMORY = """
import json, subprocess, sys
from polystore.streaming import NapariStreamingBackend, receiver_for
frames = []
rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=frames.append)
rx.start()
try:
    out = subprocess.run([sys.executable, "-m", "polystore.cli", "send", sys.argv[1], "--to",
                          "napari_stream", "--endpoint", rx.endpoint, "-q"],
                         capture_output=True, text=True, timeout=120)
finally:
    rx.stop()
print(json.dumps({"rc": out.returncode, "stderr": out.stderr, "frames": len(frames)}))
"""


def test_shared_memory_full_while_sending_is_a_send_error_said_once(tmp_path):
    """'cannot load it: OSError ... shared memory is full', repeated for every file. Run in
    a mount namespace of its own with a 1 MiB /dev/shm (the machine's is untouched)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small /dev/shm in a mount namespace here")
    folder = tmp_path / "large"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"m{i}.npy", np.ones((1024, 1024), np.uint16))  # 2 MiB each
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$0" -c "$1" "$2"',
         sys.executable, _SEND_WITH_LITTLE_SHARED_MEMORY, str(folder)],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rc"] == 1 and result["frames"] == 0
    assert "cannot send large/m0.npy: OSError: [Errno 28] shared memory is full" \
           in result["stderr"], result["stderr"]
    assert result["stderr"].count("shared memory is full") == 1
    assert "cannot load it" not in result["stderr"]


def test_a_file_the_viewer_cannot_take_is_reported_and_the_rest_is_sent(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "a.npy", np.ones((4, 4), np.uint8))
    np.save(folder / "b.npy", np.ones((4, 4), np.complex64))
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(folder), "--to", "napari_stream", "--endpoint", rx.endpoint,
                     "-q")
    assert result.returncode == 1
    assert [f.header.path for f in rx.frames] == ["mixed/a.npy"]
    assert f"not sent: {folder}/b.npy: cannot send it: " in result.stderr, result.stderr
    assert "cannot load it" not in result.stderr


# -- 6: zarr stores inside folders --------------------------------------------------------------


@pytest.fixture
def with_store(tmp_path):
    from polystore import BackendRegistry, FileManager

    folder = tmp_path / "exp"
    folder.mkdir()
    fm = FileManager(BackendRegistry())
    fm.save(np.arange(2 * 3 * 8 * 8, dtype=np.uint16).reshape(2, 3, 8, 8),
            str(folder / "plain.zarr" / "img"), "zarr")
    np.save(folder / "a.npy", np.ones((4, 4), np.uint8))
    return folder


def test_a_zarr_store_in_a_folder_is_sent_as_a_store(with_store):
    """Its chunk files were 'skipped 7 file(s) ... (none) x6'."""
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(with_store), "--to", "napari_stream", "--endpoint",
                     rx.endpoint, "-q")
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stderr
    planes = sorted((tuple(f.header.axes.items()), f.stream) for f in rx.frames
                    if f.stream != "exp/a")
    assert planes == [((("c", c), ("z", z)), "exp/plain.zarr/img")
                      for c in range(2) for z in range(3)]
    assert "sent 1 file(s) and 6 plane(s) of 1 array(s)" in result.stdout


def test_a_store_and_files_in_one_command(with_store):
    """'send zarr stores (*.zarr) and files in separate commands'."""
    with Collector(NapariStreamingBackend) as rx:
        result = cli("send", str(with_store / "plain.zarr"), str(with_store / "a.npy"),
                     "--to", "napari_stream", "--endpoint", rx.endpoint, "-q")
    assert result.returncode == 0, result.stderr
    assert sorted({f.stream for f in rx.frames}) == ["a", "plain.zarr/img"]
    assert len(rx.frames) == 7


# -- 8: what the target takes ---------------------------------------------------------------------


@pytest.mark.parametrize("to, takes", [
    ("napari_stream", ".jpeg, .jpg, .npy, .png, .roi.zip, .tif, .tiff"),
    ("fiji_stream", ".npy, .roi.zip, .tif, .tiff"),
])
def test_nothing_to_send_lists_what_the_target_takes(tmp_path, to, takes):
    """It listed what send reads (.roi too), not what the viewer takes."""
    from polystore import DiskBackend
    from polystore.rois import Roi

    DiskBackend().save(Roi("point", [[1, 2]], "a"), tmp_path / "one.roi")
    (tmp_path / "table.csv").write_text("a\n1\n")
    result = cli("send", str(tmp_path), "--to", to)
    assert result.returncode == 1
    assert f"nothing to send: no file in {tmp_path} is one {to} takes ({takes})" \
           in result.stderr, result.stderr


def test_send_help_names_every_format_it_sends():
    """It said 'Load TIFF and NPY files' while PNG, JPEG and .roi.zip were sent too."""
    from polystore.apps.send import sendable_extensions

    result = cli("send", "--help")
    assert result.returncode == 0
    assert "TIFF and NPY" not in result.stdout
    assert f"napari_stream takes {', '.join(sendable_extensions('napari_stream'))}" \
           in result.stdout
    assert ".png" in sendable_extensions("napari_stream")
    assert f"fiji_stream takes   {', '.join(sendable_extensions('fiji_stream'))}" \
           in result.stdout


# -- 9: Ctrl-C ------------------------------------------------------------------------------------


def _interrupt_send(tmp_path, presses: int) -> tuple[subprocess.CompletedProcess, list, float]:
    run = time_points(tmp_path / "run", 40)
    with SlowReceiver(0.2) as rx:
        proc = subprocess.Popen([sys.executable, "-m", "polystore.cli", "send", str(run),
                                 "--to", "napari_stream", "--endpoint", rx.endpoint, "-q"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(rx.frames) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        lines = []
        if presses == 2:
            for line in proc.stderr:  # the second Ctrl-C once it says what it waits for
                lines.append(line)
                if "Ctrl-C again" in line:
                    break
            proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
        received = list(rx.frames)
    return (subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(lines) + err),
            received, seconds)


def test_ctrl_c_says_it_waits_for_the_frames_in_flight(tmp_path):
    """It waited ~6 s in silence while the frames in flight drained."""
    result, received, _ = _interrupt_send(tmp_path, presses=1)
    assert result.returncode == 130
    match = re.search(r"waiting for the viewer to take the (\d+) frame\(s\) in flight\.\.\. "
                      r"Ctrl-C again to abandon them", result.stderr)
    assert match, result.stderr
    assert "polystore send: interrupted" in result.stderr and "Traceback" not in result.stderr
    assert 0 < len(received) < 40


def test_ctrl_c_twice_abandons_the_frames_in_flight(tmp_path):
    result, _, seconds = _interrupt_send(tmp_path, presses=2)
    assert result.returncode == 130
    assert "abandoned the frames in flight" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and seconds < 2
    # and no segment is left in /dev/shm: the autouse fixture checks it


def test_a_palette_png_is_sized_as_it_loads(tmp_path):
    """A palette PNG loads as its palette's colours (RGB): sized at one byte per pixel, a
    too-large one was read whole before being refused."""
    from polystore import DiskBackend
    from polystore.apps.send import frame_bytes

    path = tmp_path / "palette.png"
    grey = np.random.default_rng(0).integers(0, 255, (60, 50), np.uint8)
    Image.fromarray(grey).convert("P").save(path)
    assert frame_bytes(path) == DiskBackend().load(str(path)).nbytes == 60 * 50 * 3
