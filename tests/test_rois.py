"""ImageJ ROI files (roifile) on the disk backend, checked against the real ImageJ (Debian's
ij.jar, run with -batch on the Xvfb display pytest-xvfb provides), and the same ROI objects
streamed to a real receiver."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from tests import needs

needs.module("roifile")

from polystore import DiskBackend, FileManager  # noqa: E402
from polystore.rois import PositionedRoi, group_by_position, labels_to_rois  # noqa: E402
from polystore.streaming import (  # noqa: E402
    NapariStreamingBackend,
    Receiver,
    Roi,
)

IJ_JAR = Path(os.environ.get("IJ_JAR", "/usr/share/java/ij.jar"))

ROIS = [
    Roi(kind="polygon", coords=[[10, 20], [30, 20], [30, 45.5]], label="cell 1"),
    Roi(kind="rectangle", coords=[[5, 6], [15, 26]], label="box"),
    Roi(kind="ellipse", coords=[[40, 40], [60, 70]], label="oval"),
    Roi(kind="line", coords=[[1.5, 2], [50, 60]], label="track"),
    Roi(kind="point", coords=[[7, 9]], label="spot"),
]
POSITIONS = [{"c": 1, "z": 2, "t": 3}, {"t": 1}, {}, {"z": 3}, {"c": 0, "z": 0, "t": 4}]

READ_MACRO = """
newImage("img", "16-bit black", 128, 128, 2, 4, 5);
roiManager("Open", getArgument());
for (i = 0; i < roiManager("count"); i++) {
  roiManager("select", i);
  Roi.getPosition(ch, sl, fr);
  getSelectionCoordinates(xs, ys);
  s = "";
  for (k = 0; k < xs.length; k++) s = s + xs[k] + "," + ys[k] + ";";
  print("ROI|" + Roi.getName + "|" + selectionType() + "|" + ch + "," + sl + "," + fr + "|" + s);
}
"""

WRITE_MACRO = """
newImage("img", "16-bit black", 128, 128, 2, 4, 5);
makePolygon(10, 20, 40, 20, 40, 50, 12, 44);
Roi.setName("nucleus A");
Roi.setPosition(2, 3, 4);
roiManager("Add");
makeRectangle(5, 6, 20, 10);
Roi.setName("box");
Roi.setPosition(1, 1, 2);
roiManager("Add");
makeOval(30, 40, 20, 10);
Roi.setName("oval");
roiManager("Add");
makeLine(3, 4, 50, 60);
Roi.setName("line");
roiManager("Add");
makePoint(7, 9);
Roi.setName("spot");
roiManager("Add");
roiManager("Save", getArgument());
"""


def run_imagej(tmp_path: Path, macro: str, argument: str) -> list[str]:
    """Run an ImageJ macro with -batch; its print() lines come back on stdout."""
    if shutil.which("java") is None or not IJ_JAR.is_file():
        needs.missing("ImageJ is not installed (scripts/install.sh installs libij-java)")
    if not os.environ.get("DISPLAY"):
        needs.missing("ImageJ's ROI Manager needs a display (pytest-xvfb provides one)")
    script = tmp_path / "macro.ijm"
    script.write_text(macro)
    done = subprocess.run(["java", "-jar", str(IJ_JAR), "-batch", str(script), argument],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_rois_written_by_polystore_open_in_imagej(tmp_path):
    path = tmp_path / "cells.roi.zip"
    DiskBackend().save([PositionedRoi(r, a) for r, a in zip(ROIS, POSITIONS)], path)
    lines = [line.split("|") for line in run_imagej(tmp_path, READ_MACRO, str(path))
             if line.startswith("ROI|")]
    names = [line[1] for line in lines]
    assert names == ["cell 1", "box", "oval", "track", "spot"]
    types = [int(line[2]) for line in lines]
    assert types == [2, 0, 1, 5, 10]  # polygon, rectangle, oval, straight line, point
    # ImageJ positions are 1-based channel, slice, frame; 0 = every plane along that axis
    positions = [tuple(map(int, line[3].split(","))) for line in lines]
    assert positions == [(2, 3, 4), (0, 0, 2), (0, 0, 0), (0, 4, 0), (1, 1, 5)]

    def xy(line):
        return [tuple(map(float, p.split(","))) for p in line[4].split(";") if p]

    assert xy(lines[0]) == [(20, 10), (20, 30), (45.5, 30)]  # x, y = column, row
    assert xy(lines[1]) == [(6, 5), (26, 5), (26, 15), (6, 15)]
    oval = np.array(xy(lines[2]))
    assert oval[:, 0].min() == pytest.approx(40, abs=0.01)
    assert oval[:, 0].max() == pytest.approx(70, abs=0.01)
    assert oval[:, 1].min() == pytest.approx(40, abs=0.01)
    assert oval[:, 1].max() == pytest.approx(60, abs=0.01)
    assert xy(lines[3]) == [(2, 1.5), (60, 50)]
    assert xy(lines[4]) == [(9, 7)]


def test_rois_written_by_imagej_load_back(tmp_path):
    path = tmp_path / "from_imagej.roi.zip"
    run_imagej(tmp_path, WRITE_MACRO, str(path))
    fm = FileManager({"disk": DiskBackend()})
    placed = fm.load(path, backend="disk", positions=True)
    assert [p.roi.label for p in placed] == ["nucleus A", "box", "oval", "line", "spot"]
    assert [p.roi.kind for p in placed] == ["polygon", "rectangle", "ellipse", "line", "point"]
    assert placed[0].roi.coords == [[20, 10], [20, 40], [50, 40], [44, 12]]  # (row, column)
    assert placed[1].roi.coords == [[6, 5], [16, 25]]
    assert placed[2].roi.coords == [[40, 30], [50, 50]]
    assert placed[3].roi.coords == [[4, 3], [60, 50]]
    assert placed[4].roi.coords == [[9, 7]]
    assert placed[0].axes == {"c": 1, "z": 2, "t": 3}
    assert placed[1].axes == {"c": 0, "z": 0, "t": 1}
    assert placed[2].axes == {}
    # without positions=True: the plain Roi objects streaming sends
    assert fm.load(path, backend="disk") == [p.roi for p in placed]


def test_disk_round_trip_of_roi_files(tmp_path):
    disk = DiskBackend()
    disk.save(ROIS, tmp_path / "a.roi.zip", axes={"t": 7})
    assert disk.load(tmp_path / "a.roi.zip") == ROIS
    assert {tuple(p.axes.items()) for p in disk.load(tmp_path / "a.roi.zip", positions=True)} \
        == {(("t", 7),)}
    # dicts work like on the streaming backends; one ROI per .roi file
    disk.save({"kind": "polygon", "coords": [[0, 0], [0, 5], [5, 5]], "label": "x"},
              tmp_path / "one.roi")
    assert disk.load(tmp_path / "one.roi") == [Roi("polygon", [[0, 0], [0, 5], [5, 5]], "x")]
    # same labels twice: both kept (zip entry names are made unique)
    disk.save([ROIS[0], ROIS[0]], tmp_path / "twice.roi.zip")
    assert len(disk.load(tmp_path / "twice.roi.zip")) == 2
    assert disk.list_files(tmp_path, extensions=[".roi.zip"]) == [
        str(tmp_path / n) for n in ("a.roi.zip", "twice.roi.zip")]


def test_bad_roi_input_is_refused_and_writes_nothing(tmp_path):
    disk = DiskBackend()
    with pytest.raises(ValueError, match="a .roi file holds exactly one ROI, got 2.*roi.zip"):
        disk.save(ROIS[:2], tmp_path / "two.roi")
    with pytest.raises(ValueError, match="c, z and t only.*'q'"):
        disk.save(ROIS, tmp_path / "q.roi.zip", axes={"q": 1})
    with pytest.raises(ValueError, match="whole number"):
        disk.save(ROIS, tmp_path / "neg.roi.zip", axes={"z": -1})
    with pytest.raises(ValueError, match="ROIs must be polystore Roi objects"):
        disk.save([{"kind": "blob", "coords": [[0, 0]]}], tmp_path / "blob.roi.zip")
    with pytest.raises(ValueError, match="a polygon ROI needs >= 3 point"):
        disk.save([{"kind": "polygon", "coords": [[0, 0], [1, 1]]}], tmp_path / "p.roi.zip")
    with pytest.raises(ValueError, match="a polygon ROI needs >= 3 point"):  # placed too
        disk.save([PositionedRoi(Roi("polygon", [[0, 0], [1, 1]]), {"z": 1})],
                  tmp_path / "pp.roi.zip")
    # ImageJ's bounds are 16-bit: -40000 was written as 25536 and 70000 as 4464; NaN went in
    for coords, says in (([[-40000, 0], [5, 5]], "reaches -40000..5"),
                         ([[0, 0], [70000, 5]], "reaches 0..70000"),
                         ([[0, 0], [float("nan"), 5]], "has a coordinate that is NaN")):
        with pytest.raises(ValueError, match=rf"wide.roi.zip: ROI 1: a rectangle ROI 'w' {says}"):
            disk.save([ROIS[0], Roi("rectangle", coords, "w")], tmp_path / "wide.roi.zip")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "junk.roi").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not an ImageJ ROI"):
        disk.load(tmp_path / "junk.roi")
    (tmp_path / "junk.roi.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(ValueError, match="not a readable ROI zip"):
        disk.load(tmp_path / "junk.roi.zip")


def test_labels_become_one_polygon_per_label(tmp_path):
    from skimage.draw import disk as draw_disk
    from skimage.draw import polygon2mask

    labels = np.zeros((80, 100), dtype=np.uint16)
    labels[draw_disk((25, 30), 12)] = 3
    labels[50:70, 60:90] = 9
    rois = labels_to_rois(labels, prefix="cell ")
    assert [r.label for r in rois] == ["cell 3", "cell 9"]
    assert all(r.kind == "polygon" for r in rois)
    for roi, value in zip(rois, (3, 9)):
        drawn = polygon2mask(labels.shape, np.asarray(roi.coords))
        truth = labels == value
        overlap = (drawn & truth).sum() / (drawn | truth).sum()
        assert overlap > 0.9, (roi.label, overlap)
    # a (z, y, x) labels stack gives positioned ROIs, which ImageJ files keep
    stack = np.stack([labels, np.where(labels == 9, 9, 0)])
    placed = labels_to_rois(stack)
    assert [(p.roi.label, p.axes) for p in placed] == [
        ("3", {"z": 0}), ("9", {"z": 0}), ("9", {"z": 1})]
    DiskBackend().save(placed, tmp_path / "seg.roi.zip")
    assert DiskBackend().load(tmp_path / "seg.roi.zip", positions=True) == placed
    with pytest.raises(ValueError, match="integer array"):
        labels_to_rois(np.zeros((4, 4), float))


def test_rois_loaded_from_disk_stream_unchanged(tmp_path):
    """One ROI model: what the disk backend loads is what the streaming backend sends."""
    disk = DiskBackend()
    disk.save([PositionedRoi(r, a) for r, a in zip(ROIS, POSITIONS)], tmp_path / "c.roi.zip")
    placed = disk.load(tmp_path / "c.roi.zip", positions=True)
    got, arrived = [], threading.Event()

    def on_rois(item):
        got.append((dict(item.header.axes), list(item.header.rois)))
        if len(got) == len(group_by_position(placed)):
            arrived.set()

    receiver = Receiver("tcp://127.0.0.1:0", shm_prefix="napari_", on_rois=on_rois)
    receiver.start()
    sender = NapariStreamingBackend(receiver.endpoint)
    try:
        for position, rois in group_by_position(placed).items():
            sender.save(rois, "well/t000.roi.zip", axes=dict(position))
        sender.flush()
        assert arrived.wait(20)
    finally:
        sender.close()
        receiver.stop()
    received = [PositionedRoi(roi, axes) for axes, rois in got for roi in rois]
    assert sorted(received, key=lambda p: p.roi.label) == sorted(
        [PositionedRoi(r, a) for r, a in zip(ROIS, POSITIONS)], key=lambda p: p.roi.label)


def imagej_roi(roitype, xy, name, **position):
    """An ImageJ ROI of `roitype` through (x, y) vertices, as ImageJ's ROI Manager saves it."""
    import roifile

    roi = roifile.ImagejRoi.frompoints(np.asarray(xy), name=name, **position)
    roi.roitype = getattr(roifile.ROI_TYPE, roitype)
    roi.options = roifile.ROI_OPTIONS(0)
    if roi.subpixel_coordinates is not None:
        roi.options |= roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
    roi.version = 228
    return roi


#: ImageJ's open paths, multi-point and freehand outlines: (type, (x, y) vertices, name)
IMAGEJ_PATHS = [
    ("POLYLINE", [[1, 1], [10, 2], [20, 15], [30, 4]], "segmented"),
    ("FREELINE", [[1.5, 1], [2, 2.25], [3, 4], [5, 5]], "freehand line"),
    ("ANGLE", [[10, 10], [20, 20], [30, 10]], "angle"),
    ("POINT", [[5, 6], [10, 12], [20, 3]], "multi-point"),
    ("FREEHAND", [[1, 1], [10, 2], [12, 15], [3, 9]], "freehand"),
    ("TRACED", [[1, 1], [10, 1], [10, 10], [1, 10]], "traced"),
]


def test_imagej_open_paths_and_multi_points_load_and_save_back_unchanged(tmp_path):
    """Segmented, freehand and angle lines loaded as closed polygons (saved back, ImageJ
    showed an open path as an area), and a multi-point ROI loaded but could not be saved."""
    import roifile

    path = tmp_path / "imagej.roi.zip"
    roifile.roiwrite(path, [imagej_roi(t, xy, name, t=2) for t, xy, name in IMAGEJ_PATHS])
    fm = FileManager({"disk": DiskBackend()})
    rois = fm.load(path, backend="disk")
    assert [r.kind for r in rois] == ["line", "line", "line", "point", "polygon", "polygon"]
    assert [r.coords for r in rois] == [
        [[y, x] for x, y in xy] for _, xy, _ in IMAGEJ_PATHS]  # (row, column), all vertices
    fm.save(rois, tmp_path / "again.roi.zip", backend="disk", axes={"t": 2})
    fm.save(fm.load(path, backend="disk", positions=True), tmp_path / "placed.roi.zip",
            backend="disk")
    for saved in ("again.roi.zip", "placed.roi.zip"):
        assert fm.load(tmp_path / saved, backend="disk", positions=True) == [
            PositionedRoi(r, {"t": 2}) for r in rois]
        back = roifile.roiread(tmp_path / saved)
        # open paths stay open (ImageJ's segmented line), points stay one multi-point ROI
        assert [r.roitype.name for r in back] == [
            "POLYLINE", "POLYLINE", "POLYLINE", "POINT", "POLYGON", "POLYGON"]
        for roi, (_, xy, name) in zip(back, IMAGEJ_PATHS):
            assert roi.name == name
            assert roi.coordinates().tolist() == xy
    # a path of two vertices is ImageJ's straight line; a single vertex a point
    roifile.roiwrite(tmp_path / "short.roi.zip", [
        imagej_roi("POLYLINE", [[3, 4], [50, 60]], "two"),
        imagej_roi("POLYGON", [[7, 9]], "one")])
    assert fm.load(tmp_path / "short.roi.zip", backend="disk") == [
        Roi("line", [[4, 3], [60, 50]], "two"), Roi("point", [[9, 7]], "one")]


def test_long_open_paths_and_multi_points_from_files_save_back(tmp_path):
    """A file's freehand line or multi-point of more than 100,000 points (a stream's most per
    ROI) loaded but could not be saved back once streams took open paths: save() checked
    files against the stream's counts and said "a line ROI needs >= 2 point(s), got 100001".
    Files hold as many as ImageJ wrote, as polygons do."""
    import roifile

    n = 100_001
    xy = np.stack([np.arange(n) % 30_000, np.arange(n) // 30_000], axis=1)
    path = tmp_path / "long.roi.zip"
    roifile.roiwrite(path, [imagej_roi(t, xy, t.lower()) for t in ("FREELINE", "POINT")])
    fm = FileManager({"disk": DiskBackend()})
    rois = fm.load(path, backend="disk")
    assert [(r.kind, len(r.coords)) for r in rois] == [("line", n), ("point", n)]
    fm.save(rois, tmp_path / "again.roi.zip", backend="disk")
    back = roifile.roiread(tmp_path / "again.roi.zip")
    assert [r.roitype.name for r in back] == ["POLYLINE", "POINT"]
    assert all(r.coordinates().tolist() == xy.tolist() for r in back)


def test_open_paths_saved_by_polystore_open_in_imagej_as_lines(tmp_path):
    path = tmp_path / "paths.roi.zip"
    DiskBackend().save([Roi("line", [[1, 1], [2, 10], [15, 20.5]], "path"),
                        Roi("point", [[6, 5], [12, 10]], "points")], path)
    lines = [line.split("|") for line in run_imagej(tmp_path, READ_MACRO, str(path))
             if line.startswith("ROI|")]
    assert [(line[1], int(line[2])) for line in lines] == [("path", 6), ("points", 10)]
    assert lines[0][4] == "1,1;10,2;20.5,15;"  # ImageJ's segmented line, x, y
    assert lines[1][4] == "5,6;10,12;"


def test_a_multi_point_across_stack_slices_is_refused_and_one_on_a_slice_keeps_it(tmp_path):
    """ImageJ's multi-point tool used across a stack keeps each point's slice; such a ROI
    loaded with no position (shown on every plane) and was saved back without the slices."""
    import roifile

    def multi_point(slices):
        roi = roifile.ImagejRoi.frompoints(np.array([[5, 6], [10, 12], [20, 3]]), name="mp")
        roi.roitype = roifile.ROI_TYPE.POINT
        roi.counters = np.zeros(3, np.uint8)
        roi.counter_positions = np.array(slices, np.uint32)
        return roi

    spread, one = tmp_path / "spread.roi.zip", tmp_path / "one.roi.zip"
    roifile.roiwrite(spread, [multi_point([2, 4, 5])])
    roifile.roiwrite(one, [multi_point([3, 3, 3])])
    before = spread.read_bytes()
    with pytest.raises(ValueError, match=r"ROI 0: ImageJ ROI 'mp' is a multi-point whose points "
                                         r"lie on 3 different stack slices.*of their own"):
        DiskBackend().load(spread)
    assert spread.read_bytes() == before
    (placed,) = DiskBackend().load(one, positions=True)
    assert placed.axes == {"z": 2} and len(placed.roi.coords) == 3  # slice 3, 1-based


def test_composite_text_and_image_rois_are_refused_on_load_and_the_file_kept(tmp_path):
    """A composite (shape) ROI loaded as the filled rectangle of its bounds: its hole and
    outlines were lost, and saving the set back wrote that rectangle in its place."""
    import roifile

    outline = [0, 10, 10, 1, 40, 10, 1, 40, 40, 1, 10, 40, 4,  # MOVETO, LINETOs, CLOSE
               0, 20, 20, 1, 30, 20, 1, 30, 30, 1, 20, 30, 4]  # the hole
    donut = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, name="donut", version=228,
                              left=10, top=10, right=40, bottom=40,
                              shape_roi_size=len(outline),
                              multi_coordinates=np.asarray(outline, np.float32))
    box = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, name="box", version=228,
                            left=1, top=2, right=5, bottom=6)
    text = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, name="note", version=228,
                             subtype=roifile.ROI_SUBTYPE.TEXT, text="scale bar",
                             left=1, top=2, right=50, bottom=12)
    png = b"\x89PNG\r\n\x1a\n"  # an image overlay keeps its picture's bytes
    picture = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, name="picture", version=228,
                                subtype=roifile.ROI_SUBTYPE.IMAGE, image_data=png,
                                image_size=len(png), left=0, top=0, right=8, bottom=8)
    fm = FileManager({"disk": DiskBackend()})
    for roi, says in ((donut, r"ROI 1: ImageJ ROI 'donut' is a composite \(shape\) ROI.*"
                               r"bounding box.*More >> Split"),
                      (text, r"ROI 1: ImageJ ROI 'note' is a text ROI.*leave it out"),
                      (picture, r"ROI 1: ImageJ ROI 'picture' is an image ROI.*leave it out")):
        path = tmp_path / f"{roi.name}.roi.zip"
        roifile.roiwrite(path, [box, roi])
        written = path.read_bytes()
        with pytest.raises(ValueError, match=rf"{roi.name}.roi.zip: {says}"):
            fm.load(path, backend="disk")
        assert path.read_bytes() == written
        assert [r.name for r in roifile.roiread(path)] == ["box", roi.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "donut.roi.zip", "note.roi.zip", "picture.roi.zip"]


def test_open_paths_and_multi_points_from_files_stream_whole(tmp_path):
    """A line of more than two points (an open path) and a point ROI of several points (a
    multi-point) are what ImageJ files hold; the first version refused them at save(), so a
    file's ROI set could not be streamed as it was."""
    import roifile

    path = tmp_path / "paths.roi.zip"
    roifile.roiwrite(path, [imagej_roi(t, xy, name) for t, xy, name in IMAGEJ_PATHS[:4]])
    loaded = DiskBackend().load(path)
    assert [(r.kind, len(r.coords)) for r in loaded] == [
        ("line", 4), ("line", 4), ("line", 3), ("point", 3)]
    got, arrived = [], threading.Event()

    def on_rois(item):
        got.append(list(item.header.rois))
        arrived.set()

    receiver = Receiver("tcp://127.0.0.1:0", shm_prefix="napari_", on_rois=on_rois)
    receiver.start()
    sender = NapariStreamingBackend(receiver.endpoint)
    try:
        sender.save(loaded, "well/t000.roi.zip")
        sender.flush()
        assert arrived.wait(20)
    finally:
        sender.close()
        receiver.stop()
    assert got == [loaded]
