"""Applications built on the library: the ``polystore`` command (`cli`), the live demo
(`demo`) and the streaming benchmark (`bench`).

The library (`polystore`, `polystore.streaming`) never imports this package, and this package
never imports a viewer plugin by name: ``polystore napari`` is contributed by the napari plugin
through the ``polystore.cli`` entry point group.
"""
