"""Upstream PolyStore's exception names, mapped onto this project's hierarchy.

Code written for upstream (``from polystore.exceptions import StorageResolutionError``) keeps
its ``except`` clauses: this project's specific errors derive from the upstream name that
covers them (and from the built-in exception upstream used), so one failure is caught by
either style. The mapping:

=========================  ===========================================================
upstream name              raised here as (subclasses)
=========================  ===========================================================
StorageResolutionError     BackendNotFoundError, BackendNotInstantiableError,
                           BackendLoadError, NotFoundOnBackendError (a missing path),
                           DestinationExistsError (copy/move/symlink onto an existing
                           item), UnsupportedOperationError, UnsupportedFormatError
StorageWriteError          ReadOnlyBackendError, TransferError, DeliveryNotConfirmedError
ImageSaveError             FormatDataError (data the extension cannot hold)
ImageLoadError             decoding failures of a stored file; FormatReadError (a damaged
                           file, text that is not UTF-8, a TIFF page it lacks)
PathMismatchError          PathEscapeError
MetadataNotFoundError      (not raised by polystore itself)
VFSTypeError               (not raised by polystore itself)
=========================  ===========================================================
"""

from polystore.errors import (
    ImageLoadError,
    ImageSaveError,
    MetadataNotFoundError,
    PathMismatchError,
    StorageResolutionError,
    StorageWriteError,
    VFSTypeError,
)

__all__ = [
    "ImageLoadError",
    "ImageSaveError",
    "MetadataNotFoundError",
    "PathMismatchError",
    "StorageResolutionError",
    "StorageWriteError",
    "VFSTypeError",
]
