"""Guide: "Basic Backend" (verbatim)."""
# Verbatim guide code: keep its style (no sorting/formatting fixes).
# ruff: noqa: I001, UP015, B905
# fmt: off

from polystore import StorageBackend
import json
from pathlib import Path

class JSONStorageBackend(StorageBackend):
    """Backend that stores everything as JSON."""

    _backend_type = 'json_storage'  # Auto-registration key

    def __init__(self, base_dir="./json_storage"):
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)

    def save(self, data, file_path, **kwargs):
        """Save data as JSON."""
        full_path = self.base_dir / file_path
        full_path.parent.mkdir(parents=True, exist_ok=True)

        with open(full_path, 'w') as f:
            json.dump(data, f, indent=2)

    def load(self, file_path, **kwargs):
        """Load data from JSON."""
        full_path = self.base_dir / file_path

        if not full_path.exists():
            raise FileNotFoundError(f"File not found: {file_path}")

        with open(full_path, 'r') as f:
            return json.load(f)

    def save_batch(self, data_list, output_paths, **kwargs):
        """Save multiple files."""
        for data, path in zip(data_list, output_paths):
            self.save(data, path, **kwargs)

    def load_batch(self, file_paths, **kwargs):
        """Load multiple files."""
        return [self.load(path, **kwargs) for path in file_paths]

    def list_files(self, directory, pattern=None,
                  extensions=None, recursive=False, **kwargs):
        """List files in directory."""
        dir_path = self.base_dir / directory

        if not dir_path.exists():
            return []

        if recursive:
            files = dir_path.rglob("*.json")
        else:
            files = dir_path.glob("*.json")

        return [str(f.relative_to(self.base_dir)) for f in files]

    def exists(self, path):
        """Check if path exists."""
        return (self.base_dir / path).exists()

    def is_file(self, path):
        """Check if path is a file."""
        return (self.base_dir / path).is_file()

    def is_dir(self, path):
        """Check if path is a directory."""
        return (self.base_dir / path).is_dir()

    def list_dir(self, path):
        """List directory entries."""
        dir_path = self.base_dir / path
        if not dir_path.is_dir():
            raise NotADirectoryError(f"Not a directory: {path}")
        return [f.name for f in dir_path.iterdir()]
