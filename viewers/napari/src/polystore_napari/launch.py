"""Start napari with the receiver docked and listening: ``polystore napari`` or
``python -m polystore_napari [--endpoint tcp://127.0.0.1:PORT]``."""

from __future__ import annotations

import argparse
import sys

from polystore_napari.buffer import MODES

PLUGIN = "polystore-napari"
WIDGET = "polystore receiver"


def launch(
    endpoint: str | None = None,
    *,
    mode: str | None = None,
    stack_capacity: int | None = None,
    follow_contrast: bool | None = None,
    allow_remote: bool = False,
    curve_secret_key: str | bytes | None = None,
    viewer=None,
    show: bool = True,
    run: bool = True,
):
    """Open napari (or use `viewer`), dock the receiver widget and start listening.

    Returns the widget (its `.viewer` is the napari viewer, its `.endpoint` the endpoint it
    listens on). With `run=True` this blocks in napari's event loop until the window closes.
    Raises OSError if the endpoint cannot be listened on (another receiver there?).
    """
    import napari

    if viewer is None:
        viewer = napari.Viewer(show=show)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.persist = False  # options given here apply to this session only
    if endpoint is not None:
        widget.endpoint_edit.setText(endpoint)
    if mode is not None:
        widget.mode_box.setCurrentText(mode)
    if stack_capacity is not None:
        widget.capacity_box.setValue(stack_capacity)
    if follow_contrast is not None:
        widget.follow_box.setChecked(follow_contrast)
    remote = (allow_remote, curve_secret_key)
    if remote != (widget.allow_remote, widget.curve_secret_key):
        widget.allow_remote, widget.curve_secret_key = remote
        widget.stop()  # listen again with the new options
    if widget.running and endpoint is not None and widget.endpoint != endpoint:
        widget.stop()
    widget.persist = True
    widget.start()
    if run:
        napari.run()
    return widget


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="polystore napari",
        description="Open napari with the polystore receiver docked and listening for frames "
                    "streamed with backend='napari_stream'.")
    parser.add_argument("--endpoint", help="where to listen (default $POLYSTORE_NAPARI_ENDPOINT "
                        "or tcp://127.0.0.1:55555); senders must use the same endpoint")
    parser.add_argument("--mode", choices=MODES, help="default display mode for frames "
                        "without a mode hint (default: auto)")
    parser.add_argument("--stack-capacity", type=int, help="frames a stack layer keeps")
    parser.add_argument("--follow-contrast", action="store_true", default=None,
                        help="reset contrast limits to every new frame")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow an endpoint beyond 127.0.0.1 (use --curve-secret too)")
    parser.add_argument("--curve-secret", metavar="FILE",
                        help="CURVE secret key file from `polystore keys DIR`: only senders "
                        "given the matching public key can connect")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``polystore napari`` and ``python -m polystore_napari``."""
    if argv is None:
        argv = sys.argv[1:]
        if argv[:1] == ["napari"]:  # called as `polystore napari ...` with sys.argv untouched
            argv = argv[1:]
    args = parse_args(argv)
    try:
        launch(args.endpoint, mode=args.mode, stack_capacity=args.stack_capacity,
               follow_contrast=args.follow_contrast, allow_remote=args.allow_remote,
               curve_secret_key=args.curve_secret)
    except (OSError, ValueError) as exc:
        print(f"polystore napari: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
