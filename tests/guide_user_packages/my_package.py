"""Stand-in for the guide's ``my_package``.

The guide uses ``my_package`` twice: ``import my_package  # Imports and registers backend``
(the published ``polystore-mybackend`` package, installed into the test environment) and
``from my_package import MyCustomBackend`` in "Testing Your Backend". This module provides
both so those snippets run unchanged.
"""

from __future__ import annotations

import tempfile

from polystore_mybackend import MyBackend

from polystore import DiskBackend, MemoryBackend


class MyCustomBackend(DiskBackend):
    """polystore's disk backend rooted in a fresh temporary directory (removed on collection).

    It inherits ``_backend_type`` without redefining it, so it is not registered.
    """

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="guide-testing-")
        super().__init__(base_dir=self._tmp.name)


class MyCustomMemoryBackend(MemoryBackend):
    """polystore's memory backend, for running the guide's test class a second time."""


__all__ = ["MyBackend", "MyCustomBackend", "MyCustomMemoryBackend"]
