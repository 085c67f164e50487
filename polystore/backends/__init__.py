"""Built-in backends; importing this package registers 'disk', 'memory', 'zarr' and
'objectstore' (the last two import zarr/fsspec only when first used)."""

from polystore.backends.disk import DiskBackend
from polystore.backends.memory import MemoryBackend
from polystore.backends.objectstore import ObjectStoreBackend  # fsspec loads lazily
from polystore.zarr.backend import ZarrBackend  # noqa: F401  (registers 'zarr'; zarr loads lazily)

__all__ = ["DiskBackend", "MemoryBackend", "ObjectStoreBackend"]
