"""Built-in backends; importing this package registers 'disk' and 'memory'."""

from polystore.backends.disk import DiskBackend
from polystore.backends.memory import MemoryBackend

__all__ = ["DiskBackend", "MemoryBackend"]
