"""Chunked storage: the ``zarr`` backend (zarr-python 3), OME-Zarr images and plates.

Importing this package does not import zarr; the first store opened does. Install the extra
with ``pip install 'polystore[zarr]'`` (object stores: ``'polystore[zarr,s3]'``).
"""

from polystore.zarr.backend import COMPRESSIONS, ZarrBackend, default_chunks
from polystore.zarr.store import ZarrPath, split_zarr_path

__all__ = ["COMPRESSIONS", "ZarrBackend", "ZarrPath", "default_chunks", "split_zarr_path"]
