"""Every example of the custom-backends guide, run unchanged against polystore.

The guide's classes live in ``tests/guide_examples`` (verbatim). Usage snippets are pasted
below verbatim inside the test bodies; surrounding asserts check what the snippet did.
"""
# E402: the sys.path entry below must precede the guide's `my_package` imports;
# B905: the guide's verbatim test class uses zip() without strict=.
# ruff: noqa: E402, B905

from __future__ import annotations

import sys
from pathlib import Path

# The guide imports its example package as top-level `my_package` (see that module).
sys.path.insert(0, str(Path(__file__).with_name("guide_user_packages")))

import gzip
import http.server
import os
import subprocess
import textwrap
import threading
from functools import partial

import numpy as np
import pytest
from my_package import MyCustomBackend, MyCustomMemoryBackend

from polystore import (
    BackendNotInstantiableError,
    BackendRegistry,
    DiskBackend,
    FileManager,
    MemoryBackend,
    ReadOnlyBackendError,
    StorageBackend,
    UnsupportedOperationError,
)
from polystore.base import registered_backend_classes
from tests.guide_examples.basic import JSONStorageBackend
from tests.guide_examples.cached import CachedBackend
from tests.guide_examples.compressed import CompressedBackend
from tests.guide_examples.readonly import HTTPBackend
from tests.guide_examples.sqlite import SQLiteBackend
from tests.guide_examples.temporary import TemporaryBackend


def test_guide_classes_are_auto_registered():
    classes = registered_backend_classes()
    for cls in (
        JSONStorageBackend,
        HTTPBackend,
        TemporaryBackend,
        CompressedBackend,
        CachedBackend,
        SQLiteBackend,
    ):
        assert classes[cls._backend_type] is cls
        assert cls._backend_type in BackendRegistry()


# --- Basic Backend -------------------------------------------------------------------------
def test_json_storage_usage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # JSONStorageBackend's default base_dir is "./json_storage"

    # ---- guide "Usage:" verbatim ----
    from polystore import BackendRegistry, FileManager

    # Backend is auto-registered
    registry = BackendRegistry()
    fm = FileManager(registry)

    # Use the custom backend
    data = {"key": "value", "count": 42}
    fm.save(data, "config.json", backend="json_storage")

    loaded = fm.load("config.json", backend="json_storage")
    print(loaded)  # {'key': 'value', 'count': 42}
    # ---- end verbatim ----

    assert capsys.readouterr().out == "{'key': 'value', 'count': 42}\n"
    assert (tmp_path / "json_storage" / "config.json").is_file()
    assert isinstance(registry["json_storage"], JSONStorageBackend)
    assert registry["json_storage"] is registry["json_storage"]  # created once, then cached

    fm.save_batch([{"i": 0}, {"i": 1}], ["sub/a.json", "sub/b.json"], backend="json_storage")
    assert fm.load_batch(["sub/a.json", "sub/b.json"], backend="json_storage") == [
        {"i": 0},
        {"i": 1},
    ]
    assert sorted(fm.list_files("sub", backend="json_storage")) == ["sub/a.json", "sub/b.json"]
    assert fm.is_dir("sub", backend="json_storage")
    assert fm.is_file("sub/a.json", backend="json_storage")
    assert sorted(fm.list_dir("sub", backend="json_storage")) == ["a.json", "b.json"]
    with pytest.raises(FileNotFoundError) as info:
        fm.load("nope.json", backend="json_storage")
    assert "nope.json" in str(info.value) and "json_storage" in str(info.value)
    with pytest.raises(ValueError):
        fm.save_batch([{"i": 2}], ["c.json", "d.json"], backend="json_storage")
    assert not fm.exists("c.json", backend="json_storage")


# --- Read-Only Backend ------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serve a tmp directory on 127.0.0.1:<ephemeral> from a background thread."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "www"
    (root / "data").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello over http")
    (root / "data" / "table.csv").write_bytes(b"a,b\n1,2\n")
    handler = partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_read_only(http_root):
    url, root = http_root
    registry = BackendRegistry()
    with pytest.raises(BackendNotInstantiableError, match=r"registry\['http'\] = HTTPBackend"):
        registry["http"]  # needs a base_url, so it must be added explicitly
    registry["http"] = HTTPBackend(url)
    fm = FileManager(registry)

    assert fm.load("hello.txt", backend="http") == b"hello over http"
    assert fm.load_batch(["hello.txt", "data/table.csv"], backend="http") == [
        b"hello over http",
        b"a,b\n1,2\n",
    ]
    assert fm.exists("hello.txt", backend="http")
    assert fm.is_file("data/table.csv", backend="http")
    assert not fm.exists("missing.txt", backend="http")
    assert not fm.is_dir("data", backend="http")

    backend = registry["http"]
    assert backend.can_read and not backend.can_write
    for call in (
        lambda: fm.save(b"x", "new.txt", backend="http"),
        lambda: fm.save_batch([b"x"], ["new.txt"], backend="http"),
        lambda: fm.delete("hello.txt", backend="http"),
        lambda: fm.ensure_directory("newdir", backend="http"),
        lambda: fm.copy("hello.txt", "x.txt", src_backend="http", dst_backend="http"),
    ):
        with pytest.raises(ReadOnlyBackendError, match="'http' is read-only"):
            call()
    assert sorted(p.name for p in root.iterdir()) == ["data", "hello.txt"]
    with pytest.raises(NotImplementedError):
        fm.list_files("data", backend="http")

    # Reading from HTTP into a writable backend works.
    registry["scratch"] = MemoryBackend()
    fm.copy("hello.txt", "copy/hello.bin", src_backend="http", dst_backend="scratch")
    assert fm.load("copy/hello.bin", backend="scratch") == b"hello over http"


# --- Context Manager Support ------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [{"key": "value", "count": 42}, np.arange(12, dtype=np.uint16).reshape(3, 4)],
    ids=["guide-data-dict", "array"],
)
def test_temporary_backend_context_manager(data):
    seen = {}

    # ---- guide "Usage:" verbatim ----
    with TemporaryBackend() as backend:
        registry = {"temp": backend}
        fm = FileManager(registry)

        fm.save(data, "temp_file.npy", backend="temp")
        # Files automatically cleaned up on exit
        # ---- end verbatim ----
        seen["dir"] = backend.temp_dir
        assert os.path.isfile(os.path.join(backend.temp_dir, "temp_file.npy"))
        np.testing.assert_equal(fm.load("temp_file.npy", backend="temp"), data)
        with pytest.raises(FileNotFoundError, match="other.npy"):
            fm.load("other.npy", backend="temp")

    assert not os.path.exists(seen["dir"])


# --- Compression Support ----------------------------------------------------------------
def test_compressed_backend(tmp_path):
    registry = BackendRegistry()
    fm = FileManager(registry)
    assert isinstance(registry["compressed"], CompressedBackend)  # no-arg: created lazily
    target = str(tmp_path / "frame.pkl.gz")
    data = {"frame": np.arange(1000, dtype=np.float32), "label": "t0"}

    fm.save(data, target, backend="compressed")

    raw = Path(target).read_bytes()
    assert raw[:2] == b"\x1f\x8b"  # gzip magic
    assert len(raw) < data["frame"].nbytes
    loaded = fm.load(target, backend="compressed")
    np.testing.assert_array_equal(loaded["frame"], data["frame"])
    assert loaded["label"] == "t0"
    with gzip.open(target, "rb"):
        pass
    # Operations the example does not implement fall back to a clear capability error.
    for name, call in {
        "list_dir": lambda: fm.list_dir(str(tmp_path), backend="compressed"),
        "exists": lambda: fm.exists(target, backend="compressed"),
        "delete": lambda: fm.delete(target, backend="compressed"),
    }.items():
        with pytest.raises(UnsupportedOperationError, match=f"'compressed'.*{name}"):
            call()
    assert not CompressedBackend.can_list
    assert Path(target).exists()


# --- Caching Layer -------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["memory", "disk"])
def test_cached_backend(inner, tmp_path):
    wrapped = MemoryBackend() if inner == "memory" else DiskBackend(base_dir=tmp_path)
    registry = BackendRegistry()
    with pytest.raises(BackendNotInstantiableError):
        registry["cached"]
    registry["cached"] = CachedBackend(wrapped, cache_size=8)
    registry["inner"] = wrapped
    fm = FileManager(registry)
    cached = registry["cached"]

    fm.save(np.array([1, 2, 3]), "a.npy", backend="cached")
    first = fm.load("a.npy", backend="cached")
    second = fm.load("a.npy", backend="cached")
    np.testing.assert_array_equal(first, [1, 2, 3])
    assert second is first  # served from the LRU cache
    assert cached._cached_load.cache_info().hits == 1

    fm.save(np.array([9, 9]), "a.npy", backend="cached")  # invalidates
    np.testing.assert_array_equal(fm.load("a.npy", backend="cached"), [9, 9])
    np.testing.assert_array_equal(fm.load("a.npy", backend="inner"), [9, 9])

    assert fm.exists("a.npy", backend="cached")
    assert fm.list_files("", backend="cached") == ["a.npy"]
    fm.delete("a.npy", backend="cached")
    with pytest.raises(FileNotFoundError, match="a.npy"):
        fm.load("a.npy", backend="cached")


# --- Database Backend Example --------------------------------------------------------------
def test_sqlite_backend(tmp_path):
    registry = BackendRegistry()
    registry["sqlite"] = SQLiteBackend(str(tmp_path / "store.db"))
    fm = FileManager(registry)

    image = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    fm.save(image, "plate/A01.npy", backend="sqlite")
    np.testing.assert_array_equal(fm.load("plate/A01.npy", backend="sqlite"), image)
    fm.save_batch([1, "two", {"three": 3}], ["plate/b", "plate/c", "other/d"], backend="sqlite")
    assert fm.load_batch(["plate/b", "plate/c"], backend="sqlite") == [1, "two"]
    assert sorted(fm.list_files("plate", backend="sqlite")) == [
        "plate/A01.npy",
        "plate/b",
        "plate/c",
    ]
    assert fm.exists("other/d", backend="sqlite") and fm.is_file("other/d", backend="sqlite")
    assert not fm.is_dir("plate", backend="sqlite")
    with pytest.raises(FileNotFoundError) as info:
        fm.load("plate/missing", backend="sqlite")
    assert "plate/missing" in str(info.value) and "'sqlite'" in str(info.value)
    with pytest.raises(FileNotFoundError, match="sqlite"):
        fm.load_batch(["plate/b", "plate/zzz"], backend="sqlite")
    with pytest.raises(ValueError, match="2 data items and 1 paths"):
        fm.save_batch([1, 2], ["plate/x"], backend="sqlite")
    assert not fm.exists("plate/x", backend="sqlite")

    # A fresh connection (another process would see the same) reads what was saved.
    again = SQLiteBackend(str(tmp_path / "store.db"))
    assert again.load("plate/c") == "two"


# --- Testing Your Backend (verbatim) ------------------------------------------------------
class TestMyCustomBackend:
    def setup_method(self):
        self.backend = MyCustomBackend()

    def test_save_and_load(self):
        data = np.array([1, 2, 3])
        self.backend.save(data, "test.npy")
        loaded = self.backend.load("test.npy")
        np.testing.assert_array_equal(data, loaded)

    def test_batch_operations(self):
        data_list = [np.array([i]) for i in range(3)]
        paths = [f"test{i}.npy" for i in range(3)]

        self.backend.save_batch(data_list, paths)
        loaded_list = self.backend.load_batch(paths)

        for original, loaded in zip(data_list, loaded_list):
            np.testing.assert_array_equal(original, loaded)

    def test_file_not_found(self):
        with pytest.raises(FileNotFoundError):
            self.backend.load("nonexistent.npy")


# --- end verbatim ------------------------------------------------------------------------


class TestMyCustomBackendOnMemory(TestMyCustomBackend):
    """The guide's test class again, against the memory backend."""

    def setup_method(self):
        self.backend = MyCustomMemoryBackend()


def test_guide_test_class_really_used_disk():
    backend = MyCustomBackend()
    backend.save(np.array([1, 2, 3]), "test.npy")
    assert (backend.base_dir / "test.npy").is_file()
    assert backend.base_dir.name.startswith("guide-testing-")


# --- Publishing Your Backend: pip install polystore-mybackend ------------------------------
def test_mybackend_discovered_through_entry_point_in_fresh_process(tmp_path):
    """A process that never imports polystore_mybackend still finds 'mybackend'."""
    script = textwrap.dedent(
        """
        import sys
        from polystore import BackendRegistry, FileManager

        assert "polystore_mybackend" not in sys.modules
        registry = BackendRegistry()
        assert 'mybackend' in registry  # Auto-registered!
        assert "polystore_mybackend" not in sys.modules  # known by name, not imported yet
        registry["mybackend"]
        assert "polystore_mybackend" in sys.modules  # imported on first use
        fm = FileManager(registry)
        fm.save([1, 2, 3], "x", backend="mybackend")
        assert fm.load("x", backend="mybackend") == [1, 2, 3]
        print(type(registry["mybackend"]).__module__)
        """
    )
    # Only the test session's plugin install (tests/conftest.py), not my_package's directory.
    from tests.conftest import PLUGIN_PATHS

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(PLUGIN_PATHS)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "polystore_mybackend"


def test_mybackend_after_explicit_import():
    # ---- guide verbatim ----
    import my_package  # Imports and registers backend

    from polystore import BackendRegistry, FileManager

    registry = BackendRegistry()
    assert "mybackend" in registry  # Auto-registered!
    # ---- end verbatim ----

    assert isinstance(registry["mybackend"], my_package.MyBackend)
    assert isinstance(registry["mybackend"], StorageBackend)
    fm = FileManager(registry)
    fm.save({"a": 1}, "k", backend="mybackend")
    assert fm.load("k", backend="mybackend") == {"a": 1}
    with pytest.raises(FileNotFoundError, match="mybackend"):
        fm.load("missing", backend="mybackend")
