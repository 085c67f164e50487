"""Guide: "Read-Only Backend" (verbatim)."""
# Verbatim guide code: keep its style (no sorting/formatting fixes).
# ruff: noqa: I001
# fmt: off

from polystore import ReadOnlyBackend
import requests

class HTTPBackend(ReadOnlyBackend):
    """Read-only backend for HTTP resources."""

    _backend_type = 'http'

    def __init__(self, base_url):
        self.base_url = base_url.rstrip('/')

    def load(self, file_path, **kwargs):
        """Load data from HTTP."""
        url = f"{self.base_url}/{file_path}"
        response = requests.get(url)
        response.raise_for_status()
        return response.content

    def load_batch(self, file_paths, **kwargs):
        """Load multiple files."""
        return [self.load(path, **kwargs) for path in file_paths]

    def list_files(self, directory, **kwargs):
        """List files (not implemented for HTTP)."""
        raise NotImplementedError("HTTP backend doesn't support listing")

    def exists(self, path):
        """Check if resource exists."""
        url = f"{self.base_url}/{path}"
        response = requests.head(url)
        return response.status_code == 200

    def is_file(self, path):
        """Always true for HTTP resources."""
        return self.exists(path)

    def is_dir(self, path):
        """Always false for HTTP."""
        return False

    def list_dir(self, path):
        """Not supported."""
        raise NotImplementedError()
