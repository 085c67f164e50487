"""Start napari with the receiver docked and listening: ``polystore napari`` or
``python -m polystore_napari [--endpoint tcp://127.0.0.1:PORT]``.

Options come from `ReceiverOptions` only: what the caller (or the command line) gives, then
``$POLYSTORE_NAPARI_ENDPOINT``, then the defaults. Settings saved by the widget in an earlier
napari session do not apply here, so senders find napari where the documentation says.
"""

from __future__ import annotations

import argparse
import sys

from polystore_napari.options import ReceiverOptions

PLUGIN = "polystore-napari"
WIDGET = "polystore receiver"


def launch(
    options: ReceiverOptions | str | None = None,
    *,
    viewer=None,
    show: bool = True,
    run: bool = True,
    **changes,
):
    """Open napari (or use `viewer`), dock the receiver widget and start listening.

    `options`: a `ReceiverOptions` (or just an endpoint); `changes`: its fields to override
    (``mode="stack"``, ...). Returns the widget (its `.viewer` is the napari viewer, its
    `.endpoint` the endpoint it listens on). With `run=True` this blocks in napari's event
    loop until the window closes. Raises OSError if the endpoint cannot be listened on
    (another receiver there?) and ValueError for a bad option.
    """
    import napari

    if not isinstance(options, ReceiverOptions):
        options = ReceiverOptions(endpoint=options)
    options = options.replace(**changes)
    if viewer is None:
        viewer = napari.Viewer(show=show)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.persist = False  # options given here apply to this session only
    widget.apply_options(options)
    widget.persist = True
    widget.start()
    if run:
        napari.run()
    return widget


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polystore napari",
        description="Open napari with the polystore receiver docked and listening for frames "
                    "streamed with backend='napari_stream'.")
    ReceiverOptions.add_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Launch with parsed flags (`ReceiverOptions.add_arguments`); 1 with a message on stderr
    when napari cannot listen."""
    try:
        launch(ReceiverOptions.from_args(args))
    except (OSError, ValueError) as exc:
        print(f"polystore napari: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m polystore_napari``; ``polystore napari`` goes through
    `polystore_napari.cli`."""
    return run_from_args(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
