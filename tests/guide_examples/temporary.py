"""Guide: "Context Manager Support" (verbatim, required methods filled in)."""
# Verbatim guide code: keep its style (no sorting/formatting fixes).
# ruff: noqa: I001
# fmt: off

from polystore import StorageBackend
import tempfile
import shutil

class TemporaryBackend(StorageBackend):
    """Backend with automatic cleanup."""

    _backend_type = 'temporary'

    def __init__(self):
        self.temp_dir = None

    def __enter__(self):
        self.temp_dir = tempfile.mkdtemp()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if self.temp_dir:
            shutil.rmtree(self.temp_dir)

    # Implement required methods...
    # ---- FILLED-IN (not from the guide): pickle files inside temp_dir -----------------
    def _full(self, file_path):
        import os

        if self.temp_dir is None:
            raise RuntimeError("use TemporaryBackend as a context manager")
        return os.path.join(self.temp_dir, str(file_path))

    def save(self, data, file_path, **kwargs):
        import os
        import pickle

        full = self._full(file_path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            pickle.dump(data, f)

    def load(self, file_path, **kwargs):
        import os
        import pickle

        full = self._full(file_path)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"File not found: {file_path} (backend 'temporary')")
        with open(full, "rb") as f:
            return pickle.load(f)

    def exists(self, path):
        import os

        return os.path.exists(self._full(path))
    # ---- end FILLED-IN ----------------------------------------------------------------
