"""polystore: one API to save and load arrays across storage backends.

Backends register themselves by name when their class is defined (``_backend_type``);
:class:`BackendRegistry` maps names to instances and :class:`FileManager` routes each call
to the backend named by ``backend=``.
"""

from polystore import backends  # noqa: F401  (registers 'disk' and 'memory')
from polystore.backends import DiskBackend, MemoryBackend
from polystore.base import (
    Backend,
    ReadOnlyBackend,
    StorageBackend,
    WriteOnlyBackend,
    registered_backend_classes,
)
from polystore.errors import (
    BackendNotFoundError,
    BackendNotInstantiableError,
    DuplicateBackendError,
    PathEscapeError,
    PolystoreError,
    ReadOnlyBackendError,
    UnsupportedFormatError,
    UnsupportedOperationError,
)
from polystore.filemanager import FileManager
from polystore.metadata import update_json
from polystore.registry import BackendRegistry, available_backends
from polystore.streaming import (  # registers napari_stream and fiji_stream
    FijiStreamingBackend,
    NapariStreamingBackend,
    StreamingBackend,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendNotFoundError",
    "BackendNotInstantiableError",
    "BackendRegistry",
    "DiskBackend",
    "DuplicateBackendError",
    "FijiStreamingBackend",
    "FileManager",
    "MemoryBackend",
    "NapariStreamingBackend",
    "PathEscapeError",
    "PolystoreError",
    "ReadOnlyBackend",
    "ReadOnlyBackendError",
    "StorageBackend",
    "StreamingBackend",
    "UnsupportedFormatError",
    "UnsupportedOperationError",
    "WriteOnlyBackend",
    "available_backends",
    "registered_backend_classes",
    "update_json",
]

