"""napari plugin for polystore: a dock widget that receives streamed frames live.

``polystore napari`` / ``python -m polystore_napari`` opens napari with it docked; in napari
it is Plugins > polystore receiver. See docs/napari.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
