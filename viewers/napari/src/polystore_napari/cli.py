"""``polystore napari``: this plugin's subcommand of the ``polystore`` command.

Registered through the ``polystore.cli`` entry point group (see pyproject.toml), so polystore
itself never imports the plugin. The parsed options go straight to `launch.launch`; nothing
turns them back into argv.
"""

from __future__ import annotations

import argparse
import os
import sys

from polystore.streaming.endpoints import check_bind_endpoint
from polystore_napari.options import ENV_ENDPOINT, ReceiverOptions


def add_napari_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``napari`` to the ``polystore`` command's subcommands."""
    parser = subparsers.add_parser(
        "napari", help="start napari with the polystore receiver docked",
        description="Open napari with the receiver docked and listening for frames saved with "
        "backend='napari_stream'.",
    )  # fmt: skip
    ReceiverOptions.add_arguments(parser)  # the one definition of the plugin's options
    parser.set_defaults(func=run_napari_command)


def run_napari_command(args: argparse.Namespace) -> int:
    """Open napari with the parsed options; 2 with a message on stderr for a bad option
    (checked before napari starts, display or not), 1 when napari cannot start."""
    try:
        options = ReceiverOptions.from_args(args)
        check_bind_endpoint(options.listen_endpoint, options.allow_remote)
    except ValueError as exc:
        source = f" (from ${ENV_ENDPOINT})" if not args.endpoint and os.environ.get(
            ENV_ENDPOINT) else ""  # fmt: skip
        print(f"polystore napari: error: {exc}{source}\nRun 'polystore napari --help' for "
              "help.", file=sys.stderr)
        return 2
    reason = no_display_reason()
    if reason:
        return _fail(reason)
    try:
        from polystore_napari.launch import run_from_args

        return run_from_args(args)
    except ImportError as exc:  # napari itself is imported when the viewer starts
        return _fail(f"napari cannot be imported ({exc}); install it: pip install "
                     "'napari[pyqt6]' (or run `bash scripts/install.sh` in the polystore "
                     "source folder)")


def no_display_reason() -> str | None:
    """Why no napari window can open here (None if one can)."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if os.environ.get("QT_QPA_PLATFORM"):
        return None
    return (
        "no display ($DISPLAY is not set), and napari needs one. Run this on a desktop, or "
        "under a virtual display: xvfb-run polystore napari. To see the pipeline without a "
        "window: polystore demo --headless"
    )


def _fail(message: str) -> int:
    print(f"polystore napari: {message}", file=sys.stderr)
    return 1
