"""polystore: one API to save and load arrays across storage backends.

Backends register themselves by name when their class is defined (``_backend_type``);
:class:`BackendRegistry` maps names to instances and :class:`FileManager` routes each call
to the backend named by ``backend=``.
"""

from polystore import (
    backends,  # noqa: F401  (registers 'disk' and 'memory')
    exceptions,  # noqa: F401  (upstream's polystore.exceptions names)
)
from polystore.backends import DiskBackend, MemoryBackend
from polystore.base import (
    Backend,
    BackendName,
    ReadOnlyBackend,
    StorageBackend,
    WriteOnlyBackend,
    registered_backend_classes,
)
from polystore.errors import (
    BackendLoadError,
    BackendNotFoundError,
    BackendNotInstantiableError,
    DeliveryNotConfirmedError,
    DestinationExistsError,
    DuplicateBackendError,
    FormatDataError,
    FormatReadError,
    NotFoundOnBackendError,
    PathEscapeError,
    PolystoreError,
    ReadOnlyBackendError,
    StorageResolutionError,
    TransferError,
    UnsupportedFormatError,
    UnsupportedOperationError,
)
from polystore.filemanager import DEFAULT_IMAGE_EXTENSIONS, FileManager
from polystore.metadata import update_json
from polystore.registry import (
    BackendRegistry,
    available_backends,
    ensure_storage_registry,
    get_backend,
    register_backend,
    storage_registry,
)
from polystore.streaming import (  # registers napari_stream and fiji_stream
    FijiStreamingBackend,
    NapariStreamingBackend,
    StreamingBackend,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_IMAGE_EXTENSIONS",
    "Backend",
    "BackendLoadError",
    "BackendName",
    "BackendNotFoundError",
    "BackendNotInstantiableError",
    "BackendRegistry",
    "DeliveryNotConfirmedError",
    "DestinationExistsError",
    "DiskBackend",
    "DuplicateBackendError",
    "FijiStreamingBackend",
    "FileManager",
    "FormatDataError",
    "FormatReadError",
    "MemoryBackend",
    "NapariStreamingBackend",
    "NotFoundOnBackendError",
    "PathEscapeError",
    "PolystoreError",
    "ReadOnlyBackend",
    "ReadOnlyBackendError",
    "StorageBackend",
    "StorageResolutionError",
    "StreamingBackend",
    "TransferError",
    "UnsupportedFormatError",
    "UnsupportedOperationError",
    "WriteOnlyBackend",
    "available_backends",
    "ensure_storage_registry",
    "get_backend",
    "register_backend",
    "registered_backend_classes",
    "storage_registry",
    "update_json",
]

