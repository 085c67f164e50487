"""napari plugin for polystore: a dock widget that receives streamed frames."""
