"""Code written for upstream PolyStore (PyPI ``polystore`` 0.6.x) runs unchanged.

The snippets between ``---- upstream ----`` markers are reconstructed from upstream's README
quick start and the ``FileManager`` docstrings (positional ``backend``, ``Backend.DISK``,
``polystore.exceptions``, ``storage_registry``...). They are kept as upstream users write
them; the asserts after each check what they did.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_quick_start(in_tmp):
    # ---- upstream ----
    from pathlib import Path

    import numpy as np

    from polystore import DiskBackend, FileManager, MemoryBackend

    registry = {
        "disk": DiskBackend(),
        "memory": MemoryBackend(),
    }
    files = FileManager(registry)

    data = np.arange(6).reshape(2, 3)
    files.save(data, Path("output.npy"), backend="disk")
    loaded = files.load(Path("output.npy"), backend="disk")
    # ---- end upstream ----
    np.testing.assert_array_equal(loaded, data)
    assert (in_tmp / "output.npy").is_file()


def test_readme_lazy_registry(in_tmp):
    # ---- upstream ----
    from polystore import FileManager, ensure_storage_registry, storage_registry

    ensure_storage_registry()
    files = FileManager(dict(storage_registry))
    # ---- end upstream ----
    files.save(np.ones(3), "x.npy", "memory")
    np.testing.assert_array_equal(files.load("x.npy", "memory"), np.ones(3))


def test_filemanager_docstring_style_calls(in_tmp):
    # ---- upstream ----
    from polystore import Backend, DiskBackend, FileManager, MemoryBackend
    from polystore.exceptions import StorageResolutionError

    fm = FileManager({"disk": DiskBackend(), "memory": MemoryBackend()})
    out = fm.ensure_directory("plate/A01", Backend.DISK.value)
    fm.save(np.zeros((4, 4), np.uint16), "plate/A01/t10.tif", Backend.DISK.value)
    fm.save(np.zeros((4, 4), np.uint16), "plate/A01/t2.tif", Backend.DISK)
    fm.save("a,b\n1,2\n", "plate/A01/cells.csv", "DISK")
    images = fm.list_image_files("plate", Backend.DISK.value, recursive=True)
    found = fm.find_file_recursive("plate", "cells.csv", Backend.DISK.value)
    dirs, files = fm.collect_dirs_and_files("plate", Backend.DISK.value)
    text = fm.load_text("plate/A01/cells.csv", Backend.DISK.value)
    try:
        fm.load("plate/A01/missing.tif", Backend.DISK.value)
    except StorageResolutionError:
        missing_caught = True
    try:
        fm.load("x.tif", "s3")
    except StorageResolutionError:
        unknown_caught = True
    fm.copy("plate/A01/t2.tif", "plate/B02/t2.tif", Backend.DISK.value)
    fm.move("plate/B02/t2.tif", "plate/C03/t2.tif", Backend.DISK.value)
    deleted = fm.delete_all("plate/C03", Backend.DISK.value)
    # ---- end upstream ----
    assert out == "plate/A01"
    assert images == ["plate/A01/t2.tif", "plate/A01/t10.tif"]  # natural order
    assert found == "plate/A01/cells.csv"
    assert dirs == ["plate", "plate/A01"]
    assert files == ["plate/A01/cells.csv", "plate/A01/t2.tif", "plate/A01/t10.tif"]
    assert text == "a,b\n1,2\n"
    assert missing_caught and unknown_caught and deleted
    assert (in_tmp / "plate/A01/t2.tif").is_file() and not (in_tmp / "plate/C03").exists()
    assert not (in_tmp / "plate/B02/t2.tif").exists()


def test_copy_and_move_refuse_to_overwrite_as_upstream(in_tmp):
    from polystore import DiskBackend, FileManager

    fm = FileManager({"disk": DiskBackend()})
    fm.save(b"1", "a.bin", "disk")
    fm.save(b"2", "b.bin", "disk")
    # Upstream's backends raised FileExistsError (its FileManager wrapped it in
    # StorageResolutionError: see the next test); both names catch the refusal here.
    try:
        fm.copy("a.bin", "b.bin", "disk")
    except FileExistsError:
        refused_copy = True
    try:
        fm.move("a.bin", "b.bin", "disk")
    except FileExistsError:
        refused_move = True
    assert refused_copy and refused_move
    assert (in_tmp / "b.bin").read_bytes() == b"2" and (in_tmp / "a.bin").exists()


def test_symlink_helpers(in_tmp):
    from polystore import DiskBackend, FileManager

    fm = FileManager({"disk": DiskBackend()})
    for name in ("raw/A01/t1.tif", "raw/A01/t2.tif", "raw/B02/t1.tif"):
        fm.save(np.zeros((2, 2), np.uint8), name, "disk")
    # ---- upstream ----
    fm.create_symlink("raw/A01/t1.tif", "links/first.tif", "disk")
    is_link = fm.is_symlink("links/first.tif", "disk")
    count = fm.mirror_directory_with_symlinks("raw", "mirror", "disk")
    fm.create_symlink("raw/A01/t2.tif", "links/first.tif", "disk", overwrite_symlinks_only=True)
    # ---- end upstream ----
    assert is_link and count == 3
    assert os.readlink(in_tmp / "links/first.tif").endswith("raw/A01/t2.tif")
    assert (in_tmp / "mirror/B02/t1.tif").is_symlink()
    np.testing.assert_array_equal(fm.load("mirror/A01/t2.tif", "disk"), np.zeros((2, 2)))
    with pytest.raises(FileExistsError):
        fm.create_symlink("raw/A01/t1.tif", "raw/A01/t2.tif", "disk", overwrite_symlinks_only=True)
    assert not fm.is_symlink("raw/A01/t2.tif", "disk")


def test_backend_enum_spellings_and_the_guides_abc_are_one_class():
    # ---- upstream ----
    from polystore import Backend
    from polystore.constants import Backend as ConstantsBackend

    name = Backend.DISK.value
    member = Backend("memory")
    by_key = Backend["NAPARI_STREAM"]
    every = [b.value for b in Backend]
    # ---- end upstream ----
    assert name == "disk" and member is Backend.MEMORY and by_key.value == "napari_stream"
    assert {"disk", "memory", "zarr", "napari_stream", "fiji_stream"} <= set(every)
    assert ConstantsBackend is Backend

    from polystore import StorageBackend

    assert issubclass(StorageBackend, Backend)  # still the guide's ABC
    with pytest.raises(TypeError, match="abstract"):
        Backend()
    with pytest.raises(AttributeError):
        _ = StorageBackend.DISK  # the enum spellings live on the root class only


def test_module_level_registry_helpers():
    # ---- upstream ----
    from polystore import MemoryBackend, get_backend, register_backend, storage_registry

    disk = get_backend("disk")
    register_backend("scratch", MemoryBackend())
    scratch = storage_registry["scratch"]
    # ---- end upstream ----
    from polystore import DiskBackend

    assert isinstance(disk, DiskBackend) and isinstance(scratch, MemoryBackend)
    assert get_backend("DISK") is disk
    with pytest.raises(KeyError):
        get_backend("no_such_backend")
    del storage_registry["scratch"]


def test_filemanager_register_backend(in_tmp):
    from polystore import BackendRegistry, DiskBackend, FileManager

    fm = FileManager(BackendRegistry())
    # ---- upstream ----
    fm.register_backend("Results", DiskBackend(Path("results")))
    fm.save(np.arange(3), "r.npy", "results")
    # ---- end upstream ----
    assert (in_tmp / "results" / "r.npy").is_file()


def test_upstream_exception_names_catch_this_projects_errors(in_tmp):
    from polystore import (
        BackendNotFoundError,
        DiskBackend,
        FileManager,
        FormatDataError,
        PathEscapeError,
        ReadOnlyBackendError,
    )
    from polystore.exceptions import (
        ImageSaveError,
        PathMismatchError,
        StorageResolutionError,
        StorageWriteError,
    )

    fm = FileManager({"disk": DiskBackend(in_tmp)})
    with pytest.raises(StorageResolutionError):
        fm.get_backend("nope")
    assert issubclass(BackendNotFoundError, StorageResolutionError)
    assert issubclass(BackendNotFoundError, KeyError)
    with pytest.raises(ImageSaveError):
        fm.save(np.zeros(3), "x.png", "disk")
    assert issubclass(FormatDataError, TypeError)
    with pytest.raises(PathMismatchError):
        fm.save(b"", "../outside.bin", "disk")
    assert issubclass(PathEscapeError, ValueError)
    assert issubclass(ReadOnlyBackendError, StorageWriteError)
    assert issubclass(ReadOnlyBackendError, PermissionError)
    with pytest.raises(FileNotFoundError):  # this project's style catches the same failure
        fm.load("missing.npy", "disk")


def test_storage_registry_as_a_dict_skips_backends_that_need_arguments():
    from polystore import BackendNotInstantiableError, StorageBackend, storage_registry

    class NeedsArgs(StorageBackend):
        _backend_type = "compat_needs_args"

        def __init__(self, url):
            self.url = url

        def save(self, data, file_path, **kwargs): ...

        def load(self, file_path, **kwargs): ...

    everything = dict(storage_registry)  # upstream's README: FileManager(dict(storage_registry))
    assert {"disk", "memory"} <= set(everything) and "compat_needs_args" not in everything
    with pytest.raises(BackendNotInstantiableError, match="needs arguments"):
        storage_registry["compat_needs_args"]
    storage_registry["compat_needs_args"] = NeedsArgs("http://127.0.0.1:1/")
    assert dict(storage_registry)["compat_needs_args"].url == "http://127.0.0.1:1/"
    del storage_registry["compat_needs_args"]


def test_an_existing_destination_is_a_storage_resolution_error_as_upstream(in_tmp):
    """Upstream's FileManager.copy/move/mirror_directory_with_symlinks wrapped the
    FileExistsError in StorageResolutionError, so upstream code catches that name."""
    from polystore import DiskBackend, FileManager
    from polystore.exceptions import StorageResolutionError

    fm = FileManager({"disk": DiskBackend()})
    fm.save(b"1", "a.bin", "disk")
    fm.save(b"2", "b.bin", "disk")
    fm.save(b"3", "plate/t1.bin", "disk")
    fm.mirror_directory_with_symlinks("plate", "mirror", "disk")
    refused = []
    # ---- upstream ----
    for operation in (fm.copy, fm.move):
        try:
            operation("a.bin", "b.bin", "disk")
        except StorageResolutionError as error:
            refused.append(str(error))
    try:
        fm.mirror_directory_with_symlinks("plate", "mirror", "disk")
    except StorageResolutionError as error:
        refused.append(str(error))
    # ---- end upstream ----
    assert len(refused) == 3 and all("exists" in message for message in refused)
    assert (in_tmp / "b.bin").read_bytes() == b"2" and (in_tmp / "a.bin").exists()
