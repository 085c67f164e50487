"""The Fiji receiver script (viewers/fiji/polystore_receiver.groovy) against real ImageJ classes.

The script runs headless through viewers/fiji/run_headless.sh (Debian's ImageJ, JeroMQ and
Groovy from scripts/install.sh), on a free port, with an output directory: every `report`
request makes it save each image as TIFF, which is read back here with tifffile. Python
streams to it with `FijiStreamingBackend` through a FileManager, as a pipeline would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest

from polystore import DiskBackend
from polystore.filemanager import FileManager
from polystore.streaming import FijiStreamingBackend, FrameRejectedError, ViewerNotRunningError
from polystore.testing.receiver import ReceiverConformance, ReceiverUnderTest, user_curve
from polystore.testing.rules import LEADING_AXIS_CASES, SHOW_CASES, every_plane
from tests.fiji_helpers import (
    DEFAULT_STACK,
    FIJI_DIR,
    STACKS,
    RawClient,
    ScriptEditor,
    Stack,
    free_port,
    image,
    read_tiff,
    require,
    roi_summary,
    seconds_until_free,
    start_receiver,
    x_close_window,
)
from tests.stream_helpers import ipv6_loopback

pytestmark = [pytest.mark.fiji]


# -- fixtures ------------------------------------------------------------------------------
# Each test that needs the script skips with the reason when a stack is missing here, or fails
# in CI (CI=true): a broken install step must not pass with the Fiji tests gone (issue 14).


@pytest.fixture(scope="session", params=list(STACKS))
def stack(request) -> Stack:
    """Debian's stack (Groovy 2.4, JeroMQ 0.3.6) and current Fiji's (Groovy 4, JeroMQ 0.6)."""
    stack = STACKS[request.param]
    require(stack)
    return stack


@pytest.fixture(scope="session")
def fiji(tmp_path_factory, stack):
    """One headless receiver per stack for the session; it must stop cleanly when its stdin
    closes."""
    out = tmp_path_factory.mktemp(f"fiji_out_{stack.name}")
    receiver = start_receiver(out, stack=stack, timeout=180)
    yield receiver
    rc = receiver.stop()
    assert rc == 0, f"the receiver did not exit cleanly (rc={rc}):\n{receiver.log[-3000:]}"
    assert "stopped after" in receiver.log


@pytest.fixture
def debian(monkeypatch):
    """Tests that start their own receivers run on Debian's stack only: what they check is
    the script's, and Groovy 4 takes long to compile it (tests/test_fiji.py runs the shared
    receiver and the Script Editor harness on both). JeroMQ 0.3 has no CURVE: the script runs
    with allow_unauthenticated and senders with auth="none"."""
    require(DEFAULT_STACK)
    monkeypatch.setenv("POLYSTORE_AUTH", "none")
    return DEFAULT_STACK


@pytest.fixture(autouse=True)
def sender_auth(request, monkeypatch):
    """Senders talk to the stack under test its way: auth="none" to JeroMQ 0.3 (Debian),
    the user's credential (the default) to JeroMQ 0.6."""
    if "stack" in request.fixturenames:
        stack = request.getfixturevalue("stack")
        if stack.curve:
            monkeypatch.delenv("POLYSTORE_AUTH", raising=False)
        else:
            monkeypatch.setenv("POLYSTORE_AUTH", "none")


@pytest.fixture
def backend(fiji):
    # Generous timeouts: two shared cores and a JVM still compiling its hot paths.
    with FijiStreamingBackend(fiji.endpoint, timeout=60, connect_timeout=20) as b:
        yield b


@pytest.fixture
def fm(backend):
    return FileManager({"fiji_stream": backend})


@pytest.fixture
def key(request):
    """A stream key unique to the test (the receiver is shared by the session)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", request.node.name).strip("_")


def report(backend) -> dict:
    backend.flush()
    return backend.request("report", timeout=30)


def report_once(backend, done, what: str, timeout: float = 30.0) -> dict:
    """The first report for which `done(state)` holds: windows open, draw and close in the
    receiver's and AWT's own time, later under load."""
    deadline = time.monotonic() + timeout
    while not done(state := report(backend)):
        assert time.monotonic() < deadline, f"not {what} after {timeout:g} s: {state}"
        time.sleep(0.05)
    return state


def raw_report(raw: RawClient) -> dict:
    reply = raw.request({"v": 1, "type": "control", "seq": raw.next_seq(), "command": "report"})
    return reply["state"]


def saved(state: dict, title: str):
    entry = image(state, title)
    assert entry["file"], f"{title} was not saved"
    return read_tiff(entry["file"])


# -- handshake, 2D, replace ------------------------------------------------------------------


def test_handshake_uses_shared_memory(fiji, backend, fm, key):
    fm.save(np.zeros((4, 4), np.uint8), f"{key}/t000.tif", backend="fiji_stream")
    assert backend.sender.uses_shared_memory, "the receiver should have read the probe segment"
    state = report(backend)
    assert state["viewer"] == "fiji"
    assert state["shm_frames"] >= 1
    assert image(state, key)["framesReceived"] == 1


def test_2d_replace_updates_one_image(fiji, backend, fm, key):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 65535, (37, 53), dtype=np.uint16) for _ in range(5)]
    for i, frame in enumerate(frames):
        fm.save(frame, f"{key}/t{i:03d}.tif", backend="fiji_stream")
    state = report(backend)
    entry = image(state, key)
    assert (entry["width"], entry["height"], entry["bitDepth"]) == (53, 37, 16)
    assert (entry["channels"], entry["slices"], entry["frames"]) == (1, 1, 1)
    assert entry["framesReceived"] == 5
    data, axes, _ = saved(state, key)
    assert axes == "YX"
    np.testing.assert_array_equal(data, frames[-1])


def test_replace_with_new_size_and_type(fiji, backend, fm, key):
    fm.save(np.ones((8, 8), np.uint8), f"{key}/a.tif", backend="fiji_stream", stream=key)
    second = np.arange(30, dtype=np.float32).reshape(5, 6)
    fm.save(second, f"{key}/b.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    assert (image(state, key)["width"], image(state, key)["bitDepth"]) == (6, 32)
    np.testing.assert_array_equal(saved(state, key)[0], second)


def test_one_dimensional_frame_is_one_row(fiji, backend, fm, key):
    fm.save(np.arange(7, dtype=np.uint8), f"{key}.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    assert (image(state, key)["width"], image(state, key)["height"]) == (7, 1)
    np.testing.assert_array_equal(saved(state, key)[0].ravel(), np.arange(7))


def test_empty_frame_is_acknowledged_not_shown(fiji, backend, fm, key):
    before = report(backend)["empty_frames"]
    fm.save(np.zeros((0, 5), np.uint16), f"{key}.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    assert state["empty_frames"] == before + 1
    assert key not in [i["title"] for i in state["images"]]


def test_stack_mode_appends_time_points(fiji, backend, fm, key):
    """Each stacked frame is the next t, as in napari (docs/protocol.md); Fiji appended z
    slices, so napari's `t` slider was Fiji's `z`."""
    frames = [np.full((6, 7), i, np.uint16) for i in range(4)]
    for i, frame in enumerate(frames):
        fm.save(frame, f"{key}/{i}.tif", backend="fiji_stream", stream=key, mode="stack")
    state = report(backend)
    entry = image(state, key)
    assert (entry["channels"], entry["slices"], entry["frames"]) == (1, 1, 4)
    data, axes, _ = saved(state, key)
    assert axes == "TYX"
    np.testing.assert_array_equal(data, np.stack(frames))


def test_stack_mode_parameter(debian, tmp_path):
    """mode="stack" as the script parameter applies to frames without a mode hint and without
    axes (as napari's default mode): frames at `axes={"p": 0}`, a name ImageJ has no axis
    for, were stacked in their window `s [p=0]` where napari places them."""
    receiver = start_receiver(tmp_path, mode="stack")
    try:
        with FijiStreamingBackend(receiver.endpoint) as b:
            for i in range(3):
                b.save(np.full((3, 3), i, np.uint8), f"s/{i}.tif", stream="s")
                b.save(np.full((3, 3), i, np.uint8), f"s/{i}.tif", stream="s", axes={"p": 0})
                b.save(np.full((3, 3), i, np.uint8), f"s/{i}.tif", stream="z", axes={"z": i})
            state = report(b)
        assert image(state, "s")["frames"] == 3
        assert (image(state, "s [p=0]")["slices"], image(state, "s [p=0]")["frames"]) == (1, 1)
        assert (image(state, "z")["slices"], image(state, "z")["frames"]) == (3, 1)
    finally:
        assert receiver.stop() == 0


# -- hyperstacks ------------------------------------------------------------------------------


def test_hyperstack_tcz(fiji, backend, fm, key):
    T, C, Z, H, W = 3, 2, 4, 5, 6
    positions = [(t, c, z) for t in range(T) for c in range(C) for z in range(Z)]
    np.random.default_rng(1).shuffle(positions)
    for t, c, z in positions:
        plane = np.full((H, W), t * 100 + c * 10 + z, np.uint16)
        fm.save(plane, f"{key}/t{t}c{c}z{z}.tif", backend="fiji_stream", stream=key,
                axes={"t": t, "c": c, "z": z})  # fmt: skip
    state = report(backend)
    entry = image(state, key)
    assert (entry["channels"], entry["slices"], entry["frames"]) == (C, Z, T)
    assert entry["composite"] and entry["framesReceived"] == T * C * Z
    data, axes, meta = saved(state, key)
    assert axes == "TZCYX" and data.shape == (T, Z, C, H, W)
    assert meta["hyperstack"] and meta["channels"] == C
    expected = np.arange(T)[:, None, None] * 100 + np.arange(C)[None, None, :] * 10
    expected = expected + np.arange(Z)[None, :, None]
    np.testing.assert_array_equal(data[..., 0, 0], expected)


def test_hyperstack_grows_keeping_pixels(fiji, backend, fm, key):
    def put(t, c, z, value):
        fm.save(np.full((4, 4), value, np.uint8), f"{key}/x.tif", backend="fiji_stream",
                stream=key, axes={"t": t, "c": c, "z": z})  # fmt: skip

    put(0, 0, 0, 1)

    def dims():
        entry = image(report(backend), key)
        return entry["channels"], entry["slices"], entry["frames"]

    assert dims() == (1, 1, 1)
    put(0, 0, 2, 2)  # z grows to 3
    assert dims() == (1, 3, 1)
    put(0, 1, 0, 3)  # c grows: planes move to their new indices
    assert dims() == (2, 3, 1)
    put(3, 1, 1, 4)  # t grows to 4
    assert dims() == (2, 3, 4)
    data = saved(report(backend), key)[0]  # TZCYX
    assert data[0, 0, 0, 0, 0] == 1 and data[0, 2, 0, 0, 0] == 2 and data[0, 0, 1, 0, 0] == 3
    assert data[3, 1, 1, 0, 0] == 4
    assert data[0, 1, 0].max() == 0 and data[2].max() == 0  # never sent: zeros


def test_frame_own_dims_named_by_axis_names(fiji, backend, fm, key):
    volume = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)  # (c, z, y, x)
    fm.save(volume, f"{key}/t1.tif", backend="fiji_stream", stream=key, axes={"t": 1},
            axis_names=["t", "c", "z"])  # fmt: skip
    state = report(backend)
    entry = image(state, key)
    assert (entry["channels"], entry["slices"], entry["frames"]) == (2, 3, 2)
    data = saved(state, key)[0]  # TZCYX
    np.testing.assert_array_equal(data[1], volume.transpose(1, 0, 2, 3))
    assert data[0].max() == 0


@pytest.mark.parametrize(("axes", "axis_names", "lead", "names"),
                         [c for c in LEADING_AXIS_CASES if not any(n[0] == "d" for n in c[3])])
def test_leading_axes_named_as_napari_names_them(fiji, backend, fm, key, axes, axis_names, lead,
                                                 names):
    """One leading-axis rule for both viewers (the cases napari's layout tests use too). With
    fewer names than dimensions Fiji put the names innermost, napari outermost as protocol.md
    says: a (2, 3, y, x) frame with axis_names=["c"] was 3 channels × 2 planes in Fiji."""
    shape = (2, 3, 4)[:lead]
    fm.save(np.ones((*shape, 4, 5), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
            axes=axes, axis_names=axis_names)  # fmt: skip
    sizes = dict(zip(names, shape)) | {a: i + 1 for a, i in axes.items()}
    entry = image(report(backend), key)
    assert (entry["channels"], entry["slices"], entry["frames"]) == (
        sizes.get("c", 1), sizes.get("z", 1), sizes.get("t", 1))


def test_frame_own_dims_default_names(fiji, backend, fm, key):
    volume = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)  # one leading dim: z
    fm.save(volume, f"{key}.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    assert image(state, key)["slices"] == 3
    np.testing.assert_array_equal(saved(state, key)[0], volume)


def test_unknown_axis_gets_its_own_window(fiji, backend, fm, key):
    for p in range(2):
        fm.save(np.full((3, 3), p, np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
                axes={"p": p, "t": 0})  # fmt: skip
    titles = [i["title"] for i in report(backend)["images"]]
    assert f"{key} [p=0]" in titles and f"{key} [p=1]" in titles


def test_too_many_dimensions_is_bad_shape(fiji, backend, fm, key):
    with pytest.raises(FrameRejectedError) as err:
        fm.save(np.zeros((2, 2, 2, 2, 3, 3), np.uint8), f"{key}.tif", backend="fiji_stream")
        backend.flush()
    assert err.value.code == "bad_shape"


@pytest.mark.parametrize("axes", [{"t": 999_999}, {"c": 999_999, "z": 999_999, "t": 999_999}])
def test_placement_beyond_memory_is_too_large(fiji, backend, fm, key, axes):
    """A stray position must not allocate terabytes: rejected before the image changes."""
    fm.save(np.ones((256, 256), np.uint16), f"{key}.tif", backend="fiji_stream", stream=key)
    with pytest.raises(FrameRejectedError) as err:
        fm.save(np.zeros((256, 256), np.uint16), f"{key}.tif", backend="fiji_stream",
                stream=key, axes=axes)  # fmt: skip
        backend.flush()
    assert err.value.code == "too_large"
    state = report(backend)
    entry = image(state, key)
    assert (entry["channels"], entry["slices"], entry["frames"]) == (1, 1, 1)
    assert saved(state, key)[0].min() == 1


def test_placement_whose_size_overflows_is_too_large(fiji, key):
    """c x z x t planes beyond 2^63 must not wrap around into a small number that passes the
    memory check (and then allocate planes for ever): too_large, at once."""
    shape = [16_777_334, 1, 1]  # one leading dim (z) of 16 Mi planes of 1 x 1
    with RawClient(fiji.endpoint) as raw:
        assert raw.hello()["type"] == "welcome"
        started = time.monotonic()
        reply = raw.request(raw.frame(stream=key, shape=shape, nbytes=shape[0],
                                      axes={"c": 999_999, "t": 999_999}),
                            b"\0" * shape[0], timeout=30)  # fmt: skip
        assert reply["type"] == "error" and reply["code"] == "too_large", reply
        assert time.monotonic() - started < 5
        assert key not in [i["title"] for i in raw_report(raw)["images"]]


BAD_OFFSET = 2**63 - 1  # offset + nbytes wraps around in a Java long


@pytest.mark.parametrize("how", ["bad_segment", "too_large"])
def test_rejected_frame_on_a_new_stream_leaves_no_image(fiji, key, how):
    with RawClient(fiji.endpoint) as raw:
        segment = shared_memory.SharedMemory(name=f"{raw.prefix}0", create=True, size=4096)
        try:
            assert raw.hello()["type"] == "welcome"
            if how == "bad_segment":
                bad = raw.frame(stream=key, segment=segment.name, offset=BAD_OFFSET)
            else:
                bad = raw.frame(stream=key, segment=segment.name, shape=[32, 32], nbytes=1024,
                                axes={"t": 999_999, "c": 999_999})  # fmt: skip
            reply = raw.request(bad)
            assert reply["type"] == "error" and reply["code"] == how, reply
            assert key not in [i["title"] for i in raw_report(raw)["images"]]
        finally:
            segment.close()
            segment.unlink()


def test_rejected_frame_leaves_the_image_untouched(fiji, key):
    """A frame of another shape rejected at the segment check must not reshape or zero the
    stream's image first."""
    with RawClient(fiji.endpoint) as raw:
        segment = shared_memory.SharedMemory(name=f"{raw.prefix}0", create=True, size=4096)
        try:
            assert raw.hello()["type"] == "welcome"
            pixels = bytes(range(1, 7))
            assert raw.request(raw.frame(stream=key), pixels)["type"] == "ack"
            bad = raw.frame(stream=key, segment=segment.name, shape=[4, 5], nbytes=20,
                            offset=BAD_OFFSET)  # fmt: skip
            reply = raw.request(bad)
            assert reply["type"] == "error" and reply["code"] == "bad_segment", reply
            state = raw_report(raw)
        finally:
            segment.close()
            segment.unlink()
    entry = image(state, key)
    assert (entry["width"], entry["height"], entry["framesReceived"]) == (3, 2, 1)
    np.testing.assert_array_equal(saved(state, key)[0], np.arange(1, 7).reshape(2, 3))


# -- type mapping -----------------------------------------------------------------------------

DTYPE_VALUES = {
    "uint8": [0, 1, 127, 128, 255],
    "int8": [-128, -1, 0, 1, 127],
    "uint16": [0, 1, 32768, 65534, 65535],
    "int16": [-32768, -1, 0, 1, 32767],
    "uint32": [0, 1, 2**24 + 1, 123456789, 2**32 - 1],
    "int32": [-(2**31), -(2**24) - 1, 0, 16777217, 2**31 - 1],
    "uint64": [0, 2**53 + 1, 2**63, 2**63 + 2**39 + 1, 2**64 - 1],
    "int64": [-(2**63), -12345678901234567, 0, 2**40 + 1, 2**63 - 1],
    "float16": [0.0, -0.0, 6e-8, 1 / 3, 65504.0, -np.inf],
    "float32": [1.5, -2.25e30, 1e-40, np.inf, -0.0],
    "float64": [1 / 3, 1e300, -1e-50, 3.4028235e38, 16777217.0],
}
# The documented rule: these three are kept, every other dtype becomes 32-bit float.
KEPT = {"uint8": (8, "uint8"), "uint16": (16, "uint16"), "float32": (32, "float32")}


@pytest.mark.parametrize("dtype", list(DTYPE_VALUES))
def test_dtype_mapping_is_pixel_exact(fiji, backend, fm, key, dtype):
    values = np.array(DTYPE_VALUES[dtype], dtype=dtype)
    data = np.resize(values, (4, 5)).astype(dtype)
    with np.errstate(over="ignore"):  # float64 1e300 -> inf in float32 is the documented rule
        expected = data.astype(KEPT.get(dtype, (32, "float32"))[1])
    fm.save(data, f"{key}.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    bits, name = KEPT.get(dtype, (32, "float32"))
    assert image(state, key)["bitDepth"] == bits
    got = saved(state, key)[0]
    assert got.dtype.name == name
    np.testing.assert_array_equal(got, expected)


def test_big_endian_and_strided_input(fiji, backend, fm, key):
    data = np.arange(48, dtype=">u2").reshape(6, 8)[::2, ::3]
    fm.save(data, f"{key}.tif", backend="fiji_stream", stream=key)
    np.testing.assert_array_equal(saved(report(backend), key)[0], data.astype(np.uint16))


def test_labels_that_outgrow_16_bits_promote_to_float_keeping_earlier_ones(fiji, backend, fm,
                                                                          key):
    """A dtype change starts a stream again (SHOW_CASES); labels of one dtype whose ids pass
    65535 keep their earlier time points, in 32-bit float."""
    fm.save(np.full((3, 3), 200, np.int32), f"{key}.tif", backend="fiji_stream", stream=key,
            axes={"t": 0}, labels=True)  # fmt: skip
    fm.save(np.full((3, 3), 70000, np.int32), f"{key}.tif", backend="fiji_stream", stream=key,
            axes={"t": 1}, labels=True)  # fmt: skip
    state = report(backend)
    assert image(state, key)["bitDepth"] == 32
    data = saved(state, key)[0]
    assert data[0].max() == 200 and data[1].max() == 70000


# -- labels and colormaps ------------------------------------------------------------------------


def test_labels_16_bit_with_glasbey(fiji, backend, fm, key):
    labels = np.arange(20 * 20, dtype=np.int32).reshape(20, 20) % 301
    fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, labels=True)
    state = report(backend)
    entry = image(state, key)
    assert entry["bitDepth"] == 16 and entry["labels"] and entry["luts"] == ["glasbey"]
    got, _, meta = saved(state, key)
    np.testing.assert_array_equal(got, labels)
    assert meta["min"] == 0 and meta["max"] == 300  # display range 0..max(255, largest label)
    assert rendered(state, key)[0, 1].max() > 0  # label 1 is not black (issue 14)


def rendered(state: dict, title: str) -> np.ndarray:
    """The RGB pixels of what the image's window shows (the PNG the receiver renders)."""
    from PIL import Image

    entry = image(state, title)
    assert entry["rendered"], f"{title} was not rendered"
    with Image.open(entry["rendered"]) as png:
        return np.asarray(png.convert("RGB"))


@pytest.mark.parametrize("dtype,count", [("uint16", 1000), ("int32", 70_000)])
def test_labels_distinguishable_at_any_count(fiji, backend, fm, key, dtype, count):
    """Issue 14: over 255 labels, ImageJ's linear display range made labels 1-3 black and let
    neighbours share a colour. Each label now has a colour of a cycling glasbey LUT: 0 black,
    every other label coloured, neighbouring labels different (labels stay exact)."""
    labels = np.zeros((4, count + 1), dtype=dtype)
    labels[:, :] = np.arange(count + 1)  # column j holds label j: 0, 1, 2, ...
    labels[:, -1] = count - 1 if dtype == "uint16" else 69_999
    fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, labels=True)
    state = report(backend)
    np.testing.assert_array_equal(saved(state, key)[0], labels.astype(saved(state, key)[0].dtype))
    colours = rendered(state, key)[0]  # one row: the colour of label j at column j
    assert (colours[0] == 0).all(), "label 0 (background) is black"
    assert (colours[1:].max(axis=1) > 0).all(), "no label is black"
    assert (np.abs(np.diff(colours[1:-1].astype(int), axis=0)).sum(axis=1) > 0).all(), (
        "neighbouring labels share a colour"
    )


def test_negative_labels_are_coloured_apart_from_positive_ones(fiji, backend, fm, key):
    """Fiji coloured label -k as label k (the LUT index took the absolute value), so touching
    objects -5 and 5 looked like one; protocol.md's 1 + (id - 1) mod 255 keeps them apart."""
    labels = np.array([[-3, -2, -1, 0, 1, 2, 3]] * 2, np.int32)
    fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, labels=True)
    state = report(backend)
    np.testing.assert_array_equal(saved(state, key)[0], labels)
    colours = rendered(state, key)[0].astype(int)
    assert (colours[3] == 0).all() and (colours[[0, 1, 2, 4, 5, 6]].max(axis=1) > 0).all()
    for k in (1, 2, 3):
        assert (colours[3 - k] != colours[3 + k]).any(), f"labels -{k} and {k} share a colour"


def test_an_image_stream_that_turns_to_labels_keeps_no_contrast_of_the_image(fiji, backend, fm,
                                                                           key):
    """An image frame's contrast, followed when the stream is next drawn, was still applied
    after the stream had turned into labels: the labels image reported the image's range."""
    image_frame = np.full((4, 6), 1000.0, np.float32)
    image_frame[0, 0] = 1001.0
    fm.save(image_frame, f"{key}.tif", backend="fiji_stream", stream=key, axes={"t": 0})
    labels = np.arange(24, dtype=np.float32).reshape(4, 6) % 7
    fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, axes={"t": 1}, labels=True)
    entry = image(report(backend), key)
    assert entry["labels"]
    assert entry["displayRanges"] == [[0, 255]]  # the labels' own range: 0..max(255, ids)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_a_labels_stream_that_turns_to_images_is_drawn_as_an_image(fiji, backend, fm, key, dtype):
    """A stream sent as labels, then as a plain image (same shape): the window went on drawing
    label colours (the label view stayed), so a grey ramp showed as glasbey colours."""
    ramp = np.tile(np.arange(0, 1000, 10, dtype=dtype), (4, 1))
    fm.save(ramp, f"{key}.tif", backend="fiji_stream", stream=key, labels=True)
    assert image(report(backend), key)["luts"] == ["glasbey"]
    fm.save(ramp, f"{key}.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    assert not image(state, key)["labels"] and image(state, key)["luts"] != ["glasbey"]
    shown = rendered(state, key)[0].astype(int)  # one row: the ramp, left to right
    assert (shown[:, 0] == shown[:, 1]).all() and (shown[:, 1] == shown[:, 2]).all(), "grey"
    assert (np.diff(shown[:, 0]) >= 0).all() and shown[-1, 0] > shown[0, 0], "a ramp"


def test_channels_of_labels_that_turn_to_images_get_channel_colours_again(fiji, backend, fm,
                                                                          key):
    """The same with channels: each channel kept the glasbey LUT of the labels, so a ramp in
    channel 0 (channel 1 empty) showed in label colours while the report said labels=false and
    LUTs "default". Now channel 0 is drawn through the composite's red again."""
    ramp = np.tile(np.arange(0, 600, 100, dtype=np.uint16), (4, 1))
    frames = np.stack([ramp, np.zeros_like(ramp)])
    fm.save(frames // 100, f"{key}.tif", backend="fiji_stream", stream=key, axis_names=["c"],
            labels=True)  # fmt: skip
    assert image(report(backend), key)["luts"] == ["glasbey", "glasbey"]
    fm.save(frames, f"{key}.tif", backend="fiji_stream", stream=key, axis_names=["c"])
    state = report(backend)
    assert not image(state, key)["labels"] and image(state, key)["luts"] == ["default"] * 2
    shown = rendered(state, key)[0].astype(int)  # one row: the ramp, in red only
    assert (shown[:, 1:] == 0).all(), "only red"
    np.testing.assert_allclose(shown[:, 0], ramp[0] * 255.0 / 500, atol=1)


@pytest.mark.parametrize("hints", [{"colormap": "fire"}, {"contrast_limits": (0, 1000)}, {}])
def test_a_composite_that_turns_to_one_channel_looks_like_that_channel_alone(fiji, backend, fm,
                                                                            key, hints):
    """Two-channel frames, then one-channel frames: the image stayed a CompositeImage of one
    channel, which ImageJ draws through neither its channel LUT nor that LUT's range, so a
    colormap or contrast_limits hint was reported but not shown. It must look as the same
    frame does on a stream of its own (napari shows it as one plain layer too)."""
    ramp = np.tile(np.arange(0, 600, 100, dtype=np.uint16), (4, 1))
    fm.save(np.stack([ramp, ramp]), f"{key}.tif", backend="fiji_stream", stream=key,
            axis_names=["c"])  # fmt: skip
    report(backend)
    for stream in (key, f"{key}_alone"):
        fm.save(ramp, f"{key}.tif", backend="fiji_stream", stream=stream, **hints)
    state = report(backend)
    entry, alone = image(state, key), image(state, f"{key}_alone")
    assert not entry["composite"] and entry["channels"] == 1
    assert (entry["luts"], entry["displayRanges"]) == (alone["luts"], alone["displayRanges"])
    np.testing.assert_array_equal(rendered(state, key), rendered(state, f"{key}_alone"))


def test_channels_of_labels_replaced_by_lower_ids_keep_them_apart(fiji, backend, fm, key):
    """Labels with channels were drawn through a glasbey LUT over 0..max(255, largest id). The
    largest id was never lowered, also when a replace frame made the image exactly the new
    frame: after ids up to 1000, ids 1..5 all fell on the first colours of the LUT (1 black,
    2..5 one colour). They must look as the same frame does on a stream of its own."""
    ids = np.tile(np.arange(6, dtype=np.uint16), (4, 1))
    fm.save(np.stack([ids * 200, ids * 200]), f"{key}.tif", backend="fiji_stream", stream=key,
            axis_names=["c"], labels=True)  # fmt: skip
    report(backend)
    for stream in (key, f"{key}_alone"):
        fm.save(np.stack([ids, ids]), f"{key}.tif", backend="fiji_stream", stream=stream,
                axis_names=["c"], labels=True)  # fmt: skip
    state = report(backend)
    shown = rendered(state, key)
    np.testing.assert_array_equal(shown, rendered(state, f"{key}_alone"))
    assert len({tuple(p) for p in shown[0]}) == 6, "ids 0..5 in six colours"


@pytest.mark.parametrize("dtype,count", [("uint16", 1000), ("int32", 70_000)])
@pytest.mark.parametrize("channel", [0, 1])
def test_channels_of_labels_are_distinguishable_at_any_count(fiji, backend, fm, key, dtype, count,
                                                             channel):
    """Labels with channels were drawn through a linear glasbey LUT over 0..max(255, largest
    id), so above 255 ids runs of about max/255 neighbouring ids shared one colour and id 1
    was black. Each channel now cycles through the glasbey colours as a labels image of one
    channel does: a channel drawn over an empty one looks exactly like the same ids alone,
    and the pixels keep the exact ids."""
    ids = np.zeros((4, count + 1), dtype=dtype)
    ids[:, :] = np.arange(count + 1)  # column j holds id j: 0, 1, 2, ...
    frame = np.zeros((2, *ids.shape), dtype=dtype)
    frame[channel] = ids
    fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key, axis_names=["c"],
            labels=True)  # fmt: skip
    fm.save(ids, f"{key}.tif", backend="fiji_stream", stream=f"{key}_alone", labels=True)
    state = report(backend)
    assert image(state, key)["composite"] and image(state, key)["luts"] == ["glasbey"] * 2
    got = saved(state, key)[0]
    np.testing.assert_array_equal(got, frame.astype(got.dtype))  # the ids, exact
    colours = rendered(state, key)[0]  # one row: the colour of id j at column j
    assert (colours[0] == 0).all(), "id 0 (background) is black"
    assert (colours[1:].max(axis=1) > 0).all(), "no id is black"
    assert (np.abs(np.diff(colours[1:].astype(int), axis=0)).sum(axis=1) > 0).all(), (
        "neighbouring ids share a colour"
    )
    np.testing.assert_array_equal(colours, rendered(state, f"{key}_alone")[0])


def test_channels_of_labels_cycle_in_color_mode_too(debian, tmp_path):
    """channel_display="color" shows one channel at a time (the newest, here channel 1): it
    was drawn through the channel's linear glasbey LUT as well (id 1 of 1000 black)."""
    receiver = start_receiver(tmp_path, channel_display="color")
    try:
        with FijiStreamingBackend(receiver.endpoint) as b:
            ids = np.tile(np.arange(1001, dtype=np.uint16), (4, 1))
            b.save(np.stack([ids[:, ::-1], ids]), "x.tif", stream="x", axis_names=["c"],
                   labels=True)  # fmt: skip
            b.save(ids, "x.tif", stream="alone", labels=True)
            state = report(b)
        colours = rendered(state, "x")[0].astype(int)
        assert (colours[1:].max(axis=1) > 0).all(), "no id is black"
        np.testing.assert_array_equal(colours, rendered(state, "alone")[0])
    finally:
        assert receiver.stop() == 0


def test_a_shown_composite_that_grows_past_eight_channels_is_shown(debian, tmp_path):
    """ImageJ draws at most 8 channels at once: a composite on screen given a 9th channel in
    composite mode threw ArrayIndexOutOfBoundsException (index 8) in ImageJ's updateImage;
    the frame was answered `internal` although the image already held the new channels."""
    receiver = start_receiver(tmp_path, gui=True)
    try:
        with FijiStreamingBackend(receiver.endpoint) as b:
            b.save(np.ones((2, 5, 6), np.uint8), "x.tif", stream="nine", axis_names=["c"])
            b.flush()
            report_once(b, lambda state: all(i["shown"] for i in state["images"]), "shown")
            b.save(np.ones((9, 5, 6), np.uint8), "x.tif", stream="nine", axis_names=["c"])
            b.flush()  # raises FrameRejectedError if the receiver refused it
            entry = image(report(b), "nine")
            assert entry["channels"] == 9, entry
    finally:
        assert receiver.stop() == 0
    assert "ArrayIndexOutOfBounds" not in receiver.log


def test_a_shown_composite_in_grayscale_display_stays_gray(debian, tmp_path):
    """channel_display="grayscale" in a window: ImageJ's setChannelLut puts the LUT into the
    current channel's processor whatever the display mode, so the next frame's contrast
    (or a labels stream turning to images) drew the shown channel in its channel colour
    (green) instead of gray. Each stream must look as its newest frame does alone."""
    ids = np.tile(np.arange(1001, dtype=np.uint16), (4, 1))
    ramp = np.tile(np.arange(0, 1001, dtype=np.uint16), (4, 1))
    images = np.stack([ramp, ramp[:, ::-1]])
    receiver = start_receiver(tmp_path, gui=True, channel_display="grayscale")
    try:
        with FijiStreamingBackend(receiver.endpoint) as b:
            b.save(images * 2, "x.tif", stream="images", axis_names=["c"])
            b.save(np.stack([ids, ids[:, ::-1]]), "x.tif", stream="labels", axis_names=["c"],
                   labels=True)  # fmt: skip
            b.flush()
            report_once(b, lambda state: all(i["shown"] for i in state["images"]), "shown")
            for stream in ("images", "labels", "alone"):
                b.save(images, "x.tif", stream=stream, axis_names=["c"])
            state = report(b)
        alone = rendered(state, "alone")
        assert (alone[..., 0] == alone[..., 1]).all(), "gray"
        unlike = [s for s in ("images", "labels") if not np.array_equal(rendered(state, s), alone)]
        assert unlike == [], "drawn unlike the same frame alone"
    finally:
        assert receiver.stop() == 0


@pytest.mark.parametrize("value", [2**24 + 1, 2**32 - 1])
def test_labels_a_float_cannot_hold_are_rejected_not_merged(fiji, backend, fm, key, value):
    """Issue 14: labels >= 2^24 were merged silently by the float32 conversion (2^24 + 1 became
    2^24). Now the frame is refused with a message saying what to do, and nothing changes."""
    fm.save(np.ones((2, 2), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
            labels=True)  # fmt: skip
    labels = np.array([[0, 2**24], [value, 1]], dtype=np.uint32)
    with pytest.raises(FrameRejectedError) as err:
        fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, labels=True)
        backend.flush()
    assert err.value.code == "too_large"
    assert str(value) in str(err.value) and "relabel" in str(err.value)
    np.testing.assert_array_equal(saved(report(backend), key)[0], np.ones((2, 2)))


@pytest.mark.parametrize("labels, says", [
    (np.array([[0, 2**24], [2**24 + 1, 1]], np.float64), "16777217"),
    (np.array([[0, 3e9], [3e9 + 1, 1]], np.float64), "cannot be held exactly"),
    (np.array([[0, 1.5], [2, 1]], np.float32), "whole numbers"),
    (np.array([[0, np.nan], [2, 1]], np.float32), "NaN"),
])
def test_float_labels_a_float_image_cannot_hold_are_rejected_not_merged(fiji, backend, fm, key,
                                                                       labels, says):
    """Float labels were not checked at all: 2^24 and 2^24 + 1 became one label, fractions and
    NaN were shown. Now they are refused as integer labels are (napari refuses them too)."""
    fm.save(np.ones((2, 2), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
            labels=True)  # fmt: skip
    with pytest.raises(FrameRejectedError, match=says):
        fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, labels=True)
        backend.flush()
    np.testing.assert_array_equal(saved(report(backend), key)[0], np.ones((2, 2)))


@pytest.mark.parametrize("hint, value", [((10, 100), 50), ((0, 1), 0), (None, 50),
                                         (None, 0), (None, 1e17)])
def test_contrast_hints_and_flat_huge_frames_get_a_usable_range(fiji, backend, fm, key, hint,
                                                                value):
    """A constant frame of 1e17 got the range [v, v] (lo + 1 == lo); a hint of (0, 0) was read
    by ImageJ as "reset". A hint is now always low < high (save() refuses others, and so does
    the script: the conformance suite's contrast_limits cases)."""
    frame = np.full((4, 4), value, np.float64 if value > 2**53 else np.uint16)
    extra = {} if hint is None else {"contrast_limits": hint}
    fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key, **extra)
    lo, hi = image(report(backend), key)["displayRanges"][0]
    assert lo < hi and np.float32(lo) < np.float32(hi)
    if hint is not None:
        assert [lo, hi] == list(hint)


def test_a_stream_rebuilt_within_one_burst_still_reports_and_follows_its_newest_frame(
        fiji, backend, fm, key):
    """Placed channels, then a replace frame before anything looked: the pending contrast
    follow of the old three-channel image ran against the rebuilt one-channel image, so
    report failed ("Channel out of range") and the newest frame's range was never set."""
    frame = np.arange(16, dtype=np.uint16).reshape(4, 4)
    for c in range(3):
        fm.save(frame + c, f"{key}.tif", backend="fiji_stream", stream=key, axes={"c": c})
    fm.save(frame * 10, f"{key}.tif", backend="fiji_stream", stream=key, mode="replace")
    shown = image(report(backend), key)
    assert shown["channels"] == 1
    assert shown["displayRanges"][0] == [0.0, 150.0]


# -- colour, contrast, leading axes (issue 14) ----------------------------------------------------


@pytest.mark.parametrize("samples", [3, 4])
def test_rgb_and_rgba_frames_become_rgb_images(fiji, backend, fm, key, samples):
    """Issue 14: a (120, 160, 3) uint8 frame became 120 slices of 160 x 3. It is an RGB image
    now (auto-detected; RGBA loses its alpha: ImageJ's RGB has none)."""
    rng = np.random.default_rng(samples)
    frame = rng.integers(0, 256, (120, 160, samples), dtype=np.uint8)
    fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key)
    state = report(backend)
    entry = image(state, key)
    assert (entry["width"], entry["height"], entry["bitDepth"]) == (160, 120, 24)
    assert (entry["slices"], entry["luts"]) == (1, ["rgb"])
    data, axes, _ = saved(state, key)
    assert axes == "YXS"
    np.testing.assert_array_equal(data, frame[..., :3])
    np.testing.assert_array_equal(rendered(state, key), frame[..., :3])


def test_rgb_time_series_and_detection_off(fiji, key):
    with RawClient(fiji.endpoint) as raw:
        assert raw.hello()["type"] == "welcome"
        frames = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3)
        for t in range(2):
            reply = raw.request(raw.frame(stream=key, shape=[5, 6, 3], nbytes=90, axes={"t": t}),
                                frames[t].tobytes())  # fmt: skip
            assert reply["type"] == "ack", reply
        off = raw.frame(stream=key + "_grey", shape=[5, 6, 3], nbytes=90,
                        display={"rgb": False})  # fmt: skip
        assert raw.request(off, frames[0].tobytes())["type"] == "ack"
        state = raw.report()
    entry = image(state, key)
    assert (entry["frames"], entry["bitDepth"]) == (2, 24)
    np.testing.assert_array_equal(saved(state, key)[0], frames)
    grey = image(state, key + "_grey")  # detection off: 5 slices (z) of 6 x 3
    assert (grey["slices"], grey["width"], grey["height"], grey["bitDepth"]) == (5, 3, 6, 8)


@pytest.mark.parametrize("dtype,shape,kind", [("uint16", [4, 5, 3], "image"),
                                              ("uint8", [4, 5], "image"),
                                              ("uint8", [4, 5, 3], "labels")])  # fmt: skip
def test_rgb_true_on_anything_else_is_bad_message(fiji, dtype, shape, kind):
    with RawClient(fiji.endpoint) as raw:
        assert raw.hello()["type"] == "welcome"
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        reply = raw.request(raw.frame(shape=shape, dtype=dtype, nbytes=nbytes,
                                      display={"rgb": True, "kind": kind}),
                            b"\0" * nbytes)  # fmt: skip
    assert reply["type"] == "error" and reply["code"] == "bad_message", reply
    assert "rgb=true needs" in reply["message"]


def test_contrast_follows_the_data_unless_given(fiji, backend, fm, key):
    """Issue 14: the first frame fixed the contrast, so a signal drifting from 0-1 to 19-20
    was all white. Without contrast_limits the range follows each frame, per channel."""
    for t, offset in enumerate([0.0, 5.0, 19.0]):
        frame = (offset + np.linspace(0, 1, 24, dtype=np.float32)).reshape(4, 6)
        fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key, axes={"t": t})
        fm.save(frame * 100, f"{key}_c.tif", backend="fiji_stream", stream=f"{key}_c",
                axes={"t": t, "c": 1})  # fmt: skip
        fm.save(frame, f"{key}_fixed.tif", backend="fiji_stream", stream=f"{key}_fixed",
                contrast_limits=(0, 1))  # fmt: skip
    state = report(backend)
    np.testing.assert_allclose(image(state, key)["displayRanges"], [[19, 20]], rtol=1e-6)
    ranges = image(state, f"{key}_c")["displayRanges"]
    np.testing.assert_allclose(ranges[1], [1900, 2000], rtol=1e-5)
    assert image(state, f"{key}_fixed")["displayRanges"] == [[0, 1]]


def test_a_contrast_hint_holds_for_the_frames_that_carry_it(fiji, backend, fm, key):
    """As in napari (protocol.md: the rule is per frame): a frame without contrast_limits
    follows the data again. The script kept an earlier frame's hint on the channel for good."""
    frame = np.linspace(0, 100, 24, dtype=np.float32).reshape(4, 6)
    fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key, contrast_limits=(0, 1000))
    assert image(report(backend), key)["displayRanges"] == [[0, 1000]]
    fm.save(frame + 5, f"{key}.tif", backend="fiji_stream", stream=key)
    np.testing.assert_allclose(image(report(backend), key)["displayRanges"], [[5, 105]])
    fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key, contrast_limits=(0, 10))
    assert image(report(backend), key)["displayRanges"] == [[0, 10]]


def test_saved_images_show_the_contrast_the_report_gives(fiji, backend, fm, key):
    """Headless, a report saved each image before following the contrast of its newest
    frames, so the TIFF (and the PNG of what the window shows) kept the old range: both
    channels of this frame were saved at 0..500 while the report said 0..1000 for the second."""
    ramp = np.tile(np.arange(0, 600, 100, dtype=np.uint16), (4, 1))
    fm.save(np.stack([ramp, ramp * 2]), f"{key}.tif", backend="fiji_stream", stream=key,
            axis_names=["c"])  # fmt: skip
    state = report(backend)
    assert image(state, key)["displayRanges"] == [[0, 500], [0, 1000]]
    assert list(saved(state, key)[2]["Ranges"]) == [0, 500, 0, 1000]
    shown = rendered(state, key)[0].astype(int)  # red: channel 0, green: channel 1
    np.testing.assert_allclose(shown[:, 1], ramp[0] * 2.0 * 255 / 1000, atol=1)


def test_a_composite_is_rendered_as_it_is_now_not_as_it_was_first(fiji, backend, fm, key):
    """Headless, a composite kept the picture ImageJ made of it the first time it was drawn:
    the PNG of what its window shows went on showing the first frame (here a red ramp) after
    a second frame had emptied channel 0 and filled channel 1."""
    ramp = np.tile(np.arange(0, 600, 100, dtype=np.uint16), (4, 1))
    fm.save(np.stack([ramp, ramp]), f"{key}.tif", backend="fiji_stream", stream=key,
            axis_names=["c"])  # fmt: skip
    assert rendered(report(backend), key)[0, -1, 0] == 255  # drawn once
    fm.save(np.stack([np.zeros_like(ramp), ramp]), f"{key}.tif", backend="fiji_stream",
            stream=key, axis_names=["c"])  # fmt: skip
    shown = rendered(report(backend), key)[0].astype(int)  # red: channel 0, green: channel 1
    assert (shown[:, 0] == 0).all(), "channel 0 is empty now"
    np.testing.assert_allclose(shown[:, 1], ramp[0] * 255.0 / 500, atol=1)


@pytest.mark.parametrize("how", ["t", "z", "stack", "labels", "channels"])
def test_a_stack_is_rendered_at_its_newest_plane(fiji, backend, fm, key, how):
    """Headless, the PNG of what a window shows was always of plane 1 of a stack (its first
    time point, slice or stack slice), while the GUI shows the newest plane. Each stream gets
    an empty plane, then a ramp: the PNG must look like the ramp sent alone."""
    ramp = np.tile(np.arange(0, 600, 100, dtype=np.uint16), (4, 1))
    newest, hints, alone = ramp, {}, {}
    if how == "labels":
        newest, hints, alone = ramp // 100, {"labels": True}, {"labels": True}
    elif how == "channels":  # a composite time series: the newest (z, t) in every channel
        newest = np.stack([ramp, ramp[:, ::-1]])
        hints, alone = {"axis_names": ["t", "c"]}, {"axis_names": ["c"]}
    if how == "z":  # one frame of two planes along z: its last plane is the newest
        fm.save(np.stack([np.zeros_like(ramp), ramp]), f"{key}.tif", backend="fiji_stream",
                stream=key)  # fmt: skip
    else:
        for t, plane in enumerate([np.zeros_like(newest), newest]):
            where = {"mode": "stack"} if how == "stack" else {"axes": {"t": t}}
            fm.save(plane, f"{key}.tif", backend="fiji_stream", stream=key, **where, **hints)
    fm.save(newest, f"{key}.tif", backend="fiji_stream", stream=f"{key}_alone", **alone)
    state = report(backend)
    entry = image(state, key)
    assert entry["channels"] * entry["slices"] * entry["frames"] == 2 * (newest.size // ramp.size)
    assert entry["displayRanges"] == image(state, f"{key}_alone")["displayRanges"]
    shown = rendered(state, key)
    assert shown.max() > 0, "the newest plane, not the empty first one"
    np.testing.assert_array_equal(shown, rendered(state, f"{key}_alone"))


def shown_planes(state: dict, title: str) -> tuple[tuple[int, ...], dict]:
    """(c, z, t, rows, columns) of the image `title`, and each (c, z, t)'s value (as saved)."""
    entry = image(state, title)
    dims = (entry["channels"], entry["slices"], entry["frames"])
    data = saved(state, title)[0]
    data = data.reshape(dims[2], dims[1], dims[0], *data.shape[-2:])  # ImageJ order: t, z, c
    planes = {(c, z, t): data[t, z, c][0, 0].item() for (c, z, t) in every_plane(dims, {})}
    return (*dims, *data.shape[-2:]), planes


@pytest.mark.parametrize(("sends", "dims", "size", "planes"), SHOW_CASES)
def test_frames_show_as_the_rules_both_viewers_share(fiji, backend, fm, key, sends, dims, size,
                                                     planes):
    """Each case of polystore.testing.rules.SHOW_CASES, as test_napari_plugin.py sends it to
    napari: modes, axis-name synonyms and a stream that changes what it holds."""
    for i, sent in enumerate(sends):
        fm.save(sent.array(), f"{key}/{i}.tif", backend="fiji_stream", stream=key,
                **sent.options)
        if sent.refused:
            with pytest.raises(FrameRejectedError):
                backend.flush()
    assert shown_planes(report(backend), key) == ((*dims, *size), every_plane(dims, planes))


@pytest.mark.parametrize("shape,axes,dims", [
    ([3, 4, 5], {}, (1, 3, 1)),              # one leading axis: z
    ([2, 3, 4, 5], {}, (2, 3, 1)),           # two: c, z
    ([2, 4, 5], {"z": 1}, (2, 2, 1)),        # z taken by axes: the next from the end, c
    ([2, 4, 5], {"t": 0, "c": 0}, (1, 2, 1)),
])  # fmt: skip
def test_leading_axis_rule(fiji, backend, fm, key, shape, axes, dims):
    """Shared with napari (docs/protocol.md): unnamed leading dims are named, innermost
    first, from the end of t, c, z, skipping names already used."""
    fm.save(np.ones(shape, np.uint8), f"{key}.tif", backend="fiji_stream", stream=key, axes=axes)
    entry = image(report(backend), key)
    assert (entry["channels"], entry["slices"], entry["frames"]) == dims


def test_labels_beyond_16_bit_are_32_bit(fiji, backend, fm, key):
    labels = np.array([[0, 1, 65535], [65536, 70000, 16777216]], dtype=np.uint32)
    fm.save(labels, f"{key}.tif", backend="fiji_stream", stream=key, kind="labels")
    state = report(backend)
    assert image(state, key)["bitDepth"] == 32
    np.testing.assert_array_equal(saved(state, key)[0], labels.astype(np.float32))


def test_colormap_hints_per_channel(fiji, backend, fm, key):
    for c, cmap in enumerate(["green", "magenta", "nosuchmap"]):
        fm.save(np.full((4, 4), c, np.uint16), f"{key}.tif", backend="fiji_stream", stream=key,
                axes={"c": c}, colormap=cmap, contrast_limits=(0, 100 + c))  # fmt: skip
    state = report(backend)
    entry = image(state, key)
    assert entry["channels"] == 3 and entry["composite"]
    assert entry["luts"] == ["green", "magenta", "grays"]
    assert entry["unknownColormap"] == "nosuchmap"
    _, _, meta = saved(state, key)
    assert list(meta["Ranges"]) == [0, 100, 0, 101, 0, 102]
    luts = meta["LUTs"]
    assert luts[0][1].max() == 255 and luts[0][0].max() == 0  # green: only G
    assert luts[1][0].max() == 255 and luts[1][2].max() == 255 and luts[1][1].max() == 0


def test_a_colormap_hint_stays_until_another_replaces_it(fiji, backend, fm, key):
    """The rule napari follows too (protocol.md): a frame without a colormap changes none."""
    for t, hint in enumerate(["green", None, "magenta", None]):
        extra = {"colormap": hint} if hint else {}
        fm.save(np.ones((2, 4, 4), np.uint16), f"{key}.tif", backend="fiji_stream", stream=key,
                axes={"t": t}, axis_names=["t", "c"], **extra)  # fmt: skip
        assert image(report(backend), key)["luts"] == [hint or ["green", "magenta"][t > 1]] * 2


def test_a_stream_name_longer_than_a_file_name_is_saved_and_reported(fiji, backend, fm, key):
    """Stream names may have 256 characters; the receiver saved each image as <title>.tif in
    its output directory, over the 255-byte limit of a file name, and then every report
    failed with `internal` ("could not save")."""
    stream = (key + "_" + "s" * 256)[:256]
    fm.save(np.ones((3, 3), np.uint8), f"{key}.tif", backend="fiji_stream", stream=stream)
    entry = image(report(backend), stream)
    assert Path(entry["file"]).is_file() and len(Path(entry["file"]).name) <= 255


def test_channels_keep_their_contrast_when_the_composite_gains_one(fiji, backend, fm, key):
    """ImageJ resets a composite's channel ranges when it gains a channel; the receiver then
    took the reset range as the one it followed, so channel 1 (data 10-15) showed [0, 5]
    until it got a frame of its own."""
    ranges = []
    for c in range(3):
        fm.save(np.array([[10 * c, 10 * c + 5], [10 * c, 10 * c]], np.uint16), f"{key}.tif",
                backend="fiji_stream", stream=key, axes={"c": c})
        ranges.append(image(report(backend), key)["displayRanges"])
    assert ranges[-1] == [[0.0, 5.0], [10.0, 15.0], [20.0, 25.0]]


def test_fire_lut_single_channel(fiji, backend, fm, key):
    fm.save(np.zeros((3, 3), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
            colormap="fire")  # fmt: skip
    assert image(report(backend), key)["luts"] == ["fire"]


# -- ROIs ---------------------------------------------------------------------------------------

ROIS = [
    {"kind": "polygon", "coords": [[1, 1], [1, 8], [7.5, 4]], "label": "tri"},
    {"kind": "rectangle", "coords": [[2, 2], [5, 9]]},
    {"kind": "ellipse", "coords": [[0, 0], [4, 6]]},
    {"kind": "line", "coords": [[0, 0], [9, 9]]},
    {"kind": "point", "coords": [[3.5, 2.25]]},
]


def test_rois_go_to_the_image_overlay(fiji, backend, fm, key):
    fm.save(np.zeros((10, 10), np.uint8), f"{key}/img.tif", backend="fiji_stream", stream=key)
    fm.save(ROIS, f"{key}/cells.roi.zip", backend="fiji_stream", stream=key)
    state = report(backend)
    entry = image(state, key)
    assert entry["rois"] == 5 and entry["overlay"] == 5
    overlay = [roi_summary(r) for r in saved(state, key)[2]["Overlays"]]
    # x = column, y = row; bounds are (left, top, right, bottom), truncated to integers
    assert [r["kind"] for r in overlay] == ["polygon", "rectangle", "ellipse", "line", "point"]
    assert overlay[1]["bounds"] == (2, 2, 9, 5)
    assert overlay[2]["bounds"] == (0, 0, 6, 4)
    assert overlay[0]["bounds"][:2] == (1, 1)
    assert all(r["position"] == (0, 0, 0) for r in overlay)  # no axes: on every plane


def test_an_open_path_and_a_multi_point_go_to_the_overlay_whole(fiji, backend, fm, key):
    """A line of more than two points shows as ImageJ's segmented line, a point ROI of
    several points as one multi-point ROI (what ImageJ's own ROI files hold)."""
    fm.save(np.zeros((32, 32), np.uint8), f"{key}/img.tif", backend="fiji_stream", stream=key)
    fm.save([{"kind": "line", "coords": [[1, 1], [2, 10], [15, 20]]},
             {"kind": "point", "coords": [[3, 4], [5, 6], [7, 8]]}],
            f"{key}/paths.roi.zip", backend="fiji_stream", stream=key)  # fmt: skip
    state = report(backend)
    assert image(state, key)["overlay"] == 2
    overlay = [roi_summary(r) for r in saved(state, key)[2]["Overlays"]]
    assert [r["kind"] for r in overlay] == ["polyline", "point"]
    # x = column, y = row; ImageJ's bounds of a line reach one pixel past its last vertex
    # (the first version of this test expected a polygon's (1, 1, 20, 15) and failed)
    assert overlay[0]["bounds"] == (1, 1, 21, 16)
    assert overlay[1]["bounds"][:2] == (4, 3)


def test_an_imagej_roi_file_comes_back_from_the_overlay_as_it_was(fiji, backend, fm, key,
                                                                   tmp_path):
    """An ImageJ ROI set (segmented, freehand and angle lines, a straight line, a multi-point
    and a single point), loaded with its positions and streamed onto its plane of a placed
    image, is in the overlay of the TIFF Fiji saves as ImageJ types with the file's vertices:
    open paths as segmented lines, a two-point path as a straight line, the multi-point as
    one ROI."""
    roifile = pytest.importorskip("roifile")

    xy = {"segmented": [[1, 1], [10, 2], [20, 15], [30, 4]],
          "freehand": [[1.5, 1], [2, 2.25], [3, 4], [5, 5]],
          "angle": [[10, 10], [20, 20], [30, 10]],
          "straight": [[3, 4], [25, 30]],
          "spots": [[5, 6], [10, 12], [20, 3]],
          "spot": [[7, 9]]}  # fmt: skip
    types = ["POLYLINE", "FREELINE", "ANGLE", "POLYLINE", "POINT", "POINT"]
    file = tmp_path / "set.roi.zip"
    roifile.roiwrite(file, [roifile.ImagejRoi.frompoints(np.asarray(v), name=name)
                            for name, v in xy.items()])
    written = roifile.roiread(file)
    for roi, roitype in zip(written, types):
        roi.roitype = getattr(roifile.ROI_TYPE, roitype)
        roi.t_position = 2  # 1-based: t = 1
    roifile.roiwrite(file, written, mode="w")
    loaded = FileManager({"disk": DiskBackend()}).load(file, backend="disk", positions=True)
    assert [(r.roi.kind, len(r.roi.coords), r.axes) for r in loaded] == [
        ("line", 4, {"t": 1}), ("line", 4, {"t": 1}), ("line", 3, {"t": 1}),
        ("line", 2, {"t": 1}), ("point", 3, {"t": 1}), ("point", 1, {"t": 1})]
    for t in range(2):
        fm.save(np.zeros((40, 40), np.uint8), f"{key}/t{t}.tif", backend="fiji_stream",
                stream=key, axes={"t": t})  # fmt: skip
    fm.save([r.roi for r in loaded], f"{key}/set.roi.zip", backend="fiji_stream", stream=key,
            axes={"t": 1})  # the set's one position  # fmt: skip
    state = report(backend)
    assert image(state, key)["overlay"] == 6
    back = [roifile.ImagejRoi.frombytes(r) for r in saved(state, key)[2]["Overlays"]]
    assert [r.name for r in back] == list(xy)
    assert [r.roitype.name for r in back] == [
        "POLYLINE", "POLYLINE", "POLYLINE", "LINE", "POINT", "POINT"]
    for roi, (name, vertices) in zip(back, xy.items()):
        got = ([[roi.x1, roi.y1], [roi.x2, roi.y2]] if roi.roitype.name == "LINE"
               else roi.coordinates().tolist())
        assert got == vertices, name
        assert roi.t_position == 2, name  # on the image's t = 1 only


def test_rois_before_the_image_wait_for_it(fiji, backend, fm, key):
    fm.save(ROIS[:2], f"{key}/early.roi.zip", backend="fiji_stream", stream=key,
            axes={"t": 1})  # fmt: skip
    assert image(report(backend), key)["overlay"] == 0  # no image yet
    fm.save(np.zeros((10, 10), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
            axes={"t": 1})  # fmt: skip
    state = report(backend)
    assert image(state, key)["overlay"] == 2
    overlay = [roi_summary(r) for r in saved(state, key)[2]["Overlays"]]
    assert [r["position"] for r in overlay] == [(0, 0, 2), (0, 0, 2)]  # t=1, 1-based


def test_rois_for_the_same_path_replace(fiji, backend, fm, key):
    fm.save(np.zeros((10, 10), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key)
    fm.save(ROIS, f"{key}/a.roi.zip", backend="fiji_stream", stream=key)
    fm.save(ROIS[:1], f"{key}/a.roi.zip", backend="fiji_stream", stream=key)
    fm.save(ROIS[:2], f"{key}/b.roi.zip", backend="fiji_stream", stream=key)
    assert image(report(backend), key)["rois"] == 3


def test_rois_of_one_path_at_other_positions_stay(fiji, backend, fm, key):
    """A later set replaced the earlier one of the same path whatever its position, so a
    time series of ROIs saved to one path kept only its last time point (napari kept them
    all). A set replaces only the one of the same path and position (docs/protocol.md)."""
    for t in range(3):
        fm.save(np.zeros((10, 10), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
                axes={"t": t})  # fmt: skip
    for t, n in ((0, 2), (1, 3), (2, 4)):
        fm.save(ROIS[:n], f"{key}/cells.roi.zip", backend="fiji_stream", stream=key,
                axes={"t": t})  # fmt: skip
    fm.save(ROIS[:1], f"{key}/cells.roi.zip", backend="fiji_stream", stream=key, axes={"t": 1})
    state = report(backend)
    assert image(state, key)["rois"] == 2 + 1 + 4
    overlay = [roi_summary(r) for r in saved(state, key)[2]["Overlays"]]
    assert sorted(r["position"][2] for r in overlay) == [1, 1, 2, 3, 3, 3, 3]  # t, 1-based


def test_a_roi_set_at_a_synonym_position_replaces_the_same_position(fiji, backend, fm, key):
    """`axes={"Time": 1}` and `axes={"t": 1}` are one position (docs/protocol.md): Fiji kept
    ROI sets by the names as sent, so the second set was added beside the first (3 ROIs)
    where napari replaced it (1)."""
    fm.save(np.zeros((10, 10), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key,
            axes={"t": 1})  # fmt: skip
    fm.save(ROIS[:2], f"{key}/cells.roi.zip", backend="fiji_stream", stream=key,
            axes={"Time": 1})  # fmt: skip
    fm.save(ROIS[:1], f"{key}/cells.roi.zip", backend="fiji_stream", stream=key, axes={"t": 1})
    assert image(report(backend), key)["rois"] == 1


# -- transports, control ---------------------------------------------------------------------------


def test_inline_transport(fiji, key):
    data = np.arange(64, dtype=np.int16).reshape(8, 8) - 30
    with FijiStreamingBackend(fiji.endpoint, transport="inline") as b:
        before = b.request("report")["inline_frames"]
        FileManager({"fiji_stream": b}).save(data, f"{key}.tif", backend="fiji_stream", stream=key)
        state = report(b)
        assert not b.sender.uses_shared_memory
    assert state["inline_frames"] == before + 1
    np.testing.assert_array_equal(saved(state, key)[0], data.astype(np.float32))


def test_clear_closes_images(fiji, backend, fm, key):
    fm.save(np.zeros((3, 3), np.uint8), f"{key}.tif", backend="fiji_stream", stream=key)
    assert key in [i["title"] for i in report(backend)["images"]]
    assert backend.request("clear") == {}
    assert report(backend)["images"] == []


def test_pipelined_frames_are_all_acknowledged(fiji, key):
    """60 frames sent without waiting: each is acknowledged (JeroMQ 0.6's CURVE garbled about
    one in five when the receive high-water mark was 16, JeroMQ issue #1009)."""
    payload = np.arange(64 * 64, dtype=np.uint16).tobytes()
    with RawClient(fiji.endpoint) as raw:
        assert raw.hello()["type"] == "welcome"
        for _ in range(60):
            raw.send(raw.frame(stream=key, shape=[64, 64], dtype="uint16", nbytes=len(payload)),
                     payload)  # fmt: skip
        replies = [raw.recv(30) for _ in range(60)]
    assert [r["type"] for r in replies] == ["ack"] * 60, [r for r in replies if r["type"] != "ack"]


def test_bye_forgets_the_sender_and_its_segments(fiji, key):
    with FijiStreamingBackend(fiji.endpoint, transport="inline", timeout=60) as second:
        before = second.request("report", timeout=30)
        with FijiStreamingBackend(fiji.endpoint, timeout=60) as first:
            for i in range(3):
                first.save(np.zeros((64, 64), np.uint16), f"{key}/{i}.tif")
            first.flush()
            assert second.request("report", timeout=30)["senders"] == before["senders"] + 1
        deadline = time.monotonic() + 10  # the bye arrives after close() returns
        while time.monotonic() < deadline:
            state = second.request("report", timeout=30)
            if state["senders"] == before["senders"]:
                break
            time.sleep(0.1)
    assert state["senders"] == before["senders"]
    assert state["mapped_segments"] == before["mapped_segments"]


def test_segment_mappings_are_bounded_and_dropped_when_unlinked(fiji):
    segments = []
    with RawClient(fiji.endpoint) as raw:
        try:
            assert raw.hello()["type"] == "welcome"
            for n in range(70):
                seg = shared_memory.SharedMemory(name=f"{raw.prefix}{n}", create=True, size=4096)
                segments.append(seg)
                reply = raw.request(raw.frame(segment=seg.name, stream="bounded"))
                assert reply["type"] == "ack", reply
            assert raw_report(raw)["mapped_segments"] == 64
            # the 10 newest are among the 64 mapped (the least recently used went first)
            for seg in segments[-10:]:
                seg.unlink()
            time.sleep(1.5)  # the receiver looks for unlinked segments once a second
            assert raw_report(raw)["mapped_segments"] == 54
        finally:
            for seg in segments:
                seg.close()
                try:
                    seg.unlink()
                except FileNotFoundError:
                    pass


# -- the receiver conformance suite (polystore.testing.receiver), run by both receivers ------------


class TestFijiReceiver(ReceiverConformance):
    @pytest.fixture(scope="class")
    def receiver_under_test(self, fiji, stack):
        return ReceiverUnderTest(
            fiji.endpoint,
            shm_prefix="fiji_",
            viewer="fiji",
            curve=user_curve() if stack.curve else None,
        )


def test_flood_of_garbage_then_real_frames(fiji, backend, fm, key):
    """Many bad messages in a row (no reply awaited) do not stop or slow the receiver."""
    with RawClient(fiji.endpoint) as raw:
        raw.hello()
        garbage = [b"\xff", b"{", b"[]", json.dumps({"v": 1, "type": "frame", "seq": 1}).encode()]
        for i in range(300):
            raw.send(garbage[i % 4])
        for _ in range(300):
            assert raw.recv()["type"] == "error"
    frame = np.arange(16, dtype=np.uint8).reshape(4, 4)
    fm.save(frame, f"{key}.tif", backend="fiji_stream", stream=key)
    np.testing.assert_array_equal(saved(report(backend), key)[0], frame)


# -- process: binding, stopping ------------------------------------------------------------------


def test_a_connection_that_never_finishes_its_handshake_is_closed(fiji, stack):
    """Another account can open connections to the port and say nothing. The Python receiver
    closes them after 5 s; the Fiji script kept them for JeroMQ's default of 30 s."""
    if not stack.curve:
        pytest.skip("JeroMQ 0.3 has no handshake interval (and no CURVE): Debian's stack")
    port = int(fiji.endpoint.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        started = time.monotonic()
        closed = True
        try:
            while silent.recv(4096):  # its greeting, then nothing until it hangs up
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            closed = False
        waited = time.monotonic() - started
    assert closed and waited < 10, f"still open after {waited:.1f} s"


def test_refuses_to_listen_beyond_loopback(debian, tmp_path):
    receiver = start_receiver(endpoint=f"tcp://0.0.0.0:{free_port()}", wait=False)
    rc = receiver.wait(60)
    assert rc != 0
    assert "refusing to listen on 0.0.0.0" in receiver.log


def test_a_port_out_of_range_is_refused_as_such(debian, tmp_path):
    """JeroMQ refused port 99999 as "port out of range", and the script added "Is another
    polystore receiver already running there?": a wrong hint. Now it names the range, as the
    Python receiver does (endpoints.check_listen_port); the hint is kept for a port in use."""
    receiver = start_receiver(endpoint="tcp://127.0.0.1:99999", wait=False)
    assert receiver.wait(60) != 0
    assert "needs a TCP port from 0 to 65535" in receiver.log
    assert "already running there" not in receiver.log
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        receiver = start_receiver(endpoint=f"tcp://127.0.0.1:{taken.getsockname()[1]}",
                                  wait=False)
        assert receiver.wait(60) != 0
    assert "already running there" in receiver.log


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_frames_stream_over_the_ipv6_loopback(debian, tmp_path):
    """tcp://[::1]:PORT passed the loopback check, and then JeroMQ refused it ("[::1]:PORT"
    on 0.3, "::1 not found matching IPv4/IPv6 settings" on 0.6)."""
    receiver = start_receiver(tmp_path, endpoint=f"tcp://[::1]:{free_port()}")
    try:
        with FijiStreamingBackend(receiver.endpoint) as b:
            b.save(np.arange(12, dtype=np.uint16).reshape(3, 4), "v6/a.tif", stream="v6")
            np.testing.assert_array_equal(saved(report(b), "v6")[0],
                                          np.arange(12, dtype=np.uint16).reshape(3, 4))
    finally:
        assert receiver.stop() == 0


def test_stop_returns_after_a_connection_flood_killed_jeromq_0_3(debian, tmp_path):
    """Plain TCP connections (no credential) up to the JVM's descriptor limit make JeroMQ
    0.3.6's I/O thread die (NullPointerException in TcpListener.acceptEvent); the worker's
    ctx.term() then never returns, and the script waited for the worker without a limit:
    stdin closed, Stop and the window's close button all hung. It now ends within its 3 s."""
    launcher = tmp_path / "limited.sh"
    launcher.write_text("#!/bin/bash\nexec prlimit --nofile=1024:1024 "
                        f"{FIJI_DIR / 'run_headless.sh'} \"$@\"\n")
    launcher.chmod(0o755)
    receiver = start_receiver(launcher=launcher)
    host, port = receiver.endpoint.removeprefix("tcp://").rsplit(":", 1)
    conns = []
    try:
        for _ in range(1100):
            conn = socket.socket()
            conn.settimeout(1)
            try:
                conn.connect((host, int(port)))
                conns.append(conn)
            except OSError:
                conn.close()
    finally:
        for conn in conns:
            conn.close()
    started = time.monotonic()
    rc = receiver.stop(30)
    assert rc == 0 and time.monotonic() - started < 20, receiver.log[-2000:]
    assert "stopped after" in receiver.log


def test_at_its_cap_fiji_makes_room_by_the_sender_heard_from_least_recently(debian, tmp_path):
    """JeroMQ says nothing when a connection closes, so at its cap the Fiji script makes room
    for a new sender. It forgot the sender that had said hello first, even one still
    streaming (its next frame: hello_required, its frames in flight lost); it now forgets the
    one heard from least recently (one that died without bye), and the others stream on."""
    receiver = start_receiver(tmp_path, max_senders=2)
    pixels = b"\0" * 6
    try:
        with (RawClient(receiver.endpoint) as first, RawClient(receiver.endpoint) as quiet,
              RawClient(receiver.endpoint) as new):
            assert first.hello()["type"] == "welcome"
            assert quiet.hello()["type"] == "welcome"
            assert first.request(first.frame(), pixels)["type"] == "ack"  # still streaming
            assert new.hello()["type"] == "welcome"  # the cap: `quiet` makes room
            assert first.request(first.frame(), pixels)["type"] == "ack"
            assert new.request(new.frame(), pixels)["type"] == "ack"
            reply = quiet.request(quiet.frame(), pixels)
            assert reply["type"] == "error" and reply["code"] == "hello_required", reply
    finally:
        receiver.stop()


def test_max_senders_below_one_is_a_clear_error(debian, tmp_path):
    receiver = start_receiver(tmp_path, max_senders=0, wait=False)
    assert receiver.wait(60) != 0 and "max_senders must be at least 1" in receiver.log


def test_port_in_use_is_a_clear_error(fiji, debian):
    receiver = start_receiver(endpoint=fiji.endpoint, wait=False)
    rc = receiver.wait(60)
    assert rc != 0 and "cannot listen on" in receiver.log


def test_sigterm_stops_cleanly(debian, tmp_path):
    receiver = start_receiver(tmp_path)
    with FijiStreamingBackend(receiver.endpoint) as b:
        b.save(np.zeros((8, 8), np.uint8), "x.tif")
        b.flush()
    receiver.proc.send_signal(signal.SIGTERM)
    rc = receiver.wait(15)
    assert rc in (0, 143), receiver.log
    assert "stopped after 1 frames" in receiver.log


def _links_to(port: int) -> set[int]:
    """This process's local ports of established TCP connections to 127.0.0.1:`port`."""
    import psutil

    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def test_sender_goes_on_after_receiver_restart(debian, tmp_path):
    """Fiji closed and started again on the same port: the next save handshakes again, on the
    link ZeroMQ made to the new receiver by itself. A sender that closed that link and opened
    another (it did after every hang-up, which JeroMQ 0.3 reports on each disconnect) raced
    the receiver's close of the first: a ROUTER never reads a second link under a routing id
    still in use, so no hello got through for good (CI: 60 s without a handshake)."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    first = start_receiver(tmp_path, endpoint=endpoint)
    # connect_timeout: the new JVM's first hello can take over a second on a busy machine
    with FijiStreamingBackend(endpoint, timeout=10, connect_timeout=20) as b:
        b.save(np.zeros((4, 4), np.uint8), "r/0.tif")
        b.flush()
        assert first.stop() == 0
        second = start_receiver(tmp_path, endpoint=endpoint)
        try:
            deadline = time.monotonic() + 10
            while not (relinked := _links_to(port)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(relinked) == 1, "ZeroMQ did not relink to the restarted receiver"
            b.save(np.ones((4, 4), np.uint8), "r/1.tif")  # a new handshake, on that link
            b.flush()
            assert _links_to(port) == relinked
            assert image(b.request("report"), "r")["framesReceived"] == 1
        finally:
            assert second.stop() == 0


def test_a_save_after_fiji_closed_says_no_receiver_answered(debian, tmp_path):
    """Fiji closed, nothing started again on its port: the next save must say that no Fiji
    receiver answered. JeroMQ 0.3's close reads as a hang-up mid-handshake; that hang-up was
    never forgotten, so the save said the process listening there "failed the authentication
    handshake" (an impostor), when nothing listened at all."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    receiver = start_receiver(tmp_path, endpoint=endpoint)
    with FijiStreamingBackend(endpoint, timeout=10, connect_timeout=5) as b:
        b.save(np.zeros((4, 4), np.uint8), "closed/0.tif")
        b.flush()
        assert receiver.stop() == 0
        time.sleep(1.0)  # the sender's monitor has the close
        with pytest.raises(ViewerNotRunningError, match="no fiji receiver answered"):
            b.save(np.ones((4, 4), np.uint8), "closed/1.tif")

def test_replacing_rois_leaves_the_users_selection_and_never_races_the_roi_manager(stack):
    """Replacing a stream's ROIs deleted the old ones from the ROI Manager by selecting each:
    that put it on the user's current image, in place of the user's own selection. And the
    ROI Manager is a Swing list, changed from the receiver's thread while its window painted:
    AWT threw (ArrayIndexOutOfBoundsException, seen in CI; NullPointerException drawing a
    deleted selection). Replace ROIs many times beside another stream's, which stay."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    editor = ScriptEditor(stack, gui=True)
    try:
        params = f'endpoint="{endpoint}",allow_unauthenticated=true'
        assert editor.command(f"run {params}", timeout=300).startswith("listening")
        with FijiStreamingBackend(endpoint, auth="none") as b:
            for stream in ("kept", "w"):
                b.save(np.zeros((30, 40), np.uint8), f"{stream}/t000.tif", stream=stream)
            b.save(ROIS, "kept/cells.roi.zip", stream="kept")
            # the streams' windows first: one shown later becomes the current image
            report_once(b, lambda state: all(i["shown"] for i in state["images"]), "shown")
            editor.command('macro newImage("mine", "8-bit black", 50, 40, 1); '
                           'selectImage(getImageID()); makeRectangle(3, 4, 10, 20);')  # fmt: skip
            many = ROIS * 20
            for n in range(400):  # from 1 to 100 ROIs and back, deleted and added as it paints
                b.save(many[: 1 + n * 7 % len(many)], "w/cells.roi.zip", stream="w")
            assert report(b)["roi_manager"] == len(ROIS) + 1 + 399 * 7 % len(many)
            selections = editor.command(
                'macro s = ""; for (i = 1; i <= nImages; i++) { selectImage(i); '
                'getSelectionBounds(x, y, w, h); '
                's = s + getTitle() + ":" + selectionType() + "@" + x + "," + y + " "; } return s;'
            )
            # the user's rectangle (type 0) stays; the streams' images get no selection (-1)
            expected = ["kept:-1@0,0", "mine:0@3,4", "w:-1@0,0"]
            assert sorted(selections.split()) == expected, selections
        assert "ended" in editor.command("stop", timeout=30)
    finally:
        editor.close()
    assert "Exception" not in editor.log, editor.log


def test_gui_mode_windows_and_roi_manager(debian, tmp_path):
    """The GUI path Fiji takes (windows, CompositeImage, ROI Manager), on a virtual display."""
    receiver = start_receiver(tmp_path, gui=True)
    try:
        with FijiStreamingBackend(receiver.endpoint) as b:
            b.save(np.arange(12, dtype=np.uint16).reshape(3, 4), "w/t000.tif")
            for t in range(2):
                for c in range(2):
                    b.save(np.full((30, 40), t * 10 + c, np.uint8), "hs.tif", stream="hs",
                           axes={"t": t, "c": c}, colormap=["magenta", "green"][c])  # fmt: skip
            b.save(ROIS[:2], "w/cells.roi.zip", stream="w")
            b.save(ROIS[2:], "hs/cells.roi.zip", stream="hs", axes={"t": 1})
            b.save(ROIS[:1], "w/cells.roi.zip", stream="w")  # replaces the two
            labels = np.arange(100, dtype=np.int32).reshape(10, 10)
            b.save(labels, "lab.tif", stream="lab", labels=True)
            state = report(b)
            assert [i["shown"] for i in state["images"]] == [True, True, True]
            assert state["windows"] == 3
            assert state["roi_manager"] == 1 + 3
            assert image(state, "hs")["composite"]
            assert image(state, "hs")["luts"] == ["magenta", "green"]
            np.testing.assert_array_equal(saved(state, "hs")[0][1, 1], np.full((30, 40), 11))
            # The user closes a window whose newest frame is not saved yet: ImageJ flushes its
            # image. Reports (which save every changed image) go on, and say it is not shown;
            # the next frame opens a new window.
            b.save(np.full((30, 40), 9, np.uint8), "hs.tif", stream="hs", axes={"t": 1, "c": 1})
            b.flush()
            time.sleep(0.5)  # drawn (the receiver redraws within ~0.1 s), then closed
            assert x_close_window(receiver, "hs") == 1
            # ImageJ flushes the image after its window is gone
            state = report_once(b, lambda state: state["windows"] == 2, "closed")
            assert [i["shown"] for i in state["images"]] == [True, False, True]
            assert image(report(b), "hs")["width"] == 0  # and again, with the image gone
            b.save(np.full((30, 40), 7, np.uint8), "hs.tif", stream="hs", axes={"t": 0, "c": 0})
            state = report(b)
            assert state["windows"] == 3 and image(state, "hs")["shown"]
            assert state["roi_manager"] == 1 + 3
            np.testing.assert_array_equal(saved(state, "hs")[0], np.full((30, 40), 7))
            b.request("clear")
            state = b.request("report")
            assert state["windows"] == 0 and state["roi_manager"] == 0 and state["images"] == []
    finally:
        rc = receiver.stop()
    assert rc == 0, receiver.log
    assert "Exception" not in receiver.log and "failed" not in receiver.log, receiver.log


# -- one protocol source ------------------------------------------------------------------------


def load_generator():
    """scripts/gen_groovy_protocol.py as a module (scripts/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "gen_groovy_protocol.py"
    spec = importlib.util.spec_from_file_location("gen_groovy_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_script_matches_the_generator():
    """The Groovy message tables are protocol.py's, and the installed script embeds the
    committed body: run scripts/gen_groovy_protocol.py."""
    generator = load_generator()
    body = generator.expected_body()
    assert generator.BODY.read_text(encoding="utf-8") == body, (
        "viewers/fiji/src/receiver_body.groovy is out of date with protocol.py: "
        "run python scripts/gen_groovy_protocol.py"
    )
    script = generator.SCRIPT.read_text(encoding="utf-8")
    assert script == generator.expected_script(body), (
        "viewers/fiji/polystore_receiver.groovy is out of date with viewers/fiji/src/: "
        "run python scripts/gen_groovy_protocol.py"
    )
    assert script.isascii()  # reads the same whatever encoding Fiji assumes
    assert len(script.splitlines()) - len(body.splitlines()) < 400  # the bootstrap stays small


TRICKY_BODY = (
    "a backslash \\ and \\n, quotes ' '' ''' '''' \"\"\" $x ${y} \\u0041 \\\\u0041\n"
    "tab\there, CR\r\nCRLF done\r\n"
    "non-ASCII: é ß ∑ 中文 and beyond the BMP: 😀 𝔸\n"
    + "é" * 40_000  # 80,000 bytes as a class file constant: must be split
    + ("\nlong line " + "x" * 70_000 + "\n")
    + "ends in a backslash \\"
)


@pytest.mark.parametrize("text", [TRICKY_BODY, "ends with a quote '", "", "\n"],
                         ids=["tricky", "quote", "empty", "newline"])  # fmt: skip
def test_embedded_body_is_the_exact_text(stack, tmp_path, text):
    """The generator's string constants give back the body's text exactly, on Groovy 2.4 and
    4 (backslashes, quotes, CR, non-ASCII, a constant over 64 KiB split)."""
    import hashlib
    import subprocess

    script = tmp_path / "embedded.groovy"
    script.write_text(load_generator().embed(text) + (
        "byte[] b = receiverSource().getBytes('UTF-8')\n"
        "println java.security.MessageDigest.getInstance('SHA-256').digest(b)"
        ".encodeHex().toString()\n"
    ), encoding="ascii")  # fmt: skip
    env = dict(os.environ, **stack.env())
    if stack.groovy_jars:
        java = f"{env.get('JAVA_HOME', '/usr/lib/jvm/java-17-openjdk-amd64')}/bin/java"
        jars = ":".join(map(str, stack.groovy_jars))
        command = [java, "-cp", jars, "groovy.ui.GroovyMain", str(script)]
    else:
        env.setdefault("JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64")
        command = ["groovy", str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_generator_follows_protocol_changes(monkeypatch):
    """A field added to protocol.py appears in the generated table (the generator reads the
    structs, it does not copy a list), and a type it cannot translate stops it loudly."""
    import msgspec

    from polystore.streaming import protocol

    generator = load_generator()

    gamma = Annotated[float, msgspec.Meta(ge=0.1, le=10)] | None
    Display = msgspec.defstruct("Display", [("gamma", gamma, None)], bases=(protocol.Display,),
                                omit_defaults=True)  # fmt: skip
    display = ("display", Display, msgspec.field(default_factory=Display))
    Frame = msgspec.defstruct("Frame", [display], bases=(protocol.Frame,), tag="frame",
                              tag_field="type", omit_defaults=True)  # fmt: skip

    monkeypatch.setattr(protocol, "SenderMessage", protocol.Hello | Frame | protocol.Bye)
    section = generator.generate_section(protocol)
    assert "Fld.opt('gamma', Check.nullable(Check.number(0.1d, 10.0d)), null)," in section
    assert "'rois': ROIS" not in section

    monkeypatch.setattr(protocol, "NEW_LIMITS", (1, 2), raising=False)
    with pytest.raises(NotImplementedError, match="NEW_LIMITS"):
        generator.generate_section(protocol)


# -- Fiji's Script Editor: Kill, Stop and re-run in one JVM (issue 14) ---------------------------

SPINNING = 0.3  # CPU seconds in one second: a thread busier than this while idle spins


def test_script_editor_kill_stop_and_rerun_free_the_port(stack, tmp_path):
    """Run the script as the Script Editor does; Kill (on Java 21, as current Fiji runs it:
    an interrupt alone; on older JVMs interrupt, then Thread.stop), the Stop button and a
    re-run each leave the port free within about a second, with no thread left spinning, and
    the re-run on the same port works."""
    port = free_port()
    params = f'endpoint="tcp://127.0.0.1:{port}"'
    if not stack.curve:
        params += ",allow_unauthenticated=true"
    editor = ScriptEditor(stack, gui=True, cache=tmp_path / "cache")
    try:
        started = editor.command(f"run {params}", timeout=300)
        assert started.startswith("listening"), editor.log[-3000:]
        with RawClient(f"tcp://127.0.0.1:{port}") as raw:
            assert raw.hello()["type"] == "welcome"
            # Killed with a sender still connected: the receiver closes that connection first,
            # which leaves it in TIME_WAIT on this port; the port is free all the same (a
            # listener binds with SO_REUSEADDR), as the re-run below on the same port shows.
            # Kill on Java 21 (current Fiji): no Thread.stop to fall back on
            killed = editor.send("interrupt")
            assert seconds_until_free(port) < 3, editor.log[-3000:]
        assert killed(30) == "interrupted; script thread ended", editor.log[-3000:]
        busy = [t for t in editor.threads() if t["cpu"] > SPINNING]
        assert busy == [], f"threads spinning after Kill: {busy}"
        assert not [t for t in editor.threads() if t["name"].startswith(("reaper", "iothread"))]

        assert editor.command(f"run {params}", timeout=300).startswith("listening")  # re-run
        killed = editor.send("kill")  # Kill on older JVMs: Thread.stop after a second
        assert seconds_until_free(port) < 3, editor.log[-3000:]
        assert "script thread ended" in killed(30)
        assert [t for t in editor.threads() if t["cpu"] > SPINNING] == []

        assert editor.command(f"run {params}", timeout=300).startswith("listening")  # re-run
        with RawClient(f"tcp://127.0.0.1:{port}") as raw:
            assert raw.hello()["type"] == "welcome"
            assert raw.request(raw.frame(), b"\0" * 6)["type"] == "ack"
        assert "ended" in editor.command("stop", timeout=30), editor.log[-3000:]
        assert seconds_until_free(port) < 3
        assert [t for t in editor.threads() if t["cpu"] > SPINNING] == []

        assert editor.command(f"run {params}", timeout=300).startswith("listening")  # again
        assert "ended" in editor.command("stop", timeout=30)
        assert seconds_until_free(port) < 3
        # the first run compiled the receiver into the cache, the re-runs loaded it from there
        assert editor.log.count(COMPILED) == 1 and editor.log.count(LOADED) == 3, editor.log
    finally:
        editor.close()


def test_rerun_in_one_session_continues_cleanly(stack):
    """Issue 14: run again in the same Fiji session, ROI ids restarted, so the ROI Manager
    skipped the new ROIs as already present, and a second window of the same title opened.
    Now the new run's ROIs are added and the open window is taken over."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    editor = ScriptEditor(stack, gui=True)
    try:
        for run in (1, 2):
            run_params = f'endpoint="{endpoint}"'
            if not stack.curve:
                run_params += ",allow_unauthenticated=true"
            assert editor.command(f"run {run_params}", timeout=300).startswith("listening")
            with RawClient(endpoint) as raw:
                assert raw.hello()["type"] == "welcome"
                pixels = bytes([run] * 6)
                assert raw.request(raw.frame(stream="cells"), pixels)["type"] == "ack"
                rois = {"v": 1, "type": "rois", "seq": raw.next_seq(), "stream": "cells",
                        "path": "cells.roi.zip", "sent_ns": 0, "rois": ROIS[:2]}  # fmt: skip
                assert raw.request(rois)["type"] == "ack"
                state = raw.report()
            assert state["windows"] == 1, f"run {run}: {state['windows']} windows"
            assert state["roi_manager"] == 2 * run, f"run {run}: {state['roi_manager']} ROIs"
            assert image(state, "cells")["framesReceived"] == 1
            assert "ended" in editor.command("stop", timeout=30)
    finally:
        editor.close()


def test_a_rerun_stacks_after_the_time_points_of_the_window_it_took_over(debian):
    """Stacking onto a window an earlier run left open: the new run's first stacked frame
    overwrote t = 0 (its per-channel count started at 0), and a 2-D frame stacked onto a
    stack of 3-plane z blocks failed (`internal`: ImageJ cannot shrink z in place)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    editor = ScriptEditor(debian, gui=True)
    params = f'endpoint="{endpoint}",allow_unauthenticated=true'
    stack = {"mode": "stack"}
    try:
        assert editor.command(f"run {params}", timeout=300).startswith("listening")
        with RawClient(endpoint) as raw:
            assert raw.hello()["type"] == "welcome"
            block = raw.frame(stream="zs", shape=[3, 2, 3], nbytes=18, display=stack)
            assert raw.request(block, bytes([1] * 18))["type"] == "ack"
            for value in (1, 2, 3):
                reply = raw.request(raw.frame(stream="ts", display=stack), bytes([value] * 6))
                assert reply["type"] == "ack"
        assert "ended" in editor.command("stop", timeout=30)
        assert editor.command(f"run {params}", timeout=300).startswith("listening")
        with RawClient(endpoint) as raw:
            assert raw.hello()["type"] == "welcome"
            for stream in ("zs", "ts"):
                reply = raw.request(raw.frame(stream=stream, display=stack), bytes([9] * 6))
                assert reply["type"] == "ack", reply
            state = raw.report()
        assert state["windows"] == 2
        assert (image(state, "zs")["slices"], image(state, "zs")["frames"]) == (1, 1)
        assert image(state, "ts")["frames"] == 4
        shown = editor.command('macro selectImage("ts"); s = ""; for (t = 1; t <= nSlices; '
                               't++) { setSlice(t); s = s + getPixel(0, 0) + " "; } return s;')
        assert shown.split() == ["1", "2", "3", "9"]
        assert "ended" in editor.command("stop", timeout=30)
    finally:
        editor.close()


def test_a_users_own_image_with_a_streams_title_is_never_taken_over(debian):
    """A re-run takes over the windows an earlier run left open, found by title: any open
    image titled as a stream was taken, the user's own too, and the stream's frames were
    written into it (its unsaved work lost). Only images an earlier run made are taken."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    editor = ScriptEditor(debian, gui=True)
    try:
        params = f'endpoint="{endpoint}",allow_unauthenticated=true'
        assert editor.command(f"run {params}", timeout=300).startswith("listening")
        mine = editor.command('macro newImage("cells", "8-bit black", 3, 2, 1); '
                              'setPixel(0, 0, 42); run("Add...", "value=1"); '
                              'return "" + getImageID();')  # fmt: skip
        with RawClient(endpoint) as raw:
            assert raw.hello()["type"] == "welcome"
            assert raw.request(raw.frame(stream="cells"), bytes([7] * 6))["type"] == "ack"
            state = raw.report()
        assert state["windows"] == 2, "the stream opened its own window beside the user's"
        kept = editor.command(f'macro selectImage({mine}); '
                              f'return "" + getPixel(0, 0) + " " + is("changes");')
        assert kept == "43 1", f"the user's image became {kept!r}"
        # the stream's window, renamed by the user to keep it, is not taken by a re-run either
        assert "ended" in editor.command("stop", timeout=30)
        editor.command(f'macro for (i = 1; i <= nImages; i++) {{ selectImage(i); '
                       f'if (getTitle() == "cells" && getImageID() != {mine}) '
                       f'rename("kept cells"); }} return "";')
        assert editor.command(f"run {params}", timeout=300).startswith("listening")
        with RawClient(endpoint) as raw:
            assert raw.hello()["type"] == "welcome"
            assert raw.request(raw.frame(stream="cells"), bytes([9] * 6))["type"] == "ack"
            state = raw.report()
        assert state["windows"] == 3, "a renamed stream window was taken over"
        kept = editor.command('macro selectImage("kept cells"); return "" + getPixel(0, 0);')
        assert kept == "7", f"the renamed window now shows {kept!r}"
        assert "ended" in editor.command("stop", timeout=30)
    finally:
        editor.close()


def test_a_window_taken_over_by_a_rerun_follows_labels_and_images(stack, tmp_path):
    """A re-run in one Fiji session takes over the windows of the run before, whose images
    are of that run's classes (each run loads the receiver anew): the labels view (channels:
    LabelCompositeImage, one channel: a label processor) was recognised by class, so it was
    never switched. Labels that turn to images went on in glasbey colours, images that turn
    to labels were drawn through a linear LUT (id 1 of 1000 black). After the re-run each
    stream must look as the same frame does on a stream of its own."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    ids = np.tile(np.arange(1001, dtype=np.uint16), (4, 1))  # column j holds id j
    ramp = np.tile(np.arange(0, 1001, dtype=np.uint16), (4, 1))
    two = {"axis_names": ["c"]}
    frames = {  # stream: (frame of run 1, frame of run 2, hints)
        "to_images_c2": (np.stack([ids, ids[:, ::-1]]), np.stack([ramp, ramp[:, ::-1]]), two),
        "to_labels_c2": (np.stack([ramp, ramp[:, ::-1]]), np.stack([ids, ids[:, ::-1]]), two),
        "to_images_c1": (ids, ramp, {}),
        "to_labels_c1": (ramp, ids, {}),
    }
    editor = ScriptEditor(stack, gui=True, cache=tmp_path / "cache")
    try:
        for run in (1, 2):
            params = f'endpoint="{endpoint}",output_dir="{tmp_path / f"run{run}"}"'
            if not stack.curve:
                params += ",allow_unauthenticated=true"
            assert editor.command(f"run {params}", timeout=300).startswith("listening")
            with FijiStreamingBackend(endpoint, timeout=60) as b:
                for stream, (first, second, hints) in frames.items():
                    frame = first if run == 1 else second
                    labels = stream.startswith("to_images") == (run == 1)
                    b.save(frame, "x.tif", stream=stream, labels=labels, **hints)
                    if run == 2:
                        b.save(frame, "x.tif", stream=f"{stream}_alone", labels=labels, **hints)
                state = report(b)
            assert state["windows"] == (4 if run == 1 else 8), state["windows"]
            assert "ended" in editor.command("stop", timeout=30)
        assert all(image(state, stream)["framesReceived"] == 1 for stream in frames)
        unlike = [stream for stream in frames if not np.array_equal(
            rendered(state, stream), rendered(state, f"{stream}_alone"))]
        assert unlike == [], "drawn unlike the same frame alone"
    finally:
        editor.close()
    assert "Exception" not in editor.log, editor.log[-3000:]


def gui_range(editor: ScriptEditor, title: str, channel: int = 1) -> list[float]:
    """The display range ImageJ shows for `channel` of the open image `title`, read by an
    ImageJ macro in the receiver's JVM (not through the receiver's report)."""
    answer = editor.command(f'macro selectImage("{title}"); Stack.setChannel({channel}); '
                            'getMinAndMax(lo, hi); return "" + lo + " " + hi;')  # fmt: skip
    return [float(v) for v in answer.split()]


def test_contrast_set_by_hand_in_the_gui_is_kept(stack):
    """Issue 14, the contrast rule: without contrast_limits the display range follows the
    data until the user changes it by hand, then it stays the user's. The user changes it
    the way ImageJ records a Brightness/Contrast "Set" (the macro call setMinAndMax) on the
    displayed image: in a single image, and in one channel of a growing composite time
    series. Both keep the user's range when frames of another range come; the composite's
    other channel and an untouched image still follow the data."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    ramp = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    editor = ScriptEditor(stack, gui=True)
    try:
        params = f'endpoint="{endpoint}"' + ("" if stack.curve else ",allow_unauthenticated=true")
        assert editor.command(f"run {params}", timeout=300).startswith("listening")
        with FijiStreamingBackend(endpoint, timeout=60) as b:

            def send(t: int, offset: float, scale: float) -> dict:
                for title in ("drift", "untouched"):
                    b.save(offset + ramp, f"{title}.tif", stream=title)
                for c, top in enumerate((100.0, 10.0)):
                    b.save(((offset + ramp) * scale * top).astype(np.uint16), "hs.tif",
                           stream="hs", axes={"t": t, "c": c})  # fmt: skip
                return report(b)

            state = send(0, 0.0, 1.0)
            assert image(state, "drift")["displayRanges"] == [[0, 1]]
            assert image(state, "hs")["displayRanges"] == [[0, 100], [0, 10]]
            assert all(i["shown"] for i in state["images"])
            assert gui_range(editor, "drift") == [0, 1]

            # The user sets the contrast by hand, as the B&C dialog's "Set" does.
            editor.command('macro selectImage("drift"); setMinAndMax(0.25, 0.75);')
            editor.command('macro selectImage("hs"); Stack.setChannel(1); setMinAndMax(5, 50);')
            assert gui_range(editor, "hs", 1) == [5, 50]

            # New frames of another range: t grows, so the composite's stack is rebuilt.
            for t in (1, 2):
                state = send(t, 19.0, 5.0)
            assert image(state, "drift")["displayRanges"] == [[0.25, 0.75]]
            assert image(state, "drift")["userRanges"] == [0]
            hs = image(state, "hs")
            assert (hs["frames"], hs["userRanges"]) == (3, [0])
            assert hs["displayRanges"][0] == [5, 50]
            np.testing.assert_allclose(hs["displayRanges"][1], [950, 1000])
            np.testing.assert_allclose(image(state, "untouched")["displayRanges"], [[19, 20]])
            assert image(state, "untouched")["userRanges"] == []
            # What ImageJ shows, read apart from the receiver's report.
            assert gui_range(editor, "drift") == [0.25, 0.75]
            assert gui_range(editor, "hs", 1) == [5, 50]
            np.testing.assert_allclose(gui_range(editor, "hs", 2), [950, 1000])
            np.testing.assert_allclose(gui_range(editor, "untouched"), [19, 20])
        assert "ended" in editor.command("stop", timeout=30)
    finally:
        editor.close()
    assert "Exception" not in editor.log and "failed" not in editor.log, editor.log[-3000:]


# -- same-user authentication (issue 11, Fiji side) -----------------------------------------------


@pytest.fixture
def modern(monkeypatch):
    """Current Fiji's stack (JeroMQ 0.6: CURVE), senders with the user's credential."""
    require(STACKS["modern"])
    monkeypatch.delenv("POLYSTORE_AUTH", raising=False)
    return STACKS["modern"]


def test_jeromq_without_curve_refuses_unless_allowed(debian, tmp_path):
    """JeroMQ 0.3 cannot authenticate: the script refuses with upgrade instructions, or runs
    with a clear warning when the user allows unauthenticated senders on purpose."""
    refused = start_receiver(stack=debian, allow_unauthenticated=False, wait=False)
    assert refused.wait(120) != 0
    assert "jeromq-0.6.0.jar" in refused.log and "Fiji.app/jars/" in refused.log, refused.log
    assert "allow_unauthenticated=true" in refused.log
    allowed = start_receiver(tmp_path, stack=debian)  # allow_unauthenticated by default here
    try:
        assert "authentication is OFF" in allowed.log
    finally:
        assert allowed.stop() == 0


def test_credential_made_on_first_use_and_shared_with_python(modern, tmp_path, monkeypatch):
    """No credential yet: the script makes it (0700 directory, 0600 file, the format Python
    reads), and a Python sender with auth="user" streams to it."""
    from polystore.streaming.credential import load_credential

    path = tmp_path / "config" / "polystore" / "credential.json"
    monkeypatch.setenv("POLYSTORE_CREDENTIAL", str(path))
    receiver = start_receiver(tmp_path / "out", stack=modern, timeout=300)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert len(load_credential(path).curve_public) == 40
        # a generous handshake: the first CURVE handshake of a cold Groovy 4 JVM is slow
        with FijiStreamingBackend(receiver.endpoint, connect_timeout=30) as b:
            b.save(np.full((4, 4), 7, np.uint8), "cred.tif", stream="cred")
            assert image(report(b), "cred")["framesReceived"] == 1
        with RawClient(receiver.endpoint, curve=None) as stranger:  # no credential
            stranger.send({"v": 1, "type": "bye"})
            stranger.send(stranger.frame(), b"\0" * 6)
            with pytest.raises(TimeoutError):
                stranger.recv(timeout=1.5)
    finally:
        assert receiver.stop() == 0, receiver.log


@pytest.mark.parametrize("how", ["group_readable", "symlink"])
def test_unsafe_credential_is_refused(modern, tmp_path, monkeypatch, how):
    from polystore.streaming.credential import load_credential

    real = tmp_path / "real.json"
    load_credential(real)  # a valid credential...
    path = tmp_path / "credential.json"
    if how == "group_readable":
        path.write_bytes(real.read_bytes())
        path.chmod(0o640)  # ...that another account could read
    else:
        path.symlink_to(real)
    monkeypatch.setenv("POLYSTORE_CREDENTIAL", str(path))
    receiver = start_receiver(stack=modern, wait=False)
    assert receiver.wait(300) != 0
    expected = "chmod 600" if how == "group_readable" else "symbolic link"
    assert expected in receiver.log, receiver.log


# -- CI: a missing stack fails instead of skipping (issue 14 item 10) -----------------------------


def _run_in_pytest(test: str, ci: str | None, **env: str) -> tuple[int, str]:
    """Run one test of this module in a pytest of its own, with `env` changed and CI=`ci`
    (unset when None): its exit status and output."""
    import subprocess
    import sys

    env = {k: v for k, v in {**os.environ, **env}.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xvfb", "-rs",
         f"{Path(__file__).resolve()}::{test}"],
        env=env, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    return run.returncode, run.stdout + run.stderr


def _fails_in_ci_and_skips_elsewhere(test: str, ci: str | None, ci_failure: str,
                                     skipped: int, reason: str, **env: str) -> None:
    """`_run_in_pytest`, then: under CI it fails saying `ci_failure`; elsewhere `skipped`
    tests skip, giving `reason`."""
    status, output = _run_in_pytest(test, ci, **env)
    if ci:
        assert status != 0, output
        assert ci_failure in output, output
    else:
        assert status == 0, output
        assert f"{skipped} skipped" in output and reason in output, output


@pytest.mark.parametrize("ci", ["true", None])
def test_missing_stack_fails_in_ci_and_skips_elsewhere(tmp_path, ci):
    """With the jars of both stacks missing, the Fiji tests skip with the reason, except
    under CI=true, where they fail: a broken install step cannot pass with them gone."""
    _fails_in_ci_and_skips_elsewhere(
        "test_handshake_uses_shared_memory", ci, "CI=true and the Fiji debian stack cannot run",
        2, "no-jeromq.jar is missing", JEROMQ_JAR=str(tmp_path / "no-jeromq.jar"),
        POLYSTORE_VENDOR=str(tmp_path / "no-vendor"))  # fmt: skip


@pytest.mark.parametrize("ci", ["true", None])
def test_gui_tests_fail_in_ci_without_xvfb_run(modern, tmp_path, ci):
    """The GUI tests (Script Editor harness, re-runs, contrast set by hand) skipped whenever
    xvfb-run was missing, CI included, so a broken install step passed without them."""
    _fails_in_ci_and_skips_elsewhere(
        "test_rerun_in_one_session_continues_cleanly[modern]", ci,
        "CI=true and xvfb-run is not installed", 1, "xvfb-run is not installed",
        PATH=str(tmp_path))  # no xvfb-run on it (nor anything else)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def zmtp_flood(endpoint: str, parts: int, size: int) -> None:
    """Speak raw ZMTP 3.0 (NULL mechanism, as a DEALER) and send `parts` frames of `size`
    bytes, each flagged "more": a message that never ends. libzmq itself would keep an
    unfinished message on the sender's side; a raw socket does not."""
    import socket as sockets
    import struct

    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with sockets.create_connection((host, int(port)), timeout=5) as conn:
        greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
        conn.sendall(greeting + b"\0" * 32)
        ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        conn.sendall(b"\x04" + bytes([len(ready)]) + ready)
        frame = b"\x03" + struct.pack(">Q", size) + b"x" * size  # MORE | LONG
        try:
            for _ in range(parts):
                conn.sendall(frame)
        except OSError:
            pass  # refused: the receiver closed the connection
        time.sleep(3)


def test_a_stranger_cannot_make_fiji_buffer(fiji, stack):
    """Issue 11 item 5: 40 unfinished 8 MiB parts from an unauthenticated connection grew the
    receivers by 320 MiB (JeroMQ's I/O thread died of OutOfMemoryError in Fiji). With CURVE
    the connection never completes its handshake, so nothing of it is buffered."""
    if not stack.curve:
        pytest.skip("JeroMQ 0.3 has no authentication (the script warns; see docs/fiji.md)")
    before = _rss_mib(fiji.proc.pid)
    zmtp_flood(fiji.endpoint, parts=40, size=8 * 1024 * 1024)
    grown = _rss_mib(fiji.proc.pid) - before
    assert grown < 100, f"the receiver grew by {grown:.0f} MiB"
    with RawClient(fiji.endpoint) as raw:  # and it still serves its user
        assert raw.hello()["type"] == "welcome"


# -- the compile cache (viewers/fiji/src/bootstrap.groovy, docs/fiji.md "Start-up time") ---------

COMPILED = "polystore-fiji: compiled the receiver into"
LOADED = "polystore-fiji: loaded the receiver from the compile cache"
IN_MEMORY = "compiling the receiver in memory"


def cache_entries(cache: Path) -> list[Path]:
    """The compile cache's entries under XDG_CACHE_HOME=`cache`, sorted by name."""
    root = cache / "polystore" / "fiji"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name))


def run_once(stack: Stack, cache: Path, **kwargs) -> str:
    """Start the receiver with XDG_CACHE_HOME=`cache`, check that it acknowledges and counts a
    frame, stop it; its output."""
    receiver = start_receiver(stack=stack, cache=cache, timeout=300, **kwargs)
    try:
        with RawClient(receiver.endpoint) as raw:
            assert raw.hello()["type"] == "welcome"
            assert raw.request(raw.frame(), b"\0" * 6)["type"] == "ack"
            assert raw.report()["frames"] == 1
    finally:
        rc = receiver.stop()
    assert rc == 0, receiver.log[-3000:]
    return receiver.log


def test_compile_cache_first_run_compiles_later_runs_load(stack, tmp_path):
    """The first run compiles the receiver into the cache (folders 0700), the next one loads
    it from there, and both receive frames; stack traces name receiver_body.groovy."""
    cache = tmp_path / "cache"
    first = run_once(stack, cache)
    assert COMPILED in first and LOADED not in first, first
    [entry] = cache_entries(cache)
    assert f"{COMPILED} {entry} (first run of this version" in first
    for folder in (cache, cache / "polystore", cache / "polystore" / "fiji", entry):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert b"receiver_body.groovy" in (entry / "Images.class").read_bytes()  # SourceFile
    second = run_once(stack, cache)
    assert f"{LOADED} {entry}" in second and COMPILED not in second, second
    assert cache_entries(cache) == [entry]


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "another user's",
                                 "entry group-writable"])  # fmt: skip
def test_compile_cache_others_could_write_is_not_used(debian, tmp_path, how):
    """Loading classes another account could have written would run its code: a cache folder
    that is not this user's, or that group or others can write, is not used. The receiver is
    compiled in memory, says why, and works."""
    cache = tmp_path / "cache"
    polystore = cache / "polystore"
    polystore.mkdir(parents=True)
    reason = "can be written by other accounts"
    if how == "group-writable":
        polystore.chmod(0o770)
    elif how == "world-writable":
        polystore.chmod(0o777)
    elif how == "another user's":
        if os.geteuid() != 0:
            pytest.skip("only root can give a folder to another user here")
        shutil.chown(polystore, "nobody", "nogroup")
        polystore.chmod(0o700)
        reason = "belongs to another user"
    else:
        assert COMPILED in run_once(debian, cache)
        [entry] = cache_entries(cache)
        entry.chmod(0o770)
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    log = run_once(debian, cache)
    assert "not using the compile cache" in log and reason in log and IN_MEMORY in log, log
    assert COMPILED not in log and LOADED not in log, log
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("damage", ["main class removed", "class truncated", "no manifest"])
def test_damaged_cache_entry_is_compiled_again(debian, tmp_path, damage):
    """An entry that is not what was stored (a file removed or cut short) is replaced by a
    new compile, not loaded and not a crash; the run after that loads the new entry."""
    cache = tmp_path / "cache"
    assert COMPILED in run_once(debian, cache)
    [entry] = cache_entries(cache)
    if damage == "main class removed":
        (entry / "receiver_body.class").unlink()
    elif damage == "class truncated":
        images = entry / "Images.class"
        images.write_bytes(images.read_bytes()[:100])
    else:
        (entry / "manifest.txt").unlink()
    log = run_once(debian, cache)
    assert f"the compile cache entry {entry} is damaged" in log and COMPILED in log, log
    assert cache_entries(cache) == [entry] and (entry / "manifest.txt").is_file()
    assert LOADED in run_once(debian, cache)


def test_changed_body_gets_a_new_key_and_old_entries_go(debian, tmp_path):
    """Another body is another entry (never the classes of an older receiver), and the cache
    keeps the three most recently used entries."""
    generator = load_generator()
    body = generator.expected_body()
    cache = tmp_path / "cache"
    keys = []
    for n in range(4):
        copy = tmp_path / f"fiji{n}"
        shutil.copytree(FIJI_DIR, copy, ignore=shutil.ignore_patterns("src"))
        if n:  # the same receiver with one more line
            script = generator.expected_script(body + f"// changed {n}\n")
            (copy / "polystore_receiver.groovy").write_text(script, encoding="utf-8")
        log = run_once(debian, cache, launcher=copy / "run_headless.sh")
        match = re.search(re.escape(COMPILED) + r" \S*/([0-9a-f]{64}) ", log)
        assert match, log
        keys.append(match[1])
    assert len(set(keys)) == 4
    assert [e.name for e in cache_entries(cache)] == sorted(keys[1:])  # the oldest went
