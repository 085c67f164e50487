"""Guide: "Caching Layer" (verbatim, delegation filled in)."""
# Verbatim guide code: keep its style (no sorting/formatting fixes).
# ruff: noqa: I001
# fmt: off

from polystore import StorageBackend
from functools import lru_cache

class CachedBackend(StorageBackend):
    """Backend with LRU cache."""

    _backend_type = 'cached'

    def __init__(self, wrapped_backend, cache_size=128):
        self.backend = wrapped_backend
        self._cached_load = lru_cache(maxsize=cache_size)(
            self._do_load
        )

    def _do_load(self, file_path):
        """Actual load operation."""
        return self.backend.load(file_path)

    def load(self, file_path, **kwargs):
        """Load with caching."""
        return self._cached_load(file_path)

    def save(self, data, file_path, **kwargs):
        """Save (invalidates cache)."""
        self.backend.save(data, file_path, **kwargs)
        # Clear cache entry if it exists
        try:
            self._cached_load.cache_clear()
        except AttributeError:
            pass

    # Delegate other methods to wrapped backend...
    # ---- FILLED-IN (not from the guide) ------------------------------------------------
    def exists(self, path):
        return self.backend.exists(path)

    def is_file(self, path):
        return self.backend.is_file(path)

    def is_dir(self, path):
        return self.backend.is_dir(path)

    def list_dir(self, path):
        return self.backend.list_dir(path)

    def list_files(self, directory, pattern=None, extensions=None, recursive=False, **kwargs):
        return self.backend.list_files(
            directory, pattern=pattern, extensions=extensions, recursive=recursive, **kwargs
        )

    def ensure_directory(self, path):
        return self.backend.ensure_directory(path)

    def delete(self, path, recursive=False):
        if recursive:
            self.backend.delete(path, recursive=True)
        else:
            self.backend.delete(path)
        self._cached_load.cache_clear()
    # ---- end FILLED-IN ----------------------------------------------------------------
