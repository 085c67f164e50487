"""File formats of the storage half (polystore.formats, through disk and memory).

Each test attacks one defect and fails on the code before its fix: dict keys that a format
stores under one name (1 and "1"), NaN/infinity written as non-standard JSON, grey GIF
frames coming back as RGB stacks, deep library errors (json, UTF-8, tifffile indices)
instead of an error naming the file, and a memory store that took what disk refuses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from polystore import (
    DiskBackend,
    FileManager,
    FormatDataError,
    FormatReadError,
    MemoryBackend,
    TransferError,
)


@pytest.fixture
def fm(tmp_path):
    return FileManager({"disk": DiskBackend(tmp_path), "memory": MemoryBackend()})


def _refused_and_nothing_written(fm, tmp_path, data, name, match, **kwargs):
    """Saving ``data`` to disk and to memory both raise FormatDataError; nothing is kept."""
    for backend in ("disk", "memory"):
        with pytest.raises(FormatDataError, match=match) as info:
            fm.save(data, name, backend, **kwargs)
        assert name in str(info.value)
        assert not fm.exists(name, backend)
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files


# -- 1: keys that collide once written ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a.npz", {1: np.arange(2), "1": np.arange(3)}),
        ("a.csv", [{1: 5, "1": 6}]),
        ("a.csv", [{"x": 0}, {2.5: 1, "2.5": 2}]),
        ("a.json", {1: "int", "1": "str"}),
        ("a.json", {"outer": [{True: 1, "true": 2}]}),  # nested, as json writes True
        ("a.json", {None: 1, "null": 2}),
    ],
)
def test_keys_one_format_stores_alike_are_refused(fm, tmp_path, name, data):
    _refused_and_nothing_written(fm, tmp_path, data, name, "rename one of the two keys")


def test_refused_keys_keep_the_file_that_was_there(fm, tmp_path):
    fm.save({"a": np.arange(4)}, "keep.npz", "disk")
    with pytest.raises(FormatDataError, match="both stored as '1'"):
        fm.save({1: np.zeros(1), "1": np.ones(1)}, "keep.npz", "disk")
    np.testing.assert_array_equal(fm.load("keep.npz", "disk")["a"], np.arange(4))


def test_distinct_keys_still_round_trip(fm):
    fm.save({1: np.arange(2), "2": np.arange(3)}, "ok.npz", "disk")
    assert sorted(fm.load("ok.npz", "disk")) == ["1", "2"]
    fm.save({1: "a", "2": "b", None: "c", 2.5: "d"}, "ok.json", "disk")
    assert fm.load("ok.json", "disk") == {"1": "a", "2": "b", "null": "c", "2.5": "d"}
    fm.save([{1: 5, "b": 6}], "ok.csv", "disk")
    assert fm.load("ok.csv", "disk", as_="dicts") == [{"1": 5, "b": 6}]


@pytest.mark.parametrize("key", ["file", "allow_pickle"])
def test_npz_keys_named_like_savez_arguments_round_trip(fm, key):
    """np.savez takes them as its own keyword arguments (a TypeError, or a wrong file)."""
    data = {key: np.arange(3), "other": np.eye(2)}
    for backend in ("disk", "memory"):
        fm.save(data, f"k/{key}.npz", backend, compress=True)
    fm.copy(f"k/{key}.npz", "k/copied.npz", src_backend="memory", dst_backend="disk")
    for name in (f"k/{key}.npz", "k/copied.npz"):
        loaded = fm.load(name, "disk")
        assert sorted(loaded) == sorted(data)
        for k, v in data.items():
            np.testing.assert_array_equal(loaded[k], v)


def test_npz_key_and_key_dot_npy_each_load_their_own_array(fm, tmp_path):
    """Key 'a' is stored as member 'a.npy', key 'a.npy' as 'a.npy.npy'; np.load's
    archive['a.npy'] returns member 'a.npy', so both keys loaded a's array."""
    data = {"a.npy": np.zeros(2), "a": np.ones(3)}
    for backend in ("disk", "memory"):
        fm.save(data, "two.npz", backend)
    fm.copy("two.npz", "copied.npz", src_backend="memory", dst_backend="disk")
    np.savez(tmp_path / "numpy.npz", **data)  # a file numpy itself wrote
    for name, backend in [("two.npz", "disk"), ("two.npz", "memory"), ("copied.npz", "disk"),
                          ("numpy.npz", "disk")]:
        loaded = fm.load(name, backend)
        assert sorted(loaded) == ["a", "a.npy"]
        np.testing.assert_array_equal(loaded["a.npy"], np.zeros(2))
        np.testing.assert_array_equal(loaded["a"], np.ones(3))


def test_update_json_refuses_keys_stored_alike_and_keeps_the_file(tmp_path):
    """As a .json save does: {1: .., '1': ..} would be written as one name twice, and the
    next update (or any reader) keeps only the last."""
    from polystore.metadata import update_json

    path = tmp_path / "meta.json"
    update_json(path, lambda m: {"kept": 1})
    with pytest.raises(FormatDataError, match="both stored as '1'"):
        update_json(path, lambda m: {**m, "runs": {1: "first", "1": "second"}})
    assert json.loads(path.read_text()) == {"kept": 1}


# -- 2: NaN and infinity in JSON ----------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        {"mean": float("nan")},
        [1.0, float("inf")],
        {"a": {"b": [-np.inf]}},
        np.array([1.0, np.nan]),
        {"score": np.float32("nan")},
    ],
)
def test_json_refuses_nan_and_infinity(fm, tmp_path, data):
    _refused_and_nothing_written(fm, tmp_path, data, "m.json", "NaN or infinity.*allow_nan")


def test_json_nan_refusal_keeps_the_old_file_and_what_to_do_works(fm, tmp_path):
    fm.save({"mean": 1.5}, "m.json", "disk")
    with pytest.raises(FormatDataError, match="replace them with None"):
        fm.save({"mean": float("nan")}, "m.json", "disk")
    assert fm.load("m.json", "disk") == {"mean": 1.5}
    fm.save({"mean": None}, "m.json", "disk")
    assert json.loads((tmp_path / "m.json").read_text()) == {"mean": None}  # standard JSON
    fm.save({"mean": float("nan")}, "nan.json", "disk", allow_nan=True)  # asked for
    assert np.isnan(fm.load("nan.json", "disk")["mean"])


# -- 3: GIF frames back in the shape saved -------------------------------------------------
_rng = np.random.default_rng(7)
_GREY = {
    "noise": _rng.integers(0, 256, (20, 30), dtype=np.uint8),
    "two levels": np.where(_rng.random((20, 30)) > 0.5, 200, 7).astype(np.uint8),
    "constant": np.full((20, 30), 9, np.uint8),
    "three wide": _rng.integers(0, 256, (20, 3), dtype=np.uint8),  # (y, 3): grey, not RGB
}


@pytest.mark.parametrize("backend", ["disk", "memory"])
@pytest.mark.parametrize("kind", sorted(_GREY))
def test_a_grey_gif_frame_loads_as_the_2d_array_saved(fm, backend, kind):
    frame = _GREY[kind]
    if backend == "memory":  # held as the file's bytes, decoded on load
        fm.save(frame, "g.gif", "disk")
        fm.copy("g.gif", "g.gif", src_backend="disk", dst_backend="memory")
    else:
        fm.save(frame, "g.gif", "disk")
    loaded = fm.load("g.gif", backend)
    assert loaded.shape == frame.shape and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, frame)


def test_grey_and_colour_gif_stacks_and_frames_keep_their_shape(fm):
    grey = np.stack([_GREY["noise"], _GREY["two levels"], 255 - _GREY["noise"]])
    colour = np.stack([_GREY["noise"], _GREY["two levels"] // 2, _GREY["constant"]], axis=-1)
    colour[colour > 100] = 100  # at most 101 colours a frame
    cases = {"grey.gif": grey, "frame.gif": colour, "stack.gif": np.stack([colour, colour[::-1]])}
    for name, data in cases.items():
        fm.save(data, name, "disk")
        loaded = fm.load(name, "disk")
        assert loaded.shape == data.shape, name
        np.testing.assert_array_equal(loaded, data)
    # one page of a stack stays available as imageio gives it
    np.testing.assert_array_equal(fm.load("grey.gif", "disk", index=1), grey[1])


# -- 4: files that cannot be read: an error naming the file --------------------------------
@pytest.mark.parametrize(
    ("name", "content", "kwargs", "match"),
    [
        ("bad.json", b'{"a": 1,', {}, "damaged"),
        ("latin.json", '{"caf\u00e9": 1}'.encode("latin-1"), {}, "not UTF-8.*read_bytes"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), {}, "not UTF-8.*read_bytes"),
        ("latin.csv", "a,b\ncaf\u00e9,1\n".encode("latin-1"), {}, "not UTF-8"),
        ("latin.csv", "a,b\ncaf\u00e9,1\n".encode("latin-1"), {"as_": "rows"}, "not UTF-8"),
        ("latin.csv", "a,b\ncaf\u00e9,1\n".encode("latin-1"), {"as_": "dicts"}, "not UTF-8"),
        ("latin.csv", "caf\u00e9,b\n1,2\n".encode("latin-1"), {"as_": "dataframe"}, "UTF-8"),
    ],
)
def test_an_unreadable_text_file_is_an_error_that_names_it(
    fm, tmp_path, name, content, kwargs, match
):
    if kwargs.get("as_") == "dataframe":
        pytest.importorskip("pandas")
    (tmp_path / name).write_bytes(content)
    fm.copy(name, name, src_backend="disk", dst_backend="memory")
    for backend in ("disk", "memory"):
        with pytest.raises(FormatReadError, match=match) as info:
            fm.load(name, backend, **kwargs)
        assert repr(name) in str(info.value)
        assert isinstance(info.value, ValueError)  # as json's and codecs' errors were
    assert (tmp_path / name).read_bytes() == content  # nothing touched


@pytest.mark.parametrize(
    "kwargs",
    [{"key": 5}, {"key": -3}, {"key": [0, 7]}, {"key": "x"}, {"series": 3}, {"series": -2},
     {"series": "a"}, {"key": 4, "series": 0}],
)
def test_a_tiff_page_or_series_it_lacks_is_an_error_saying_what_it_has(fm, tmp_path, kwargs):
    fm.save(np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4), "t.tif", "disk")
    fm.copy("t.tif", "t.tif", src_backend="disk", dst_backend="memory")
    for backend in ("disk", "memory"):
        with pytest.raises(FormatReadError, match="'t.tif'.*2 page.*1 series") as info:
            fm.load("t.tif", backend, **kwargs)
        assert "ask for one it has" in str(info.value)


def test_tiff_indices_it_has_still_read(fm):
    stack = np.arange(3 * 4 * 4, dtype=np.uint16).reshape(3, 4, 4)
    fm.save(stack, "t.tif", "disk")
    np.testing.assert_array_equal(fm.load("t.tif", "disk", key=-1), stack[-1])
    np.testing.assert_array_equal(fm.load("t.tif", "disk", key=-3), stack[0])
    np.testing.assert_array_equal(fm.load("t.tif", "disk", key=[0, 2]), stack[[0, 2]])
    np.testing.assert_array_equal(fm.load("t.tif", "disk", series=-1), stack)
    with pytest.raises(TypeError, match="unexpected keyword"):  # not an index: as before
        fm.load("t.tif", "disk", no_such_option=1)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="no extended precision")
def test_tiff_refuses_extended_precision_it_cannot_read_back(fm, tmp_path):
    for dtype in (np.longdouble, np.clongdouble):
        _refused_and_nothing_written(
            fm, tmp_path, np.ones((2, 2), dtype), "x.tif", "extended precision.*npy"
        )


# -- 5: memory refuses at save what disk refuses for the extension -------------------------
@pytest.mark.parametrize(
    ("data", "name"),
    [
        (object(), "x.npy"),
        ("text", "x.npy"),
        ({"a": "b"}, "x.tif"),
        ({"a": object()}, "x.json"),
        (np.zeros((4, 4), np.float32), "x.png"),
        (np.zeros((2, 2, 2)), "x.csv"),
        (np.zeros(3), "x.txt"),
        ([np.zeros(2), "no"], "x.npz"),
    ],
)
def test_memory_refuses_what_disk_refuses_for_the_extension(fm, tmp_path, data, name):
    _refused_and_nothing_written(fm, tmp_path, data, name, "this extension takes")


def test_memory_still_holds_any_object_where_there_is_no_format(fm):
    """The contract (tests/test_core.py): memory holds any Python object; only a path whose
    extension names a format holds what that format takes."""
    thing = {"model": object, "fn": len}
    fm.save(thing, "scratch/state", "memory")
    fm.save(thing, "scratch/state.pkl", "memory")
    assert fm.load("scratch/state", "memory") == thing
    assert fm.load("scratch/state.pkl", "memory") == thing


def test_memory_checks_with_the_save_s_own_options(fm):
    """The check of what memory is given uses the options of the save (the first version
    checked without them, so memory refused NaN in JSON even with allow_nan=True)."""
    fm.save({"mean": float("nan")}, "m/nan.json", "memory", allow_nan=True)
    assert np.isnan(fm.load("m/nan.json", "memory")["mean"])


def test_what_memory_accepted_moves_to_disk_whole(fm):
    items = {
        "t/a.npy": np.arange(5),
        "t/b.json": {"wells": ["A01"], "n": 3, "mean": 2.5},
        "t/c.csv": np.arange(6).reshape(2, 3),
        "t/d.gif": _GREY["noise"],
        "t/e.txt": "hello",
    }
    for name, data in items.items():
        fm.save(data, name, "memory")
    fm.move("t", "t", src_backend="memory", dst_backend="disk")
    assert not fm.exists("t", "memory")
    np.testing.assert_array_equal(fm.load("t/a.npy", "disk"), items["t/a.npy"])
    assert fm.load("t/b.json", "disk") == items["t/b.json"]
    np.testing.assert_array_equal(fm.load("t/c.csv", "disk", as_="array"), items["t/c.csv"])
    np.testing.assert_array_equal(fm.load("t/d.gif", "disk"), items["t/d.gif"])
    assert fm.load("t/e.txt", "disk") == "hello"


def test_csv_records_and_rows_held_in_memory_move_to_disk_and_lossy_ones_stay(fm):
    """A list of dicts (or of rows) saved to memory as .csv could not be moved to disk: the
    move's check loaded the written CSV back as text, which never equals the records."""
    records, rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], [[1, 2.5], [3, 4]]
    fm.save(records, "t/records.csv", "memory")
    fm.save(rows, "t/rows.csv", "memory")
    lossy = [{"a": 1}, {"b": 2}]  # would come back with empty cells: {"a": 1, "b": ""}
    fm.save(lossy, "t/lossy.csv", "memory")
    fm.move("t/records.csv", "records.csv", src_backend="memory", dst_backend="disk")
    fm.move("t/rows.csv", "rows.csv", src_backend="memory", dst_backend="disk")
    assert fm.load("records.csv", "disk", as_="dicts") == records
    assert fm.load("rows.csv", "disk", as_="rows") == rows
    assert not fm.exists("t/records.csv", "memory")
    with pytest.raises(TransferError, match="changes the data"):
        fm.move("t/lossy.csv", "lossy.csv", src_backend="memory", dst_backend="disk")
    assert fm.load("t/lossy.csv", "memory") == lossy
    assert not fm.exists("lossy.csv", "disk")


def test_an_npy_of_python_objects_is_refused_as_such_not_as_damaged(tmp_path):
    """The file is intact; only its pickled objects are refused. The message said "the file
    is damaged, truncated, or not a NPY file"."""
    from polystore import DiskBackend
    from polystore.errors import FormatReadError

    path = tmp_path / "objects.npy"
    np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(FormatReadError, match="NPY file of Python objects") as refused:
        DiskBackend().load(str(path))
    assert "damaged" not in str(refused.value)
    assert "allow_pickle=True" in str(refused.value)
