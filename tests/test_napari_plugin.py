"""The napari plugin with a real viewer under Xvfb and real sender processes.

Every sender runs in a separate Python process (subprocess) and streams over wire protocol v1
into a `ReceiverWidget` listening on an ephemeral port. pytest-xvfb provides the display.
"""

from __future__ import annotations

import inspect
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from tests import needs  # in CI a missing napari fails instead of skipping

napari = needs.module("napari")
needs.module("pytestqt")

from polystore_napari.buffer import CoalescingBuffer  # noqa: E402
from polystore_napari.widget import ReceiverWidget  # noqa: E402
from qtpy.QtCore import QSettings  # noqa: E402

from polystore.streaming import NapariStreamingBackend, Receiver, receiver_for  # noqa: E402
from polystore.testing.rules import SHOW_CASES, every_plane  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPHEMERAL = "tcp://127.0.0.1:0"


def rand(seed, shape, dtype="uint16"):
    """Deterministic test pixels, computed identically in the sender process."""
    high = {"uint8": 250, "uint16": 60000, "int32": 1000, "float32": 1000}[dtype]
    return np.random.default_rng(seed).integers(1, high, size=shape).astype(dtype)


SENDER = """
import json, sys
import numpy as np
from polystore.streaming import NapariStreamingBackend

{rand}

def barrier():
    # tell the test this phase is sent, wait for its go-ahead
    backend.flush()
    print("ready", flush=True)
    sys.stdin.readline()

backend = NapariStreamingBackend(sys.argv[1], timeout=20)
try:
{body}
    backend.flush()
finally:
    backend.close()
"""


class Sender:
    """A sender process running `body` (Python, with `backend`, `np`, `rand`, `barrier`)."""

    def __init__(self, endpoint: str, body: str) -> None:
        script = SENDER.format(rand=inspect.getsource(rand),
                               body=textwrap.indent(textwrap.dedent(body), "    "))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, endpoint], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, qtbot, timeout: float = 30.0) -> str:
        got: list[str] = []

        def arrived() -> bool:
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"sender exited early:\n{self.proc.stderr.read()}")
            try:
                got.append(self.lines.get_nowait())
            except queue.Empty:
                return False
            return True

        qtbot.waitUntil(arrived, timeout=int(timeout * 1000))
        self.output.append(got[0])
        return got[0]

    def go(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, qtbot, timeout: float = 60.0) -> list[str]:
        """Wait (running the Qt event loop) for a clean exit; return its stdout lines."""
        qtbot.waitUntil(lambda: self.proc.poll() is not None, timeout=int(timeout * 1000))
        self._reader.join(5)
        stderr = self.proc.stderr.read()
        assert self.proc.returncode == 0, f"sender failed:\n{stderr}"
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return self.output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def send_in_two_steps(qtbot, endpoint: str, body: str, until) -> None:
    """Run a sender up to its `barrier()`, wait (running Qt) until `until()`, then let it
    go on to a clean exit."""
    sender = Sender(endpoint, body)
    try:
        sender.wait_line(qtbot)
        qtbot.waitUntil(until, timeout=10000)
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()


def send(qtbot, endpoint: str, body: str, timeout: float = 60.0) -> list[str]:
    sender = Sender(endpoint, body)
    try:
        return sender.finish(qtbot, timeout)
    finally:
        sender.kill()


def mapped_segments() -> list[str]:
    """Shared-memory segments of our prefix mapped into this process."""
    with open("/proc/self/maps") as maps:
        return [line.split()[-1] for line in maps if "/dev/shm/napari_" in line]


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Keep the widget's QSettings (auto-start, endpoint, ...) out of the user's config."""
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, str(tmp_path / "settings"))
    monkeypatch.delenv("POLYSTORE_NAPARI_ENDPOINT", raising=False)
    yield


@pytest.fixture
def docked(make_napari_viewer, qtbot):
    """A shown viewer with the receiver widget docked and listening on an ephemeral port."""
    viewer = make_napari_viewer(show=True)
    widget = ReceiverWidget(viewer, endpoint=EPHEMERAL, auto_start=False)
    viewer.window.add_dock_widget(widget, name="polystore receiver", area="right")
    widget.start()
    assert widget.running and not widget.endpoint.endswith(":0")
    yield viewer, widget
    widget.stop()


def layer_of(widget, stream):
    return widget.manager.layer(stream)


def wait_kind(qtbot, widget, stream: str, kind: type) -> None:
    """Wait until `stream` is shown as a layer of `kind` (napari.layers.Image, Labels...)."""
    qtbot.waitUntil(lambda: isinstance(layer_of(widget, stream), kind), timeout=10000)


def wait_frames(qtbot, widget, n: int, timeout: float = 30.0) -> None:
    """Wait until `n` frames have been written into layers."""
    qtbot.waitUntil(lambda: widget.manager.frames >= n, timeout=int(timeout * 1000))


# -- plugin discovery ------------------------------------------------------------------------


def test_npe2_manifest_is_discovered():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("polystore-napari")
    assert manifest.display_name == "polystore"
    widgets = [w.display_name for w in manifest.contributions.widgets]
    assert widgets == ["polystore receiver"]
    listed = subprocess.run(
        [sys.executable, "-m", "npe2", "list", "--fields", "name,display_name", "--format",
         "json"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert {"name": "polystore-napari", "display_name": "polystore"} in json.loads(listed)
    valid = subprocess.run([sys.executable, "-m", "npe2", "validate", "polystore-napari"],
                           capture_output=True, text=True)
    assert valid.returncode == 0, valid.stdout + valid.stderr


def test_plugins_menu_docks_an_auto_starting_receiver(make_napari_viewer, qtbot, monkeypatch):
    monkeypatch.setenv("POLYSTORE_NAPARI_ENDPOINT", EPHEMERAL)
    viewer = make_napari_viewer(show=True)
    actions = [a for a in viewer.window.plugins_menu.actions() if "polystore receiver" in a.text()]
    assert len(actions) == 1, [a.text() for a in viewer.window.plugins_menu.actions()]
    # issue 14 item 8: napari titles it "<widget> (<plugin>)"; it read "polystore receiver
    # (polystore receiver)"
    assert actions[0].text() == "polystore receiver (polystore)"
    actions[0].trigger()
    widgets = [w for w in viewer.window.dock_widgets.values() if isinstance(w, ReceiverWidget)]
    assert len(widgets) == 1
    widget = widgets[0]
    qtbot.waitUntil(lambda: widget.running, timeout=5000)  # auto-start is on by default
    send(qtbot, widget.endpoint, """
        backend.save(rand(1, (40, 50)), "menu/t000.tif")
    """)
    wait_frames(qtbot, widget, 1)
    layer = viewer.layers["menu"]
    np.testing.assert_array_equal(layer.data, rand(1, (40, 50)))
    widget.stop()
    assert not widget.running


# -- replace ---------------------------------------------------------------------------------


def test_replace_updates_one_layer_in_place_with_equal_pixels(docked, qtbot):
    viewer, widget = docked
    inserted, removed = [], []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value.name))
    viewer.layers.events.removed.connect(lambda e: removed.append(e.value.name))
    sender = Sender(widget.endpoint, """
        backend.save(rand(0, (120, 160)), "cam/t000.tif")
        backend.save(rand(100, (30, 20), "float32"), "other/img_000.tif")
        barrier()
        for i in range(1, 6):
            backend.save(rand(i, (120, 160)), f"cam/t{i:03d}.tif")
    """)
    try:
        assert sender.wait_line(qtbot) == "ready"
        wait_frames(qtbot, widget, 2)
        first = viewer.layers["cam"]
        array = first.data
        np.testing.assert_array_equal(first.data, rand(0, (120, 160)))
        assert first.data.dtype == np.uint16
        # contrast limits come from the first frame
        assert first.contrast_limits == [float(rand(0, (120, 160)).min()),
                                         float(rand(0, (120, 160)).max())]
        other = viewer.layers["other/img"]
        assert other.data.dtype == np.float32 and other.data.shape == (30, 20)
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: np.array_equal(first.data, rand(5, (120, 160))), timeout=10000)
    assert viewer.layers["cam"] is first  # same layer object...
    assert first.data is array  # ...showing the same array, written in place
    assert inserted == ["cam", "other/img"] and removed == []
    assert widget.receiver.stats.frames == 7


def test_canvas_screenshot_shows_the_streamed_image(docked, qtbot):
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        image = np.zeros((200, 200), np.uint16)
        image[:, 100:] = 50000  # right half bright, left half dark
        backend.save(image, "halves/t000.tif", contrast_limits=[0, 50000])
    """)
    wait_frames(qtbot, widget, 1)
    viewer.reset_view()
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].max() > 200, "canvas screenshot is black"
    rows, cols = np.nonzero(shot[..., :3].max(axis=2) > 200)
    middle = shot.shape[1] // 2
    # the bright pixels are the right half of the image: right of the canvas centre
    assert cols.min() >= middle - 3, (cols.min(), middle)
    left = shot[:, : middle - 10, :3].mean()
    right = shot[:, middle + 10 :, :3].mean()
    assert right > left + 50, (left, right)


def test_replace_coalesces_when_frames_outpace_the_display(docked, qtbot):
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        frames = [rand(i, (512, 512)) for i in range(4)]
        for i in range(400):
            backend.save(frames[i % 4], f"fast/t{i:04d}.tif")
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 400, timeout=20000)
    qtbot.waitUntil(lambda: widget.buffer.pending == 0, timeout=5000)
    layer = viewer.layers["fast"]
    np.testing.assert_array_equal(layer.data, rand(399 % 4, (512, 512)))
    assert widget.buffer.stats.coalesced > 0
    assert widget.manager.frames + widget.buffer.stats.coalesced == 400
    assert widget.manager.updates < 400


# -- place (t, c, z and named axes) ----------------------------------------------------------


def test_place_builds_an_nd_layer_from_tcz_axes(docked, qtbot):
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        import itertools, random
        positions = list(itertools.product(range(2), range(3), range(4)))
        random.Random(0).shuffle(positions)  # any arrival order
        for t, c, z in positions:
            backend.save(rand(100 * t + 10 * c + z, (48, 64)), f"emb/t{t}c{c}z{z}.tif",
                         stream="embryo", axes={"t": t, "c": c, "z": z},
                         axis_names=["t", "c", "z"])
        backend.save(rand(7, (16, 16), "uint8"), "plate/a.tif", axes={"well": 2, "site": 1},
                     mode="place")
    """)
    wait_frames(qtbot, widget, 25)
    # one layer per channel (napari's channel_axis semantics), additive, own colormap
    channels = [viewer.layers[f"embryo [c{c}]"] for c in range(3)]
    assert "embryo" not in viewer.layers
    assert [layer.colormap.name for layer in channels] == ["cyan", "yellow", "magenta"]
    for c, layer in enumerate(channels):
        assert layer.data.shape == (2, 4, 48, 64) and layer.data.dtype == np.uint16
        assert tuple(layer.axis_labels) == ("t", "z", "y", "x")
        assert layer.blending == "additive"
        for t in range(2):
            for z in range(4):
                np.testing.assert_array_equal(np.asarray(layer.data[t, z]),
                                              rand(100 * t + 10 * c + z, (48, 64)))
    plate = viewer.layers["plate/a"]
    assert plate.data.shape == (3, 2, 16, 16)
    assert tuple(plate.axis_labels) == ("well", "site", "y", "x")
    np.testing.assert_array_equal(np.asarray(plate.data[2, 1]), rand(7, (16, 16), "uint8"))
    assert not np.asarray(plate.data[0, 0]).any()  # positions never sent stay empty


def test_place_grows_in_place_without_re_adding_the_layer(docked, qtbot):
    viewer, widget = docked
    removed = []
    viewer.layers.events.removed.connect(lambda e: removed.append(e.value.name))
    sender = Sender(widget.endpoint, """
        backend.save(rand(0, (32, 32)), "grow/a.tif", axes={"z": 0})
        barrier()
        for z in range(1, 40):
            backend.save(rand(z, (32, 32)), "grow/a.tif", axes={"z": z})
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 1)
        layer = viewer.layers["grow/a"]
        assert layer.data.shape == (1, 32, 32)
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: layer.data.shape == (40, 32, 32), timeout=10000)
    assert viewer.layers["grow/a"] is layer and removed == []
    np.testing.assert_array_equal(np.asarray(layer.data[39]), rand(39, (32, 32)))
    np.testing.assert_array_equal(np.asarray(layer.data[0]), rand(0, (32, 32)))


def test_place_follows_the_newest_time_point_unless_the_user_scrolled_back(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        for t in range(5):
            for c in range(2):
                backend.save(rand(t, (16, 16)), f"live/t{t}c{c}.tif", axes={"t": t, "c": c})
        backend.flush()
        barrier()
        for t in range(5, 8):
            backend.save(rand(t, (16, 16)), f"live/t{t}c0.tif", axes={"t": t, "c": 0})
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 10)
        layer = viewer.layers["live [c0]"]
        t_axis = viewer.dims.ndim - layer.ndim
        qtbot.waitUntil(lambda: layer.data.shape[0] == 5, timeout=10000)
        assert viewer.dims.current_step[t_axis] == 4  # followed t while it grew
        viewer.dims.set_current_step(t_axis, 1)  # the user looks back in time...
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: layer.data.shape[0] == 8, timeout=10000)
    assert viewer.dims.current_step[t_axis] == 1  # ...and is not yanked to the end


# -- stack -----------------------------------------------------------------------------------


def test_stack_keeps_the_newest_frames_up_to_capacity(docked, qtbot):
    viewer, widget = docked
    widget.capacity_box.setValue(5)
    send(qtbot, widget.endpoint, """
        for i in range(12):
            backend.save(rand(i, (24, 36)), f"series/t{i:03d}.tif", mode="stack")
            backend.save(rand(i, (24, 36), "int32"), f"masks/t{i:03d}.tif", mode="stack",
                         labels=True)
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 24 and widget.buffer.pending == 0,
                    timeout=10000)
    layer = viewer.layers["series"]
    assert layer.data.shape == (5, 24, 36)
    assert tuple(layer.axis_labels) == ("t", "y", "x")
    for k, i in enumerate(range(7, 12)):
        np.testing.assert_array_equal(np.asarray(layer.data[k]), rand(i, (24, 36)))
    np.testing.assert_array_equal(np.asarray(layer.data),
                                  np.stack([rand(i, (24, 36)) for i in range(7, 12)]))
    assert viewer.dims.current_step[0] == 4  # the slider follows the newest frame
    masks = viewer.layers["masks"]
    assert isinstance(masks, napari.layers.Labels) and masks.data.shape == (5, 24, 36)
    np.testing.assert_array_equal(np.asarray(masks.data),
                                  np.stack([rand(i, (24, 36), "int32") for i in range(7, 12)]))
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].max() > 0


def test_typing_a_larger_stack_capacity_keeps_the_stack(docked, qtbot):
    """The spin box applied each keystroke: typing 200 over 100 set a capacity of 2, then 20,
    on the way, and a frame arriving meanwhile cut a live stack of 50 down to 2 for good. The
    value now applies once typed (Enter)."""
    from qtpy.QtCore import Qt

    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        for i in range(50):
            backend.save(rand(i, (8, 8)), f"typed/t{i:03d}.tif", mode="stack")
    """)
    qtbot.waitUntil(lambda: "typed" in viewer.layers
                    and viewer.layers["typed"].data.shape[0] == 50, timeout=10000)
    box = widget.capacity_box
    box.setFocus()
    box.selectAll()
    qtbot.keyClicks(box, "2")
    send(qtbot, widget.endpoint, """
        backend.save(rand(50, (8, 8)), "typed/t050.tif", mode="stack")
    """)
    qtbot.waitUntil(lambda: viewer.layers["typed"].data.shape[0] != 50, timeout=10000)
    qtbot.keyClicks(box, "00")
    qtbot.keyClick(box, Qt.Key.Key_Return)
    assert box.value() == 200
    send(qtbot, widget.endpoint, """
        backend.save(rand(51, (8, 8)), "typed/t051.tif", mode="stack")
    """)
    qtbot.waitUntil(lambda: viewer.layers["typed"].data.shape[0] != 51, timeout=10000)
    assert viewer.layers["typed"].data.shape[0] == 52


def test_a_stack_capacity_beyond_the_widget_s_range_is_refused():
    from polystore_napari.options import ReceiverOptions

    with pytest.raises(ValueError, match="from 1 to 100,000"):
        ReceiverOptions(stack_capacity=200_000)  # the spin box clamped it without a word


def test_a_stream_that_turns_to_stack_shows_its_newest_frame(docked, qtbot):
    """A stream shown in ``replace`` mode turns to ``stack`` with a burst of frames that
    reach the display together: the t slider must show the newest frame, and keep following
    the stack as it grows."""
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        backend.save(rand(0, (16, 16)), "s/t0.tif", stream="s")
        barrier()
        for t in range(1, 7):
            backend.save(rand(t, (16, 16)), f"s/t{t}.tif", stream="s", mode="stack")
        barrier()
        backend.save(rand(7, (16, 16)), "s/t7.tif", stream="s", mode="stack")
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 1)
        widget.display.stop(drain=False)  # the burst reaches the display in one tick
        sender.go()
        sender.wait_line(qtbot)
        widget.display.start(widget.buffer)
        wait_frames(qtbot, widget, 7)
        layer = viewer.layers["s"]
        t_axis = viewer.dims.ndim - layer.ndim
        assert layer.data.shape == (6, 16, 16)
        assert viewer.dims.current_step[t_axis] == 5
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_frames(qtbot, widget, 8)
    assert layer.data.shape == (7, 16, 16) and viewer.dims.current_step[t_axis] == 6


def test_stack_never_loses_frames_it_must_keep_under_load(docked, qtbot):
    viewer, widget = docked
    widget.capacity_box.setValue(150)
    widget.mode_box.setCurrentText("stack")  # default mode: no hint needed
    send(qtbot, widget.endpoint, """
        for i in range(400):
            frame = np.full((64, 64), i, np.uint16)
            backend.save(frame, f"burst/t{i:04d}.tif")
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 400 and widget.buffer.pending == 0,
                    timeout=20000)
    layer = viewer.layers["burst"]
    assert layer.data.shape == (150, 64, 64)
    # exactly the newest 150 frames, in order, none skipped
    np.testing.assert_array_equal(np.asarray(layer.data[:, 0, 0]), np.arange(250, 400))
    assert widget.manager.updates < 400  # they arrived faster than the display ticked


# -- labels, hints, contrast -----------------------------------------------------------------


def test_labels_mask_becomes_a_labels_layer(docked, qtbot):
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        mask = np.zeros((50, 60), np.uint16)
        mask[5:20, 5:30] = 1
        mask[25:45, 10:50] = 7
        backend.save(mask, "seg/nuclei_000.tif", labels=True)
        backend.save(rand(3, (50, 60), "int32"), "seg/cells.tif", kind="labels", opacity=0.3)
        backend.save(np.eye(8, dtype=np.float32) * 3, "seg/float_mask.tif", labels=True)
    """)
    wait_frames(qtbot, widget, 3)
    nuclei = viewer.layers["seg/nuclei"]
    assert isinstance(nuclei, napari.layers.Labels)
    assert nuclei.data.dtype == np.uint16 and nuclei.data.shape == (50, 60)
    assert set(np.unique(nuclei.data)) == {0, 1, 7}
    cells = viewer.layers["seg/cells"]
    assert isinstance(cells, napari.layers.Labels) and cells.data.dtype == np.int32
    np.testing.assert_array_equal(cells.data, rand(3, (50, 60), "int32"))
    assert cells.opacity == pytest.approx(0.3)
    floats = viewer.layers["seg/float_mask"]
    assert isinstance(floats, napari.layers.Labels) and floats.data.dtype == np.int64
    assert not any(isinstance(layer, napari.layers.Image) for layer in viewer.layers)


def test_display_hints_and_contrast_following(docked, qtbot):
    """Issue 14 item 4: contrast follows the data until the user sets it by hand; a
    contrast_limits hint fixes it."""
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        backend.save(np.full((10, 10), 100, np.uint16) + np.eye(10, dtype=np.uint16),
                     "green/t000.tif", colormap="green", opacity=0.5)
        backend.save(np.arange(100, dtype=np.float32).reshape(10, 10), "fixed/t000.tif",
                     contrast_limits=[10, 20])
        backend.save(np.eye(10, dtype=np.float32), "drift/t000.tif")
        barrier()
        backend.save(np.full((10, 10), 1000, np.uint16) + 9 * np.eye(10, dtype=np.uint16),
                     "green/t001.tif", colormap="green", opacity=0.5)
        backend.save(np.arange(100, dtype=np.float32).reshape(10, 10) + 50, "fixed/t001.tif",
                     contrast_limits=[10, 20])
        backend.save(np.eye(10, dtype=np.float32) + 19, "drift/t001.tif")  # 0-1 -> 19-20
        barrier()
        backend.save(np.full((10, 10), 3000, np.uint16) + 2 * np.eye(10, dtype=np.uint16),
                     "green/t002.tif", colormap="green", opacity=0.5)
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 3)
        green = viewer.layers["green"]
        assert green.colormap.name == "green"
        assert green.opacity == pytest.approx(0.5)
        assert green.contrast_limits == [100, 101]  # from the first frame
        assert viewer.layers["fixed"].contrast_limits == [10, 20]  # the hint wins
        assert viewer.layers["drift"].contrast_limits == [0, 1]
        sender.go()
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 6)
        assert green.contrast_limits == [1000, 1009]  # follows the data
        assert viewer.layers["drift"].contrast_limits == [19, 20]  # not stuck at [0, 1]
        assert viewer.layers["fixed"].contrast_limits == [10, 20]
        green.contrast_limits = [0, 500]  # the user sets it by hand...
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_frames(qtbot, widget, 7)
    assert green.contrast_limits == [0, 500]  # ...and it stays


# -- ROIs ------------------------------------------------------------------------------------


def test_rois_become_shapes_and_points_on_their_image_planes(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        for t in range(2):
            for z in range(3):
                backend.save(rand(t * 3 + z, (64, 64)), "vol/x.tif", axes={"t": t, "z": z},
                             axis_names=["t", "z"])
        rois = [
            {"kind": "polygon", "coords": [[5, 5], [5, 30], [25, 18]], "label": "tri"},
            {"kind": "rectangle", "coords": [[10, 10], [20, 40]]},
            {"kind": "ellipse", "coords": [[30, 30], [50, 60]], "label": "oval"},
            {"kind": "line", "coords": [[0, 0], [63, 63]]},
            {"kind": "point", "coords": [[12.5, 7]]},
            {"kind": "point", "coords": [[40, 41]], "label": "p2"},
        ]
        backend.save(rois, "vol/x_t1_z2.roi.zip", stream="vol/x", axes={"t": 1, "z": 2})
        barrier()
        # a new set for the same plane replaces the old one; another plane adds
        backend.save(rois[:2], "vol/x_t1_z2.roi.zip", stream="vol/x", axes={"t": 1, "z": 2})
        backend.save(rois[3:5], "vol/x_t0_z0.roi.zip", stream="vol/x", axes={"t": 0, "z": 0})
    """)
    try:
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: "vol/x points" in viewer.layers, timeout=10000)
        shapes, points = viewer.layers["vol/x ROIs"], viewer.layers["vol/x points"]
        assert isinstance(shapes, napari.layers.Shapes)
        assert isinstance(points, napari.layers.Points)
        assert shapes.shape_type == ["polygon", "rectangle", "ellipse", "line"]
        assert shapes.ndim == 4 and points.ndim == 4
        for data in shapes.data:  # every shape sits on plane t=1, z=2
            assert (data[:, 0] == 1).all() and (data[:, 1] == 2).all()
        np.testing.assert_allclose(shapes.data[0][:, 2:], [[5, 5], [5, 30], [25, 18]])
        np.testing.assert_allclose(shapes.data[1][:, 2:].min(axis=0), [10, 10])
        np.testing.assert_allclose(shapes.data[1][:, 2:].max(axis=0), [20, 40])
        np.testing.assert_allclose(points.data, [[1, 2, 12.5, 7], [1, 2, 40, 41]])
        assert list(shapes.features["label"]) == ["tri", "", "oval", ""]
        assert list(points.features["label"]) == ["", "p2"]
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: len(shapes.data) == 3, timeout=10000)
    assert viewer.layers["vol/x ROIs"] is shapes
    assert sorted(shapes.shape_type) == ["line", "polygon", "rectangle"]
    on_first_plane = [d for d in shapes.data if d[0, 0] == 0 and d[0, 1] == 0]
    assert len(on_first_plane) == 1  # the line on t=0, z=0
    np.testing.assert_allclose(points.data, [[0, 0, 12.5, 7]])  # t1z2 lost its points


def test_an_open_path_and_a_multi_point_show_whole(docked, qtbot):
    """A line of more than two points (an ImageJ segmented line) shows as a path, and a point
    ROI of several points as that many points with its label."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        backend.save(rand(1, (32, 32)), "pth/x.tif")
        backend.save([{"kind": "line", "coords": [[1, 1], [2, 10], [15, 20]], "label": "seg"},
                      {"kind": "point", "coords": [[3, 4], [5, 6], [7, 8]], "label": "pts"}],
                     "pth/x.roi.zip", stream="pth/x")
    """)
    qtbot.waitUntil(lambda: "pth/x points" in viewer.layers, timeout=10000)
    shapes, points = viewer.layers["pth/x ROIs"], viewer.layers["pth/x points"]
    assert shapes.shape_type == ["path"]
    np.testing.assert_allclose(shapes.data[0], [[1, 1], [2, 10], [15, 20]])
    np.testing.assert_allclose(points.data, [[3, 4], [5, 6], [7, 8]])
    assert list(points.features["label"]) == ["pts"] * 3


#: A self-intersecting outline (as freehand ROIs drawn in ImageJ can be) on which vispy's
#: triangulation fails ("Triangulation failed"); napari's compiled one (bermuda) draws it.
TANGLED = [[101.08404698774231, 468.95255431799467], [47.38833918058349, 2.4497074942878005],
           [161.46040183198917, 495.372359120611], [132.34756419421996, 415.3471327588655],
           [86.55681851023273, 293.18917739918885], [479.204667589696, 358.2566172829035],
           [490.25398758924314, 287.2783245445198], [491.6673532767107, 418.5235158600019]]


def test_a_self_intersecting_polygon_shows_with_the_rest_of_its_set(docked, qtbot):
    """With vispy's triangulation the whole set was refused (*Last error*: "Triangulation
    failed"); the plugin depends on napari's compiled triangulation, which draws it."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, f"""
        backend.save(rand(1, (512, 512)), "tangle/x.tif")
        backend.save([{{"kind": "polygon", "coords": {TANGLED!r}, "label": "tangled"}},
                      {{"kind": "rectangle", "coords": [[1, 1], [9, 9]]}}],
                     "tangle/x.roi.zip", stream="tangle/x")
    """)
    qtbot.waitUntil(lambda: "tangle/x ROIs" in viewer.layers, timeout=10000)
    shapes = viewer.layers["tangle/x ROIs"]
    assert shapes.shape_type == ["polygon", "rectangle"]
    np.testing.assert_allclose(shapes.data[0], TANGLED)
    assert list(shapes.features["label"]) == ["tangled", ""]


def test_rois_without_axes_are_2d(docked, qtbot):
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        backend.save(rand(1, (30, 30)), "img/t000.tif")
        backend.save([{"kind": "rectangle", "coords": [[1, 2], [10, 20]]}], "img/a.roi.zip",
                     stream="img")
    """)
    qtbot.waitUntil(lambda: "img ROIs" in viewer.layers, timeout=10000)
    shapes = viewer.layers["img ROIs"]
    assert shapes.ndim == 2 and shapes.shape_type == ["rectangle"]
    assert "img points" not in viewer.layers


def test_rois_sent_before_the_first_frame_stay_above_the_image(docked, qtbot):
    """ROIs that arrived before their image's first frame ended up under the image (hidden by
    it), with the view fitted to the ROIs, so the image showed magnified."""
    viewer, widget = docked
    send_in_two_steps(qtbot, widget.endpoint, """
        backend.save([{"kind": "rectangle", "coords": [[10, 20], [60, 90]]},
                      {"kind": "point", "coords": [[30, 40]]}], "early/a.roi.zip",
                     stream="early")
        barrier()
        for c in range(2):  # one layer per channel, each made after the ROI layers
            backend.save(rand(c, (400, 600)), f"early/c{c}.tif", stream="early",
                         axes={"c": c})
    """, until=lambda: "early points" in viewer.layers)
    wait_frames(qtbot, widget, 2)
    names = [layer.name for layer in viewer.layers]
    assert names == ["early [c0]", "early [c1]", "early ROIs", "early points"]
    fitted = (viewer.scene.camera.zoom, tuple(viewer.scene.camera.center))
    viewer.reset_view()  # napari's fit of every layer: the image's extent
    assert viewer.scene.camera.zoom == pytest.approx(fitted[0])
    assert tuple(viewer.scene.camera.center) == pytest.approx(fitted[1])


# -- remote state ----------------------------------------------------------------------------


def test_report_describes_the_layers_to_the_sender(docked, qtbot):
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        backend.save(rand(1, (20, 30)), "rep/a_000.tif")
        backend.save(np.ones((20, 30), np.uint8), "rep/mask.tif", labels=True)
        for _ in range(200):
            state = backend.request("report")
            if len(state.get("layers", [])) == 2:
                break
            time.sleep(0.05)
        print(json.dumps(state))
    """)
    state = json.loads(lines[-1])
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert layers["rep/a"]["shape"] == [20, 30] and layers["rep/a"]["dtype"] == "uint16"
    assert layers["rep/a"]["kind"] == "image" and layers["rep/a"]["mode"] == "replace"
    assert layers["rep/mask"]["kind"] == "labels" and layers["rep/mask"]["dtype"] == "uint8"
    assert layers["rep/a"]["colormap"] == "gray" and layers["rep/a"]["channel"] is None
    assert layers["rep/mask"]["colormap"] == "label_colormap"
    assert state["frames"] == 2 and state["frames_displayed"] == 2
    assert state["pending_frames"] == 0


def test_clear_command_removes_the_stream_layers(docked, qtbot):
    viewer, widget = docked
    viewer.add_image(np.zeros((5, 5)), name="user layer")
    send_in_two_steps(qtbot, widget.endpoint, """
        backend.save(rand(1, (20, 30)), "gone/t000.tif")
        backend.save([{"kind": "point", "coords": [[1, 1]]}], "gone/p.roi.zip", stream="gone")
        barrier()
        backend.request("clear")
    """, until=lambda: "gone points" in viewer.layers)
    qtbot.waitUntil(lambda: "gone" not in viewer.layers, timeout=10000)
    assert [layer.name for layer in viewer.layers] == ["user layer"]


def test_after_clear_a_stream_starts_afresh_in_last_error(docked, qtbot):
    """After a sender's clear, *Last error* counted the empty frames a stream had sent before
    it ("4 empty frame(s)" for the one sent since)."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for i in range(3):
            backend.save(np.zeros((0, 5), np.uint16), f"e/t{i}.tif", mode="stack")
        backend.flush()
        time.sleep(0.3)
        print(json.dumps(backend.request("report")["errors"]))
        backend.request("clear")
        backend.save(np.zeros((0, 5), np.uint16), "e/t3.tif")
        backend.flush()
        time.sleep(0.3)
        print(json.dumps(backend.request("report")["errors"]))
    """)
    before, after = (json.loads(line) for line in lines[-2:])
    assert before["e"].startswith("3 empty frame(s)")
    assert after["e"].startswith("1 empty frame(s)")


# napari itself runs in a child process here: the crash this guards against is a segfault,
# which would take pytest down with it.
NAPARI_CHILD = """
import json, os, sys, time
import napari
from qtpy.QtWidgets import QApplication
from polystore_napari.widget import ReceiverWidget

viewer = napari.Viewer(show=True)
widget = ReceiverWidget(viewer, endpoint="tcp://127.0.0.1:0", auto_start=False)
viewer.window.add_dock_widget(widget, name="polystore receiver", area="right")
widget.start()
print(widget.endpoint, flush=True)
app = QApplication.instance()

def pump(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)

def last_frame_shown():
    layer = widget.manager.layer("fresh")
    return layer is not None and int(layer.data[0, 0]) == 9

deadline = time.monotonic() + 60
while not last_frame_shown() and time.monotonic() < deadline:
    pump(0.05)
pump(1.0)  # more draws of the new image
canvas = viewer.screenshot(canvas_only=True, flash=False)
print(json.dumps({"shown": last_frame_shown(), "layers": [l.name for l in viewer.layers],
                  "canvas_mean": float(canvas[..., :3].mean())}), flush=True)
widget.stop()
viewer.close()
"""


def test_napari_survives_new_images_after_a_clear_removed_labelled_rois(qtbot, tmp_path):
    """After a ``clear`` removed a Shapes layer that showed its labels as text, napari
    segfaulted (in glDrawArrays) at the second draw of the next new image on Mesa's llvmpipe
    (Xvfb, CI, cluster nodes): the layer's GL program was deleted while it was the current one
    (see ``release_deleted_gl_program`` in gl_release.py)."""
    errors = open(tmp_path / "napari.err", "w+")  # a file: a full pipe would stall napari
    child = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", NAPARI_CHILD],
                             stdout=subprocess.PIPE, stderr=errors, text=True,
                             cwd=ROOT)  # fmt: skip
    sender = None
    try:
        endpoint = child.stdout.readline().strip()
        assert endpoint.startswith("tcp://"), (tmp_path / "napari.err").read_text()
        sender = Sender(endpoint, """
            import time
            backend.save(rand(1, (300, 300)), "cells/t000.tif")
            centres = np.random.default_rng(3).uniform(40, 260, (12, 2))
            backend.save([{"kind": "ellipse", "coords": [[r - 14, c - 14], [r + 14, c + 14]],
                           "label": f"cell {k}"} for k, (r, c) in enumerate(centres)],
                         "cells/t000.roi.zip", stream="cells")
            backend.flush()
            for _ in range(200):
                kinds = [layer["kind"] for layer in backend.request("report")["layers"]]
                if "shapes" in kinds:
                    break
                time.sleep(0.05)
            time.sleep(1.0)  # napari draws the ROIs and their labels
            backend.request("clear")
            ramp = np.add.outer(np.arange(240), np.arange(320)).astype(np.uint16)
            for t in range(10):  # a new stream: a new image layer, updated in place
                frame = ramp * 100 + 100
                frame[0, 0] = t
                backend.save(frame, f"fresh/t{t:03d}.tif")
                backend.flush()
                time.sleep(0.05)
        """)
        sender_failed = None
        try:
            sender.finish(qtbot)
        except AssertionError as exc:  # as it does when napari died under it
            sender_failed = exc
        finally:
            sender.kill()
        out, _ = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        errors.close()
        pids = [child.pid] + ([sender.proc.pid] if sender is not None else [])
        for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []:
            if name.startswith(tuple(f"napari_{pid}_" for pid in pids)):
                os.unlink(os.path.join("/dev/shm", name))  # left by a crashed process
    err = (tmp_path / "napari.err").read_text()
    assert child.returncode == 0, f"napari died ({child.returncode}):\n{err[-3000:]}"
    if sender_failed is not None:
        raise sender_failed
    state = json.loads(out.strip().splitlines()[-1])
    assert state["shown"] and state["layers"] == ["fresh"]
    assert state["canvas_mean"] > 20, "canvas is black"


# -- lifecycle -------------------------------------------------------------------------------


def test_closing_the_dock_widget_stops_the_receiver(docked, qtbot):
    viewer, widget = docked
    endpoint = widget.endpoint
    receiver = widget.receiver
    # a sender still streaming (policy latest: it drops frames once the receiver is gone)
    sender = Sender(endpoint, """
        import time
        backend = NapariStreamingBackend(sys.argv[1], policy="latest")
        backend.save(rand(1, (256, 256)), "live/t0.tif")
        print("ready", flush=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            backend.save(rand(1, (256, 256)), "live/t1.tif")
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 1)
        viewer.window.remove_dock_widget(widget)
        assert not receiver.running
        assert widget.receiver is None and not widget.running
        assert mapped_segments() == []
        sender.finish(qtbot)  # it went on, dropping frames, and closed cleanly
    finally:
        sender.kill()
    # the endpoint is free again
    receiver_for(NapariStreamingBackend, endpoint).start().stop()
    widget.deleteLater()


def test_closing_the_viewer_stops_the_receiver(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    widget = ReceiverWidget(viewer, endpoint=EPHEMERAL, auto_start=False)
    viewer.window.add_dock_widget(widget, name="polystore receiver")
    widget.start()
    receiver = widget.receiver
    send(qtbot, widget.endpoint, """
        backend.save(rand(1, (64, 64)), "v/t0.tif")
    """)
    wait_frames(qtbot, widget, 1)
    viewer.close()
    qtbot.waitUntil(lambda: not receiver.running, timeout=5000)
    assert mapped_segments() == []
    Receiver(receiver.endpoint, shm_prefix="napari_").start().stop()  # port released


def test_start_on_a_busy_endpoint_reports_the_error(docked, make_napari_viewer):
    viewer, widget = docked
    other = ReceiverWidget(viewer, endpoint=widget.endpoint, auto_start=False)
    try:
        with pytest.raises(OSError, match="another napari receiver"):
            other.start()
        other.update_status()
        assert "cannot listen" in other.status_labels["error"].text()
        assert not other.running
    finally:
        other.deleteLater()


def test_status_shows_senders_frames_and_dropped(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        for i in range(3):
            backend.save(rand(i, (16, 16)), f"st/t{i}.tif")
        barrier()
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 1)
        widget.update_status()
        labels = {k: v.text() for k, v in widget.status_labels.items()}
        assert labels["senders"] == "1"
        assert labels["frames"] == "3"
        assert labels["dropped"] == "0"
        assert labels["state"] == f"listening on {widget.endpoint}"
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: widget.receiver.stats.senders == 0, timeout=5000)


def test_launch_docks_a_listening_receiver(make_napari_viewer, qtbot):
    from polystore_napari.launch import launch

    viewer = make_napari_viewer(show=True)
    widget = launch(EPHEMERAL, viewer=viewer, mode="stack", stack_capacity=3, run=False)
    try:
        assert widget.running
        assert isinstance(widget, ReceiverWidget)
        assert widget in viewer.window.dock_widgets.values()
        send(qtbot, widget.endpoint, """
            for i in range(5):
                backend.save(rand(i, (8, 8)), f"l/t{i}.tif")
        """)
        qtbot.waitUntil(lambda: widget.buffer.stats.frames == 5 and not widget.buffer.pending,
                        timeout=10000)
        assert viewer.layers["l"].data.shape == (3, 8, 8)  # the launch options apply
    finally:
        widget.stop()


def test_launch_remote_with_curve_keys_accepts_only_key_holders(make_napari_viewer, qtbot,
                                                                tmp_path, monkeypatch):
    import zmq
    from polystore_napari.launch import launch

    from polystore.streaming import ViewerNotRunningError
    from polystore.streaming.keys import create_keys

    public, secret = create_keys(tmp_path)
    viewer = make_napari_viewer(show=True)
    widget = launch("tcp://0.0.0.0:0", viewer=viewer, allow_remote=True,
                    curve_secret_key=str(secret), run=False)
    try:
        assert widget.running and "0.0.0.0" in widget.endpoint
        port = widget.endpoint.rsplit(":", 1)[1]
        local = f"tcp://127.0.0.1:{port}"
        monkeypatch.delenv("POLYSTORE_NAPARI_SERVER_KEY", raising=False)
        stranger = NapariStreamingBackend(local, connect_timeout=0.5)
        with pytest.raises(ViewerNotRunningError):
            stranger.save(np.zeros((8, 8), np.uint16), "x/t0.tif")
        stranger.close()
        monkeypatch.setenv("POLYSTORE_NAPARI_SERVER_KEY", str(public))
        send(qtbot, local, """
            backend.save(rand(1, (8, 8)), "secure/t0.tif")
        """)  # the sender process inherits the public key from the environment
        qtbot.waitUntil(lambda: "secure" in [layer.name for layer in viewer.layers],
                        timeout=10000)
        assert zmq.has("curve")
    finally:
        widget.stop()


def test_python_m_polystore_napari_has_a_cli():
    out = subprocess.run([sys.executable, "-m", "polystore_napari", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--endpoint" in out.stdout and "--mode" in out.stdout


# -- the coalescing buffer on its own (receiver thread side) ----------------------------------


def _frame(stream, value=0, shape=(4, 4), *, array=None, display=None, **header):
    """A frame as the receiver hands it over: `array`, or `shape` filled with `value` as
    uint16; `mode`, `kind` and `display` (more display fields) go into its display."""
    from polystore.streaming import ReceivedFrame
    from polystore.streaming import protocol as p

    display = p.Display(mode=header.pop("mode", None), kind=header.pop("kind", "image"),
                        **(display or {}))
    if array is None:
        array = np.full(shape, value, np.uint16)
    frame = p.Frame(v=1, seq=0, stream=stream, path=f"{stream}.tif", shape=list(array.shape),
                    dtype=str(array.dtype), nbytes=array.nbytes, sent_ns=0, display=display,
                    **header)
    return ReceivedFrame(array, frame, "test", 0)


def _rois(stream, label, axes):
    from polystore.streaming import ReceivedRois
    from polystore.streaming import protocol as p

    k = float(sum(axes.values()))
    header = p.Rois(v=1, seq=0, stream=stream, path=f"{stream}.roi.zip", sent_ns=0, axes=axes,
                    rois=[p.Roi(kind="rectangle", coords=[[k, k], [k + 5, k + 5]],
                                label=label)])
    return ReceivedRois(header, "test")


def test_a_stack_of_channels_keeps_its_capacity_per_channel_while_the_display_is_behind(
        make_napari_viewer):
    """Capacity 2, three channels, two time points within one display tick: the buffer kept
    the stream's newest 2 frames in all, so each channel layer got 1 frame (or none), and
    which were lost depended on timing."""
    from polystore_napari.layers import LayerManager

    buffer = CoalescingBuffer(stack_capacity=2)
    for k in range(3):
        for c in range(3):
            buffer.put_frame(_frame("sc", 10 * k + c, axes={"c": c}, mode="stack",
                                    display={"colormap": "green"} if k == 0 else None))
    (update,) = buffer.take().updates
    got = sorted(int(f.array[0, 0]) for f in update.frames)
    assert got == [10, 11, 12, 20, 21, 22]  # the newest two of each channel
    assert buffer.stats.overflow == 3
    assert all(f.header.display.colormap == "green" for f in update.frames[:3])  # carried on
    viewer = make_napari_viewer(show=False)
    buffer = CoalescingBuffer(stack_capacity=2)
    for k in range(3):
        for c in range(3):
            buffer.put_frame(_frame("sc", 10 * k + c, axes={"c": c}, mode="stack"))
    LayerManager(viewer).apply(buffer.take())
    for c in range(3):
        layer = viewer.layers[f"sc [c{c}]"]
        assert [int(layer.data[i][0, 0]) for i in range(len(layer.data))] == [10 + c, 20 + c]


def test_a_new_stack_stream_does_not_pull_the_shared_t_slider_back(make_napari_viewer):
    """Stream A stacked 10 frames; then one frame each to A and to a new stack stream B: B's
    new layer set the shared t slider to its own newest (0), A showed old frames and, no
    longer at its end, stopped following."""
    from polystore_napari.layers import LayerManager

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    for k in range(10):
        buffer.put_frame(_frame("a", k, mode="stack"))
    manager.apply(buffer.take())
    assert viewer.dims.current_step[0] == 9
    for k in (10, 11):
        buffer.put_frame(_frame("a", k, mode="stack"))
        buffer.put_frame(_frame("b", 100 + k, mode="stack"))
        manager.apply(buffer.take())
    assert viewer.dims.current_step[0] == 11  # still A's newest: A keeps following
    buffer.put_frame(_frame("a", 12, mode="stack"))
    manager.apply(buffer.take())
    assert viewer.dims.current_step[0] == 12


def test_rois_keep_their_planes_when_the_image_or_a_later_set_brings_new_axes(
        make_napari_viewer):
    """ROIs at t = 0 and 1 sent before an image placed as (t, z, y, x): the 3-D ROI layer
    lined up by its last axes, so a time point's ROIs were drawn on plane z = t. And a later
    set with new axes threw away every set before it."""
    from polystore_napari.layers import LayerManager

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    buffer.put_rois(_rois("s", "t0", {"t": 0}))
    buffer.put_rois(_rois("s", "t1", {"t": 1}))
    manager.apply(buffer.take())
    for t in range(3):
        for z in range(2):
            buffer.put_frame(_frame("s", 10 * t + z, shape=(16, 16), axes={"t": t, "z": z},
                                    axis_names=["t", "z"]))
    manager.apply(buffer.take())
    shapes, _ = manager.roi_layers("s")
    assert tuple(shapes.axis_labels)[:2] == ("t", "z")
    where = {str(label): (float(data[0][0]), float(data[0][1]))
             for label, data in zip(shapes.features["label"], shapes.data, strict=True)}
    assert where == {"t0": (0.0, 0.0), "t1": (1.0, 0.0)}
    buffer.put_rois(_rois("s", "t2 p1", {"t": 2, "p": 1}))  # a set with an axis of its own
    manager.apply(buffer.take())
    shapes, _ = manager.roi_layers("s")
    assert sorted(str(label) for label in shapes.features["label"]) == ["t0", "t1", "t2 p1"]


def test_a_roi_axis_the_image_lacks_never_lands_on_an_image_axis(make_napari_viewer):
    """An image placed along z, ROIs sent at t = 1: the ROI layers were (z, t, y, x), and
    napari lines layers up from their last axis, so the image's z fell on the viewer's t and
    the ROIs of t = 1 were drawn on the image's z = 1. The image's axes come last now."""
    from polystore_napari.layers import LayerManager

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    for z in range(2):
        buffer.put_frame(_frame("s", 10 + z, shape=(16, 16), axes={"z": z}))
    buffer.put_rois(_rois("s", "t1", {"t": 1}))
    manager.apply(buffer.take())
    image = viewer.layers["s"]
    shapes, _ = manager.roi_layers("s")
    assert tuple(image.axis_labels) == ("z", "y", "x")
    assert tuple(shapes.axis_labels) == ("t", "z", "y", "x")
    assert [float(v) for v in shapes.data[0][0][:2]] == [1.0, 0.0]  # t = 1, z = 0


def test_roi_files_of_one_plane_both_show_and_saving_one_again_replaces_only_it(
        make_napari_viewer):
    """Two ROI files for one image plane (cells, nuclei): the second replaced the first, as
    napari kept one set per position (Fiji kept both). A set replaces only the one of the
    same path and position (docs/protocol.md), in the buffer and in the layers."""
    from polystore_napari.layers import LayerManager

    from polystore.streaming import ReceivedRois
    from polystore.streaming import protocol as p

    def rois(path, labels, axes):
        header = p.Rois(v=1, seq=0, stream="s", path=path, sent_ns=0, axes=axes,
                        rois=[p.Roi(kind="rectangle", coords=[[i, i], [i + 5, i + 5]],
                                    label=label) for i, label in enumerate(labels)])
        return ReceivedRois(header, "test")

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    buffer.put_frame(_frame("s", 1, shape=(16, 16), axes={"t": 0}))
    buffer.put_frame(_frame("s", 2, shape=(16, 16), axes={"t": 1}))
    buffer.put_rois(rois("s/cells.roi.zip", ["c1", "c2"], {"t": 0}))
    buffer.put_rois(rois("s/nuclei.roi.zip", ["n1"], {"t": 0}))  # same tick: both kept
    manager.apply(buffer.take())
    buffer.put_rois(rois("s/cells.roi.zip", ["c1 t1"], {"t": 1}))  # the same file, t = 1
    manager.apply(buffer.take())

    def shown() -> list[str]:
        shapes, _ = manager.roi_layers("s")
        return sorted(str(label) for label in shapes.features["label"])

    assert shown() == ["c1", "c1 t1", "c2", "n1"]
    buffer.put_rois(rois("s/cells.roi.zip", ["c3"], {"t": 0}))  # saved again: replaces
    manager.apply(buffer.take())
    assert shown() == ["c1 t1", "c3", "n1"]


def test_a_roi_set_napari_cannot_show_leaves_the_streams_later_sets_showing(
        make_napari_viewer):
    """A rectangle to 1e12: napari's sliders overflowed inside Shapes.add, after the shape was
    added, so the layer and the records disagreed and every later set of the stream failed
    ("Length of values (2) does not match length of index (3)"); the stream's next image
    frame then cleared the error while its ROIs stayed broken."""
    from polystore_napari.layers import LayerManager

    from polystore.streaming import ReceivedRois
    from polystore.streaming import protocol as p

    def rois(path, corner):
        header = p.Rois(v=1, seq=0, stream="r", path=path, sent_ns=0,
                        rois=[p.Roi(kind="rectangle", coords=[[0, 0], [corner, corner]],
                                    label=path)])
        return ReceivedRois(header, "test")

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    buffer.put_frame(_frame("r", 1, shape=(16, 16)))
    buffer.put_rois(rois("r/good.roi.zip", 5))
    manager.apply(buffer.take())
    buffer.put_rois(rois("r/bad.roi.zip", 1e12))
    manager.apply(buffer.take())
    assert "could not show a ROI set" in manager.errors["r (ROIs)"]
    buffer.put_frame(_frame("r", 2, shape=(16, 16)))
    manager.apply(buffer.take())
    assert "r (ROIs)" in manager.errors  # an image frame does not make the ROIs right
    buffer.put_rois(rois("r/later.roi.zip", 8))
    manager.apply(buffer.take())
    shapes, _ = manager.roi_layers("r")
    assert sorted(str(label) for label in shapes.features["label"]) == [
        "r/good.roi.zip", "r/later.roi.zip"]
    assert len(shapes.data) == 2 and "r (ROIs)" not in manager.errors


def test_a_replacing_roi_set_napari_cannot_show_leaves_none_of_the_old_set(make_napari_viewer):
    """The old set's shapes went, but its points stayed on screen (and in the report) after
    a set saved again to the same path failed in Shapes.add."""
    from polystore_napari.layers import LayerManager

    from polystore.streaming import ReceivedRois
    from polystore.streaming import protocol as p

    def rois(corner, point):
        header = p.Rois(v=1, seq=0, stream="r", path="r/cells.roi.zip", sent_ns=0,
                        rois=[p.Roi(kind="rectangle", coords=[[0, 0], [corner, corner]]),
                              p.Roi(kind="point", coords=[point])])
        return ReceivedRois(header, "test")

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    buffer.put_frame(_frame("r", 1, shape=(16, 16)))
    buffer.put_rois(rois(5, [1, 2]))
    manager.apply(buffer.take())
    shapes, points = manager.roi_layers("r")
    assert len(shapes.data) == 1 and points.data.tolist() == [[1, 2]]
    buffer.put_rois(rois(1e12, [3, 4]))  # the same path again: napari cannot show it
    manager.apply(buffer.take())
    assert "could not show a ROI set" in manager.errors["r (ROIs)"]
    shapes, points = manager.roi_layers("r")
    assert len(shapes.data) == 0 and len(points.data) == 0


def test_rois_the_user_deleted_do_not_come_back_when_the_layers_are_rebuilt(
        make_napari_viewer):
    """The ROI sets a rebuild redraws from were kept after the user deleted the ROI layers,
    so a set with a new axis brought the deleted ROIs back."""
    from polystore_napari.layers import LayerManager

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    buffer.put_rois(_rois("s", "old", {"t": 0}))
    manager.apply(buffer.take())
    viewer.layers.remove(manager.roi_layers("s")[0])  # the user deletes "s ROIs"
    assert manager.held_rois("s") == 0
    buffer.put_rois(_rois("s", "new", {"t": 1, "p": 1}))  # new axes: the layers are rebuilt
    manager.apply(buffer.take())
    shapes, _ = manager.roi_layers("s")
    assert [str(label) for label in shapes.features["label"]] == ["new"]


def test_deleting_the_points_layer_keeps_the_shapes_on_their_planes(make_napari_viewer):
    """Deleting only "s points" emptied the sets both ROI layers are made from: when the
    image gained a z axis the shapes kept axes (t, y, x), so napari put their t on the
    image's z, and the next set's rebuild left only that set's shapes."""
    from polystore_napari.layers import LayerManager

    from polystore.streaming import ReceivedRois
    from polystore.streaming import protocol as p

    def rois(label, t):
        header = p.Rois(v=1, seq=0, stream="s", path=f"s/{label}.roi.zip", sent_ns=0,
                        axes={"t": t}, rois=[
                            p.Roi(kind="rectangle", coords=[[1, 1], [5, 5]], label=label),
                            p.Roi(kind="point", coords=[[2, 2]], label=label)])
        return ReceivedRois(header, "test")

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    for t in range(2):
        buffer.put_frame(_frame("s", t, shape=(16, 16), axes={"t": t}))
        buffer.put_rois(rois(f"t{t}", t))
    manager.apply(buffer.take())
    viewer.layers.remove(manager.roi_layers("s")[1])  # the user deletes "s points" only
    buffer.put_frame(_frame("s", 9, shape=(16, 16), axes={"t": 1, "z": 2}))
    manager.apply(buffer.take())
    shapes, points = manager.roi_layers("s")
    assert tuple(shapes.axis_labels) == tuple(viewer.layers["s"].axis_labels)  # t z y x
    buffer.put_rois(rois("t2", 2))
    manager.apply(buffer.take())
    shapes, points = manager.roi_layers("s")
    assert [str(x) for x in shapes.features["label"]] == ["t0", "t1", "t2"]
    assert [str(x) for x in points.features["label"]] == ["t2"]  # the deleted stay deleted


def test_buffer_coalesces_replace_keeps_stack_and_places_per_position():
    buffer = CoalescingBuffer(stack_capacity=3)
    for i in range(5):
        buffer.put_frame(_frame("r", i))
        buffer.put_frame(_frame("s", i, mode="stack"))
        buffer.put_frame(_frame("p", i, axes={"z": i % 2}))
    batch = buffer.take()
    updates = {u.stream: u for u in batch.updates}
    assert [f.array[0, 0] for f in updates["r"].frames] == [4]
    assert updates["r"].mode == "replace"
    assert [f.array[0, 0] for f in updates["s"].frames] == [2, 3, 4]
    assert updates["p"].mode == "place"
    assert sorted((f.header.axes["z"], f.array[0, 0]) for f in updates["p"].frames) == \
        [(0, 4), (1, 3)]
    assert buffer.stats.coalesced == 4 + 3 and buffer.stats.overflow == 2
    assert not buffer.take() and buffer.pending_bytes == 0


@pytest.mark.parametrize("default", ["stack", "replace"])
def test_the_default_mode_is_for_frames_without_axes(default):
    """Fiji's `mode` parameter applies to frames without t/c/z axes; the widget's default
    mode applied to every frame without a hint, so under `stack` a z series sent with
    `axes={"z": i}` became a time series of planes in napari and one z-stack in Fiji.
    Frames with axes are placed unless their own hint says otherwise (docs/protocol.md)."""
    buffer = CoalescingBuffer(default_mode=default)
    buffer.put_frame(_frame("p", 1, axes={"z": 0}))
    buffer.put_frame(_frame("n", 2))
    buffer.put_frame(_frame("h", 3, axes={"z": 0}, mode="stack"))
    modes = {u.stream: u.mode for u in buffer.take().updates}
    assert modes == {"p": "place", "n": default, "h": "stack"}


def test_what_the_display_resolves_alike_is_no_change_and_a_change_keeps_hints(
        make_napari_viewer):
    """The buffer drops a stream's pending frames when a frame changes it (it starts again):
    an RGB frame sent with rgb=True after ones detected as RGB was such a change, and wiped a
    placed series in one tick though napari shows both alike; and the dropped frames took
    their colormap hint along (frame by frame it stays)."""
    from polystore_napari.layers import LayerManager

    def frame(value, t, dtype=np.uint8, shape=(4, 5, 3), **display):
        return _frame("s", array=np.full(shape, value, dtype), axes={"t": t}, display=display)

    buffer = CoalescingBuffer()
    for t in range(3):
        buffer.put_frame(frame(t + 1, t))
    buffer.take()
    buffer.put_frame(frame(4, 3, rgb=True))
    buffer.put_frame(frame(5, 4))
    (update,) = buffer.take().updates
    assert not update.starts_again and len(update.frames) == 2
    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    manager.apply(buffer.take())
    buffer.put_frame(frame(1, 0, np.uint16, (4, 5), colormap="green"))
    buffer.put_frame(frame(2, 0, np.float32, (4, 5)))  # starts the stream again
    manager.apply(buffer.take())
    assert viewer.layers["s"].colormap.name == "green"
    assert viewer.layers["s"].data.dtype == np.float32


def test_a_refused_frame_in_one_tick_with_a_good_one_keeps_what_the_layer_shows(
        make_napari_viewer):
    """Labels t0..t4 shown; then, in one tick, a float labels frame with fractions (refused)
    and a good one. The refused frame counted as a change of the stream: the good one, a
    change back, started the stream again, and the five planes already shown were wiped
    (the layer read [0 0 0 0 0 0 7]) while the refusal was counted nowhere."""
    from polystore_napari.layers import LayerManager

    def labels(value, t, dtype=np.int32):
        return _frame("seg", array=np.full((8, 8), value, dtype), axes={"t": t},
                      kind="labels")

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    for t in range(5):
        buffer.put_frame(labels(t + 1, t))
    manager.apply(buffer.take())
    buffer.put_frame(labels(0.5, 5, np.float32))  # fractions: napari refuses it
    buffer.put_frame(labels(7, 6))
    manager.apply(buffer.take())
    assert list(viewer.layers["seg"].data[:, 0, 0]) == [1, 2, 3, 4, 5, 0, 7]
    assert manager.rejected == 1 and "whole numbers" in manager.errors["seg"]


def test_a_hint_of_a_coalesced_frame_stays_with_the_layers_it_was_for(make_napari_viewer):
    """A hinted single-layer frame coalesced away by a 3-channel frame without hints: its
    colormap was carried into the newer frame and coloured all three channel layers green,
    where showing each frame (as Fiji does) gives the channels napari's own cycle."""
    from msgspec import structs
    from polystore_napari.layers import LayerManager
    from polystore_napari.pieces import CHANNEL_COLORMAPS

    viewer = make_napari_viewer(show=False)
    manager = LayerManager(viewer)
    buffer = CoalescingBuffer()
    hinted = _frame("s", 1, shape=(8, 8))
    display = structs.replace(hinted.header.display, colormap="green")
    hinted = type(hinted)(hinted.array, structs.replace(hinted.header, display=display),
                          "test", 0)
    buffer.put_frame(hinted)
    buffer.put_frame(_frame("s", 2, shape=(3, 8, 8), axis_names=["c"]))  # coalesces it
    manager.apply(buffer.take())
    colours = [viewer.layers[f"s [c{c}]"].colormap.name for c in range(3)]
    assert colours == list(CHANNEL_COLORMAPS[:3])  # napari's cycle, as if both were shown
    buffer.put_frame(hinted)
    buffer.put_frame(_frame("s", 3, shape=(8, 8)))  # the same layer: the hint is carried
    manager.apply(buffer.take())
    assert viewer.layers["s"].colormap.name == "green"


def test_a_stream_that_changes_mode_within_a_tick_ends_on_its_newest_frame():
    """stack f1, replace f2, stack f3 in one tick: the display applied the stack update (f1,
    f3) first and the replace (f2) last, so the layer showed f2, older than the newest. Each
    change of mode starts the stream again (docs/protocol.md), so f1 and f2 would be gone
    at once: only f3 is left to show, the others are counted as coalesced."""
    buffer = CoalescingBuffer()
    for value, mode in [(1, "stack"), (2, "replace"), (3, "stack")]:
        buffer.put_frame(_frame("m", value, mode=mode))
    updates = buffer.take().updates
    assert [(u.mode, [f.array[0, 0] for f in u.frames]) for u in updates] == [("stack", [3])]
    assert updates[0].starts_again and buffer.stats.coalesced == 2


def test_buffer_memory_is_bounded_by_backpressure():
    frame_bytes = 64 * 64 * 2
    buffer = CoalescingBuffer(max_bytes=3 * frame_bytes, stack_capacity=100)
    done = threading.Event()

    def produce():
        for i in range(10):
            buffer.put_frame(_frame("s", i, (64, 64), mode="stack"))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    got = []
    while not done.is_set() or buffer.pending:
        assert buffer.pending_bytes <= 3 * frame_bytes
        got += [f.array[0, 0] for u in buffer.take().updates for f in u.frames]
        done.wait(0.01)
    producer.join()
    got += [f.array[0, 0] for u in buffer.take().updates for f in u.frames]
    assert got == list(range(10))  # slowed down, nothing lost
    assert buffer.stats.waits > 0


def test_buffer_close_releases_a_waiting_producer():
    buffer = CoalescingBuffer(max_bytes=10)
    buffer.put_frame(_frame("s", 0, mode="stack"))
    producer = threading.Thread(target=buffer.put_frame, args=(_frame("s", 1, mode="stack"),))
    producer.start()
    producer.join(0.3)
    assert producer.is_alive()  # waiting for room
    buffer.close()
    producer.join(2)
    assert not producer.is_alive()


# -- the documentation screenshot -----------------------------------------------------------


def test_widget_with_live_layers_screenshot(docked, qtbot, tmp_path):
    """Streams the demo scene; POLYSTORE_NAPARI_SCREENSHOT=path also saves the picture."""
    viewer, widget = docked
    viewer.window._qt_window.resize(1400, 850)
    sender = subprocess.Popen([sys.executable, "-m", "polystore_napari.demo", "--endpoint",
                               widget.endpoint, "--frames", "15", "--fps", "30"],
                              stderr=subprocess.PIPE, text=True)
    try:
        qtbot.waitUntil(lambda: sender.poll() is not None, timeout=60000)
        assert sender.returncode == 0, sender.stderr.read()
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    qtbot.waitUntil(lambda: widget.buffer.pending == 0 and "camera points" in viewer.layers,
                    timeout=10000)
    assert {"volume [c0]", "volume [c1]", "camera", "nuclei", "camera ROIs"} <= set(
        layer.name for layer in viewer.layers)
    viewer.layers.selection.active = viewer.layers["camera"]
    viewer.reset_view()
    widget.update_status()
    qtbot.wait(300)
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert canvas[..., :3].mean() > 20, "canvas is black"
    window = viewer.screenshot(canvas_only=False, flash=False)
    assert window.shape[1] > canvas.shape[1]  # the dock widget is in the picture
    target = os.environ.get("POLYSTORE_NAPARI_SCREENSHOT")
    from imageio.v3 import imwrite

    imwrite(target or tmp_path / "napari_widget.png", window)


def test_streams_survive_shape_axis_and_kind_changes(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        backend.save(rand(1, (20, 30)), "chg/a.tif")
        backend.save(rand(2, (8, 8)), "ax/a.tif", axes={"t": 1})
        backend.save(rand(3, (8, 8)), "kind/a.tif")
        barrier()
        backend.save(rand(4, (5, 20, 30)), "chg/a.tif")  # 2D -> 3D
        backend.save(rand(5, (8, 8)), "ax/a.tif", axes={"t": 0, "z": 2})  # a new axis
        backend.save(rand(6, (8, 8)), "kind/a.tif", labels=True)  # image -> labels
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 3)
        assert viewer.layers["ax/a"].data.shape == (2, 8, 8)
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_frames(qtbot, widget, 6)
    chg = viewer.layers["chg/a"]
    assert chg.data.shape == (5, 20, 30)
    np.testing.assert_array_equal(chg.data, rand(4, (5, 20, 30)))
    ax = viewer.layers["ax/a"]
    assert ax.data.shape == (2, 3, 8, 8)
    assert tuple(ax.axis_labels) == ("t", "z", "y", "x")
    np.testing.assert_array_equal(np.asarray(ax.data[1, 0]), rand(2, (8, 8)))
    np.testing.assert_array_equal(np.asarray(ax.data[0, 2]), rand(5, (8, 8)))
    kind = viewer.layers["kind/a"]
    assert isinstance(kind, napari.layers.Labels)
    np.testing.assert_array_equal(kind.data, rand(6, (8, 8)))
    assert len([layer for layer in viewer.layers if layer.name.startswith("kind")]) == 1
    assert widget.manager.last_error == ""


def test_a_contrast_set_by_hand_does_not_stop_a_stream_that_turns_labels_and_back(docked,
                                                                                   qtbot):
    """An image whose contrast the user had set, then a labels frame, then an image again:
    the new image layer was never made (TypeError, every later frame lost, a permanent *Last
    error*). The user's setting belonged to the layer that was replaced."""
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        backend.save(np.full((8, 8), 100, np.uint16) + np.eye(8, dtype=np.uint16), "s/t0.tif")
        barrier()
        backend.save(np.eye(8, dtype=np.int32), "s/t1.tif", labels=True)
        barrier()
        backend.save(np.full((8, 8), 300, np.uint16) + np.eye(8, dtype=np.uint16), "s/t2.tif")
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 1)
        viewer.layers["s"].contrast_limits = [0, 50]  # by hand
        sender.go()
        sender.wait_line(qtbot)
        wait_kind(qtbot, widget, "s", napari.layers.Labels)
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_kind(qtbot, widget, "s", napari.layers.Image)
    layer = viewer.layers["s"]
    np.testing.assert_array_equal(layer.data, np.full((8, 8), 300) + np.eye(8))
    assert layer.contrast_limits == [300, 301]  # a new layer: automatic again
    assert widget.manager.last_error == ""


# -- review fixes: memory, odd frames, geometry changes, block placement, report cost ---------


def test_deleting_a_layer_frees_what_its_stream_holds(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        for i in range(3):
            backend.save(rand(i, (16, 16)), f"del/img_t{i}.tif", stream="img", mode="stack")
            backend.save(rand(i, (16, 16), "int32"), f"del/lab_t{i}.tif", stream="lab",
                         mode="stack", labels=True)
            backend.save(rand(i, (16, 16)), f"del/pl_t{i}.tif", stream="pl", axes={"t": i})
        backend.save(rand(9, (16, 16)), "del/rep.tif", stream="rep")
        backend.save([{"kind": "rectangle", "coords": [[1, 1], [5, 5]]},
                      {"kind": "point", "coords": [[2, 2]]}], "del/r.roi.zip", stream="rep")
        barrier()
        backend.save(rand(7, (16, 16)), "del/img_t3.tif", stream="img", mode="stack")
    """)
    try:
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: widget.manager.frames >= 10 and "rep points" in viewer.layers,
                        timeout=10000)
        manager = widget.manager
        assert manager.held_bytes("img") == 3 * 16 * 16 * 2
        assert manager.held_bytes("lab") >= 3 * 16 * 16 * 4
        assert manager.held_bytes("pl") >= 3 * 16 * 16 * 2
        assert manager.held_rois("rep") == 2
        for name in ("img", "lab", "pl", "rep", "rep ROIs", "rep points"):
            viewer.layers.remove(name)
        # freed at once, not at the stream's next frame
        for stream in ("img", "lab", "pl", "rep"):
            assert manager.layer(stream) is None and manager.held_bytes(stream) == 0, stream
        assert manager.roi_layers("rep") == (None, None) and manager.held_rois("rep") == 0
        widget.display.tick()
        assert widget.buffer.report()["layers"] == []
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: "img" in viewer.layers, timeout=10000)
    layer = viewer.layers["img"]  # a new layer with only the new frame
    assert layer.data.shape == (1, 16, 16)
    np.testing.assert_array_equal(np.asarray(layer.data[0]), rand(7, (16, 16)))


def test_one_d_frames_show_as_a_row_and_empty_frames_are_counted(docked, qtbot, caplog):
    viewer, widget = docked
    caplog.set_level("WARNING", logger="polystore_napari")
    send(qtbot, widget.endpoint, """
        backend.save(np.arange(50, dtype=np.uint16), "vec/t0.tif")
        backend.save(np.arange(8, dtype=np.float32), "vecs/t0.tif", mode="stack")
        for i in range(3):
            backend.save(np.zeros((0, 5), np.uint16), f"empty/t{i}.tif", mode="stack")
        backend.save(np.zeros((2, 0, 4), np.float32), "empty3d/t0.tif")
        backend.save(rand(1, (4, 4)), "after/t0.tif")
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 7 and not widget.buffer.pending,
                    timeout=10000)
    qtbot.waitUntil(lambda: "after" in viewer.layers, timeout=5000)
    vec = viewer.layers["vec"]
    assert vec.data.shape == (1, 50) and tuple(vec.axis_labels) == ("y", "x")
    np.testing.assert_array_equal(vec.data[0], np.arange(50))
    assert viewer.layers["vecs"].data.shape == (1, 1, 8)
    assert "empty" not in viewer.layers and "empty3d" not in viewer.layers
    assert widget.manager.skipped == 4
    assert widget.manager.snapshot["frames_skipped"] == 4
    assert "empty frame" in widget.manager.last_error
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    warnings = [r for r in caplog.records if "empty frame" in r.getMessage()]
    assert len(warnings) == 2  # once per stream, not per frame


def test_a_dtype_change_keeps_the_layer_and_refits_its_contrast(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        base = np.full((10, 10), 4000, np.uint16) + np.eye(10, dtype=np.uint16)
        backend.save(base, "dt/t0.tif")
        backend.save(base, "fixed/t0.tif", contrast_limits=[0, 5000])
        barrier()
        small = (np.arange(100, dtype=np.float32).reshape(10, 10) / 198)  # 0 .. 0.5
        backend.save(small, "dt/t1.tif")
        backend.save(small, "fixed/t1.tif", contrast_limits=[0, 5000])
        barrier()
        backend.save(np.full((6, 8), 7, np.uint8) + np.eye(6, 8, dtype=np.uint8), "dt/t2.tif")
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 2)
        layer = viewer.layers["dt"]
        assert layer.contrast_limits == [4000, 4001]
        sender.go()
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 4)
        assert viewer.layers["dt"] is layer and layer.data.dtype == np.float32
        assert layer.contrast_limits == pytest.approx([0, 0.5])  # not black
        assert viewer.layers["fixed"].contrast_limits == [0, 5000]  # the hint still wins
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_frames(qtbot, widget, 5)
    assert viewer.layers["dt"] is layer and layer.data.shape == (6, 8)
    assert layer.contrast_limits == [7, 8]


def test_float64_data_spanning_its_whole_range_keeps_a_working_layer(docked, qtbot):
    """Such a frame made napari's contrast controls overflow (``hi - lo`` was infinite): the
    layer was added without its controls, and deleting it by hand raised KeyError."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        backend.save(np.array([[-1.7e308, np.inf], [np.nan, 1e308]]), "huge/t0.tif")
    """)
    wait_frames(qtbot, widget, 1)
    layer = viewer.layers["huge"]
    lo, hi = layer.contrast_limits
    assert lo < -1e307 and hi > 1e307 and np.isfinite(np.float64(hi) - np.float64(lo))
    viewer.layers.remove(layer)  # as the user's delete button does
    assert "huge" not in viewer.layers


def test_place_names_a_blocks_own_dims_with_the_rest_of_axis_names(docked, qtbot):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        block = rand(1, (2, 3, 16, 12))
        backend.save(block, "blk/t1.tif", axes={"t": 1}, axis_names=["t", "c", "z"])
        backend.save(rand(2, (4, 16, 12)), "mid/t0.tif", axes={"t": 0}, axis_names=["c", "t"])
        backend.save(rand(3, (2, 5, 8, 8)), "part/t0.tif", axes={"t": 0}, axis_names=["t", "c"])
        barrier()
        backend.save(rand(0, (2, 3, 16, 12)), "blk/t0.tif", axes={"t": 0},
                     axis_names=["t", "c", "z"])
        backend.save(rand(4, (2, 3, 16, 12)), "blk/t3.tif", axes={"t": 3},
                     axis_names=["t", "c", "z"])
    """)
    try:
        sender.wait_line(qtbot)
        wait_frames(qtbot, widget, 3)
        blocks = [viewer.layers[f"blk [c{c}]"] for c in range(2)]  # c splits into layers
        for c, layer in enumerate(blocks):
            assert layer.data.shape == (2, 3, 16, 12)
            assert tuple(layer.axis_labels) == ("t", "z", "y", "x")
            np.testing.assert_array_equal(np.asarray(layer.data[1]), rand(1, (2, 3, 16, 12))[c])
            assert not np.asarray(layer.data[0]).any()  # t=0 not sent yet
        layer = blocks[1]
        for c in range(4):  # the frame's own c dimension: four channel layers over t
            mid = viewer.layers[f"mid [c{c}]"]
            assert mid.data.shape == (1, 16, 12) and tuple(mid.axis_labels) == ("t", "y", "x")
            np.testing.assert_array_equal(np.asarray(mid.data[0]), rand(2, (4, 16, 12))[c])
        part = viewer.layers["part [c1]"]  # c named; the other leading dim is z by default
        assert tuple(part.axis_labels) == ("t", "z", "y", "x")
        assert part.data.shape == (1, 5, 8, 8)
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_frames(qtbot, widget, 5)
    assert viewer.layers["blk [c1]"] is layer and layer.data.shape == (4, 3, 16, 12)
    for t, seed in ((0, 0), (1, 1), (3, 4)):
        np.testing.assert_array_equal(np.asarray(layer.data[t]), rand(seed, (2, 3, 16, 12))[1])
    assert not np.asarray(layer.data[2]).any()
    assert widget.manager.last_error == ""


def test_report_snapshots_do_not_walk_every_roi_shape(docked, qtbot, monkeypatch):
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        rois = [{"kind": "rectangle", "coords": [[i % 50, 0], [i % 50 + 2, 3]]}
                for i in range(300)]
        rois += [{"kind": "ellipse", "coords": [[0, 0], [4, 4]]}] * 5
        backend.save(rand(0, (64, 64)), "many/t0.tif")
        backend.save(rois, "many/a.roi.zip", stream="many")
        barrier()
        for i in range(1, 4):
            backend.save(rand(i, (64, 64)), f"many/t{i}.tif")
            barrier()
        backend.save(rois[:10], "many/a.roi.zip", stream="many")
    """)
    walked = []
    try:
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: "many ROIs" in viewer.layers and widget.manager.frames >= 1,
                        timeout=10000)
        manager = widget.manager
        assert manager.updates == 1 and manager.roi_updates == 1  # ROIs are not pixels
        # from here on, count what the plugin reads of the whole Shapes layer
        shapes_cls = type(viewer.layers["many ROIs"])
        for name in ("data", "shape_type"):
            prop = getattr(shapes_cls, name)

            def counted(layer, _prop=prop, _name=name):
                if sys._getframe(1).f_code.co_filename.endswith("layers.py") and \
                        "polystore_napari" in sys._getframe(1).f_code.co_filename:
                    walked.append(_name)
                return _prop.fget(layer)

            monkeypatch.setattr(shapes_cls, name, property(counted, prop.fset))
        for i in range(1, 4):  # display ticks with new pixels: each takes a snapshot
            sender.go()
            sender.wait_line(qtbot)
            wait_frames(qtbot, widget, 1 + i)
        entry = next(e for e in manager.snapshot["layers"] if e["kind"] == "shapes")
        assert entry["count"] == 305 and entry["types"] == {"rectangle": 300, "ellipse": 5}
        assert walked == []
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: widget.manager.roi_updates == 2, timeout=10000)
    entry = next(e for e in widget.manager.snapshot["layers"] if e["kind"] == "shapes")
    assert entry["count"] == 10 and entry["types"] == {"rectangle": 10}
    assert widget.manager.updates == 4


def test_float16_and_float_labels_convert_while_copying_into_the_layer(docked, qtbot,
                                                                      monkeypatch):
    import tracemalloc

    viewer, widget = docked
    streams = ["half", "single", "flabels", "ilabels"]
    sender = Sender(widget.endpoint, """
        def frames(i):
            x = np.random.default_rng(i).random((1024, 1024)) * 100
            return {"half": (x.astype(np.float16), {}),
                    "single": (x.astype(np.float32), {}),
                    "flabels": (np.floor(x).astype(np.float32), {"labels": True}),
                    "ilabels": (x.astype(np.int32), {"labels": True})}
        for i in range(3):
            for name, (array, hint) in frames(i).items():
                backend.save(array, f"{name}/t{i}.tif", **hint)
                barrier()
    """)
    manager = widget.manager
    peaks: dict[str, list[int]] = {name: [] for name in streams}
    apply = manager.apply

    def measured(batch):
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        apply(batch)
        for update in batch.updates:
            peaks[update.stream].append(tracemalloc.get_traced_memory()[1] - start)

    monkeypatch.setattr(manager, "apply", measured)
    tracemalloc.start()
    try:
        for n in range(1, 13):
            sender.wait_line(qtbot)
            wait_frames(qtbot, widget, n)
            if n == 4:  # every layer made
                shown = [viewer.layers[name].data for name in streams]
            sender.go()
        sender.finish(qtbot)
    finally:
        tracemalloc.stop()
        sender.kill()
    x = np.random.default_rng(2).random((1024, 1024)) * 100
    np.testing.assert_array_equal(viewer.layers["half"].data,
                                  x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(viewer.layers["flabels"].data, np.floor(x).astype(np.int32))
    for name, before in zip(streams, shown, strict=True):
        assert viewer.layers[name].data is before  # updated in place
    # replace frames after the first: converting must not allocate a converted copy (4 MiB)
    assert all(len(p) == 3 for p in peaks.values()), peaks
    mib = 1024**2
    assert max(peaks["half"][1:]) < min(peaks["single"][1:]) + mib, peaks
    # float labels are shown as int64 (one dtype however large the ids grow): twice int32's
    assert max(peaks["flabels"][1:]) < 2 * min(peaks["ilabels"][1:]) + mib, peaks


# -- issue 14: channels, colour, labels, contrast, settings; issue 11 item 9 -------------------


def test_t_by_c_frames_become_one_layer_per_channel_with_its_own_colormap(docked, qtbot):
    """Issue 14 item 1: the docs/fiji.md example (green/magenta/cyan) was one layer whose
    colormap flipped with every frame, with one contrast range for all channels."""
    viewer, widget = docked
    viewer.window._qt_window.resize(900, 700)
    lines = send(qtbot, widget.endpoint, """
        import time
        yy, xx = np.mgrid[0:96, 0:128]
        for t in range(4):
            for c, colour in enumerate(["green", "magenta", "cyan"]):
                cy, cx = 30 + 15 * c, 30 + 25 * c + 5 * t
                plane = (1000 * (c + 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 200))
                backend.save(plane.astype(np.uint16), f"cells/t{t}_c{c}.tif", stream="cells",
                             axes={"t": t, "c": c}, axis_names=["t", "c"], colormap=colour)
        for _ in range(200):
            state = backend.request("report")
            if len(state.get("layers", [])) == 3 and state["frames_displayed"] == 12:
                break
            time.sleep(0.05)
        print(json.dumps(state))
    """)
    state = json.loads(lines[-1])
    colours = ["green", "magenta", "cyan"]
    reported = {e["name"]: e for e in state["layers"]}
    assert {name: reported[name]["colormap"] for name in reported} == {
        f"cells [c{c}]": colours[c] for c in range(3)}
    assert [reported[f"cells [c{c}]"]["channel"] for c in range(3)] == [0, 1, 2]
    layers = [viewer.layers[f"cells [c{c}]"] for c in range(3)]
    for c, layer in enumerate(layers):
        assert layer.colormap.name == colours[c]  # stays: not whichever hint came last
        assert layer.blending == "additive" and layer.data.shape == (4, 96, 128)
        assert tuple(layer.axis_labels) == ("t", "y", "x")
    highs = [layer.contrast_limits[1] for layer in layers]  # one range per channel
    assert highs[0] < highs[1] < highs[2] and highs[0] == pytest.approx(1000, abs=2)
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert (shot[..., :3].max(axis=(0, 1)) > 100).sum() >= 2  # more than one colour drawn


def test_a_colormap_hint_stays_until_another_replaces_it(docked, qtbot):
    """protocol.md: a colormap hint stays with its channels (as in Fiji). Channel layers went
    back to napari's channel cycle when a later frame came without a hint, while a stream's
    single layer kept its colormap."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for t, hint in enumerate(["green", None, "magenta", None]):
            extra = {"colormap": hint} if hint else {}
            backend.save(np.ones((2, 8, 8), np.uint16), f"ch/t{t}.tif", stream="ch",
                         axes={"t": t}, axis_names=["t", "c"], **extra)
            backend.save(np.ones((8, 8), np.uint16), f"one/t{t}.tif", stream="one", **extra)
            for _ in range(200):
                if backend.request("report")["frames_displayed"] >= 2 * (t + 1):
                    break
                time.sleep(0.05)
            print(json.dumps({e["name"]: e["colormap"]
                              for e in backend.request("report")["layers"]}))
    """)
    seen = [json.loads(line) for line in lines[-4:]]
    expected = ["green", "green", "magenta", "magenta"]
    assert [step["ch [c0]"] for step in seen] == expected
    assert [step["ch [c1]"] for step in seen] == expected
    assert [step["one"] for step in seen] == expected
    assert viewer.layers["ch [c0]"].colormap.name == "magenta"
    assert viewer.layers["ch [c1]"].colormap.name == "magenta"
    assert viewer.layers["one"].colormap.name == "magenta"


def test_an_unknown_colormap_is_reported_while_the_layer_shows_gray(docked, qtbot):
    """docs/napari.md: an unknown colormap is reported in *Last error* and gray is used. The
    message was set and removed within the same frame (the frame was shown), so no user and
    no report ever saw it; Fiji names it in its report while the image shows gray."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for t, hint in enumerate(["nosuchmap", None, "gray"]):
            extra = {"colormap": hint} if hint else {}
            backend.save(np.ones((2, 8, 8), np.uint16), f"ch/t{t}.tif", stream="ch",
                         axis_names=["c"], **extra)
            backend.save(np.ones((8, 8), np.uint16), f"one/t{t}.tif", stream="one", **extra)
            for _ in range(200):
                if backend.request("report")["frames_displayed"] >= 2 * (t + 1):
                    break
                time.sleep(0.05)
            report = backend.request("report")
            print(json.dumps([report["errors"], {e["name"]: e["colormap"]
                                                 for e in report["layers"]}]))
    """)
    seen = [json.loads(line) for line in lines[-3:]]
    for errors, colormaps in seen[:2]:  # the hint stays until another replaces it
        assert set(errors) == {"ch", "one"}
        assert all("unknown colormap 'nosuchmap'" in errors[s] for s in errors)
        assert colormaps == {"ch [c0]": "gray", "ch [c1]": "gray", "one": "gray"}
    errors, colormaps = seen[2]
    assert errors == {} and set(colormaps.values()) == {"gray"}  # a known hint
    assert widget.manager.last_error == ""


def test_an_unknown_colormap_after_a_known_one_shows_gray_with_a_short_message(docked, qtbot):
    """The layer kept magenta while *Last error* said "shown in gray", and the message held
    napari's list of every colormap (about 2,000 characters, cut off in the dock)."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for t, hint in enumerate(["magenta", "nosuchmap"]):
            backend.save(np.ones((8, 8), np.uint16), f"m/t{t}.tif", colormap=hint)
            for _ in range(200):
                if backend.request("report")["frames_displayed"] >= t + 1:
                    break
                time.sleep(0.05)
            report = backend.request("report")
            print(json.dumps([report["errors"], report["layers"][0]["colormap"]]))
    """)
    (errors0, first), (errors1, second) = [json.loads(line) for line in lines[-2:]]
    assert (errors0, first, second) == ({}, "magenta", "gray")
    assert "unknown colormap 'nosuchmap', shown in gray" in errors1["m"]
    assert len(errors1["m"]) < 300
    assert viewer.layers["m"].colormap.name == "gray"


def test_a_colormap_hint_stays_through_labels_frames_and_a_deleted_layer(docked, qtbot):
    """A colormap hint stays with its channels until another replaces it (protocol.md), as in
    Fiji. A stream hinted green, then sent a labels frame, then unhinted images: the new image
    layers were gray (one layer) or back on the channel cycle (channel layers)."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for t, (kind, hint) in enumerate([("image", "green"), ("labels", None),
                                          ("image", None)]):
            extra = {"colormap": hint} if hint else {}
            labels = kind == "labels"
            backend.save(np.ones((2, 8, 8), np.uint16), f"ch/t{t}.tif", stream="ch",
                         axis_names=["c"], labels=labels, **extra)
            backend.save(np.ones((8, 8), np.uint16), f"one/t{t}.tif", stream="one",
                         labels=labels, **extra)
            for _ in range(200):
                if backend.request("report")["frames_displayed"] >= 2 * (t + 1):
                    break
                time.sleep(0.05)
            print(json.dumps({e["name"]: [e["kind"], e["colormap"]]
                              for e in backend.request("report")["layers"]}))
    """)
    seen = [json.loads(line) for line in lines[-3:]]
    assert seen[1]["one"][0] == "labels" and seen[1]["ch [c1]"][0] == "labels"
    assert seen[2] == {name: ["image", "green"] for name in ("ch [c0]", "ch [c1]", "one")}
    viewer.layers.remove("one")  # the user deletes it; the stream's next frame makes a new one
    send(qtbot, widget.endpoint, """
        backend.save(np.ones((8, 8), np.uint16), "one/t3.tif", stream="one")
    """)
    qtbot.waitUntil(lambda: "one" in viewer.layers, timeout=10000)
    assert viewer.layers["one"].colormap.name == "green"
    assert widget.manager.last_error == ""


def test_a_colormap_hint_on_a_coalesced_frame_is_not_lost(docked, qtbot):
    """A hinted frame followed at once by one without a hint, both reaching the display in
    one tick: the display took only the newest (replace, and place per position) and its
    hints, or applied the hints of the newest frame of a run only (stack, place), so the
    layers stayed gray where Fiji, which shows every frame, showed green."""
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        def frames(t, **extra):
            backend.save(np.full((8, 8), t, np.uint16), f"one/t{t}.tif", stream="one", **extra)
            backend.save(np.full((2, 8, 8), t, np.uint16), f"ch/t{t}.tif", stream="ch",
                         axis_names=["c"], **extra)
            backend.save(np.full((8, 8), t, np.uint16), f"pl/t{t}.tif", stream="pl",
                         axes={"z": 1}, **extra)
            backend.save(np.full((8, 8), t, np.uint16), f"pz/t{t}.tif", stream="pz",
                         axes={"z": t}, **extra)
            backend.save(np.full((8, 8), t, np.uint16), f"st/t{t}.tif", stream="st",
                         mode="stack", **extra)
        frames(0)
        barrier()
        frames(1, colormap="green", opacity=0.5)
        frames(2)
    """)
    names = ("one", "ch [c0]", "ch [c1]", "pl", "pz", "st")
    try:
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: all(name in viewer.layers for name in names), timeout=10000)
        widget.display.stop(drain=False)  # the next frames reach the display in one tick
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
        widget.display.start(widget.buffer)
    wait_frames(qtbot, widget, 5 + 7)  # one, ch and pl coalesced
    for name in names:
        layer = viewer.layers[name]
        assert layer.colormap.name == "green" and layer.opacity == pytest.approx(0.5), name
        assert int(np.asarray(layer.data).max()) == 2  # the newest pixels
    assert widget.manager.last_error == ""


def test_channel_layers_a_newer_frame_no_longer_has_are_removed(docked, qtbot):
    """A stream whose frames went from 3 channels to 2, or stopped being split, kept the
    left-over channel layers, showing the old frame blended over the new one."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        import time
        backend.save(np.full((3, 8, 8), 7, np.uint16), "ch/t0.tif", axis_names=["c"])
        backend.flush()
        time.sleep(0.5)  # shown before the next one (not coalesced with it)
        backend.save(np.full((2, 8, 8), 1, np.uint16), "ch/t1.tif", axis_names=["c"])
        backend.flush()
        time.sleep(0.5)
        backend.save(np.full((8, 8), 2, np.uint16), "ch/t2.tif")
        backend.flush()
    """)
    qtbot.waitUntil(lambda: [layer.name for layer in viewer.layers] == ["ch"], timeout=20000)
    assert int(viewer.layers["ch"].data.max()) == 2


def test_a_channel_that_comes_back_keeps_its_colormap_hint(docked, qtbot):
    """3 channels hinted green, then 2, then 3 without hints: channel 2's layer came back in
    napari's channel cycle (magenta) while channels 0 and 1 stayed green; the hint stays with
    the channels it covered until another replaces it (protocol.md), as in Fiji."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for t, (n, hint) in enumerate([(3, "green"), (2, None), (3, None)]):
            extra = {"colormap": hint} if hint else {}
            backend.save(np.ones((n, 8, 8), np.uint16), f"ch/t{t}.tif", stream="ch",
                         axis_names=["c"], **extra)
            for _ in range(200):
                if backend.request("report")["frames_displayed"] >= t + 1:
                    break
                time.sleep(0.05)
            print(json.dumps({e["name"]: e["colormap"]
                              for e in backend.request("report")["layers"]}))
    """)
    seen = [json.loads(line) for line in lines[-3:]]
    assert seen[1] == {"ch [c0]": "green", "ch [c1]": "green"}
    assert seen[2] == {"ch [c0]": "green", "ch [c1]": "green", "ch [c2]": "green"}


def test_rgb_and_rgba_frames_become_rgb_layers(docked, qtbot):
    """Issue 14 item 2: an (h, w, 3) uint8 frame raised ValueError in the plugin."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        rgb = np.zeros((120, 160, 3), np.uint8)
        rgb[..., 0] = np.linspace(0, 255, 160, dtype=np.uint8)  # red ramp left to right
        rgb[:60, :, 1] = 200  # green top half
        backend.save(rgb, "photo/t0.png")
        rgba = np.concatenate([rgb, np.full((120, 160, 1), 255, np.uint8)], axis=-1)
        backend.save(rgba, "overlay/t0.png")
        backend.save(rgb, "planes/t0.tif", rgb=False)  # three z planes, not colour
    """)
    wait_frames(qtbot, widget, 3)
    photo = viewer.layers["photo"]
    assert photo.rgb and photo.data.shape == (120, 160, 3)
    assert tuple(photo.axis_labels) == ("y", "x")  # napari labels only the spatial axes
    assert viewer.layers["overlay"].rgb and viewer.layers["overlay"].data.shape[-1] == 4
    planes = viewer.layers["planes"]
    assert not planes.rgb and tuple(planes.axis_labels) == ("z", "y", "x")
    assert widget.manager.last_error == ""
    for name in ("overlay", "planes"):
        viewer.layers[name].visible = False
    qtbot.wait(200)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    middle = shot[shot.shape[0] // 4, shot.shape[1] // 2, :3].astype(int)
    assert middle[1] > 150 and middle[0] > 60  # green top half over the red ramp


def test_an_rgb_contrast_hint_holds_for_the_frames_that_carry_it(docked, qtbot):
    """protocol.md: RGB frames keep 0-255 unless hinted, and a hint holds for the frames that
    carry it. An RGB layer kept a hinted [0, 100] for every later frame without a hint."""
    viewer, widget = docked
    lines = send(qtbot, widget.endpoint, """
        import time
        for t, hint in enumerate([[0, 100], None, [10, 50], None]):
            extra = {"contrast_limits": hint} if hint else {}
            backend.save(np.full((8, 8, 3), 50, np.uint8), f"rgb/t{t}.png", **extra)
            for _ in range(200):
                if backend.request("report")["frames_displayed"] >= t + 1:
                    break
                time.sleep(0.05)
            print(json.dumps(backend.request("report")["layers"][0]["contrast_limits"]))
    """)
    seen = [json.loads(line) for line in lines[-4:]]
    assert seen == [[0, 100], [0, 255], [10, 50], [0, 255]]
    assert viewer.layers["rgb"].rgb and widget.manager.last_error == ""


def test_a_frame_the_plugin_cannot_show_leaves_no_permanent_error(docked, qtbot):
    """Issue 14 item 2: one bad frame left a permanent *Last error*."""
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        from polystore.streaming import StreamingError
        try:  # refused by the protocol's frame check (at save or by the receiver) with why
            backend.save(np.zeros((20, 30), np.uint8), "cam/t0.tif", rgb=True)
            backend.flush()
        except StreamingError as exc:
            print("rejected", exc, flush=True)
        backend.save(np.array([[0, 1.5]], np.float32), "seg/t0.tif", labels=True)
        barrier()
        backend.save(np.zeros((20, 30, 3), np.uint8), "cam/t1.tif", rgb=True)
        backend.save(np.array([[0, 2]], np.float32), "seg/t1.tif", labels=True)
    """)
    try:
        rejected = sender.wait_line(qtbot)
        assert rejected.startswith("rejected") and "rgb=true needs a uint8" in rejected
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: "seg" in widget.manager.errors, timeout=10000)
        widget.update_status()
        shown = widget.status_labels["error"].text()
        assert "whole numbers" in widget.manager.errors["seg"] and "seg" in shown
        assert widget.manager.snapshot["frames_rejected"] == 1
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    qtbot.waitUntil(lambda: "cam" in viewer.layers and "seg" in viewer.layers, timeout=10000)
    widget.update_status()
    assert widget.manager.last_error == "" and widget.status_labels["error"].text() == "-"
    assert viewer.layers["cam"].rgb


def test_many_labels_get_distinct_neighbouring_colours(docked, qtbot):
    """Issue 14 item 3 (napari half): more than 300 touching objects stay distinguishable."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        ids = np.arange(1, 401, dtype=np.uint16).reshape(20, 20)  # 400 touching squares
        mask = np.kron(ids, np.ones((12, 12), np.uint16))
        backend.save(mask, "cells/mask.tif", labels=True)
    """)
    wait_frames(qtbot, widget, 1)
    layer = viewer.layers["cells/mask"]
    assert isinstance(layer, napari.layers.Labels) and len(np.unique(layer.data)) == 400
    colours = layer.colormap.map(np.arange(1, 401))
    assert (colours[:, 3] > 0).all()  # none is transparent (the background's colour)
    # neighbours (right and below in the grid) never share a colour
    grid = colours.reshape(20, 20, 4)
    assert (np.abs(grid[:, 1:] - grid[:, :-1]).sum(-1) > 0.05).all()
    assert (np.abs(grid[1:] - grid[:-1]).sum(-1) > 0.05).all()
    assert len({tuple(np.round(c, 3)) for c in colours}) >= 40  # a cycle of many colours


def test_place_refuses_far_apart_positions_without_growing(docked, qtbot):
    """Issue 11 item 9: three 32 KiB frames at t = 0, 20000, 40001 grew the plugin by about
    650 MiB and blocked the main thread for about a second."""
    viewer, widget = docked
    send(qtbot, widget.endpoint, """
        for t in (0, 20000, 40001):
            backend.save(np.full((128, 128), t % 7 + 1, np.uint16), f"far/t{t}.tif",
                         axes={"t": t})
        backend.save(np.full((128, 128), 9, np.uint16), "far/t1.tif", axes={"t": 1})
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 4 and not widget.buffer.pending,
                    timeout=10000)
    qtbot.waitUntil(lambda: viewer.layers["far"].data.shape == (2, 128, 128), timeout=10000)
    manager = widget.manager
    assert manager.held_bytes("far") <= 4 * 128 * 128 * 2
    assert manager.snapshot["frames_rejected"] == 2
    assert "closer together" in manager.errors.get("far", "") or manager.last_error == ""
    assert widget.display.busy_s < 2.0  # generous: the old code spent ~1 s in one tick


def test_command_line_and_environment_win_over_saved_settings(make_napari_viewer, qtbot,
                                                              monkeypatch):
    """Issue 14 item 7: `polystore napari` listened on the endpoint saved by an earlier Start
    instead of its documented default, so senders found no receiver."""
    import socket

    from polystore_napari.launch import launch

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    default, saved = ports
    monkeypatch.setattr(NapariStreamingBackend, "DEFAULT_PORT", default)
    QSettings("polystore", "polystore-napari").setValue("endpoint", f"tcp://127.0.0.1:{saved}")
    viewer = make_napari_viewer(show=True)
    widget = launch(viewer=viewer, run=False)  # no --endpoint, no environment
    try:
        assert widget.endpoint == f"tcp://127.0.0.1:{default}"
        widget.update_status()
        # the widget shows where it listens
        assert widget.status_labels["state"].text() == f"listening on tcp://127.0.0.1:{default}"
        assert widget.endpoint_edit.text() == f"tcp://127.0.0.1:{default}"
    finally:
        widget.stop()
    # the environment wins over the saved endpoint in a widget opened from the Plugins menu
    monkeypatch.setenv("POLYSTORE_NAPARI_ENDPOINT", EPHEMERAL)
    menu = ReceiverWidget(viewer, auto_start=False)
    try:
        assert menu.endpoint_edit.text() == EPHEMERAL
    finally:
        menu.deleteLater()


# -- the display rules both viewers share (polystore.testing.rules, Fiji: test_fiji.py) -------


def received_frame(stream: str, sent):
    """A frame as the receiver hands it over, with the header `save(**sent.options)` makes."""
    options = dict(sent.options)
    kind = "labels" if options.pop("labels", False) else "image"
    return _frame(stream, array=np.ascontiguousarray(sent.array()), kind=kind, **options)


def shown_planes(viewer, stream: str) -> tuple[tuple[int, ...], dict]:
    """(c, z, t, rows, columns) of what napari shows of `stream`, and each (c, z, t)'s value:
    a layer per channel (``<stream> [c<i>]``) or one, with leading axes t and z."""
    names = [layer.name for layer in viewer.layers
             if layer.name == stream or layer.name.startswith(f"{stream} [c")]
    assert not (stream in names and f"{stream} [c0]" in names), names
    layers = {0 if layer.name == stream else int(layer.name[len(stream) + 3:-1]): layer
              for layer in viewer.layers if layer.name in names}
    planes, extent, size = {}, [max(layers) + 1, 1, 1], None
    for channel, layer in layers.items():
        data = np.asarray(layer.data)
        lead = list(layer.axis_labels)[:data.ndim - 2]
        assert set(lead) <= {"z", "t"}, f"{layer.name} has axes {layer.axis_labels}"
        size = data.shape[-2:]
        for index in np.ndindex(data.shape[:len(lead)]):
            where = dict(zip(lead, index, strict=True))
            planes[(channel, where.get("z", 0), where.get("t", 0))] = data[index][0, 0].item()
        for axis, name in ((1, "z"), (2, "t")):
            if name in lead:
                extent[axis] = max(extent[axis], data.shape[lead.index(name)])
    dims = tuple(extent)
    return (*dims, *size), {**every_plane(dims, {}), **planes}


def show_cases_by_ticks():
    """SHOW_CASES shown frame by frame, with the last 3 frames in one display tick, and all
    in one tick; not the coalesced ways for a case whose refused frame would be coalesced
    (the buffer drops a stream's pending frames when a frame changes it, not knowing that
    the display will refuse that frame: docs/napari.md)."""
    for case in SHOW_CASES:
        sends = case.values[0]
        for together, name in ((1, "tick_per_frame"), (3, "last_3_in_one_tick"),
                               (99, "one_tick")):
            if together == 1 or not any(sent.refused for sent in sends[-together:]):
                yield pytest.param(*case.values, together, id=f"{case.id}-{name}")


@pytest.mark.parametrize(("sends", "dims", "size", "planes", "together"), show_cases_by_ticks())
def test_frames_show_as_the_rules_both_viewers_share(make_napari_viewer, sends, dims, size,
                                                     planes, together):
    """Each case of polystore.testing.rules.SHOW_CASES through the plugin's buffer and layer
    manager into napari: shown frame by frame, and with the last `together` frames in one
    display tick (the display behind, the buffer coalescing); test_fiji.py sends the same
    frames to Fiji."""
    from polystore_napari.layers import LayerManager

    viewer = make_napari_viewer(show=False)
    manager, buffer = LayerManager(viewer), CoalescingBuffer()
    for i, sent in enumerate(sends):
        buffer.put_frame(received_frame("s", sent))
        if i < len(sends) - together:
            manager.apply(buffer.take())
    manager.apply(buffer.take())
    assert manager.rejected == sum(sent.refused for sent in sends), manager.errors
    assert shown_planes(viewer, "s") == ((*dims, *size), every_plane(dims, planes))


# -- reopening the widget, refused kind changes, lowering the stack capacity ------------------


def managers_listening(viewer) -> int:
    """How many LayerManagers listen to `viewer.layers.events.removed` (napari keeps a bound
    method as a (weakref, name) pair, another callable as it is)."""
    from polystore_napari.layers import LayerManager

    count = 0
    for callback in viewer.layers.events.removed.callbacks:
        if isinstance(callback, tuple):
            target = callback[0]()
        else:
            target = getattr(callback, "args", (None,))[0] if callback else None
        count += isinstance(target, LayerManager)
    return count


def test_a_reopened_widget_takes_over_the_layers_of_the_closed_one(make_napari_viewer, qtbot,
                                                                    monkeypatch):
    """The dock widget closed (its x) and opened again from the Plugins menu made a second
    LayerManager that knew nothing of the layers the first had made: streaming again added
    "cam [1]" beside "cam" (and "seg [1]", "cam points [1]"), a sender's clear removed only the
    new ones, and the first manager stayed connected to viewer.layers.events."""
    monkeypatch.setenv("POLYSTORE_NAPARI_ENDPOINT", EPHEMERAL)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((5, 5)), name="user layer")

    def open_from_plugins_menu() -> ReceiverWidget:
        (action,) = [a for a in viewer.window.plugins_menu.actions()
                     if "polystore receiver" in a.text()]
        action.trigger()
        (widget,) = [w for w in viewer.window.dock_widgets.values()
                     if isinstance(w, ReceiverWidget)]
        qtbot.waitUntil(lambda: widget.running, timeout=5000)
        return widget

    def settled(widget, frames: int, rois: int):
        def done() -> bool:
            stats = widget.buffer.stats
            return stats.frames == frames and stats.rois == rois and widget.buffer.pending == 0
        qtbot.waitUntil(done, timeout=10000)
        qtbot.wait(200)  # a few display ticks: the ROI set is shown too

    first = open_from_plugins_menu()
    send(qtbot, first.endpoint, """
        backend.save(rand(1, (20, 30)), "cam/t000.tif")
        backend.save(rand(2, (16, 16), "int32"), "seg/t000.tif", mode="stack", labels=True)
        backend.save([{"kind": "point", "coords": [[1, 1]]}], "cam/p.roi.zip", stream="cam")
    """)
    settled(first, 2, 1)
    names = [layer.name for layer in viewer.layers]
    assert names == ["user layer", "cam", "seg", "cam points"]
    cam = viewer.layers["cam"]
    viewer.window.remove_dock_widget(first)  # what the dock's close button does
    assert not first.running

    second = open_from_plugins_menu()
    assert second is not first
    send(qtbot, second.endpoint, """
        backend.save(rand(3, (20, 30)), "cam/t001.tif")
        backend.save(rand(4, (16, 16), "int32"), "seg/t001.tif", mode="stack", labels=True)
        backend.save([{"kind": "point", "coords": [[2, 2]]}], "cam/q.roi.zip", stream="cam")
    """)
    settled(second, 2, 1)
    assert [layer.name for layer in viewer.layers] == names  # no second set of layers
    assert viewer.layers["cam"] is cam
    np.testing.assert_array_equal(cam.data, rand(3, (20, 30)))
    np.testing.assert_array_equal(np.asarray(viewer.layers["seg"].data),
                                  np.stack([rand(2, (16, 16), "int32"),
                                            rand(4, (16, 16), "int32")]))
    assert len(viewer.layers["cam points"].data) == 2  # both ROI sets, in one layer
    assert managers_listening(viewer) == 1

    send(qtbot, second.endpoint, """
        backend.request("clear")
    """)
    qtbot.waitUntil(lambda: len(viewer.layers) < len(names), timeout=10000)
    assert [layer.name for layer in viewer.layers] == ["user layer"]
    second.stop()


def test_a_refused_frame_that_turns_a_stream_to_labels_keeps_its_image_layer(docked, qtbot):
    """A labels frame placed too far out (t = 40001 after an image at t = 0), arriving as an
    image -> labels change: the display removed the image layer before the placement was
    refused, so the screen lost the image although the frame was not shown (docs/protocol.md:
    a frame a viewer refuses starts nothing)."""
    viewer, widget = docked
    sender = Sender(widget.endpoint, """
        backend.save(rand(1, (128, 128)), "s/t0.tif", axes={"t": 0})
        barrier()
        backend.save(np.ones((128, 128), np.int32), "s/t40001.tif", axes={"t": 40001},
                     labels=True)
        barrier()
        backend.save(np.full((128, 128), 2, np.int32), "s/t1.tif", axes={"t": 1}, labels=True)
    """)
    try:
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: "s" in viewer.layers, timeout=10000)
        image = viewer.layers["s"]
        sender.go()
        sender.wait_line(qtbot)
        qtbot.waitUntil(lambda: widget.manager.snapshot["frames_rejected"] == 1, timeout=10000)
        assert [layer.name for layer in viewer.layers] == ["s"]
        assert viewer.layers["s"] is image and isinstance(image, napari.layers.Image)
        np.testing.assert_array_equal(np.asarray(image.data), rand(1, (128, 128))[None])
        assert "closer together" in widget.manager.last_error
        sender.go()
        sender.finish(qtbot)
    finally:
        sender.kill()
    wait_kind(qtbot, widget, "s", napari.layers.Labels)
    labels = viewer.layers["s"]
    assert [layer.name for layer in viewer.layers] == ["s"]
    assert labels.data.shape == (2, 128, 128) and (np.asarray(labels.data[1]) == 2).all()
    assert widget.manager.last_error == ""


def test_lowering_the_stack_capacity_frees_labels_stacks_as_image_stacks(docked, qtbot):
    """Capacity 20, 30 frames of each: then the capacity lowered to 3 and one more frame.
    The image stack kept 3 frames; the labels stack showed 3 but still held its array of 32
    frames (grown towards 2 x the old capacity), for as long as the stream lived."""
    viewer, widget = docked
    frame = 64 * 64 * 4
    widget.capacity_box.setValue(20)
    send(qtbot, widget.endpoint, """
        for i in range(30):
            backend.save(rand(i, (64, 64), "int32"), f"img/t{i:03d}.tif", mode="stack")
            backend.save(rand(i, (64, 64), "int32"), f"seg/t{i:03d}.tif", mode="stack",
                         labels=True)
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 60 and widget.buffer.pending == 0,
                    timeout=10000)
    manager = widget.manager
    assert viewer.layers["seg"].data.shape == viewer.layers["img"].data.shape == (20, 64, 64)
    assert manager.held_bytes("img") == 20 * frame
    assert manager.held_bytes("seg") >= 30 * frame
    widget.capacity_box.setValue(3)
    send(qtbot, widget.endpoint, """
        backend.save(rand(30, (64, 64), "int32"), "img/t030.tif", mode="stack")
        backend.save(rand(30, (64, 64), "int32"), "seg/t030.tif", mode="stack", labels=True)
    """)
    qtbot.waitUntil(lambda: widget.buffer.stats.frames == 62 and widget.buffer.pending == 0,
                    timeout=10000)
    newest = np.stack([rand(i, (64, 64), "int32") for i in range(28, 31)])
    for name in ("img", "seg"):
        np.testing.assert_array_equal(np.asarray(viewer.layers[name].data), newest)
    assert manager.held_bytes("img") == 3 * frame
    assert manager.held_bytes("seg") <= 2 * 3 * frame  # at most 2 x capacity, as documented
    data = viewer.layers["seg"].data  # a view of the array the layer keeps alive
    assert (data if data.base is None else data.base).nbytes <= 2 * 3 * frame
