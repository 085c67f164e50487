"""Issue 12: storage that never loses a byte.

Each test attacks one weakness the issue reports (and fails on the code before the fix):
bytes-exact copy/move (ImageJ hyperstack, multi-series TIFF, OME-TIFF, unknown extension,
directories), move that deletes the source only once the destination holds the item, modes
kept on overwrite, formats with clear errors, pickling into worker processes, natural order,
and the test-only plugin package kept out of the user's set-up.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import pickle
import socket
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import pytest
import tifffile

from polystore import (
    BackendRegistry,
    DeliveryNotConfirmedError,
    DiskBackend,
    FileManager,
    FormatDataError,
    MemoryBackend,
    NapariStreamingBackend,
    StorageBackend,
    TransferError,
    UnsupportedFormatError,
    UnsupportedOperationError,
)
from tests import needs

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file, plus every directory (empty ones too)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "<dir>" if path.is_dir() else sha256(path)
    return out


def digest_of(path: Path) -> dict[str, str] | str:
    return tree_digest(path) if path.is_dir() else sha256(path)


# -- the items of the acceptance test -------------------------------------------------------
def make_imagej_hyperstack(path: Path) -> None:
    data = np.arange(2 * 3 * 2 * 16 * 20, dtype=np.uint16).reshape(2, 3, 2, 16, 20)
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.325, 1 / 0.325),
        metadata={"spacing": 2.5, "unit": "um", "axes": "TZCYX", "Info": "hyperstack"},
    )


def make_multi_series(path: Path) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.ones((8, 8), np.uint8), description="series zero")
        tif.write(
            np.full((3, 5, 6), 7, np.float32), description="series one", photometric="minisblack"
        )


def make_ome(path: Path) -> None:
    data = np.arange(3 * 10 * 12, dtype=np.uint16).reshape(3, 10, 12)
    tifffile.imwrite(path, data, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5})


def make_unknown(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 3 + b"not a format polystore knows")


def make_directory(path: Path) -> None:
    (path / "sub" / "deeper").mkdir(parents=True)
    (path / "empty").mkdir()
    make_imagej_hyperstack(path / "sub" / "stack.tif")
    make_unknown(path / "sub" / "deeper" / "blob.xyz")
    (path / "notes.txt").write_text("keep me\n")


ITEMS = {
    "imagej.tif": make_imagej_hyperstack,
    "two-series.tif": make_multi_series,
    "image.ome.tif": make_ome,
    "blob.unknownext": make_unknown,
    "folder": make_directory,
}


@pytest.fixture(params=sorted(ITEMS))
def item(request, tmp_path) -> tuple[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    ITEMS[request.param](src / request.param)
    return request.param, tmp_path


def test_fixture_items_are_what_they_claim(tmp_path):
    """The acceptance items really carry what a decode/re-encode would lose."""
    for name, make in ITEMS.items():
        make(tmp_path / name)
    with tifffile.TiffFile(tmp_path / "imagej.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 2.5
    with tifffile.TiffFile(tmp_path / "two-series.tif") as tif:
        assert len(tif.series) == 2
    with tifffile.TiffFile(tmp_path / "image.ome.tif") as tif:
        assert tif.is_ome


@pytest.mark.parametrize("layout", ["one disk backend", "two disk backends"])
def test_copy_and_move_disk_to_disk_are_bytes_exact(item, layout):
    name, root = item
    source_disk = DiskBackend(root / "src")
    dest_disk = source_disk if layout == "one disk backend" else DiskBackend(root / "dst")
    dest_root = root / "src" if layout == "one disk backend" else root / "dst"
    fm = FileManager({"a": source_disk, "b": dest_disk})
    original = digest_of(root / "src" / name)

    assert fm.copy(name, f"copied/{name}", src_backend="a", dst_backend="b") is True
    assert digest_of(dest_root / "copied" / name) == original
    assert digest_of(root / "src" / name) == original

    assert fm.move(name, f"moved/{name}", src_backend="a", dst_backend="b") is True
    assert digest_of(dest_root / "moved" / name) == original
    assert not (root / "src" / name).exists()


def test_disk_to_memory_to_disk_is_bytes_exact(item):
    name, root = item
    fm = FileManager({"disk": DiskBackend(root), "memory": MemoryBackend()})
    original = digest_of(root / "src" / name)

    fm.copy(f"src/{name}", f"held/{name}", src_backend="disk", dst_backend="memory")
    fm.move(f"held/{name}", f"back/{name}", src_backend="memory", dst_backend="disk")
    assert digest_of(root / "back" / name) == original
    assert not fm.exists(f"held/{name}", backend="memory")

    fm.move(f"src/{name}", f"held2/{name}", src_backend="disk", dst_backend="memory")
    assert not (root / "src" / name).exists()
    fm.copy(f"held2/{name}", f"again/{name}", src_backend="memory", dst_backend="disk")
    assert digest_of(root / "again" / name) == original


def test_memory_decodes_bytes_it_holds_like_disk(tmp_path):
    make_multi_series(tmp_path / "two.tif")
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})
    fm.copy("two.tif", "two.tif", src_backend="disk", dst_backend="memory")
    for kwargs in ({}, {"series": 1}):
        np.testing.assert_array_equal(
            fm.load("two.tif", "memory", **kwargs), fm.load("two.tif", "disk", **kwargs)
        )
    # a change of format is a conversion, through the destination's save()
    fm.copy("two.tif", "two.npy", src_backend="disk", dst_backend="memory")
    fm.copy("two.npy", "two.npy", src_backend="memory", dst_backend="disk")
    np.testing.assert_array_equal(np.load(tmp_path / "two.npy"), np.ones((8, 8), np.uint8))


def test_same_filesystem_move_is_a_rename(tmp_path):
    (tmp_path / "other").mkdir()
    fm = FileManager({"disk": DiskBackend(tmp_path), "other": DiskBackend(tmp_path / "other")})
    make_imagej_hyperstack(tmp_path / "a.tif")
    inode = os.stat(tmp_path / "a.tif").st_ino
    fm.move("a.tif", "archive/a.tif", "disk")
    assert os.stat(tmp_path / "archive" / "a.tif").st_ino == inode
    fm.move("archive/a.tif", "b.tif", src_backend="disk", dst_backend="other")
    assert os.stat(tmp_path / "other" / "b.tif").st_ino == inode


def test_a_move_with_writer_options_re_encodes_instead_of_renaming(tmp_path):
    """Within one backend a move was a rename whatever the keywords: compression="zlib"
    was silently ignored (copy() honoured it), and so was a keyword no writer takes."""
    kind = "disk"
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    image = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    fm.save(image, "a.tif", kind)
    fm.move("a.tif", "b.tif", kind, compression="zlib")
    with tifffile.TiffFile(io.BytesIO(fm.get_backend(kind).read_bytes("b.tif"))) as tif:
        assert tif.pages[0].compression.name == "ADOBE_DEFLATE"
    np.testing.assert_array_equal(fm.load("b.tif", kind), image)
    assert not fm.exists("a.tif", kind)
    with pytest.raises(TypeError, match="bogus"):
        fm.move("b.tif", "c.tif", kind, bogus=1)
    assert fm.exists("b.tif", kind) and not fm.exists("c.tif", kind)


def test_a_big_endian_array_moves_to_a_format_that_stores_native_order(tmp_path):
    """'>u2' from .npy came back from .tif as '<u2', equal values: the move was refused as
    lossy and left the converted copy behind."""
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    data = np.arange(12, dtype=">u2").reshape(3, 4)
    fm.save(data, "be.npy", "disk")
    fm.move("be.npy", "be.tif", "disk")
    np.testing.assert_array_equal(fm.load("be.tif", "disk"), data)
    assert not fm.exists("be.npy", "disk")


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_a_directory_moved_onto_one_with_overwrite_merges_into_it(tmp_path, kind):
    """overwrite=True within one backend raised 'Cannot move directory onto existing',
    while between two backends the same call merged the trees."""
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})
    fm.save(b"new", "src/a.bin", kind)
    fm.save(b"new", "src/same.bin", kind)
    fm.save(b"old", "dst/old.bin", kind)
    fm.save(b"old", "dst/same.bin", kind)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fm.move("src", "dst", kind)
    fm.move("src", "dst", kind, overwrite=True)
    assert sorted(fm.list_files("dst", kind)) == ["dst/a.bin", "dst/old.bin", "dst/same.bin"]
    assert fm.load("dst/same.bin", kind) == b"new"
    assert not fm.exists("src", kind)


def test_move_to_another_format_converts(tmp_path):
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    tifffile.imwrite(tmp_path / "a.tif", np.arange(6, dtype=np.uint16).reshape(2, 3))
    fm.move("a.tif", "a.npy", "disk")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(6).reshape(2, 3))
    assert not (tmp_path / "a.tif").exists()


def test_a_move_converting_a_multi_series_tiff_is_refused_before_anything_is_written(
    tmp_path,
):
    """load() reads series 0, so moving 'two.tif' to 'two.npy' kept one series of two and
    deleted the source. (copy() still converts series 0: the source stays.)"""
    make_multi_series(tmp_path / "two.tif")
    before = sha256(tmp_path / "two.tif")
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    with pytest.raises(TransferError, match="2 TIFF series"):
        fm.move("two.tif", "two.npy", "disk")
    assert sha256(tmp_path / "two.tif") == before
    assert not (tmp_path / "two.npy").exists()


def test_a_move_whose_conversion_changes_the_data_keeps_the_source(tmp_path):
    """'a.png' -> 'a.jpg' re-encoded lossily and deleted the exact original."""
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    noise = np.random.default_rng(10).integers(0, 256, (16, 16), dtype=np.uint8)
    fm.save(noise, "a.png", "disk")
    with pytest.raises(TransferError, match="changes the data.*nothing was written"):
        fm.move("a.png", "a.jpg", "disk")
    np.testing.assert_array_equal(fm.load("a.png", "disk"), noise)
    assert not (tmp_path / "a.jpg").exists()


def test_a_move_converts_only_what_loads_back_equal_and_writes_nothing_otherwise(tmp_path):
    """A JPEG held decoded in memory moved to disk by its re-encoded bytes (lossy), checked
    only against themselves; JSON -> CSV wrote repr() text for nested values and deleted the
    JSON; an int array .npy -> .csv was refused (the CSV loads as text) and the refused copy
    replaced the file at the destination (overwrite=True)."""
    disk, memory = DiskBackend(tmp_path), MemoryBackend()
    fm = FileManager({"disk": disk, "memory": memory})
    noise = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    fm.save(noise, "/m/a.jpg", "memory")
    with pytest.raises(TransferError, match="changes the data"):
        fm.move("/m/a.jpg", "a.jpg", src_backend="memory", dst_backend="disk")
    np.testing.assert_array_equal(fm.load("/m/a.jpg", "memory"), noise)
    assert not (tmp_path / "a.jpg").exists()

    fm.save([{"x": {"nested": 1}, "y": None}], "rows.json", "disk")
    (tmp_path / "keep.csv").write_text("keep me\n")
    with pytest.raises(TransferError, match="changes the data"):
        fm.move("rows.json", "keep.csv", "disk", overwrite=True)
    assert (tmp_path / "keep.csv").read_text() == "keep me\n"
    assert fm.load("rows.json", "disk") == [{"x": {"nested": 1}, "y": None}]

    counts = np.arange(12, dtype=np.int64).reshape(3, 4)
    fm.save(counts, "counts.npy", "disk")
    fm.move("counts.npy", "counts.csv", "disk")
    np.testing.assert_array_equal(fm.load("counts.csv", "disk", as_="array"), counts)
    assert not (tmp_path / "counts.npy").exists()


def test_copy_does_not_overwrite_in_upstreams_one_backend_form(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"new")
    (tmp_path / "b.bin").write_bytes(b"old")
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fm.copy("a.bin", "b.bin", "disk")
    assert (tmp_path / "b.bin").read_bytes() == b"old"
    fm.copy("a.bin", "b.bin", "disk", overwrite=True)
    assert (tmp_path / "b.bin").read_bytes() == b"new"


# -- move keeps the source unless the destination holds the item ----------------------------
class _NoDelete(StorageBackend):
    """A store that can save but not delete (it does not override delete)."""

    def __init__(self) -> None:
        self.items: dict[str, object] = {}

    def save(self, data, file_path, **kwargs):
        self.items[str(file_path)] = data

    def load(self, file_path, **kwargs):
        try:
            return self.items[str(file_path)]
        except KeyError:
            raise FileNotFoundError(f"{file_path} not found on backend 'nodelete'") from None

    def exists(self, path):
        return str(path) in self.items


class _StuckDelete(MemoryBackend):
    """A memory store whose delete fails (e.g. a permission the process lacks)."""

    def delete(self, path, recursive=False):
        raise PermissionError(f"cannot delete {path}")


def test_move_from_a_backend_that_cannot_delete_copies_nothing(tmp_path):
    source = _NoDelete()
    source.save(np.arange(4), "a.npy")
    fm = FileManager({"nodelete": source, "disk": DiskBackend(tmp_path)})
    with pytest.raises(UnsupportedOperationError, match="nothing was copied"):
        fm.move("a.npy", "a.npy", src_backend="nodelete", dst_backend="disk")
    assert not (tmp_path / "a.npy").exists()
    assert source.exists("a.npy")


def test_move_rolls_back_the_copy_when_the_source_cannot_be_deleted(tmp_path):
    source = _StuckDelete()
    source.save(np.arange(4), "a.npy")
    fm = FileManager({"stuck": source, "disk": DiskBackend(tmp_path)})
    with pytest.raises(TransferError, match="removed again, so nothing moved"):
        fm.move("a.npy", "a.npy", src_backend="stuck", dst_backend="disk")
    assert not (tmp_path / "a.npy").exists() and source.exists("a.npy")


def test_move_says_plainly_when_both_copies_exist():
    source, dest = _StuckDelete(), _StuckDelete()
    source.save(np.arange(4), "a.npy")
    fm = FileManager({"stuck": source, "stuck2": dest})
    with pytest.raises(TransferError, match="BOTH EXIST"):
        fm.move("a.npy", "b.npy", src_backend="stuck", dst_backend="stuck2")
    assert source.exists("a.npy") and dest.exists("b.npy")


def _free_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_move_to_a_viewer_keeps_a_file_of_an_extension_it_skips(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    viewer = NapariStreamingBackend(_free_endpoint(), timeout=1.0, connect_timeout=0.5)
    fm = FileManager({"disk": DiskBackend(tmp_path), "napari_stream": viewer})
    try:
        with pytest.raises(DeliveryNotConfirmedError, match="does not take") as info:
            fm.move("table.csv", "table.csv", src_backend="disk", dst_backend="napari_stream")
        assert "source was kept" in str(info.value)
        assert (tmp_path / "table.csv").read_text() == "a,b\n1,2\n"
    finally:
        viewer.close()


@pytest.mark.parametrize("policy", ["latest", "block"])
def test_move_to_a_viewer_that_is_gone_keeps_the_source(tmp_path, policy):
    tifffile.imwrite(tmp_path / "frame.tif", np.ones((8, 8), np.uint16))
    viewer = NapariStreamingBackend(
        _free_endpoint(), policy=policy, timeout=1.0, connect_timeout=0.5
    )
    fm = FileManager({"disk": DiskBackend(tmp_path), "napari_stream": viewer})
    try:
        with pytest.raises(DeliveryNotConfirmedError, match="source was kept"):
            fm.move("frame.tif", "frame.tif", src_backend="disk", dst_backend="napari_stream")
        assert (tmp_path / "frame.tif").is_file()
    finally:
        viewer.close()


def test_move_to_a_live_viewer_deletes_the_source_after_the_ack(tmp_path):
    from tests.stream_helpers import digest, start_receiver

    frame = np.arange(64, dtype=np.uint16).reshape(8, 8)
    tifffile.imwrite(tmp_path / "frame.tif", frame)
    receiver = start_receiver()
    viewer = NapariStreamingBackend(receiver.endpoint, timeout=20.0, connect_timeout=20.0)
    fm = FileManager({"disk": DiskBackend(tmp_path), "napari_stream": viewer})
    try:
        assert fm.move("frame.tif", "live/frame.tif", src_backend="disk",
                       dst_backend="napari_stream")  # fmt: skip
        assert not (tmp_path / "frame.tif").exists()
        received = viewer.request("report", timeout=20.0)["received"]
        assert [(r["path"], r["digest"]) for r in received] == [("live/frame.tif", digest(frame))]
    finally:
        viewer.close()
        receiver.stop()


# -- overwrite keeps mode and owner ---------------------------------------------------------
def test_overwrite_keeps_the_files_mode(tmp_path):
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    fm.save(np.arange(3), "secret.npy", "disk")
    os.chmod(tmp_path / "secret.npy", 0o600)
    fm.save(np.arange(4), "secret.npy", "disk")
    assert stat.S_IMODE(os.stat(tmp_path / "secret.npy").st_mode) == 0o600
    np.testing.assert_array_equal(np.load(tmp_path / "secret.npy"), np.arange(4))

    (tmp_path / "other.npy").write_bytes((tmp_path / "secret.npy").read_bytes())
    os.chmod(tmp_path / "other.npy", 0o640)
    fm.copy("secret.npy", "other.npy", src_backend="disk", dst_backend="disk")
    assert stat.S_IMODE(os.stat(tmp_path / "other.npy").st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_overwrite_keeps_the_files_owner(tmp_path):
    disk = DiskBackend(tmp_path)
    disk.save("v1", "shared.txt")
    os.chown(tmp_path / "shared.txt", 4321, 4321)
    disk.save("v2", "shared.txt")
    info = os.stat(tmp_path / "shared.txt")
    assert (info.st_uid, info.st_gid) == (4321, 4321)


# -- formats --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("gray.png", np.random.default_rng(1).integers(0, 256, (16, 20), dtype=np.uint8)),
        ("rgb.png", np.random.default_rng(2).integers(0, 256, (16, 20, 3), dtype=np.uint8)),
        ("deep.png", np.random.default_rng(3).integers(0, 65536, (16, 20), dtype=np.uint16)),
        ("rgba.png", np.random.default_rng(4).integers(0, 256, (6, 7, 4), dtype=np.uint8)),
        ("rgb.bmp", np.random.default_rng(5).integers(0, 256, (16, 20, 3), dtype=np.uint8)),
    ],
)
def test_lossless_images_round_trip(tmp_path, name, array):
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    fm.save(array, name, "disk")
    np.testing.assert_array_equal(fm.load(name, "disk"), array)


def test_jpeg_and_gif(tmp_path):
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    smooth = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    fm.save(smooth, "photo.jpg", "disk", quality=95)
    loaded = fm.load("photo.jpg", "disk")
    assert loaded.shape == smooth.shape and np.abs(loaded.astype(int) - smooth).max() <= 8
    frames = np.random.default_rng(6).integers(0, 256, (3, 10, 12), dtype=np.uint8)
    fm.save(frames, "movie.gif", "disk")
    np.testing.assert_array_equal(fm.load("movie.gif", "disk", mode="L"), frames)


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("rgba.jpg", np.full((8, 8, 4), 200, np.uint8)),  # Pillow: a bare OSError
        ("rgba.bmp", np.full((8, 8, 4), 200, np.uint8)),  # saved, alpha silently dropped
        ("deep-rgb.png", np.full((8, 8, 3), 40000, np.uint16)),  # Pillow: a bare TypeError
        ("rgba.gif", np.full((8, 8, 4), 200, np.uint8)),  # alpha silently dropped
        # 1024 colours in one frame: Pillow silently quantised it to 256
        ("many.gif", np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    ],
)
def test_images_a_format_cannot_hold_exactly_are_refused_with_a_clear_error(
    tmp_path, name, array
):
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    with pytest.raises(FormatDataError, match=name) as raised:
        fm.save(array, name, "disk")
    assert "this extension takes" in str(raised.value)
    assert not (tmp_path / name).exists()


def test_a_gif_with_up_to_256_colours_per_frame_round_trips(tmp_path):
    palette = np.random.default_rng(8).integers(0, 256, (256, 3), dtype=np.uint8)
    frames = palette[np.random.default_rng(9).integers(0, 256, (2, 24, 24))]
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    fm.save(frames, "palette.gif", "disk")
    np.testing.assert_array_equal(fm.load("palette.gif", "disk"), frames)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("damaged.tif", b"II*\x00garbage"),  # tifffile: a TiffFileError without the path
        ("damaged.npy", b"\x93NUMPY\x01\x00garbage"),  # numpy: "contains pickled data"
        ("damaged.npz", b"PK\x03\x04garbage"),  # zipfile.BadZipFile without the path
    ],
)
def test_a_damaged_file_is_an_error_that_names_it(tmp_path, name, content):
    from polystore.exceptions import ImageLoadError

    (tmp_path / name).write_bytes(content)
    for backend in (DiskBackend(tmp_path), MemoryBackend()):
        if isinstance(backend, MemoryBackend):
            backend.write_bytes(content, name)
        with pytest.raises(ImageLoadError, match=f"{name}.*damaged"):
            FileManager({"b": backend}).load(name, "b")


def test_npz(tmp_path):
    disk = DiskBackend(tmp_path)
    arrays = {"raw": np.arange(6).reshape(2, 3), "mask": np.eye(3, dtype=bool)}
    disk.save(arrays, "bundle.npz")
    loaded = disk.load("bundle.npz")
    assert sorted(loaded) == ["mask", "raw"]
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype
    disk.save(np.arange(3), "one.npz", compress=True)
    np.testing.assert_array_equal(disk.load("one.npz")["arr_0"], np.arange(3))


def test_csv_forms_load_back_as_written(tmp_path):
    disk = DiskBackend(tmp_path)
    matrix = np.arange(12, dtype=np.int32).reshape(3, 4)
    disk.save(matrix, "matrix.csv")
    assert (tmp_path / "matrix.csv").read_text().splitlines()[0] == "0,1,2,3"
    np.testing.assert_array_equal(disk.load("matrix.csv", as_="array"), matrix)
    floats = np.array([[0.1, 2.5e-7], [1 / 3, -4.0]])
    disk.save(floats, "floats.csv")
    np.testing.assert_array_equal(disk.load("floats.csv", as_="array"), floats)

    rows = [["well", "cells", "mean"], ["A01", 42, 1.5], ["B02", 7, 0.25]]
    disk.save(rows, "rows.csv")
    assert disk.load("rows.csv", as_="rows") == rows

    records = [{"well": "A01", "cells": 42, "mean": 1.5}, {"well": "B02", "cells": 7, "mean": 0.25}]
    disk.save(records, "records.csv")
    assert disk.load("records.csv", as_="dicts") == records
    assert disk.load("records.csv").startswith("well,cells,mean")  # default: the text


def test_csv_keeps_identifiers_that_look_like_numbers_and_floats_that_are_not_finite(tmp_path):
    """'007' came back as 7 (a plate or zip code silently changed), and a NaN in a float
    array came back as the text 'nan', turning the whole array into strings."""
    disk = DiskBackend(tmp_path)
    rows = [["id", "count", "ratio"], ["007", 3, float("inf")], ["+5", -2, 0.5]]
    disk.save(rows, "ids.csv")
    assert disk.load("ids.csv", as_="rows") == rows
    with_nan = np.array([[1.0, np.nan], [-np.inf, 2.5]])
    disk.save(with_nan, "nan.csv")
    loaded = disk.load("nan.csv", as_="array")
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, with_nan)


@pytest.mark.parametrize("array", [np.array([[True, False], [False, True]]),
                                   np.array([[1 + 2j, 3], [np.nan + 1j, -2j]]),
                                   np.array([[2**64 - 1, 5]], np.uint64)],
                         ids=["bool", "complex", "uint64"])
def test_a_bool_complex_or_uint64_array_loads_back_from_csv_as_written(tmp_path, array):
    """as_="array" gave bool and complex arrays back as strings ('True', '(1+2j)') and a
    uint64 beyond int64 as float64 (its low bits lost)."""
    disk = DiskBackend(tmp_path)
    disk.save(array, "values.csv")
    loaded = disk.load("values.csv", as_="array")
    assert loaded.dtype == array.dtype
    np.testing.assert_array_equal(loaded, array)


def test_ragged_csv_rows_as_an_array_say_how_to_load_them(tmp_path):
    disk = DiskBackend(tmp_path)
    disk.save([[1, 2, 3], [4]], "ragged.csv")
    with pytest.raises(ValueError, match=r"rows have 1 to 3 cells.*as_='rows'"):
        disk.load("ragged.csv", as_="array")
    assert disk.load("ragged.csv", as_="rows") == [[1, 2, 3], [4]]


def test_csv_from_a_pandas_dataframe(tmp_path):
    pd = needs.module("pandas")
    frame = pd.DataFrame({"well": ["A01", "B02"], "cells": [42, 7], "mean": [1.5, 0.25]})
    disk = DiskBackend(tmp_path)
    disk.save(frame, "frame.csv")
    pd.testing.assert_frame_equal(disk.load("frame.csv", as_="dataframe"), frame)


@pytest.mark.parametrize("name", ["raw.tif", "raw.npy", "raw.unknownext", "raw.txt"])
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_bytes_are_written_verbatim_to_any_extension(tmp_path, name, kind):
    payload = kind(b"\x00\x01binary \xff payload")
    DiskBackend(tmp_path).save(payload, name)
    assert (tmp_path / name).read_bytes() == bytes(payload)


def test_arrays_from_other_libraries_are_saved_as_numpy(tmp_path):
    torch = pytest.importorskip("torch")
    tensor = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    disk = DiskBackend(tmp_path)
    disk.save(tensor, "t.npy")
    disk.save(tensor, "t.tif")
    for name in ("t.npy", "t.tif"):
        np.testing.assert_array_equal(disk.load(name), tensor.numpy())


@pytest.mark.parametrize(
    ("name", "data", "given", "accepts"),
    [
        ("img.png", np.zeros((4, 4)), "float64 array", "uint8 or uint16"),
        ("img.jpg", np.zeros((4, 4, 5), np.uint8), "shape (4, 4, 5)", "uint8"),
        ("arr.npy", {"a": 1}, "dict", "numeric array"),
        ("arr.tif", "text", "str", "numeric array"),
        ("t.csv", [1, 2, 3], "list", "a list of rows"),
        ("t.csv", np.zeros((2, 2, 2)), "shape (2, 2, 2)", "2-D numeric array"),
        ("n.txt", 3.5, "float", "str"),
        ("m.json", {"a": object()}, "dict", "JSON"),
    ],
)
def test_bad_input_says_path_type_and_what_the_extension_takes(
    tmp_path, name, data, given, accepts
):
    disk = DiskBackend(tmp_path)
    with pytest.raises(FormatDataError) as info:
        disk.save(data, f"sub/{name}")
    message = str(info.value)
    assert f"sub/{name}" in message and given in message and accepts in message
    assert not (tmp_path / "sub").exists()  # nothing written, not even the directory


@pytest.mark.parametrize("name", ["é" * 120 + ".npy", "画" * 80 + ".tif", "a" * 251 + ".npy"])
def test_a_name_up_to_255_bytes_saves_whatever_its_script(tmp_path, name):
    """Non-ASCII names of 244 bytes failed with 'File name too long', naming an internal
    temporary file: its name kept 200 characters of the target's, not 200 bytes."""
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    fm.save(np.arange(6, dtype=np.uint8).reshape(2, 3), name, "disk")
    np.testing.assert_array_equal(fm.load(name, "disk"),
                                  np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert os.listdir(tmp_path) == [name]  # and no temporary file left beside it


def test_a_save_under_a_file_or_of_an_empty_image_says_what_is_wrong(tmp_path):
    """A file as a parent gave a bare '[Errno 17] File exists'; an empty PNG imageio's
    'cannot write empty image', without the path."""
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    fm.save("hello", "notes.txt", "disk")
    with pytest.raises(NotADirectoryError, match=r"notes.txt/a.npy.*notes.txt' is a file"):
        fm.save(np.arange(3), "notes.txt/a.npy", "disk")
    with pytest.raises(FormatDataError, match=r"shape \(0, 4\) \(no pixels.*'e.png'"):
        fm.save(np.zeros((0, 4), np.uint8), "e.png", "disk")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_unknown_extension_error_names_the_extensions(tmp_path):
    with pytest.raises(UnsupportedFormatError, match=r"\.png.*\.tif") as info:
        DiskBackend(tmp_path).save(np.zeros(3), "a.weird")
    assert "a.weird" in str(info.value)


# -- pickling into worker processes ---------------------------------------------------------
def test_registry_and_filemanager_pickle_as_configuration(tmp_path):
    registry = BackendRegistry()
    registry["disk"] = DiskBackend(tmp_path)
    registry["memory"].save(np.arange(3), "x.npy")
    fm = FileManager(registry)
    copy = pickle.loads(pickle.dumps(fm))
    assert sorted(copy.registry) == sorted(registry)
    assert copy.get_backend("disk").base_dir == tmp_path.resolve()
    assert not copy.exists("x.npy", "memory")  # a memory store is per process
    copy.save(np.arange(2), "from_copy.npy", "disk")
    assert (tmp_path / "from_copy.npy").is_file()


def _frames(n: int) -> list[np.ndarray]:
    return [np.full((4, 5), i, np.uint16) for i in range(n)]


def test_spawn_process_pool_saves_through_one_pickled_filemanager(tmp_path):
    fm = FileManager(BackendRegistry())
    fm.register_backend("disk", DiskBackend(tmp_path))
    paths = [f"pool/t{i}.tif" for i in range(6)]
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(fm.save, _frames(6), paths, repeat("disk")))
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / path), _frames(6)[i])
    assert fm.list_files("pool", "disk") == [str(Path("pool") / f"t{i}.tif") for i in range(6)]


def test_dask_local_cluster_saves_through_one_pickled_filemanager(tmp_path):
    distributed = needs.module("distributed")
    fm = FileManager(BackendRegistry())
    fm.register_backend("disk", DiskBackend(tmp_path))
    paths = [f"dask/t{i}.npy" for i in range(6)]
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster, distributed.Client(cluster) as client:
        futures = client.map(fm.save, _frames(6), paths, backend="disk", pure=False)
        client.gather(futures)
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids  # real worker processes
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(np.load(tmp_path / path), _frames(6)[i])


# -- natural order --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_list_files_is_in_natural_order(tmp_path, kind):
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})
    for i in (10, 2, 1, 21, 3):
        fm.save(b"x", f"run/t{i}.bin", kind)
    names = [Path(p).name for p in fm.list_files("run", kind)]
    assert names == ["t1.bin", "t2.bin", "t3.bin", "t10.bin", "t21.bin"]
    assert fm.list_dir("run", kind) == names


def test_list_files_passes_extra_keywords_to_the_backend(tmp_path):
    class Listing(MemoryBackend):
        def list_files(self, directory, pattern=None, extensions=None, recursive=False, **kw):
            return [f"{directory}/{kw['plate_id']}.tif"]

    fm = FileManager({"listing": Listing()})
    assert fm.list_files("root", "listing", plate_id="P7") == ["root/P7.tif"]


# -- packaging: the guide's example names stay free -----------------------------------------
def test_install_script_installs_nothing_from_tests():
    script = (ROOT / "scripts" / "install.sh").read_text()
    commands = [line.split("#")[0] for line in script.splitlines()]
    assert not [line for line in commands if "tests" in line]
    assert "-e viewers/napari" in script  # the same install still sets up the plugin


def test_guides_mybackend_name_is_free_without_the_test_session(tmp_path):
    """A fresh interpreter without the test session's plugin install: the guide's own
    `mybackend` example registers without DuplicateBackendError."""
    script = textwrap.dedent(
        """
        from polystore import BackendRegistry, StorageBackend

        assert "mybackend" not in BackendRegistry()

        class MyBackend(StorageBackend):
            _backend_type = 'mybackend'
            def save(self, data, file_path, **kwargs): pass
            def load(self, file_path, **kwargs): return None

        assert type(BackendRegistry()["mybackend"]) is MyBackend
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_replacing_a_registered_name_on_purpose(tmp_path):
    """`__replaces_registered__ = True` takes over a name; without it, a clash is an error.
    Run in a fresh interpreter: the class table is process-wide."""
    script = textwrap.dedent(
        """
        from polystore import BackendRegistry, MemoryBackend
        from polystore.base import registered_backend_classes
        from polystore.errors import DuplicateBackendError

        try:
            class Accidental(MemoryBackend):
                _backend_type = "memory"
        except DuplicateBackendError as exc:
            assert "already registered" in str(exc)
        else:
            raise AssertionError("a clash must raise")

        class Deliberate(MemoryBackend):
            _backend_type = "memory"
            __replaces_registered__ = True

        assert registered_backend_classes()["memory"] is Deliberate
        assert type(BackendRegistry()["memory"]) is Deliberate
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_move_replaces_a_symlink_only_when_asked(tmp_path):
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    fm.save(b"target", "target.bin", "disk")
    fm.save(b"new", "new.bin", "disk")
    fm.create_symlink("target.bin", "link.bin", "disk")
    with pytest.raises(FileExistsError):
        fm.move("new.bin", "link.bin", "disk")
    fm.move("new.bin", "link.bin", "disk", replace_symlinks=True)
    assert not (tmp_path / "link.bin").is_symlink()
    assert (tmp_path / "link.bin").read_bytes() == b"new"
    assert (tmp_path / "target.bin").read_bytes() == b"target"  # the link's target untouched


def test_memory_backend_copies_keep_items_but_pickles_do_not():
    import copy

    store = MemoryBackend()
    store.save(np.arange(3), "a/x.npy")
    for clone in (copy.copy(store), copy.deepcopy(store)):
        np.testing.assert_array_equal(clone.load("a/x.npy"), np.arange(3))
        clone.delete("a/x.npy")
        assert store.exists("a/x.npy")  # independent stores
    assert not pickle.loads(pickle.dumps(store)).exists("a/x.npy")  # one store per process


def _lock_against_deletion(path: Path) -> bool:
    """Make files in ``path`` undeletable for real: no write permission on the directory
    (an ordinary user) or the immutable attribute (root, which ignores permissions)."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        return True
    for file in path.iterdir():
        if subprocess.run(["chattr", "+i", str(file)], capture_output=True).returncode != 0:
            return False
    return True


def _unlock(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o700)
    else:
        for file in path.iterdir():
            subprocess.run(["chattr", "-i", str(file)], capture_output=True)


def test_move_of_a_tree_whose_source_is_deleted_only_in_part_loses_no_file(tmp_path):
    """Deleting a moved tree's source can fail half way (a file that cannot be removed):
    each file must then still exist somewhere, and the error must say where."""
    src = tmp_path / "src"
    (src / "zlocked").mkdir(parents=True)
    # Many files beside the locked one: whatever order a recursive delete takes, it is
    # all but certain to remove some of them before it fails.
    contents = {f"f{i}.bin": f"data {i}".encode() for i in range(30)}
    contents["zlocked/keep.bin"] = b"locked"
    for rel, data in contents.items():
        (src / rel).write_bytes(data)
    if not _lock_against_deletion(src / "zlocked"):
        pytest.skip("cannot make a file undeletable on this filesystem")
    memory = MemoryBackend()
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": memory})
    try:
        with pytest.raises(TransferError) as raised:
            fm.move("src", "moved", src_backend="disk", dst_backend="memory")
    finally:
        _unlock(src / "zlocked")
    for rel, data in contents.items():
        on_disk = (src / rel).read_bytes() if (src / rel).exists() else None
        in_memory = memory.read_bytes(f"moved/{rel}") if memory.exists(f"moved/{rel}") else None
        assert data in (on_disk, in_memory), f"{rel} was lost: {raised.value}"
    assert "nothing moved" not in str(raised.value)
    assert "only on 'disk'" in str(raised.value)  # says where the rest are


def test_a_tree_with_a_symlink_to_a_directory_is_refused_before_anything_is_written(tmp_path):
    """A link back up the tree made copy follow it 40 levels deep, writing a partial
    tree before failing; a move would delete through the link."""
    (tmp_path / "tree/x").mkdir(parents=True)
    (tmp_path / "tree/x/f.bin").write_bytes(b"f")
    (tmp_path / "tree/x/loop").symlink_to(tmp_path / "tree")
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})
    for operation in (fm.copy, fm.move):
        with pytest.raises(UnsupportedOperationError, match="symbolic link to a directory"):
            operation("tree", "out", src_backend="disk", dst_backend="memory")
        assert not fm.exists("out", "memory")
    assert (tmp_path / "tree/x/f.bin").read_bytes() == b"f"


def test_moving_a_link_to_a_directory_moves_its_content_and_removes_only_the_link(tmp_path):
    """Moved to another backend, a link named as the source deleted every file through the
    link: the directory it points to was emptied, its files left only in memory."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real/a.bin").write_bytes(b"a")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})
    fm.move("link", "moved", src_backend="disk", dst_backend="memory")
    assert fm.load("moved/a.bin", "memory") == b"a"
    assert not (tmp_path / "link").is_symlink()  # the link is what moved...
    assert (tmp_path / "real/a.bin").read_bytes() == b"a"  # ...not what it points to


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_moving_a_directory_into_itself_is_a_clear_error(tmp_path, kind):
    fm = FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})
    fm.save(b"a", "d/a.bin", kind)
    with pytest.raises(ValueError, match="into itself"):
        fm.move("d", "d/sub/inner", kind)
    assert fm.list_files("d", kind, recursive=True) == ["d/a.bin"]


_FULL_DISK_SCRIPT = """
import os, sys
from polystore import DiskBackend, FileManager
src, small = sys.argv[1], sys.argv[2]
fm = FileManager({"disk": DiskBackend()})
try:
    fm.move(src, os.path.join(small, "tree"), "disk")  # another filesystem: copy, then delete
except OSError as error:
    print("refused", error.errno)
print("left", sorted(os.listdir(small)))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_mid_move_keeps_the_source_and_leaves_no_partial_tree(tmp_path):
    """A 1 MiB tmpfs (in a private mount namespace) fills up half way through a tree."""
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    files = {f"f{i}.bin": os.urandom(300_000) for i in range(4)} | {"sub/g.bin": b"g" * 10}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    small = tmp_path / "small"
    small.mkdir()
    command = (
        f"mount -t tmpfs -o size=1M tmpfs {small} && "
        f"{sys.executable} -c '{_FULL_DISK_SCRIPT}' {src} {small}"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True)
    if "refused" not in result.stdout and "left" not in result.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr[-300:]}")
    assert "refused 28" in result.stdout, result.stdout + result.stderr  # ENOSPC reported
    assert "left []" in result.stdout, result.stdout  # no partial tree
    for rel, data in files.items():
        assert (src / rel).read_bytes() == data


def test_moving_a_link_onto_its_target_through_two_disk_backends_keeps_the_file(tmp_path):
    """Through two disk backends (one filesystem: a rename) a symlink moved onto its own
    target replaced the file with a link to itself, and the content was gone."""
    (tmp_path / "real.bin").write_bytes(b"content")
    (tmp_path / "link.bin").symlink_to(tmp_path / "real.bin")
    fm = FileManager({"disk": DiskBackend(), "lab": DiskBackend(tmp_path)})
    fm.move(str(tmp_path / "link.bin"), "real.bin", src_backend="disk", dst_backend="lab")
    assert (tmp_path / "real.bin").read_bytes() == b"content"


def test_moving_a_hard_link_onto_another_link_of_the_same_file_moves_it(tmp_path):
    """rename() between two hard links of one file does nothing: the move returned True
    and left the source in place."""
    (tmp_path / "a.bin").write_bytes(b"content")
    os.link(tmp_path / "a.bin", tmp_path / "b.bin")
    fm = FileManager({"disk": DiskBackend(tmp_path)})
    assert fm.move("a.bin", "b.bin", "disk", overwrite=True) is True
    assert not (tmp_path / "a.bin").exists()
    assert (tmp_path / "b.bin").read_bytes() == b"content"
