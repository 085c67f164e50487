"""The frame header a sender encodes once per stream, path, shape and dtype
(`header_template.py`): byte for byte what `protocol.encode` gives, checked as before, and
read right by a real receiver when one path changes shape, dtype or display hints."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from polystore.streaming import NapariStreamingBackend, Receiver, UnstreamableDataError
from polystore.streaming import protocol as p
from polystore.streaming.stream_meta import StreamMeta, display_hints

METAS = {
    "plain": StreamMeta.build("s"),
    "names and hints": StreamMeta.build(
        'odd "stream" \\ é', ["t", "z"],
        display_hints(colormap="red", contrast_limits=[0, 9.5], opacity=0.5)),
    "labels stacked": StreamMeta.build("lab", None, display_hints(labels=True, mode="stack")),
}
PER_FRAME = [  # seq, sent_ns, segment, axes, dropped
    (0, 0, None, {}, 0),
    (1, 1_796_232_105_007_820_880, "napari_stream_12_ab_3", {}, 0),
    (2**40, 5, None, {"t": 3, "z": 1_000_000}, 7),
    (9, 10**19, "s_1", {"t": 0}, 0),
]


@pytest.mark.parametrize("meta", METAS.values(), ids=METAS.keys())
@pytest.mark.parametrize(("path", "shape", "dtype"), [
    ("well_A01/t003.tif", (512, 512), "uint16"),
    ('a "quoted" \\ päth\n.tif', (3,), "float64"),
    ("x.npy", (2, 3, 4, 5), "int8"),
])
def test_a_template_encodes_the_bytes_protocol_encode_gives(meta, path, shape, dtype):
    dtype = np.dtype(dtype)
    template = meta.header_template(path, shape, dtype, p.MAX_FRAME_BYTES)
    nbytes = dtype.itemsize * int(np.prod(shape))
    assert template.nbytes == nbytes
    for seq, sent_ns, segment, axes, dropped in PER_FRAME:
        expected = p.encode(p.Frame(
            v=p.VERSION, seq=seq, stream=meta.stream, path=path, shape=list(shape),
            dtype=dtype.name, nbytes=nbytes, sent_ns=sent_ns, segment=segment, axes=axes,
            axis_names=meta.axis_names, display=meta.display, dropped=dropped))
        assert template.encode(seq, sent_ns, segment, axes, dropped) == expected


def test_a_template_is_checked_against_each_receivers_limit():
    meta = StreamMeta.build("s")
    meta.header_template("s/t.tif", (16, 16), np.dtype("uint16"), p.MAX_FRAME_BYTES)
    with pytest.raises(UnstreamableDataError, match="exceeds the receiver's limit of 100"):
        meta.header_template("s/t.tif", (16, 16), np.dtype("uint16"), 100)
    with pytest.raises(UnstreamableDataError, match="dimension above"):
        meta.header_template("s/t.tif", (p.MAX_DIM + 1,), np.dtype("uint8"), p.MAX_FRAME_BYTES)
    rgb = StreamMeta.build("c", None, display_hints(rgb=True))
    with pytest.raises(UnstreamableDataError, match="rgb=true needs a uint8 frame"):
        rgb.header_template("c.tif", (4, 4, 3), np.dtype("uint16"), p.MAX_FRAME_BYTES)


@pytest.mark.parametrize("transport", ["shm", "inline"])
def test_one_path_saved_with_other_shapes_dtypes_and_hints_arrives_as_each_was_saved(transport):
    """The sender remembers each path's header and its option-less saves: a later save with
    another shape, dtype, axes or hints at that path must not arrive with an earlier one's."""
    got: list = []
    done = threading.Event()
    calls = [
        ({}, np.arange(12, dtype=np.uint16).reshape(3, 4)),
        ({"colormap": "red"}, np.arange(12, dtype=np.uint16).reshape(3, 4)),
        ({}, np.arange(20, dtype=np.float32).reshape(4, 5)),
        ({"axes": {"t": 4}}, np.arange(12, dtype=np.uint16).reshape(3, 4)),
        ({}, np.arange(12, dtype=np.uint16).reshape(3, 4)),
        ({"labels": True}, np.arange(6, dtype=np.uint8).reshape(2, 3)),
        ({}, np.arange(6, dtype=np.uint8).reshape(2, 3)),
    ]

    def on_frame(frame) -> None:
        got.append(frame)
        if len(got) == len(calls):
            done.set()

    with Receiver("tcp://127.0.0.1:0", shm_prefix=NapariStreamingBackend.SHM_PREFIX,
                  viewer="napari", on_frame=on_frame) as receiver, \
            NapariStreamingBackend(receiver.endpoint, transport=transport) as backend:
        for options, array in calls:
            backend.save(array, "run/t.tif", **options)
        backend.flush()
        assert done.wait(10)
    assert [f.header.seq for f in got] == sorted(f.header.seq for f in got)
    for frame, (options, array) in zip(got, calls, strict=True):
        np.testing.assert_array_equal(frame.array, array)
        assert frame.header.dtype == array.dtype.name
        assert frame.header.axes == options.get("axes", {})
        assert frame.header.display.colormap == options.get("colormap")
        assert frame.header.display.kind == ("labels" if options.get("labels") else "image")
        assert (frame.header.segment is None) == (transport == "inline")
