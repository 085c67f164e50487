"""Core API: registration, BackendRegistry, FileManager, disk and memory backends, atomic
writes, path-escape checks and process-safe JSON updates. Everything runs on real files,
real threads and real processes."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import posixpath
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from filelock import FileLock, Timeout
from hypothesis import given
from hypothesis import strategies as st

import polystore
from polystore import (
    Backend,
    BackendLoadError,
    BackendNotFoundError,
    BackendNotInstantiableError,
    BackendRegistry,
    DiskBackend,
    DuplicateBackendError,
    FileManager,
    MemoryBackend,
    PathEscapeError,
    PolystoreError,
    ReadOnlyBackend,
    ReadOnlyBackendError,
    StorageBackend,
    UnsupportedFormatError,
    UnsupportedOperationError,
    WriteOnlyBackend,
    update_json,
)
from polystore.base import registered_backend_classes
from polystore.paths import normalize_relative

NUMERIC_DTYPES = [
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


def sample(shape, dtype) -> np.ndarray:
    """Deterministic data that uses the dtype's range (negative values where signed)."""
    n = int(np.prod(shape))
    base = np.arange(n, dtype=np.int64) * 7919 % 251 - 100
    if dtype == "bool":
        return (base % 2 == 0).reshape(shape)
    arr = base.astype(np.float64) / (3 if np.dtype(dtype).kind in "fc" else 1)
    if np.dtype(dtype).kind == "u":
        arr = np.abs(arr)
    out = arr.astype(dtype).reshape(shape)
    if np.dtype(dtype).kind == "c":
        out = out + 1j * out[::-1].reshape(shape)
        out = out.astype(dtype)
    return out


def leftovers(directory: Path) -> list[str]:
    """Every entry below ``directory`` (temporary files included), relative, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# =========================================================================================
# Registration
# =========================================================================================
class _Counted(StorageBackend):
    _backend_type = "core_counted"
    created = 0

    def __init__(self):
        type(self).created += 1
        self.data = {}

    def save(self, data, file_path, **kwargs):
        self.data[file_path] = data

    def load(self, file_path, **kwargs):
        return self.data[file_path]


class _NeedsArgs(StorageBackend):
    _backend_type = "core_needs_args"

    def __init__(self, url):
        self.url = url

    def save(self, data, file_path, **kwargs):
        pass

    def load(self, file_path, **kwargs):
        return self.url


class _ReadOnlyFixture(ReadOnlyBackend):
    _backend_type = "core_readonly"

    def load(self, file_path, **kwargs):
        return f"content of {file_path}"


class _SinkFixture(WriteOnlyBackend):
    _backend_type = "core_sink"

    def __init__(self):
        self.received = []

    def save(self, data, file_path, **kwargs):
        self.received.append((file_path, data))


def test_subclass_with_backend_type_registers_and_inheritors_do_not():
    class Child(_Counted):  # inherits _backend_type without redefining it
        pass

    classes = registered_backend_classes()
    assert classes["core_counted"] is _Counted
    assert Child not in classes.values()
    assert classes["disk"] is DiskBackend and classes["memory"] is MemoryBackend
    classes.clear()  # a copy: the real table is untouched
    assert "disk" in registered_backend_classes()


def test_abstract_bases_are_not_registered_and_cannot_be_instantiated():
    names = registered_backend_classes().values()
    for base in (Backend, StorageBackend, ReadOnlyBackend, WriteOnlyBackend):
        assert base not in names
        with pytest.raises(TypeError):
            base()


def test_two_classes_with_one_name_is_an_error_naming_both():
    class First(StorageBackend):
        _backend_type = "core_dup"

        def save(self, data, file_path, **kwargs):
            pass

        def load(self, file_path, **kwargs):
            pass

    with pytest.raises(DuplicateBackendError) as info:

        class Second(StorageBackend):
            _backend_type = "core_dup"

            def save(self, data, file_path, **kwargs):
                pass

            def load(self, file_path, **kwargs):
                pass

    message = str(info.value)
    assert f"{__name__}.test_two_classes_with_one_name_is_an_error_naming_both.<locals>.First" in (
        message
    )
    assert "<locals>.Second" in message
    assert isinstance(info.value, TypeError)
    assert registered_backend_classes()["core_dup"] is First


def test_reimporting_the_same_class_replaces_it_silently(tmp_path, monkeypatch):
    (tmp_path / "core_reimport_mod.py").write_text(
        textwrap.dedent(
            """
            from polystore import StorageBackend

            class Reimported(StorageBackend):
                _backend_type = "core_reimport"

                def save(self, data, file_path, **kwargs):
                    pass

                def load(self, file_path, **kwargs):
                    return "v"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    first = importlib.import_module("core_reimport_mod").Reimported
    del sys.modules["core_reimport_mod"]
    second = importlib.import_module("core_reimport_mod").Reimported
    del sys.modules["core_reimport_mod"]
    assert first is not second
    assert registered_backend_classes()["core_reimport"] is second


def test_backend_type_must_be_a_name():
    with pytest.raises(TypeError, match="non-empty str"):

        class Bad(StorageBackend):
            _backend_type = ""


# =========================================================================================
# BackendRegistry
# =========================================================================================
def test_registry_contains_every_registered_name_and_creates_lazily():
    before = _Counted.created
    registry = BackendRegistry()
    assert {"disk", "memory", "core_counted", "core_needs_args"} <= set(registry)
    assert "core_counted" in registry and "nope" not in registry
    assert len(registry) == len(list(registry))
    assert _Counted.created == before  # neither `in`, iteration nor len instantiate
    first = registry["core_counted"]
    assert registry["core_counted"] is first
    assert _Counted.created == before + 1
    other = BackendRegistry()["core_counted"]
    assert other is not first  # cached per registry
    assert isinstance(registry["disk"], DiskBackend) and registry["disk"].base_dir is None


def test_registry_unknown_name_lists_available():
    registry = BackendRegistry()
    with pytest.raises(BackendNotFoundError) as info:
        registry["nosuch"]
    message = str(info.value)
    assert message.startswith("Unknown backend 'nosuch'")  # not quoted like a bare KeyError
    assert "'disk'" in message and "'memory'" in message
    assert isinstance(info.value, KeyError)
    assert registry.get("nosuch") is None


def test_registry_class_needing_arguments_must_be_added():
    registry = BackendRegistry()
    assert "core_needs_args" in registry
    with pytest.raises(BackendNotInstantiableError) as info:
        registry["core_needs_args"]
    assert "registry['core_needs_args'] = _NeedsArgs(...)" in str(info.value)
    assert isinstance(info.value, KeyError)
    registry["core_needs_args"] = _NeedsArgs("db://x")
    assert registry["core_needs_args"].url == "db://x"


def test_registry_explicit_instances_and_deletion(tmp_path):
    disk = DiskBackend(base_dir=tmp_path)
    registry = BackendRegistry({"data": disk})
    assert registry["data"] is disk and "data" in registry
    registry["disk"] = disk  # replaces the lazily created default
    assert registry["disk"] is disk
    del registry["disk"]
    assert "disk" not in registry and "disk" not in list(registry)
    with pytest.raises(BackendNotFoundError):
        registry["disk"]
    with pytest.raises(BackendNotFoundError):
        del registry["disk"]
    registry["disk"] = disk
    assert registry["disk"] is disk
    with pytest.raises(TypeError, match="Backend instance"):
        registry["x"] = object()
    assert "core_counted*" in repr(registry)


def test_available_backends_lists_builtins_and_entry_points():
    names = polystore.available_backends()
    assert names == sorted(names)
    assert {"disk", "memory", "mybackend"} <= set(names)


def _fake_distribution(root: Path, entry_points: str) -> None:
    info = root / "polystore_core_test_plugins-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: polystore-core-test-plugins\nVersion: 0.0.1\n"
    )
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_points_are_listed_by_name_and_imported_on_first_use(tmp_path, monkeypatch):
    """Issue 10 item 6: listing names imports nothing; a broken plugin fails only when its
    name is used, with an error naming the entry point and the cause."""
    _fake_distribution(
        tmp_path,
        "[polystore.backends]\n"
        "broken = polystore_no_such_module_xyz:Backend\n"
        "notabackend = json:dumps\n"
        "badattr = json:no_such_attribute_xyz\n"
        "clash = core_clashing_plugin:ClashingDisk\n"
        "memalias = polystore.backends.memory:MemoryBackend\n"
        "lazyone = core_lazy_plugin:LazyBackend\n",
    )
    (tmp_path / "core_clashing_plugin.py").write_text(
        "from polystore import StorageBackend\n\n"
        "class ClashingDisk(StorageBackend):\n"
        "    _backend_type = 'disk'  # already taken by polystore's DiskBackend\n"
    )
    (tmp_path / "core_lazy_plugin.py").write_text(
        "from polystore.backends.memory import MemoryBackend\n\n"
        "class LazyBackend(MemoryBackend):\n"
        "    _backend_type = 'lazyone'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = BackendRegistry()
    names = list(registry)
    for name in ("broken", "notabackend", "badattr", "clash", "memalias", "lazyone"):
        assert name in names and name in registry
    assert "core_lazy_plugin" not in sys.modules  # listing imported nothing
    assert "core_clashing_plugin" not in sys.modules
    assert "LazyOne" in registry  # names are case-insensitive

    assert type(registry["LAZYONE"]).__name__ == "LazyBackend"  # imported on first use
    assert "core_lazy_plugin" in sys.modules
    for name, cause in [
        ("broken", "polystore_no_such_module_xyz"),
        ("notabackend", "not a polystore Backend"),
        ("badattr", "AttributeError"),
        ("clash", "DuplicateBackendError"),
    ]:
        with pytest.raises(BackendLoadError, match=cause) as info:
            registry[name]
        assert f"'{name}'" in str(info.value) and "entry point" in str(info.value)
        assert isinstance(info.value, KeyError) and registry.get(name) is None
    assert registered_backend_classes()["disk"] is DiskBackend
    assert isinstance(registry["memalias"], MemoryBackend)  # listed under its entry-point name
    assert "memalias" not in BackendRegistry(entry_points=False)
    sys.modules.pop("core_lazy_plugin", None)


def test_a_plugin_that_failed_to_import_stays_failed(tmp_path, monkeypatch):
    """A plugin module that defines its backend class and then raises: the first lookup
    raised BackendLoadError, but the class stayed registered, so the second lookup (and any
    fresh registry) returned a backend of a module that never finished importing. Every
    lookup must fail alike, and the plugin is imported afresh each time (it may be fixed)."""
    _fake_distribution(tmp_path, "[polystore.backends]\nhalfway = core_halfway_plugin:Half\n")
    plugin = tmp_path / "core_halfway_plugin.py"
    plugin.write_text(
        "from polystore.backends.memory import MemoryBackend\n\n"
        "class Half(MemoryBackend):\n"
        "    _backend_type = 'halfway'\n\n"
        "raise RuntimeError('needs a config file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = BackendRegistry()
    for _attempt in range(2):
        with pytest.raises(BackendLoadError, match="RuntimeError: needs a config file"):
            registry["halfway"]
        with pytest.raises(BackendLoadError, match="needs a config file"):
            BackendRegistry()["halfway"]
    assert "halfway" not in registered_backend_classes()
    assert "core_halfway_plugin" not in sys.modules
    plugin.write_text(plugin.read_text().replace("raise RuntimeError", "# fixed: raise"))
    importlib.invalidate_caches()
    try:
        assert type(registry["halfway"]).__name__ == "Half"  # the fixed plugin loads
    finally:
        sys.modules.pop("core_halfway_plugin", None)
        polystore.base._backend_classes.pop("halfway", None)  # leave no class behind


def test_a_plugin_that_calls_sys_exit_on_import_does_not_end_the_program(tmp_path):
    """`registry[name]` for a plugin whose module calls sys.exit() at import ended the
    whole program (SystemExit is no Exception), and so did `polystore shm ls`, which imports
    every plugin. It is a BackendLoadError like any other failed import."""
    _fake_distribution(tmp_path, "[polystore.backends]\nquitter = core_quitting_plugin:X\n")
    (tmp_path / "core_quitting_plugin.py").write_text(
        "import sys\nsys.exit('core_quitting_plugin: no licence')\n")
    code = textwrap.dedent("""
        import polystore
        from polystore.registry import load_entry_points
        registry = polystore.BackendRegistry()
        try:
            registry["quitter"]
        except polystore.BackendLoadError as exc:
            print("load error:", exc)
        print("loaded:", sorted(load_entry_points()))
        print("still running")
    """)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "SystemExit: core_quitting_plugin: no licence" in result.stdout
    assert "loaded: ['mybackend']" in result.stdout and "still running" in result.stdout


# =========================================================================================
# Base-class behaviour and errors
# =========================================================================================
def test_capability_flags():
    assert DiskBackend.can_read and DiskBackend.can_write and DiskBackend.can_list
    assert MemoryBackend.can_list
    assert _ReadOnlyFixture.can_read and not _ReadOnlyFixture.can_write
    assert not _ReadOnlyFixture.can_list
    assert not _SinkFixture.can_read and _SinkFixture.can_write
    assert not _Counted.can_list


def test_read_only_backend_rejects_every_write():
    backend = _ReadOnlyFixture()
    assert backend.load("a") == "content of a"
    assert backend.load_batch(["a", "b"]) == ["content of a", "content of b"]
    calls = {
        "save": lambda: backend.save(1, "a"),
        "save_batch": lambda: backend.save_batch([1], ["a"]),
        "delete": lambda: backend.delete("a"),
        "ensure_directory": lambda: backend.ensure_directory("d"),
    }
    for operation, call in calls.items():
        with pytest.raises(ReadOnlyBackendError) as info:
            call()
        assert isinstance(info.value, PermissionError)
        assert f"'core_readonly' is read-only and cannot {operation}" in str(info.value)
        assert "writable backend" in str(info.value)


def test_write_only_backend_cannot_load():
    sink = _SinkFixture()
    sink.save_batch([1, 2], ["a", "b"])
    assert sink.received == [("a", 1), ("b", 2)]
    for call in (lambda: sink.load("a"), lambda: sink.load_batch(["a"])):
        with pytest.raises(UnsupportedOperationError, match="'core_sink'.*write-only"):
            call()


def test_missing_capabilities_raise_unsupported_operation():
    backend = _Counted()
    calls = {
        "exists": lambda: backend.exists("a"),
        "is_file": lambda: backend.is_file("a"),
        "is_dir": lambda: backend.is_dir("a"),
        "list_dir": lambda: backend.list_dir("a"),
        "list_files": lambda: backend.list_files("a"),
        "delete": lambda: backend.delete("a"),
        "ensure_directory": lambda: backend.ensure_directory("a"),
    }
    for operation, call in calls.items():
        with pytest.raises(UnsupportedOperationError) as info:
            call()
        assert str(info.value) == f"Backend 'core_counted' does not support {operation}()."
        assert isinstance(info.value, NotImplementedError)


def test_default_save_batch_checks_lengths_before_writing():
    backend = _Counted()
    with pytest.raises(ValueError, match="3 data items and 2 paths; nothing was written"):
        backend.save_batch([1, 2, 3], ["a", "b"])
    assert backend.data == {}
    backend.save_batch((x for x in [1, 2]), iter(["a", "b"]))
    assert backend.load_batch(["a", "b"]) == [1, 2]


@pytest.mark.parametrize(
    "error",
    [
        BackendNotFoundError("x", ["disk", "memory"]),
        BackendNotInstantiableError("x", _NeedsArgs),
        DuplicateBackendError("x", _Counted, _NeedsArgs),
        ReadOnlyBackendError("http", "save"),
        UnsupportedOperationError("x", "list_dir"),
        UnsupportedFormatError("a.zzz", [".npy"]),
        PathEscapeError("../a", "/root"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_round_trip(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert isinstance(copy, PolystoreError)


# =========================================================================================
# FileManager
# =========================================================================================
def test_filemanager_routes_explicitly():
    a, b = MemoryBackend(), MemoryBackend()
    fm = FileManager({"a": a, "b": b})
    fm.save(np.arange(3), "x.npy", backend="a")
    assert a.exists("x.npy") and not b.exists("x.npy")
    assert not fm.exists("x.npy", backend="b")
    fm.save(np.arange(3), "y.npy", "b")  # backend may be positional, as upstream documents
    assert b.exists("y.npy") and not a.exists("y.npy")
    with pytest.raises(TypeError):
        fm.load("x.npy")  # and required: there is no default backend


@pytest.mark.parametrize("kind", ["plain-dict", "registry"])
def test_filemanager_unknown_backend_lists_names(kind):
    registry = {"memory": MemoryBackend()} if kind == "plain-dict" else BackendRegistry()
    fm = FileManager(registry)
    with pytest.raises(BackendNotFoundError) as info:
        fm.load("x.npy", backend="s3")
    assert "Unknown backend 's3'" in str(info.value) and "'memory'" in str(info.value)
    fm.save(1, "x", backend="Memory")  # names are case-insensitive (as upstream) ...
    with pytest.raises(BackendNotFoundError):
        fm.save(1, "x", backend="memory_")  # ... but nothing else is guessed


def test_filemanager_rejects_non_mapping():
    with pytest.raises(TypeError, match="mapping"):
        FileManager([MemoryBackend()])


@pytest.fixture(params=["disk", "memory"])
def fm_and_name(request, tmp_path):
    backend = DiskBackend(base_dir=tmp_path) if request.param == "disk" else MemoryBackend()
    return FileManager({request.param: backend}), request.param


def test_missing_file_error_names_path_and_backend(fm_and_name):
    fm, name = fm_and_name
    for call in (
        lambda: fm.load("sub/missing.npy", backend=name),
        lambda: fm.load_batch(["sub/missing.npy"], backend=name),
        lambda: fm.delete("sub/missing.npy", backend=name),
        lambda: fm.list_dir("sub/missing.npy", backend=name),
        lambda: fm.list_files("sub/missing.npy", backend=name),
    ):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert "sub/missing.npy" in str(info.value) and f"'{name}'" in str(info.value)


def test_save_batch_length_mismatch_writes_nothing(fm_and_name):
    fm, name = fm_and_name
    with pytest.raises(ValueError, match="2 data items and 3 paths"):
        fm.save_batch([np.zeros(2), np.ones(2)], ["a.npy", "b.npy", "c.npy"], backend=name)
    assert fm.list_files("", backend=name, recursive=True) == []
    with pytest.raises(ValueError):
        fm.save_batch((np.zeros(1) for _ in range(2)), iter(["a.npy"]), backend=name)
    assert fm.list_files("", backend=name, recursive=True) == []


def test_filemanager_full_api(fm_and_name):
    fm, name = fm_and_name
    fm.ensure_directory("plate/A01", backend=name)
    assert fm.is_dir("plate/A01", backend=name) and not fm.is_file("plate/A01", backend=name)
    images = [sample((4, 5), "uint16") + i for i in range(3)]
    paths = [f"plate/A01/t{i}.tif" for i in range(3)]
    fm.save_batch(images, paths, backend=name)
    fm.save('{"ok": true}', "plate/notes.txt", backend=name)
    fm.save({"n": 3}, "plate/meta.json", backend=name)
    for got, want in zip(fm.load_batch(paths, backend=name), images, strict=True):
        np.testing.assert_array_equal(got, want)
    assert fm.list_dir("plate", backend=name) == ["A01", "meta.json", "notes.txt"]
    assert fm.list_files("plate", backend=name) == ["plate/meta.json", "plate/notes.txt"]
    assert fm.list_files("plate", backend=name, recursive=True) == [
        "plate/A01/t0.tif",
        "plate/A01/t1.tif",
        "plate/A01/t2.tif",
        "plate/meta.json",
        "plate/notes.txt",
    ]
    assert fm.list_files("plate", backend=name, recursive=True, extensions={"TIF"}) == paths
    assert fm.list_files("plate", backend=name, recursive=True, extensions=[".json"]) == [
        "plate/meta.json"
    ]
    assert fm.list_files("plate", backend=name, recursive=True, pattern="t[12].*") == paths[1:]
    assert fm.list_files("plate", backend=name, pattern="*.tif") == []
    with pytest.raises(OSError):
        fm.delete("plate/A01", backend=name)  # not empty
    fm.delete("plate/A01/t0.tif", backend=name)
    assert not fm.exists("plate/A01/t0.tif", backend=name)
    fm.delete("plate/A01", backend=name, recursive=True)
    assert not fm.exists("plate/A01", backend=name) and fm.exists("plate", backend=name)
    fm.ensure_directory("empty", backend=name)
    fm.delete("empty", backend=name)
    assert not fm.exists("empty", backend=name)


@pytest.mark.parametrize("direction", ["disk->memory", "memory->disk"])
def test_copy_and_move_between_backends(tmp_path, direction):
    registry = BackendRegistry({"disk": DiskBackend(base_dir=tmp_path), "memory": MemoryBackend()})
    fm = FileManager(registry)
    src, dst = direction.split("->")
    stack = sample((3, 4, 5), "float32")
    fm.save(stack, "in/stack.tif", backend=src)
    fm.save({"a": [1, 2]}, "in/meta.json", backend=src)

    fm.copy("in/stack.tif", "out/stack.tif", src_backend=src, dst_backend=dst)
    np.testing.assert_array_equal(fm.load("out/stack.tif", backend=dst), stack)
    assert fm.exists("in/stack.tif", backend=src)

    fm.move("in/meta.json", "out/meta.json", src_backend=src, dst_backend=dst)
    assert fm.load("out/meta.json", backend=dst) == {"a": [1, 2]}
    assert not fm.exists("in/meta.json", backend=src)

    with pytest.raises(FileNotFoundError, match=f"in/nothing.tif.*'{src}'"):
        fm.move("in/nothing.tif", "out/nothing.tif", src_backend=src, dst_backend=dst)

    fm.move("in/stack.tif", "in/stack.tif", src_backend=src, dst_backend=src)  # no-op
    assert fm.exists("in/stack.tif", backend=src)


def test_move_keeps_source_when_copy_fails(tmp_path):
    fm = FileManager({"disk": DiskBackend(base_dir=tmp_path), "memory": MemoryBackend()})
    fm.save(np.arange(4), "a.npy", backend="memory")
    (tmp_path / "taken.npy").mkdir()  # the destination is a directory: the write fails
    with pytest.raises(IsADirectoryError):
        fm.move("a.npy", "taken.npy", src_backend="memory", dst_backend="disk")
    assert fm.exists("a.npy", backend="memory")
    assert leftovers(tmp_path) == ["taken.npy"]  # no temporary file left behind


def test_copy_to_read_only_and_from_sink_fail_before_reading(tmp_path):
    fm = FileManager({"ro": _ReadOnlyFixture(), "sink": _SinkFixture(), "mem": MemoryBackend()})
    with pytest.raises(ReadOnlyBackendError, match="'ro'"):
        fm.copy("missing", "x", src_backend="mem", dst_backend="ro")
    with pytest.raises(UnsupportedOperationError, match="'sink'"):
        fm.copy("x", "y", src_backend="sink", dst_backend="mem")
    with pytest.raises(ReadOnlyBackendError, match="'ro'"):
        fm.move("a", "b", src_backend="ro", dst_backend="mem")
    assert not fm.exists("b", backend="mem")


# =========================================================================================
# Disk backend: formats
# =========================================================================================
@pytest.mark.parametrize("dtype", [*NUMERIC_DTYPES, ">i4", ">f8"])
def test_disk_npy_round_trip_every_dtype(tmp_path, dtype):
    disk = DiskBackend(base_dir=tmp_path)
    data = sample((3, 4), dtype)
    disk.save(data, "a.npy")
    loaded = disk.load("a.npy")
    assert loaded.dtype == data.dtype and loaded.shape == data.shape
    np.testing.assert_array_equal(loaded, data)


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
@pytest.mark.parametrize("shape", [(6, 7), (3, 6, 7), (5, 6, 3), (2, 3, 6, 7)], ids=str)
def test_disk_tiff_round_trip_every_dtype_and_stack(tmp_path, dtype, shape):
    disk = DiskBackend(base_dir=tmp_path)
    data = sample(shape, dtype)
    disk.save(data, "img.tif")
    loaded = disk.load("img.tif")
    assert loaded.dtype == data.dtype and loaded.shape == data.shape
    np.testing.assert_array_equal(loaded, data)
    with tifffile.TiffFile(tmp_path / "img.tif") as tif:
        # N-D data are multi-page stacks of 2D planes, never guessed to be RGB.
        assert len(tif.pages) == int(np.prod(shape[:-2], dtype=np.int64))
        assert tif.pages[0].shape == shape[-2:]


def test_disk_tiff_extension_variants_and_foreign_files(tmp_path):
    disk = DiskBackend(base_dir=tmp_path)
    data = sample((2, 3, 4), "uint8")
    disk.save(data, "a.TIFF")
    np.testing.assert_array_equal(disk.load("a.TIFF"), data)
    tifffile.imwrite(tmp_path / "other.tif", data, imagej=True)  # written by another tool
    np.testing.assert_array_equal(disk.load("other.tif"), data)
    disk.save(data, "c.tif", compression="zlib")  # kwargs reach tifffile
    with tifffile.TiffFile(tmp_path / "c.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_disk_json_and_text(tmp_path):
    disk = DiskBackend(base_dir=tmp_path)
    meta = {"name": "plate 1", "wells": ["A01", "B02"], "n": 3, "nested": {"x": 1.5, "y": None}}
    disk.save(meta, "meta.json")
    assert disk.load("meta.json") == meta
    disk.save({"mean": np.float32(2.5), "count": np.int64(7), "v": np.arange(3)}, "np.json")
    assert disk.load("np.json") == {"mean": 2.5, "count": 7, "v": [0, 1, 2]}
    text = "línea 1\r\nline 2\n\ttab ✓"
    disk.save(text, "notes.txt")
    assert disk.load("notes.txt") == text
    table = "well,mean\r\nA01,1.5\nB02,2.0\n"
    disk.save(table, "results.csv")
    assert disk.load("results.csv") == table
    assert (tmp_path / "results.csv").read_bytes() == table.encode("utf-8")
    with pytest.raises(TypeError, match="takes str"):
        disk.save(42, "bad.txt")
    with pytest.raises(TypeError, match="unexpected keyword"):
        disk.save(np.zeros(2), "x.npy", compression="zlib")
    assert not (tmp_path / "bad.txt").exists() and not (tmp_path / "x.npy").exists()


def test_disk_unknown_extension_lists_supported_and_writes_nothing(tmp_path):
    disk = DiskBackend(base_dir=tmp_path)
    with pytest.raises(UnsupportedFormatError) as info:
        disk.save(np.zeros(3), "deep/dir/a.zarr")
    message = str(info.value)
    for ext in (".csv", ".json", ".npy", ".npz", ".png", ".tif", ".tiff", ".txt"):
        assert ext in message
    assert "a.zarr" in message and isinstance(info.value, ValueError)
    assert "float64 array" in message and "bytes are written verbatim" in message
    assert leftovers(tmp_path) == []
    (tmp_path / "foreign.xyz").write_bytes(b"\x89PNG")
    assert disk.load("foreign.xyz") == b"\x89PNG"  # an unknown extension loads as bytes
    with pytest.raises(UnsupportedFormatError):
        disk.save("x", "noextension")


def test_disk_without_base_dir_uses_paths_as_given(tmp_path, monkeypatch):
    disk = DiskBackend()
    target = tmp_path / "given" / "a.npy"
    disk.save(np.arange(3), target)
    assert target.is_file()
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(disk.load("given/a.npy"), np.arange(3))
    assert disk.list_files("given") == ["given/a.npy"]
    assert disk.list_files(tmp_path / "given") == [str(target)]


def test_disk_directory_edge_cases(tmp_path):
    disk = DiskBackend(base_dir=tmp_path)
    disk.ensure_directory("d.npy")
    with pytest.raises(IsADirectoryError):
        disk.save(np.zeros(1), "d.npy")
    with pytest.raises(IsADirectoryError):
        disk.load("d.npy")
    disk.save("x", "f.txt")
    with pytest.raises(NotADirectoryError):
        disk.list_dir("f.txt")
    with pytest.raises(ValueError, match="base directory"):
        disk.delete(".", recursive=True)
    assert (tmp_path / "f.txt").exists()


# =========================================================================================
# Path escapes
# =========================================================================================
@pytest.mark.parametrize(
    "bad", ["../x.npy", "a/../../x.npy", "./../x.npy", "a/b/../../../x.npy", "link/x.npy"]
)
def test_disk_rejects_paths_escaping_base_dir(tmp_path, bad):
    base, outside = tmp_path / "base", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (base / "link").symlink_to(outside)  # symlink escape
    (outside / "x.npy").write_bytes(b"secret")
    disk = DiskBackend(base_dir=base)
    fm = FileManager({"disk": disk, "memory": MemoryBackend()})
    fm.save(np.zeros(2), "x.npy", backend="memory")
    for call in (
        lambda: fm.save(np.zeros(2), bad, backend="disk"),
        lambda: fm.load(bad, backend="disk"),
        lambda: fm.exists(bad, backend="disk"),
        lambda: fm.is_file(bad, backend="disk"),
        lambda: fm.delete(bad, backend="disk"),
        lambda: fm.list_files(posixpath.dirname(bad), backend="disk"),
        lambda: fm.copy("x.npy", bad, src_backend="memory", dst_backend="disk"),
    ):
        with pytest.raises(PathEscapeError, match="escapes the backend root"):
            call()
    assert (outside / "x.npy").read_bytes() == b"secret"
    assert leftovers(outside) == ["x.npy"]


def test_disk_absolute_paths_must_stay_inside_base(tmp_path):
    base = tmp_path / "base"
    disk = DiskBackend(base_dir=base)
    disk.save(np.arange(2), str(base / "ok.npy"))
    np.testing.assert_array_equal(disk.load("ok.npy"), np.arange(2))
    with pytest.raises(PathEscapeError):
        disk.save(np.arange(2), str(tmp_path / "elsewhere.npy"))
    with pytest.raises(PathEscapeError):
        disk.load("/etc/hostname.txt")
    with pytest.raises(PathEscapeError):
        disk.save(np.arange(2), str(base / ".." / "sneaky.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    disk.save(np.arange(2), "a/../inside.npy")  # '..' that stays inside is fine
    assert (base / "inside.npy").is_file()


def test_disk_symlink_inside_base_is_followed_and_deleted_as_link(tmp_path):
    disk = DiskBackend(base_dir=tmp_path)
    disk.save(np.arange(3), "real/a.npy")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    np.testing.assert_array_equal(disk.load("alias/a.npy"), np.arange(3))
    disk.delete("alias")
    assert not (tmp_path / "alias").exists() and (tmp_path / "real" / "a.npy").is_file()


def test_memory_rejects_escaping_the_root():
    memory = MemoryBackend()
    fm = FileManager({"memory": memory})
    for bad in ("../x", "a/../../x", "/../x"):
        with pytest.raises(PathEscapeError, match="escapes"):
            fm.save(1, bad, backend="memory")
        with pytest.raises(PathEscapeError):
            fm.load(bad, backend="memory")
    assert memory.list_files("", recursive=True) == []
    fm.save(1, "a/../b", backend="memory")
    assert fm.load("/b", backend="memory") == 1
    assert fm.list_dir("/", backend="memory") == ["b"]


segments = st.lists(
    st.sampled_from(["a", "b", ".", "..", "", "c.npy", "..."]), min_size=0, max_size=8
)


@given(segments, st.booleans())
def test_normalize_relative_matches_posix_normpath_or_rejects(parts, absolute):
    path = ("/" if absolute else "") + "/".join(parts)
    depth, escapes = 0, False
    for part in parts:
        if part == "..":
            depth -= 1
            escapes = escapes or depth < 0
        elif part not in ("", "."):
            depth += 1
    if escapes:
        with pytest.raises(PathEscapeError):
            normalize_relative(path)
        return
    result = normalize_relative(path)
    expected = posixpath.normpath("/" + "/".join(parts)).lstrip("/")
    assert result == expected
    assert ".." not in result.split("/") and not result.startswith("/")


# =========================================================================================
# Atomic writes
# =========================================================================================
class _Unserializable:
    pass


@pytest.fixture(params=["o_tmpfile", "named-temp"])
def temp_kind(request, monkeypatch):
    """Run a test with anonymous O_TMPFILE temporaries and with the named-file fallback."""
    import polystore.atomic

    if request.param == "named-temp":
        monkeypatch.setattr(polystore.atomic, "_O_TMPFILE", None)
    elif polystore.atomic._O_TMPFILE is None:
        pytest.skip("no O_TMPFILE on this platform")
    return request.param


def test_failed_json_write_midway_leaves_old_file_and_no_temp(tmp_path, temp_kind):
    disk = DiskBackend(base_dir=tmp_path)
    disk.save({"version": 1}, "meta.json")
    # json.dump writes the big string to the file, then fails on the last value.
    bad = {"big": "x" * 2_000_000, "z": _Unserializable()}
    with pytest.raises(TypeError):
        disk.save(bad, "meta.json")
    with pytest.raises(TypeError):
        disk.save(bad, "new.json")
    assert disk.load("meta.json") == {"version": 1}
    assert leftovers(tmp_path) == ["meta.json"]


@pytest.mark.parametrize(
    "data,name",
    [
        (np.array([[object(), object()]] * 2), "objects.tif"),
        (np.array([["a", "b"], ["c", "d"]]), "strings.tif"),
        (np.array([{"a": 1}], dtype=object), "objects.npy"),
    ],
    ids=["tif-object", "tif-str", "npy-object"],
)
def test_unencodable_data_leaves_nothing(tmp_path, data, name, temp_kind):
    disk = DiskBackend(base_dir=tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - whatever tifffile/numpy raise
        disk.save(data, name)
    assert leftovers(tmp_path) == []
    # Without atomic writes tifffile itself leaves a broken file behind:
    if name.endswith(".tif"):
        with pytest.raises(Exception):  # noqa: B017
            tifffile.imwrite(tmp_path / "raw.tif", data)
        assert (tmp_path / "raw.tif").exists()


_KILL_SCRIPT = """
import sys
import numpy as np
from polystore import DiskBackend

disk = DiskBackend(base_dir=sys.argv[1])
data = np.ones(int(sys.argv[2]), dtype=np.uint8)
print("ready", flush=True)
disk.save(data, "big.npy")
print("done", flush=True)
"""


def _open_write_sizes(pid: int, directory: Path) -> list[int]:
    """Sizes of files inside ``directory`` that process ``pid`` holds open (O_TMPFILE files
    show up as '<directory>/#<inode> (deleted)')."""
    sizes = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
            if target.startswith(f"{directory}/"):
                sizes.append(os.stat(fd_dir / fd).st_size)
        except OSError:
            continue
    return sizes


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_sigkill_during_save_leaves_old_file_and_no_temp(tmp_path):
    size = 800_000_000
    np.save(tmp_path / "big.npy", np.arange(3))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        killed_at = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            sizes = _open_write_sizes(proc.pid, tmp_path)
            if sizes and max(sizes) > 1_000_000:
                proc.send_signal(signal.SIGKILL)
                killed_at = max(sizes)
                break
            time.sleep(0.0005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_at is not None and killed_at < size + 128, "write finished before the kill"
    assert proc.returncode == -signal.SIGKILL
    assert leftovers(tmp_path) == ["big.npy"]  # no temporary file, no truncated target
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy"), np.arange(3))


# =========================================================================================
# Memory backend
# =========================================================================================
def test_memory_directories():
    memory = MemoryBackend()
    memory.save(np.zeros(2), "a/b/c.npy")
    assert memory.is_dir("a") and memory.is_dir("a/b") and memory.is_file("a/b/c.npy")
    assert memory.list_dir("") == ["a"] and memory.list_dir("a") == ["b"]
    memory.ensure_directory("a/empty/deeper")
    assert memory.list_dir("a") == ["b", "empty"]
    assert memory.list_files("a", recursive=True) == ["a/b/c.npy"]
    with pytest.raises(NotADirectoryError):
        memory.save(1, "a/b/c.npy/inner")
    with pytest.raises(NotADirectoryError):
        memory.ensure_directory("a/b/c.npy/x")
    with pytest.raises(FileExistsError):
        memory.ensure_directory("a/b/c.npy")
    with pytest.raises(IsADirectoryError):
        memory.save(1, "a/b")
    with pytest.raises(IsADirectoryError):
        memory.load("a")
    with pytest.raises(NotADirectoryError):
        memory.list_dir("a/b/c.npy")
    with pytest.raises(OSError, match="not empty"):
        memory.delete("a")
    memory.delete("a/empty/deeper")
    memory.delete("a/empty")
    assert memory.list_dir("a") == ["b"]
    memory.delete("a", recursive=True)
    assert memory.list_dir("") == [] and not memory.exists("a/b/c.npy")
    with pytest.raises(ValueError, match="root"):
        memory.delete("", recursive=True)


def test_memory_stores_copies():
    memory = MemoryBackend()
    data = np.arange(5)
    meta = {"wells": ["A01"]}
    memory.save(data, "a.npy")
    memory.save(meta, "m.json")
    data[:] = -1
    meta["wells"].append("B02")
    np.testing.assert_array_equal(memory.load("a.npy"), np.arange(5))
    assert memory.load("m.json") == {"wells": ["A01"]}
    loaded = memory.load("a.npy")
    loaded[0] = 99
    assert memory.load("a.npy")[0] == 0


def test_memory_is_thread_safe():
    memory = MemoryBackend()
    errors: list[BaseException] = []
    n_threads, per_thread = 8, 150
    start = threading.Barrier(n_threads + 2)

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                memory.save(np.full(4, t * 1000 + i), f"w{t}/d{i % 5}/f{i}.npy")
                np.testing.assert_array_equal(
                    memory.load(f"w{t}/d{i % 5}/f{i}.npy")[0], t * 1000 + i
                )
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    def lister() -> None:
        try:
            start.wait()
            for _ in range(300):
                memory.list_files("", recursive=True)
                memory.list_dir("")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    threads += [threading.Thread(target=lister) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    files = memory.list_files("", recursive=True)
    assert len(files) == n_threads * per_thread
    for t in range(n_threads):
        assert memory.list_dir(f"w{t}") == [f"d{k}" for k in range(5)]
        assert memory.load(f"w{t}/d2/f7.npy")[0] == t * 1000 + 7


# =========================================================================================
# update_json
# =========================================================================================
_UPDATE_SCRIPT = """
import sys
from polystore import update_json

path, worker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def bump(data):
    data["total"] = data.get("total", 0) + 1
    data.setdefault("per_worker", {})
    data["per_worker"][worker] = data["per_worker"].get(worker, 0) + 1

for _ in range(n):
    update_json(path, bump, timeout=120)
"""


def test_update_json_from_many_processes_loses_nothing(tmp_path):
    path = tmp_path / "meta" / "counts.json"
    workers, per_worker = 8, 50
    procs = [
        subprocess.Popen([sys.executable, "-c", _UPDATE_SCRIPT, str(path), f"w{i}", "50"])
        for i in range(workers)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    data = json.loads(path.read_text())
    assert data["total"] == workers * per_worker
    assert data["per_worker"] == {f"w{i}": per_worker for i in range(workers)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["counts.json", "counts.json.lock"]


def test_update_json_return_value_and_timeout(tmp_path):
    path = tmp_path / "m.json"
    assert update_json(path, lambda d: {**d, "a": 1}) == {"a": 1}
    assert update_json(path, lambda d: d.update(b=2)) == {"a": 1, "b": 2}  # None: in-place
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    with FileLock(f"{path}.lock"):
        started = time.monotonic()
        with pytest.raises(Timeout):
            update_json(path, lambda d: {"lost": True}, timeout=0.3)
        assert time.monotonic() - started >= 0.25
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    with pytest.raises(RuntimeError):
        update_json(path, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}


def test_update_json_refuses_nan_and_a_damaged_file_and_keeps_the_file(tmp_path):
    """update_json wrote Python's NaN (JSON no other reader takes), and on a damaged file
    raised a bare JSONDecodeError naming no file."""
    from polystore import FormatDataError, FormatReadError

    path = tmp_path / "m.json"
    update_json(path, lambda d: {"mean": 1.5})
    with pytest.raises(FormatDataError, match=r"NaN or infinity.*use None"):
        update_json(path, lambda d: {"mean": float("nan")})
    assert json.loads(path.read_text()) == {"mean": 1.5}
    path.write_text('{"mean": 1.5,')  # cut short
    with pytest.raises(FormatReadError, match=r"m\.json is not a JSON metadata file"):
        update_json(path, lambda d: {"lost": True})
    assert path.read_text() == '{"mean": 1.5,'


def test_move_onto_the_same_item_spelled_differently_keeps_it(tmp_path):
    """Regression: move() used to compare paths as text, then delete the 'source'."""
    fm = FileManager({"memory": MemoryBackend(), "disk": DiskBackend(base_dir=tmp_path)})
    x = np.arange(4)
    fm.save(x, "a.npy", backend="memory")
    fm.move("a.npy", "/a.npy", src_backend="memory", dst_backend="memory")
    np.testing.assert_array_equal(fm.load("a.npy", backend="memory"), x)
    fm.save(x, "b.npy", backend="disk")
    fm.move("b.npy", str(tmp_path / "b.npy"), src_backend="disk", dst_backend="disk")
    np.testing.assert_array_equal(fm.load("b.npy", backend="disk"), x)
    (tmp_path / "link.npy").symlink_to(tmp_path / "b.npy")
    fm.move("link.npy", "b.npy", src_backend="disk", dst_backend="disk")
    np.testing.assert_array_equal(fm.load("b.npy", backend="disk"), x)
