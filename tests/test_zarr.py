"""The zarr backend (zarr-python 3) and OME-Zarr writing: real stores on disk, real worker
processes, an independent OME-Zarr reader (ome-zarr-py) and napari's OME-Zarr plugin."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import needs

zarr = needs.module("zarr")

from polystore import BackendRegistry, FileManager  # noqa: E402
from polystore.zarr import ZarrBackend  # noqa: E402


@pytest.fixture
def fm() -> FileManager:
    return FileManager(BackendRegistry(entry_points=False))


def series(n: int = 4, shape: tuple[int, ...] = (32, 48), dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 4000, size=(n, *shape)).astype(dtype)


# -- the backend ------------------------------------------------------------------------------


def test_import_polystore_does_not_import_zarr():
    code = "import sys, polystore; print('zarr' in sys.modules, 'ome_zarr_models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_round_trip_through_filemanager(fm, tmp_path):
    data = series(3, (2, 40, 50))
    path = tmp_path / "plate.zarr" / "A" / "1" / "0"
    fm.save(data, path, backend="zarr")
    loaded = fm.load(path, backend="zarr")
    assert isinstance(loaded, np.ndarray)
    np.testing.assert_array_equal(loaded, data)
    assert loaded.dtype == data.dtype
    # an ordinary zarr v3 array any zarr reader opens
    plain = zarr.open_array(str(tmp_path / "plate.zarr"), path="A/1/0", mode="r")
    assert plain.shape == (3, 2, 40, 50)
    # saving again replaces the array
    fm.save(data[:1], path, backend="zarr")
    assert fm.load(path, backend="zarr").shape == (1, 2, 40, 50)


def test_default_chunks_are_planes_and_compression_is_configurable(fm, tmp_path):
    data = np.zeros((4, 256, 256), dtype="uint16")
    data[:, 100:120, 100:120] = 1000
    fm.save(data, tmp_path / "a.zarr" / "zstd", backend="zarr")
    fm.save(data, tmp_path / "a.zarr" / "raw", backend="zarr", compression="none")
    compressed = fm.load(tmp_path / "a.zarr" / "zstd", backend="zarr", lazy=True)
    raw = fm.load(tmp_path / "a.zarr" / "raw", backend="zarr", lazy=True)
    assert compressed.chunks == (1, 256, 256)
    assert compressed.nbytes_stored() < data.nbytes / 20
    assert raw.nbytes_stored() >= data.nbytes
    np.testing.assert_array_equal(compressed[...], raw[...])
    with pytest.raises(ValueError, match="unknown compression 'gzip9'.*zstd, lz4, none"):
        fm.save(data, tmp_path / "a.zarr" / "bad", backend="zarr", compression="gzip9")
    with pytest.raises(ValueError, match="unknown compression"):
        ZarrBackend(compression="brotli")


def test_saving_time_points_grows_the_series(fm, tmp_path):
    frames = series(5)
    root = tmp_path / "live.zarr"
    for t in (0, 1, 2):
        fm.save(frames[t], root / "cells" / f"t{t:03d}", backend="zarr")
    assert fm.load(root / "cells", backend="zarr").shape == (3, 32, 48)
    fm.save(frames[4], root / "cells" / "t004", backend="zarr")  # a gap is filled with zeros
    stored = fm.load(root / "cells", backend="zarr")
    assert stored.shape == (5, 32, 48)
    np.testing.assert_array_equal(stored[[0, 1, 2, 4]], frames[[0, 1, 2, 4]])
    assert not stored[3].any()
    np.testing.assert_array_equal(fm.load(root / "cells" / "t002", backend="zarr"), frames[2])
    assert fm.exists(root / "cells" / "t004", backend="zarr")
    assert not fm.exists(root / "cells" / "t005", backend="zarr")
    with pytest.raises(FileNotFoundError, match="time point 9 is not stored.*t0..t4"):
        fm.load(root / "cells" / "t009", backend="zarr")
    # the frame axes are named like the viewers name them
    assert fm.load(root / "cells", backend="zarr", lazy=True).metadata.dimension_names == (
        "t", "y", "x")


def test_a_frame_that_does_not_fit_the_series_writes_nothing(fm, tmp_path):
    root = tmp_path / "live.zarr"
    fm.save(series(1)[0], root / "s" / "t000", backend="zarr")
    with pytest.raises(ValueError, match=r"frame \(10, 10\) uint16 does not fit .* \(32, 48\)"):
        fm.save(np.zeros((10, 10), "uint16"), root / "s" / "t001", backend="zarr")
    with pytest.raises(ValueError, match="float32 does not fit"):
        fm.save(np.zeros((32, 48), "float32"), root / "s" / "t001", backend="zarr")
    assert fm.load(root / "s", backend="zarr").shape == (1, 32, 48)


def test_lazy_load_reads_only_the_chunks_indexed(fm, tmp_path):
    frames = series(4)
    root = tmp_path / "lazy.zarr"
    fm.save(frames, root / "s", backend="zarr")
    # damage the chunk of the last plane: a full read fails, a lazy read of plane 0 does not
    chunk = root / "s" / "c" / "3" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc frame")
    lazy = fm.load(root / "s", backend="zarr", lazy=True)
    assert isinstance(lazy, zarr.Array)
    np.testing.assert_array_equal(lazy[0], frames[0])
    lazy_dask = fm.load(root / "s", backend="zarr", lazy="dask")
    np.testing.assert_array_equal(lazy_dask[1].compute(), frames[1])
    with pytest.raises(Exception):  # noqa: B017 - the damaged chunk is read only here
        fm.load(root / "s", backend="zarr")
    one = fm.load(root / "s" / "t002", backend="zarr", lazy=True)
    np.testing.assert_array_equal(np.asarray(one), frames[2])


def test_navigation_over_groups_and_arrays(fm, tmp_path):
    root = tmp_path / "plate.zarr"
    for well in ("A/1", "A/2", "B/1"):
        fm.save(series(1)[0], f"{root}/{well}/0", backend="zarr")
    fm.ensure_directory(f"{root}/empty", backend="zarr")
    assert fm.list_dir(root, backend="zarr") == ["A", "B", "empty"]
    assert fm.list_files(root, backend="zarr") == []
    assert fm.list_files(root, backend="zarr", recursive=True) == [
        f"{root}/A/1/0", f"{root}/A/2/0", f"{root}/B/1/0"]
    assert fm.list_files(f"{root}/A/1", backend="zarr") == [f"{root}/A/1/0"]
    assert fm.is_dir(f"{root}/A", backend="zarr") and not fm.is_file(f"{root}/A", backend="zarr")
    assert fm.is_file(f"{root}/A/1/0", backend="zarr")
    assert fm.exists(root, backend="zarr") and not fm.exists(f"{root}/C", backend="zarr")
    with pytest.raises(NotADirectoryError, match="is a zarr array"):
        fm.list_dir(f"{root}/A/1/0", backend="zarr")
    with pytest.raises(IsADirectoryError, match="is a zarr group, not an array"):
        fm.load(f"{root}/A", backend="zarr")
    with pytest.raises(OSError, match="not empty.*recursive=True"):
        fm.delete(f"{root}/A", backend="zarr")
    fm.delete(f"{root}/A/1/0", backend="zarr")
    assert not fm.exists(f"{root}/A/1/0", backend="zarr")
    assert fm.exists(f"{root}/A/2/0", backend="zarr")
    fm.delete(f"{root}/A", backend="zarr", recursive=True)
    fm.delete(f"{root}/empty", backend="zarr")
    assert fm.list_dir(root, backend="zarr") == ["B"]
    with pytest.raises(FileNotFoundError, match="plate.zarr/A"):
        fm.delete(f"{root}/A", backend="zarr")
    with pytest.raises(FileNotFoundError, match="nothing at .*plate.zarr/Z"):
        fm.load(f"{root}/Z", backend="zarr")


def test_bad_paths_explain_themselves(fm, tmp_path):
    with pytest.raises(ValueError, match="names no store.*'.zarr'.*plate.zarr/A/1/0"):
        fm.save(np.zeros((2, 2)), tmp_path / "plain" / "x", backend="zarr")
    fm.ensure_directory(tmp_path / "g.zarr" / "group", backend="zarr")
    with pytest.raises(IsADirectoryError, match="is a zarr group"):
        fm.save(np.zeros((2, 2)), tmp_path / "g.zarr" / "group", backend="zarr")
    with pytest.raises(IsADirectoryError, match="inside the store"):
        fm.save(np.zeros((2, 2)), tmp_path / "g.zarr", backend="zarr")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['colour'\\]"):
        fm.save(np.zeros((2, 2)), tmp_path / "g.zarr" / "a", backend="zarr", colour="red")
    # options zarr refuses are refused before the array already there is touched
    fm.save(np.ones((4, 4)), tmp_path / "g.zarr" / "keep", backend="zarr")
    with pytest.raises(ValueError, match="nothing was written"):
        fm.save(np.zeros((4, 4)), tmp_path / "g.zarr" / "keep", backend="zarr", chunks=(2,))
    assert fm.load(tmp_path / "g.zarr" / "keep", backend="zarr").sum() == 16
    contained = ZarrBackend(base_dir=tmp_path)
    with pytest.raises(ValueError, match="escapes the backend root"):
        contained.save(np.zeros((2, 2)), "../escape.zarr/a")


def test_interrupted_write_leaves_no_readable_array(tmp_path):
    """Chunks are written before the metadata: a write that dies half-way is invisible."""
    backend = ZarrBackend()
    target = tmp_path / "x.zarr" / "arr"
    # a file where the chunk folder of plane 2 must go: that chunk write fails mid-save
    (target / "c").mkdir(parents=True)
    (target / "c" / "2").write_bytes(b"in the way")
    with pytest.raises(OSError):
        backend.save(series(4), target)
    assert not backend.exists(target)
    assert not (target / "zarr.json").exists()
    with pytest.raises(FileNotFoundError):
        backend.load(target)


def _append_frames(root: str, ts: list[int], start) -> None:
    backend = ZarrBackend()
    start.wait(60)  # both processes begin together, so their first saves collide
    for t in ts:
        backend.save(np.full((8, 8), t + 1, dtype="uint16"), f"{root}/cells/t{t:03d}")


def test_two_processes_appending_to_one_series_lose_nothing(tmp_path):
    """Both processes create and grow the same array at once. Growing is locked across
    processes: without the lock a process resizing from a stale shape shrinks the series
    another one just grew, and frames vanish (a reader watching sees t go backwards)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    root = str(tmp_path / "shared.zarr")
    start = ctx.Barrier(3)
    workers = [ctx.Process(target=_append_frames, args=(root, list(range(i, 200, 2)), start))
               for i in (0, 1)]
    for worker in workers:
        worker.start()
    start.wait(60)
    watcher, lengths = ZarrBackend(), []
    while any(worker.is_alive() for worker in workers):
        if watcher.exists(f"{root}/cells"):
            lengths.append(watcher.open(f"{root}/cells").shape[0])
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    shrinks = [(a, b) for a, b in zip(lengths, lengths[1:]) if b < a]
    assert not shrinks, f"the series shrank while growing: {shrinks[:5]}"
    assert len(lengths) > 10  # the watcher did see it grow
    stored = ZarrBackend().load(f"{root}/cells")
    assert stored.shape == (200, 8, 8)
    assert [int(stored[t, 0, 0]) for t in range(200)] == [t + 1 for t in range(200)]


def _write_block(path: str, start: int, stop: int) -> int:
    backend = ZarrBackend()
    array = backend.open(path, mode="r+")
    for t in range(start, stop):
        array[t] = np.full(array.shape[1:], t, dtype=array.dtype)
    return stop - start


def test_dask_workers_writing_different_chunks_lose_nothing(tmp_path):
    distributed = needs.module("distributed")
    path = str(tmp_path / "dask.zarr" / "stack")
    backend = ZarrBackend()
    backend.save(np.zeros((12, 64, 64), dtype="uint16"), path)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as client:
        futures = [client.submit(_write_block, path, start, start + 3, pure=False)
                   for start in range(0, 12, 3)]
        assert sum(client.gather(futures)) == 12
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        assert len(pids) == 2
    stored = backend.load(path)
    assert [int(stored[t].min()) for t in range(12)] == list(range(12))
    assert [int(stored[t].max()) for t in range(12)] == list(range(12))
    # dask itself writes through the backend's lazy array too
    import dask.array as da

    doubled = backend.load(path, lazy="dask") * 2
    da.to_zarr(doubled, backend.open(path, mode="r+"))
    assert int(backend.load(path)[11].max()) == 22


# -- OME-Zarr ---------------------------------------------------------------------------------


def test_ome_image_is_valid_ngff_05_with_axes_units_and_pyramid(fm, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    data = series(2 * 3 * 4, (128, 96)).reshape(2, 3, 4, 128, 96)
    path = tmp_path / "img.ome.zarr"
    fm.save(data, path, backend="zarr", ome=True, scale={"z": 2.0, "y": 0.5, "x": 0.5},
            levels=3)
    # validated by ome-zarr-models (pydantic models of the spec) ...
    image = Image.from_zarr(zarr.open_group(str(path), mode="r"))
    multiscale = image.ome_attributes.multiscales[0]
    assert [a.name for a in multiscale.axes] == ["t", "c", "z", "y", "x"]
    assert [a.unit for a in multiscale.axes] == ["second", None, "micrometer", "micrometer",
                                                 "micrometer"]
    assert json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"
    # ... and read back by an independent reader, ome-zarr-py
    node = next(iter(Reader(parse_url(str(path)))()))
    assert [tuple(level.shape) for level in node.data] == [
        (2, 3, 4, 128, 96), (2, 3, 4, 64, 48), (2, 3, 4, 32, 24)]
    assert node.metadata["coordinateTransformations"][1][0]["scale"] == [1, 1, 2, 1, 1]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data)
    # the pyramid is means of 2x2 blocks
    expected = data[..., :2, :2].mean(axis=(-2, -1))
    np.testing.assert_array_equal(np.asarray(node.data[1])[..., 0, 0], np.rint(expected))
    # polystore loads full resolution by default, any level on request
    np.testing.assert_array_equal(fm.load(path, backend="zarr"), data)
    assert fm.load(path, backend="zarr", level=2).shape == (2, 3, 4, 32, 24)
    with pytest.raises(IndexError, match="levels 0..2"):
        fm.load(path, backend="zarr", level=3)


def test_ome_image_grows_one_time_point_at_a_time(fm, tmp_path):
    from ome_zarr_models.v05.image import Image

    frames = series(3, (2, 64, 64))
    path = tmp_path / "live.ome.zarr"
    fm.save(frames[:1], path, backend="zarr", ome=True, axes="tcyx", levels=2)
    fm.save(frames[1], path / "t001", backend="zarr")
    fm.save(frames[2], path / "t002", backend="zarr")
    Image.from_zarr(zarr.open_group(str(path), mode="r"))
    np.testing.assert_array_equal(fm.load(path, backend="zarr"), frames)
    assert fm.load(path, backend="zarr", level=1).shape == (3, 2, 32, 32)
    with pytest.raises(ValueError, match="does not fit the image"):
        fm.save(np.zeros((2, 10, 10), "uint16"), path / "t003", backend="zarr")


def test_bad_ome_input_is_refused_before_writing(fm, tmp_path):
    path = tmp_path / "bad.ome.zarr"
    with pytest.raises(ValueError, match="axes are t, c, z, y, x"):
        fm.save(np.zeros((2, 8, 8)), path, backend="zarr", ome=True, axes="qyx")
    with pytest.raises(ValueError, match="names 2 dimensions"):
        fm.save(np.zeros((2, 8, 8)), path, backend="zarr", ome=True, axes="yx")
    with pytest.raises(ValueError, match="below one pixel"):
        fm.save(np.zeros((8, 8)), path, backend="zarr", ome=True, levels=5)
    with pytest.raises(ValueError, match="'ROW/COLUMN' like 'A/1'"):
        fm.save({"A1": [np.zeros((8, 8))]}, path, backend="zarr", ome="plate")
    assert not path.exists() or not any(path.iterdir())


def test_an_ome_image_written_over_a_group_keeps_what_else_it_holds(fm, tmp_path):
    """ome=True deleted every child of the target group: saving an image at exp.zarr erased
    exp.zarr/raw/keep; a re-save with bad chunks erased the old image, then failed with
    zarr's "chunk_shape and shape need to have the same number of dimensions"."""
    exp = tmp_path / "exp.zarr"
    fm.save(series(2, (8, 8)), exp / "raw" / "keep", backend="zarr")
    fm.save(np.ones((16, 16), np.uint16), exp, backend="zarr", ome=True, levels=2)
    np.testing.assert_array_equal(fm.load(exp / "raw" / "keep", backend="zarr"), series(2, (8, 8)))
    with pytest.raises(ValueError, match=r"chunks=\(1, 2\).*one whole number >= 1 per axis"):
        fm.save(np.zeros((4, 16, 16), np.uint16), exp, backend="zarr", ome=True, chunks=(1, 2))
    np.testing.assert_array_equal(fm.load(exp, backend="zarr"), np.ones((16, 16), np.uint16))
    fm.save(np.full((16, 16), 2, np.uint16), exp, backend="zarr", ome=True, levels=1)
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["0", "raw"]  # level 1 gone


def test_ngff_04_on_zarr_v2_for_older_readers(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04.image import Image

    backend = ZarrBackend(zarr_format=2)
    data = series(3, (64, 64))
    path = tmp_path / "old.ome.zarr"
    backend.save(data, path, ome=True, axes="zyx", levels=2)
    assert json.loads((path / ".zattrs").read_text())["multiscales"][0]["version"] == "0.4"
    Image.from_zarr(zarr.open_group(str(path), mode="r", zarr_format=2))
    node = next(iter(Reader(parse_url(str(path)))()))
    assert [tuple(level.shape) for level in node.data] == [(3, 64, 64), (3, 32, 32)]
    np.testing.assert_array_equal(backend.load(path), data)


def write_test_plate(fm: FileManager, path: Path) -> dict[str, list[np.ndarray]]:
    wells = {
        # pixel value 100 * well index + 10 * field + channel
        f"{row}/{col}": [np.stack([np.full((64, 64), 100 * i + 10 * f + c, dtype="uint16")
                                   for c in range(2)]) for f in range(2)]
        for i, (row, col) in enumerate([("A", "1"), ("A", "2"), ("B", "1"), ("B", "3")])
    }
    fm.save(wells, path, backend="zarr", ome="plate", levels=2, axes="cyx", name="demo")
    return wells


def test_hcs_plate_layout_is_valid(fm, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.hcs import HCS

    path = tmp_path / "plate.ome.zarr"
    wells = write_test_plate(fm, path)
    plate = HCS.from_zarr(zarr.open_group(str(path), mode="r"))
    meta = plate.ome_attributes.plate
    assert [r.name for r in meta.rows] == ["A", "B"]
    assert [c.name for c in meta.columns] == ["1", "2", "3"]
    assert [w.path for w in meta.wells] == ["A/1", "A/2", "B/1", "B/3"]
    assert meta.field_count == 2
    assert len(plate.get_well_group(3).ome_attributes.well.images) == 2
    np.testing.assert_array_equal(fm.load(path / "B" / "3" / "1", backend="zarr"),
                                  wells["B/3"][1])
    node = next(iter(Reader(parse_url(str(path)))()))
    # ome-zarr-py tiles the plate: 2 rows x 3 columns of 64x64 fields at full resolution
    assert tuple(node.data[0].shape) == (2, 128, 192)


def test_napari_opens_the_plate_with_its_ome_zarr_reader(fm, tmp_path, make_napari_viewer):
    needs.module("napari_ome_zarr")
    path = tmp_path / "plate.ome.zarr"
    write_test_plate(fm, path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-ome-zarr")
    assert layers, "napari-ome-zarr returned no layers"
    shapes = {tuple(layer.data[0].shape) if layer.multiscale else tuple(layer.data.shape)
              for layer in layers}
    # one layer per channel (napari splits c) or one with c: 2 rows x 3 columns of 64x64
    assert shapes <= {(128, 192), (2, 128, 192)}, shapes
    planes = [np.asarray(layer.data[0] if layer.multiscale else layer.data) for layer in layers]
    if len(planes) == 1:
        planes = list(planes[0])
    # well B/1 (index 2) sits in row 1, column 0 of the tiling and shows its field 0
    assert [int(np.unique(p[64:128, 0:64])[0]) for p in planes] == [200, 201]
    assert [int(np.unique(p[0:64, 64:128])[0]) for p in planes] == [100, 101]  # A/2
    assert not planes[0][64:128, 64:128].any()  # B/2 is no well: empty


# -- polystore send x.zarr --------------------------------------------------------------------


def send_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polystore.cli", "send", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("target", ["napari_stream", "fiji_stream"])
def test_send_streams_an_ome_zarr_image_plane_by_plane(fm, tmp_path, target):
    from polystore.streaming import FijiStreamingBackend, NapariStreamingBackend, receiver_for

    data = series(2 * 3 * 4, (24, 32)).reshape(2, 3, 4, 24, 32)
    path = tmp_path / "img.ome.zarr"
    fm.save(data, path, backend="zarr", ome=True, levels=2)
    backend_cls = NapariStreamingBackend if target == "napari_stream" else FijiStreamingBackend
    frames: list = []
    receiver = receiver_for(backend_cls, "tcp://127.0.0.1:0", on_frame=frames.append)
    receiver.start()
    try:
        result = send_cli(str(path), "--to", target, "--endpoint", receiver.endpoint)
    finally:
        receiver.stop()
    assert result.returncode == 0, result.stderr
    assert len(frames) == 24
    for frame in frames:
        axes = frame.header.axes
        assert frame.header.axis_names == ["t", "c", "z"]
        assert frame.stream == "img.ome.zarr"
        np.testing.assert_array_equal(frame.array, data[axes["t"], axes["c"], axes["z"]])
    assert sorted((f.header.axes["t"], f.header.axes["c"], f.header.axes["z"]) for f in frames) \
        == [(t, c, z) for t in range(2) for c in range(3) for z in range(4)]
    assert "send -> " + target in result.stderr and "24/24" in result.stderr  # progress bar
    assert "sent 24 plane(s) of 1 array(s)" in result.stdout
    assert "(tczyx)" in result.stdout


def test_send_streams_every_field_of_a_plate(fm, tmp_path):
    from polystore.streaming import NapariStreamingBackend, receiver_for

    path = tmp_path / "plate.ome.zarr"
    write_test_plate(fm, path)
    frames: list = []
    receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=frames.append)
    receiver.start()
    try:
        result = send_cli(str(path), "--to", "napari_stream", "--endpoint", receiver.endpoint,
                          "-q")
    finally:
        receiver.stop()
    assert result.returncode == 0, result.stderr
    streams = sorted({f.stream for f in frames})
    assert streams == [f"plate.ome.zarr/{w}/{f}" for w in ("A/1", "A/2", "B/1", "B/3")
                       for f in (0, 1)]
    b3 = {f.header.axes["c"]: int(f.array[0, 0]) for f in frames
          if f.stream == "plate.ome.zarr/B/3/1"}
    assert b3 == {0: 310, 1: 311}  # well index 3, field 1, channel c
    assert "send -> " not in result.stderr  # -q


def test_send_zarr_says_how_many_planes_policy_latest_dropped(tmp_path, capsys):
    """send_zarr printed "sent 40 plane(s)" and returned 40 when a slow viewer had been
    given only some of them under policy 'latest'."""
    import time as clock

    from polystore.streaming import NapariStreamingBackend, receiver_for
    from polystore.zarr.planes import send_zarr

    path = tmp_path / "series.zarr"
    ZarrBackend().save(np.zeros((40, 256, 256), "uint16"), str(path / "cells"))
    received: list = []

    def slow_viewer(frame) -> None:
        clock.sleep(0.05)
        received.append(frame)

    receiver = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=slow_viewer,
                            queue_size=1)
    receiver.start()
    try:
        sent = send_zarr([str(path)], "napari_stream", endpoint=receiver.endpoint,
                         policy="latest", quiet=True, max_inflight_bytes=256 * 256 * 2 * 2)
    finally:
        receiver.stop()
    out = capsys.readouterr().out
    assert sent < 40 and "were dropped by policy='latest'" in out, out
    assert f"but {40 - sent} of them" in out


def test_send_a_missing_store_fails_clearly(tmp_path):
    result = send_cli(str(tmp_path / "none.zarr"), "--to", "napari_stream",
                      "--endpoint", "tcp://127.0.0.1:9")
    assert result.returncode == 2  # a usage error: a path that is not there
    assert "no such zarr store" in result.stderr and "none.zarr" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_used_zarr_backend_pickles_as_configuration(tmp_path):
    """Once the zarr backend had saved anything, pickling a FileManager (for a process pool,
    even to save to disk) failed: "cannot pickle '_thread.lock' object"."""
    fm = FileManager(BackendRegistry())
    fm.save(np.arange(12, dtype=np.uint16).reshape(3, 4), f"{tmp_path}/plate.zarr/img", "zarr")
    copy = pickle.loads(pickle.dumps(fm))
    np.testing.assert_array_equal(copy.load(f"{tmp_path}/plate.zarr/img", "zarr"),
                                  np.arange(12, dtype=np.uint16).reshape(3, 4))
    copy.save(np.ones(2, np.uint8), f"{tmp_path}/plate.zarr/more", "zarr")
    assert fm.exists(f"{tmp_path}/plate.zarr/more", "zarr")


@pytest.mark.parametrize("dst", ["exp.zarr/archive/raw", "other.zarr/raw"])
def test_a_move_keeps_attributes_dimension_names_chunks_and_ome_metadata(tmp_path, dst):
    """A move inside the zarr backend loaded and saved the array again: its attributes and
    dimension names were lost, an OME-Zarr image became a bare group that no longer loaded,
    and then the source was deleted."""
    zarr = needs.module("zarr")
    fm = FileManager({"zarr": ZarrBackend(tmp_path)})
    data = np.arange(64, dtype=np.uint16).reshape(4, 4, 4)
    fm.save(data, "exp.zarr/raw", "zarr", axes="zyx", attributes={"pixel_um": 0.65},
            chunks=(1, 4, 4))
    fm.save(np.ones((2, 64, 64), np.uint16), "exp.zarr/img", "zarr", ome=True)
    fm.move("exp.zarr/raw", dst, "zarr")
    fm.move("exp.zarr/img", dst.replace("raw", "img"), "zarr")
    root, node = dst.split("/", 1)
    moved = zarr.open_array(str(tmp_path / root), path=node, mode="r")
    assert dict(moved.attrs) == {"pixel_um": 0.65}
    assert moved.metadata.dimension_names == ("z", "y", "x") and moved.chunks == (1, 4, 4)
    np.testing.assert_array_equal(fm.load(dst, "zarr"), data)
    image = zarr.open_group(str(tmp_path / root), path=node.replace("raw", "img"), mode="r")
    assert "ome" in image.attrs
    assert fm.load(dst.replace("raw", "img"), "zarr").shape == (2, 64, 64)
    assert not fm.exists("exp.zarr/raw", "zarr") and not fm.exists("exp.zarr/img", "zarr")
    with pytest.raises(FileExistsError):  # one backend: an existing destination stays
        fm.move(dst, dst.replace("raw", "img"), "zarr")


def _garble_chunks(array_dir: Path) -> None:
    for chunk in (array_dir / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a chunk" * 10)


def test_send_of_a_damaged_or_mislabelled_store_says_what_is_wrong(fm, tmp_path):
    """Each gave a traceback: OME metadata naming no datasets (KeyError 'datasets'), a plate
    well that is not there (KeyError 'A/1'), a chunk that does not decompress."""
    image = tmp_path / "bad_ome.zarr"
    fm.save(series(2, (8, 8)), image / "0", backend="zarr")
    attrs = json.loads((image / "zarr.json").read_text())
    attrs.setdefault("attributes", {})["ome"] = {"version": "0.5", "multiscales": [{}]}
    (image / "zarr.json").write_text(json.dumps(attrs))
    plate = tmp_path / "plate.ome.zarr"
    write_test_plate(fm, plate)
    shutil.rmtree(plate / "A" / "1")
    damaged = tmp_path / "damaged.zarr"
    fm.save(series(2, (8, 8)), damaged / "img", backend="zarr")
    _garble_chunks(damaged / "img")
    for path, says in ((image, "OME-Zarr metadata"), (plate, "OME-Zarr metadata"),
                       (damaged, "damaged.zarr/img at {'z': 0}: cannot read this plane")):
        result = send_cli(str(path), "--to", "napari_stream", "--endpoint", "tcp://127.0.0.1:9")
        assert result.returncode == 1 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_send_refuses_a_plane_too_large_before_reading_it(fm, tmp_path):
    """A (100000, 100000) plane was read whole (18.6 GiB) before the frame size was checked,
    and no option could raise the limit. Its chunks are damaged here: reading it would say so."""
    store = tmp_path / "big.zarr"
    fm.save(series(2, (1024, 1024)), store / "img", backend="zarr")
    _garble_chunks(store / "img")
    result = send_cli(str(store), "--to", "napari_stream", "--endpoint", "tcp://127.0.0.1:9",
                      "--max-inflight-bytes", "1M")
    assert result.returncode == 1, result.stderr
    assert "is 2,097,152 bytes, more than one frame may be (1,048,576)" in result.stderr
    assert "raise --max-inflight-bytes" in result.stderr and "Traceback" not in result.stderr


# -- moves and copies keep every key; time points as files -----------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): a zarr node's exact content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _ome_store(fm: FileManager, path: str, kind: str) -> None:
    image = np.arange(2 * 96 * 96, dtype=np.uint16).reshape(2, 96, 96)
    if kind == "image":
        fm.save(image, path, "zarr", ome=True, levels=3, scale={"y": 0.5, "x": 0.5})
    else:
        fm.save({"A/1": [image[0], image[1]], "B/2": [image[1]]}, path, "zarr", ome="plate",
                levels=2, name="screen")


@pytest.mark.parametrize("kind", ["image", "plate"])
@pytest.mark.parametrize("operation", ["move", "copy"])
@pytest.mark.parametrize("dst", ["b.zarr", "other.zarr/runs/b"])
def test_a_whole_store_moved_or_copied_keeps_every_key(tmp_path, kind, operation, dst):
    """A move of a whole store (a.zarr -> b.zarr) fell back to load and save: the root's
    OME-Zarr metadata (multiscales, omero, plate) was dropped, so b.zarr no longer loaded as
    an image, and the source was deleted. A copy did the same to every group."""
    fm = FileManager({"zarr": ZarrBackend(tmp_path)})
    _ome_store(fm, "a.zarr", kind)
    before = _tree(tmp_path / "a.zarr")
    getattr(fm, operation)("a.zarr", dst, "zarr")
    assert _tree(tmp_path / dst) == before  # byte for byte, every level and attribute
    assert fm.exists("a.zarr", "zarr") == (operation == "copy")
    if kind == "image":
        assert fm.load(dst, "zarr", level=2).shape == (2, 24, 24)
    else:
        assert fm.load(f"{dst}/A/1/1", "zarr").shape == (96, 96)
    if "/" in dst:  # into another store as a group, listed there like any other
        assert fm.list_dir("other.zarr/runs", "zarr") == ["b"]


def test_a_store_moved_on_an_object_store_keeps_every_key(tmp_path):
    """The same through an fsspec URL (key by key, metadata last)."""
    fm = FileManager({"zarr": ZarrBackend()})
    root = f"memory://polystore-test/{tmp_path.name}"
    _ome_store(fm, f"{root}/a.zarr", "image")
    fm.move(f"{root}/a.zarr", f"{root}/b.zarr", "zarr")
    moved = zarr.open_group(ZarrBackend().store(f"{root}/b.zarr"), mode="r")
    assert moved.attrs["ome"]["multiscales"][0]["datasets"][2]["path"] == "2"
    assert fm.load(f"{root}/b.zarr", "zarr", level=2).shape == (2, 24, 24)
    assert not fm.exists(f"{root}/a.zarr", "zarr")
    fm.copy(f"{root}/b.zarr", f"{root}/c.zarr/b", "zarr")
    assert fm.load(f"{root}/c.zarr/b", "zarr", level=1).shape == (2, 48, 48)


@pytest.mark.parametrize("operation", ["move", "copy"])
def test_onto_an_existing_node_an_array_replaces_an_array_and_groups_are_not_merged(
        tmp_path, operation):
    """With overwrite=True a move onto an existing group merged by loading and saving: a
    3-level image moved onto a 1-level one kept the old levels 1 and 2 under metadata of
    the old image, and the source's attributes were dropped."""
    fm = FileManager({"zarr": ZarrBackend(tmp_path)})
    transfer = getattr(fm, operation)
    data = np.arange(48, dtype=np.uint16).reshape(3, 4, 4)
    fm.save(data, "s.zarr/new", "zarr", axes="zyx", attributes={"v": 2}, chunks=(1, 2, 2))
    fm.save(data[:1] + 7, "s.zarr/old", "zarr", attributes={"v": 1})
    before = _tree(tmp_path / "s.zarr" / "new")
    transfer("s.zarr/new", "s.zarr/old", "zarr", overwrite=True)
    assert _tree(tmp_path / "s.zarr" / "old") == before
    np.testing.assert_array_equal(fm.load("s.zarr/old", "zarr"), data)
    assert fm.list_dir("s.zarr", "zarr") == (["new", "old"] if operation == "copy" else ["old"])
    assert not list((tmp_path / "s.zarr").glob(".*"))  # nothing set aside is left over

    big = np.ones((2, 64, 64), np.uint16)
    fm.save(big, "s.zarr/img3", "zarr", ome=True, levels=3)
    fm.save(big, "s.zarr/img1", "zarr", ome=True, levels=1)
    snapshot = _tree(tmp_path / "s.zarr")
    for src, dst in [("s.zarr/img3", "s.zarr/img1"), ("s.zarr/old", "s.zarr/img1"),
                     ("s.zarr/img3", "s.zarr/old")]:
        with pytest.raises(FileExistsError, match="never merges groups.*nothing was changed"):
            transfer(src, dst, "zarr", overwrite=True)
        assert _tree(tmp_path / "s.zarr") == snapshot
    with pytest.raises(ValueError, match="into itself"):
        transfer("s.zarr", "s.zarr/inner", "zarr")
    with pytest.raises(NotADirectoryError, match="is a zarr array, not a group"):
        transfer("s.zarr/img3", "s.zarr/old/img3", "zarr")
    fm.save(big, "v2.zarr/img", "zarr", ome=True, levels=1)
    ZarrBackend(tmp_path, zarr_format=2).save(big, "two.zarr/x", ome=True, levels=1)
    with pytest.raises(ValueError, match="zarr v2 node.*zarr v3 group.*one format"):
        transfer("two.zarr/x", "v2.zarr/x", "zarr")
    assert _tree(tmp_path / "s.zarr") == snapshot and fm.exists("two.zarr/x", "zarr")


def test_a_group_copied_with_writer_options_is_refused_before_writing(tmp_path):
    """Writer options mean load and save: for a group that dropped its attributes."""
    fm = FileManager({"zarr": ZarrBackend(tmp_path)})
    fm.save(np.ones((2, 64, 64), np.uint16), "a.zarr/img", "zarr", ome=True, levels=2)
    for transfer in (fm.copy, fm.move):
        with pytest.raises(ValueError, match="writer options.*drop the group's attributes"):
            transfer("a.zarr/img", "a.zarr/img2", "zarr", compression="none")
    assert fm.list_dir("a.zarr", "zarr") == ["img"]
    # an array may still be re-encoded on request
    fm.copy("a.zarr/img/0", "a.zarr/raw", "zarr", compression="none")
    assert fm.load("a.zarr/raw", "zarr", lazy=True).nbytes_stored() >= 2 * 64 * 64 * 2


def test_a_time_point_is_a_file_exactly_when_it_loads(fm, tmp_path):
    """exists() said True for a time point that is_file() called no file and delete()
    could not find ('nothing at'); an OME-Zarr image's time points loaded but did not
    exist. One model now: a stored time point is a file-like item."""
    frames = series(3)
    for t in range(3):
        fm.save(frames[t], tmp_path / "s.zarr" / "cells" / f"t{t:03d}", backend="zarr")
    fm.save(frames, tmp_path / "s.zarr" / "img", backend="zarr", ome=True, axes="tyx",
            levels=2)
    fm.ensure_directory(tmp_path / "s.zarr" / "plain", backend="zarr")
    for path, loads in [("cells/t002", True), ("cells/t3", False), ("img/t001", True),
                        ("img/t009", False), ("plain/t000", False), ("nothing/t000", False)]:
        full = tmp_path / "s.zarr" / path
        assert fm.exists(full, backend="zarr") is loads, path
        assert fm.is_file(full, backend="zarr") is loads, path
        assert not fm.is_dir(full, backend="zarr")
        if loads:
            t = int(path.rsplit("/t", 1)[1])
            np.testing.assert_array_equal(fm.load(full, backend="zarr"), frames[t])
        else:
            with pytest.raises(FileNotFoundError):
                fm.load(full, backend="zarr")
            with pytest.raises(FileNotFoundError):
                fm.delete(full, backend="zarr")


def test_deleting_or_moving_one_time_point_is_refused_and_loses_nothing(fm, tmp_path):
    """delete() of a time point said 'nothing at' a path exists() confirmed; a move of one
    failed the same way after the checks had passed. Neither may touch the other frames."""
    from polystore.errors import TransferError, UnsupportedOperationError

    frames = series(3)
    root = tmp_path / "s.zarr"
    for t in range(3):
        fm.save(frames[t], root / "cells" / f"t{t:03d}", backend="zarr")
    fm.save(frames, root / "img", backend="zarr", ome=True, axes="tyx", levels=1)
    before = _tree(root)
    for series_name in ("cells", "img"):
        frame = root / series_name / "t001"
        with pytest.raises(UnsupportedOperationError, match="time point 1.*cannot be deleted "
                           "on its own.*nothing was deleted.*Delete the whole series"):
            fm.delete(frame, backend="zarr")
        with pytest.raises(TransferError, match="cannot move.*time point 1.*nothing was written"):
            fm.move(frame, root / "moved" / "t000", backend="zarr")
        assert _tree(root) == before
        np.testing.assert_array_equal(fm.load(root / series_name, backend="zarr"), frames)
    # a copy of one time point writes its pixels (into a new series here)
    fm.copy(root / "cells" / "t001", root / "copied" / "t000", backend="zarr")
    np.testing.assert_array_equal(fm.load(root / "copied", backend="zarr"), frames[1:2])
    # and moving an array onto a time point writes that time point
    fm.save(frames[0] + 1, root / "single", backend="zarr")
    fm.move(root / "single", root / "cells" / "t003", backend="zarr")
    assert fm.load(root / "cells", backend="zarr").shape == (4, 32, 48)
    assert not fm.exists(root / "single", backend="zarr")
    fm.ensure_directory(root / "grp", backend="zarr")
    with pytest.raises(IsADirectoryError, match="group.*a time point.*only an array"):
        fm.move(root / "grp", root / "cells" / "t009", backend="zarr")
    assert fm.is_dir(root / "grp", backend="zarr")
    assert fm.load(root / "cells", backend="zarr").shape == (4, 32, 48)


@pytest.mark.parametrize("operation", ["move", "copy"])
def test_a_file_url_names_the_same_local_store(tmp_path, operation):
    """A move onto the same array spelled once as a path and once as file:// was taken for a
    move between two stores: with overwrite=True the 'old' destination (the source itself)
    was deleted, then the source: the array was gone and no error was raised. A group moved
    into its own member through file:// was lost the same way."""
    fm = FileManager({"zarr": ZarrBackend()})
    data = np.arange(12, dtype=np.uint16).reshape(3, 4)
    fm.save(data, f"{tmp_path}/a.zarr/x", "zarr")
    fm.save(data + 1, f"{tmp_path}/a.zarr/G/y", "zarr")
    before = _tree(tmp_path / "a.zarr")
    if operation == "move":  # onto itself: nothing to do
        fm.move(f"{tmp_path}/a.zarr/x", f"file://{tmp_path}/a.zarr/x", "zarr", overwrite=True)
    else:  # as with one spelling
        with pytest.raises(ValueError, match="into itself"):
            fm.copy(f"{tmp_path}/a.zarr/x", f"file://{tmp_path}/a.zarr/x", "zarr",
                    overwrite=True)
    assert _tree(tmp_path / "a.zarr") == before
    with pytest.raises(ValueError, match="into itself"):
        getattr(fm, operation)(f"{tmp_path}/a.zarr/G", f"file://{tmp_path}/a.zarr/G/H", "zarr")
    assert _tree(tmp_path / "a.zarr") == before
    np.testing.assert_array_equal(fm.load(f"{tmp_path}/a.zarr/x", "zarr"), data)


@pytest.mark.parametrize("operation", ["move", "copy"])
def test_a_store_that_is_one_array_moves_and_copies_whole(tmp_path, operation):
    """A store whose root is an array (zarr.save_array('r.zarr', data)) loads as that array,
    but a move or copy of the whole store to another store was refused as 'the array as
    the store itself' (and suggested the name 'r2.zarr/')."""
    fm = FileManager({"zarr": ZarrBackend(tmp_path)})
    data = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    root = zarr.create_array(str(tmp_path / "r.zarr"), shape=data.shape, dtype=data.dtype,
                             chunks=(1, 3, 4), attributes={"k": 1})
    root[...] = data
    before = _tree(tmp_path / "r.zarr")
    transfer = getattr(fm, operation)
    transfer("r.zarr", "r2.zarr", "zarr")
    assert _tree(tmp_path / "r2.zarr") == before
    np.testing.assert_array_equal(fm.load("r2.zarr", "zarr"), data)
    assert fm.exists("r.zarr", "zarr") == (operation == "copy")
    # onto a store that is an array already: refused, nothing changes
    zarr.save_array(str(tmp_path / "r3.zarr"), data[:1])
    other = _tree(tmp_path / "r3.zarr")
    with pytest.raises(FileExistsError, match="nothing was changed"):
        transfer("r2.zarr", "r3.zarr", "zarr", overwrite=True)
    assert _tree(tmp_path / "r3.zarr") == other and _tree(tmp_path / "r2.zarr") == before
    # an array inside a store still cannot become a store's root
    fm.save(data, "s.zarr/x", "zarr")
    with pytest.raises(IsADirectoryError, match="name it inside the store, e.g. '.*r4.zarr/x'"):
        transfer("s.zarr/x", "r4.zarr", "zarr")


@pytest.mark.parametrize("operation", ["move", "copy"])
def test_onto_object_store_keys_without_a_node_is_refused_as_on_disk(tmp_path, operation):
    """A local destination folder that holds files but no zarr node is refused; at an
    object-store URL the same keys (a store whose root metadata is missing, chunks of an
    interrupted write) were merged with the copy, and a copy failing there would have
    removed them with its own keys."""
    backend = ZarrBackend()
    fm = FileManager({"zarr": backend})
    root = f"memory://polystore-test/{tmp_path.name}"
    data = np.arange(12, dtype=np.uint16).reshape(3, 4)
    fm.save(data, f"{root}/a.zarr/A/x", "zarr")
    fm.save(data + 1, f"{root}/b.zarr/keep/y", "zarr")
    fm.save(data + 2, f"{root}/c.zarr/G/z", "zarr")
    from zarr.core.sync import sync

    sync(backend.store(f"{root}/b.zarr").delete("zarr.json"))
    sync(backend.store(f"{root}/c.zarr").delete("G/z/zarr.json"))  # chunks left over
    for dst in (f"{root}/b.zarr", f"{root}/c.zarr/G/z"):
        assert not fm.exists(dst, "zarr")
        with pytest.raises(FileExistsError, match="holds keys but no zarr node.*Nothing was "
                           "changed"):
            getattr(fm, operation)(f"{root}/a.zarr/A", dst, "zarr")
    assert fm.list_dir(f"{root}/b.zarr/keep", "zarr") == ["y"]
    left = backend.store(f"{root}/c.zarr").list_prefix("G/z/")
    assert sync(_collect(left)) == ["G/z/c/0/0"]
    assert fm.list_dir(f"{root}/a.zarr/A", "zarr") == ["x"]



@pytest.mark.parametrize("dst", ["new.zarr/runs/r1/img", "keep.zarr/runs/img"])
def test_a_copy_that_fails_leaves_no_groups_it_created(tmp_path, dst):
    """A copy that failed half way (a full disk) removed its partial node, but the groups it
    had created above the destination stayed: a new, empty store new.zarr with runs/r1 in
    it. Only what the copy created goes; a file that was there before stays."""
    backend = ZarrBackend(tmp_path)
    fm = FileManager({"zarr": backend})
    fm.save(np.ones((2, 64, 64), np.uint16), "a.zarr/img", "zarr", ome=True, levels=2)
    (tmp_path / "keep.zarr").mkdir()
    (tmp_path / "keep.zarr" / "README").write_text("mine")
    store = backend.store(dst)
    real_set, calls = store.set, []

    async def full_disk(key, value, *args, **kwargs):
        calls.append(key)
        if len(calls) == 6:
            raise OSError(28, "No space left on device")
        return await real_set(key, value, *args, **kwargs)

    store.set = full_disk
    with pytest.raises(OSError, match="No space left"):
        fm.copy("a.zarr/img", dst, "zarr")
    store.set = real_set
    assert not (tmp_path / "new.zarr").exists()
    assert [p.name for p in (tmp_path / "keep.zarr").iterdir()] == ["README"]
    assert fm.list_dir("a.zarr", "zarr") == ["img"]



def test_a_time_point_of_an_image_with_damaged_metadata_does_not_exist(fm, tmp_path):
    """exists()/is_file() of img/t000 raised KeyError 'datasets' when the image's OME
    metadata names no datasets (before time points of images counted, it said False)."""
    path = tmp_path / "a.zarr" / "img"
    fm.save(np.ones((2, 64, 64), np.uint16), path, "zarr", ome=True, levels=1)
    group = zarr.open_group(str(tmp_path / "a.zarr"), path="img", mode="r+")
    ome = dict(group.attrs["ome"])
    ome["multiscales"] = [{k: v for k, v in ome["multiscales"][0].items() if k != "datasets"}]
    group.attrs["ome"] = ome
    assert not fm.exists(path / "t000", "zarr")
    assert not fm.is_file(path / "t000", "zarr")
    with pytest.raises(FileNotFoundError):
        fm.delete(path / "t000", "zarr")
    assert fm.is_dir(path, "zarr")


async def _collect(keys):
    return sorted([key async for key in keys])


# -- consolidated metadata --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # v2: not in its spec, says zarr
@pytest.mark.parametrize("fmt", [2, 3])
def test_consolidated_metadata_stays_true_through_every_change(tmp_path, fmt):
    """zarr and napari's readers open a group through its consolidated metadata when it has
    some: every node saved, grown, moved, copied or deleted must be there (or gone) too."""
    store = tmp_path / "c.zarr"
    root = zarr.open_group(str(store), mode="w", zarr_format=fmt)
    root.create_array("a", shape=(4, 4), dtype="uint16")[:] = 1
    root.create_array("b", shape=(4, 4), dtype="uint16")[:] = 2
    root.create_group("sub").create_array("x", shape=(2,), dtype="uint8")[:] = 3
    zarr.consolidate_metadata(str(store))
    zarr.consolidate_metadata(str(store), path="sub")
    backend = ZarrBackend(zarr_format=fmt)
    backend.delete(str(store / "b"))
    backend.save(np.full((3, 3), 5, "uint16"), str(store / "c"))
    backend.rename(str(store / "a"), str(store / "g" / "d"))
    backend.copy_within(str(store / "sub" / "x"), str(store / "sub" / "y"))
    backend.save(np.ones((3, 3), "uint16"), str(store / "ser" / "t000"))
    backend.save(np.ones((3, 3), "uint16"), str(store / "ser" / "t001"))
    backend.ensure_directory(str(store / "empty"))

    def consolidated(path: str = "") -> zarr.Group:
        return zarr.open_group(str(store), path=path, mode="r", use_consolidated=True)

    assert sorted(consolidated().keys()) == ["c", "empty", "g", "ser", "sub"]
    assert consolidated()["ser"].shape == (2, 3, 3)
    assert consolidated()["g/d"][:].sum() == 16
    assert sorted(consolidated("sub").keys()) == ["x", "y"]
    np.testing.assert_array_equal(consolidated("sub")["y"][:], [3, 3])


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_polystore_reads_the_store_not_stale_consolidated_metadata(tmp_path):
    """Another tool that changed the store without consolidating again left the consolidated
    metadata stale: polystore lists and finds what is stored."""
    store = tmp_path / "s.zarr"
    root = zarr.open_group(str(store), mode="w")
    root.create_array("old", shape=(2,), dtype="uint8")
    zarr.consolidate_metadata(str(store))
    root = zarr.open_group(str(store), mode="a", use_consolidated=False)
    del root["old"]
    root.create_array("new", shape=(2,), dtype="uint8")[:] = 7
    backend = ZarrBackend()
    assert backend.list_files(str(store)) == [str(store / "new")]
    assert not backend.exists(str(store / "old"))
    np.testing.assert_array_equal(backend.load(str(store / "new")), [7, 7])


def test_ensure_directory_over_an_array_says_so_and_keeps_it(tmp_path):
    backend = ZarrBackend()
    path = str(tmp_path / "e.zarr" / "arr")
    backend.save(np.arange(3, dtype="uint8"), path)
    with pytest.raises(NotADirectoryError, match="an array is stored there"):
        backend.ensure_directory(path)
    np.testing.assert_array_equal(backend.load(path), [0, 1, 2])
    backend.ensure_directory(str(tmp_path / "e.zarr" / "g" / "h"))
    assert backend.is_dir(str(tmp_path / "e.zarr" / "g" / "h"))


def test_saving_below_an_array_is_refused_and_leaves_no_chunks(tmp_path):
    """The chunks went in before zarr refused the metadata ("A parent ... is an array"), and
    stayed inside the array's folder where nothing could delete them and moves carried
    them along."""
    backend = ZarrBackend()
    store = tmp_path / "s.zarr"
    backend.save(np.arange(16, dtype="uint8").reshape(4, 4), str(store / "arr"))
    with pytest.raises(NotADirectoryError, match="a node above it is a zarr array"):
        backend.save(np.ones((2, 2)), str(store / "arr" / "child"))
    assert not (store / "arr" / "child").exists()
    np.testing.assert_array_equal(backend.load(str(store / "arr")),
                                  np.arange(16, dtype="uint8").reshape(4, 4))
