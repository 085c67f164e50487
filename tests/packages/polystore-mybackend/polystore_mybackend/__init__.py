"""Example third-party backend: stores arrays in a dict, registered via entry point."""

from polystore import StorageBackend


class MyBackend(StorageBackend):
    _backend_type = "mybackend"

    def __init__(self) -> None:
        self._store: dict[str, object] = {}

    def save(self, data, file_path, **kwargs):
        self._store[str(file_path)] = data

    def load(self, file_path, **kwargs):
        try:
            return self._store[str(file_path)]
        except KeyError:
            raise FileNotFoundError(f"File not found: {file_path} (backend 'mybackend')") from None

    def exists(self, path):
        return str(path) in self._store


__all__ = ["MyBackend"]
