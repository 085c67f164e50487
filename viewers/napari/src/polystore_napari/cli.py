"""``polystore napari``: this plugin's subcommand of the ``polystore`` command.

Registered through the ``polystore.cli`` entry point group (see pyproject.toml), so polystore
itself never imports the plugin. The parsed options go straight to `launch.launch`; nothing
turns them back into argv.
"""

from __future__ import annotations

import argparse
import os
import sys

from polystore_napari.buffer import MODES


def add_napari_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``napari`` to the ``polystore`` command's subcommands."""
    parser = subparsers.add_parser(
        "napari", help="start napari with the polystore receiver docked",
        description="Open napari with the receiver docked and listening for frames saved with "
        "backend='napari_stream'.",
    )  # fmt: skip
    parser.add_argument("--endpoint", help="where to listen (default $POLYSTORE_NAPARI_ENDPOINT "
                        "or tcp://127.0.0.1:55555); senders must use the same one")
    parser.add_argument("--mode", choices=MODES,
                        help="display mode for frames without a mode hint (default auto)")
    parser.add_argument("--stack-capacity", type=_positive_int,
                        help="frames a stack layer keeps")
    parser.add_argument("--follow-contrast", action="store_true", default=None,
                        help="reset contrast limits to every new frame")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow an endpoint beyond 127.0.0.1 (use --curve-secret too)")
    parser.add_argument("--curve-secret", metavar="FILE",
                        help="CURVE secret key file from `polystore keys DIR`")
    parser.set_defaults(func=run_napari_command)


def run_napari_command(args: argparse.Namespace) -> int:
    """Open napari with the parsed options; 1 with a message on stderr when it cannot."""
    reason = no_display_reason()
    if reason:
        return _fail(reason)
    options = {"mode": args.mode, "stack_capacity": args.stack_capacity,
               "follow_contrast": args.follow_contrast, "curve_secret_key": args.curve_secret}
    try:
        from polystore_napari.launch import launch

        launch(args.endpoint, allow_remote=args.allow_remote,
               **{name: value for name, value in options.items() if value is not None})
    except ImportError as exc:  # napari itself is imported when the viewer starts
        return _fail(f"napari cannot be imported ({exc}); install it: pip install "
                     "'napari[pyqt6]' (or run `bash scripts/install.sh` in the polystore "
                     "source folder)")
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    return 0


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _fail(message: str) -> int:
    print(f"polystore napari: {message}", file=sys.stderr)
    return 1
