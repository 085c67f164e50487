"""The ``polystore`` command line.

    polystore demo                      the main job: a live pipeline streamed into napari
    polystore napari [--endpoint E]     napari with the receiver docked (from the napari plugin)
    polystore fiji [--run]              where the Fiji receiver script is (or run it headless)
    polystore send PATHS... --to napari_stream|fiji_stream   (files, folders, x.zarr)
    polystore shm ls | clean            our shared-memory segments / sweep orphaned ones
    polystore bench [--quick]           the streaming benchmark

Every subcommand has ``--help``. Usage errors exit with status 2, failures with 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from polystore import __version__
from polystore.apps.arguments import (
    CommandError,
    byte_size,
    connect_endpoint,
    frames_per_second,
    human_size,
    listen_endpoint,
    positive_int,
    stream_key,
)
from polystore.apps.fiji import cmd_fiji, fiji_endpoint
from polystore.apps.send import cmd_send, sendable_extensions

log = logging.getLogger("polystore.cli")

STREAM_TARGETS = ("napari_stream", "fiji_stream")
INSTALL_NAPARI = (
    "install napari and the polystore plugin: pip install 'napari[pyqt6]' && "
    "pip install -e viewers/napari (from the polystore source folder), or run "
    "`bash scripts/install.sh` there to install everything"
)


SEND_DESCRIPTION = """\
Stream files, folders (recursively) and zarr/OME-Zarr stores into a running viewer.

Files are read with the disk backend:
  napari_stream takes {napari}
  fiji_stream takes   {fiji}
Other files are skipped and reported, and so is each file that cannot be read. A file
larger than one frame may be (--max-inflight-bytes) is refused from its header, before
its pixels are read (.npy, .tif/.tiff, .png, .jpg/.jpeg).

Streams and positions: a file goes to the stream of its folder and name without the
trailing index (plate/A01/t003.tif -> plate/A01), or to --stream. Files of one stream
are placed along the axis their index names: t003 -> t=3, z05 -> z=5, c1 or ch1 -> c=1,
s2/f2/p2 -> an axis s/f/p, a bare number (img_007, img007) -> t=7; so a folder
t000.npy ... t059.npy becomes one layer with a t slider (also when named one by one,
run1/t*.npy: a name that is nothing but an index takes its folder's name). A file of the
stream without that index is at 0. Indices that would leave most of an axis empty (t005, t120) are
placed in order (0, 1). A second index of one axis is part of the name
(exp20240501_t001 -> stream exp20240501, t=1). Files that land at one position of one
stream (snap.png and snap.jpg -> stream snap) replace each other in the viewer: send warns.

Zarr: a zarr/OME-Zarr path (plate.zarr, plate.zarr/A/1/0, s3://bucket/x.zarr), or a
*.zarr store found in a folder, is streamed plane by plane with its t/c/z axes.

Exit status: 0 when everything was handed to the viewer (with --policy latest, frames
the viewer was too slow for are dropped: the summary counts them and a warning says so,
and the status stays 0); 1 if a file or folder could not be read or sent, or sending
stopped (no viewer, viewer lost, credential, shared memory full: at the first such
error, once); 2 for usage errors (a bad option, endpoint or a path that is not there).
Ctrl-C waits for the frames in flight; Ctrl-C again abandons them.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a pointer to ``--help`` after every usage error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for help.\n")


# -- commands contributed by plugins ------------------------------------------------------

#: the entry point group through which a package adds a ``polystore`` subcommand: each entry
#: point is a function ``add(subparsers)`` that adds its parser and sets ``func`` (a function
#: of the parsed arguments returning the exit status).
PLUGIN_GROUP = "polystore.cli"
#: subcommands that plugins contribute, and how to install each plugin
PLUGIN_COMMANDS = {"napari": INSTALL_NAPARI}


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Let installed plugins add their subcommands; a command whose plugin is missing (or
    broken) still exists and says how to install it. Call it after the built-in commands: a
    plugin cannot replace one, and a plugin that fails (on import, by taking a name already
    in use, or half-way through adding its parser) leaves nothing of its own behind."""
    from importlib.metadata import entry_points

    added = set()
    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name in added:
            continue
        before = (dict(sub._name_parser_map), len(sub._choices_actions))
        try:
            entry.load()(sub)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one broken plugin must
            # not break the others, nor the built-in commands (SystemExit: sys.exit on import)
            sub._name_parser_map.clear()
            sub._name_parser_map.update(before[0])
            del sub._choices_actions[before[1]:]
            why = f"{type(exc).__name__}: {exc}"
            if entry.name in sub._name_parser_map:  # a built-in (or earlier plugin) name
                log.warning("ignoring the polystore.cli entry point %s = %s (%s); uninstall "
                            "or fix the package that provides it", entry.name, entry.value, why)
            else:
                dist = entry.dist.name if entry.dist else entry.module.split(".")[0]
                install = PLUGIN_COMMANDS.get(entry.name, f"reinstall or fix {dist}")
                _add_unavailable(sub, entry.name, f"the {entry.name} plugin cannot be "
                                 f"loaded ({why}); {install}")
        added.add(entry.name)
    for name, install in PLUGIN_COMMANDS.items():
        if name not in added and name not in sub._name_parser_map:
            _add_unavailable(sub, name, f"`polystore {name}` comes with the {name} plugin, "
                             f"which is not installed; {install}")


def _add_unavailable(sub: argparse._SubParsersAction, name: str, why: str) -> None:
    def unavailable(args: argparse.Namespace) -> int:
        raise CommandError(why)

    parser = sub.add_parser(name, help=f"(not available: see `polystore {name}`)",
                            description=why)
    parser.add_argument("ignored", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=unavailable)


# -- shm ------------------------------------------------------------------------------------


def _our_prefixes(every: bool) -> list[str]:
    """Segment prefixes to look at: polystore's own and those of every installed streaming
    backend; with `every`, any prefix of a name shaped like a sender's segment."""
    from polystore.apps.bench import RING_PREFIX
    from polystore.base import registered_backend_classes
    from polystore.registry import load_entry_points
    from polystore.streaming import PREFIXES, StreamingBackend
    from polystore.streaming.shm import SEGMENT_NAME_RE, SHM_DIR

    prefixes = {*PREFIXES, RING_PREFIX}  # the benchmark's ring too: a killed run leaves it
    if every:
        if SHM_DIR.is_dir():
            for name in os.listdir(SHM_DIR):
                match = SEGMENT_NAME_RE.match(name)
                if match:
                    prefixes.add(match[1])
    else:
        load_entry_points()
        for cls in registered_backend_classes().values():
            if issubclass(cls, StreamingBackend):
                prefixes.add(cls.SHM_PREFIX)
    return sorted(prefixes)


def cmd_shm_ls(args: argparse.Namespace) -> int:
    from polystore.streaming import list_segments
    from polystore.streaming.shm import SHM_DIR

    if not SHM_DIR.is_dir():
        print(f"no {SHM_DIR} on this system: nothing to list")
        return 0
    prefixes = _our_prefixes(args.all)
    segments = list_segments(prefixes)
    if not segments:
        print(f"no polystore shared-memory segments in {SHM_DIR} "
              f"(prefixes: {', '.join(prefixes)})")
        return 0
    width = max(len(s.name) for s in segments)
    print(f"{'NAME':<{width}}  {'OWNER PID':>9}  {'OWNER':<7}  {'SIZE':>10}")
    for s in segments:
        state = "alive" if s.owner_alive else "dead"
        print(f"{s.name:<{width}}  {s.pid:>9}  {state:<7}  {human_size(s.size):>10}")
    orphans = [s for s in segments if not s.owner_alive]
    total = sum(s.size for s in segments)
    line = f"{len(segments)} segment(s), {human_size(total)}"
    if orphans:
        line += (f"; {len(orphans)} orphaned ({human_size(sum(s.size for s in orphans))}) whose "
                 "owner is gone: `polystore shm clean` removes them")
    print(line)
    return 0


def cmd_shm_clean(args: argparse.Namespace) -> int:
    from polystore.streaming import sweep
    from polystore.streaming.shm import SHM_DIR

    if not SHM_DIR.is_dir():
        print(f"no {SHM_DIR} on this system: nothing to clean")
        return 0
    removed = sweep(_our_prefixes(args.all))
    if not removed:
        print("no orphaned segments: every polystore segment's owner is alive")
        return 0
    for s in removed:
        print(f"removed {s.name} (owner pid {s.pid}, {human_size(s.size)})")
    print(f"removed {len(removed)} orphaned segment(s), "
          f"{human_size(sum(s.size for s in removed))} freed")
    return 0


def cmd_shm(args: argparse.Namespace) -> int:
    raise argparse.ArgumentTypeError("choose what to do: `polystore shm ls` or "
                                     "`polystore shm clean`")


# -- bench, demo ----------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from polystore.streaming.keys import create_keys

    try:
        public, secret = create_keys(args.directory, args.name)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    public, secret = os.path.abspath(public), os.path.abspath(secret)  # work from anywhere
    print(f"public key (share with pipelines): {public}\n"
          f"secret key (keep on the viewer machine): {secret}\n\n"
          f"viewer:    polystore napari --endpoint tcp://0.0.0.0:55555 --allow-remote "
          f"--curve-secret {secret}\n"
          f"pipelines: export POLYSTORE_NAPARI_SERVER_KEY={public}   "
          f"(or NapariStreamingBackend(endpoint, curve_server_key=...))")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from polystore.apps.demo import run_demo
    from polystore.streaming import StreamingError

    try:
        run_demo(
            args.frames, args.out, headless=args.headless, napari=not args.no_napari,
            fps=args.fps, endpoint=args.endpoint, wait=not args.no_wait,
            progress=not args.quiet,
        )  # fmt: skip
    except (OSError, RuntimeError, ValueError, StreamingError) as exc:
        raise CommandError(str(exc)) from None
    return 0


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="polystore",
        description="Save and load arrays anywhere, and stream them live into napari and Fiji.",
        epilog="Start with `polystore demo`. Docs: docs/ (mkdocs serve) or README.md.",
    )
    parser.add_argument("--version", action="version", version=f"polystore {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo", help="the main job: a synthetic live pipeline saved to disk and streamed to "
        "napari", description="Simulate cells in three channels, smooth, segment, outline "
        "them; save every step with the disk backend and stream it into napari. Without a "
        "display (or with --headless) napari runs on a virtual display (Xvfb) and a "
        "screenshot is saved; without napari a headless receiver takes the frames.",
    )  # fmt: skip
    demo.add_argument("--frames", type=positive_int, default=60,
                      help="time points to simulate (default 60)")
    demo.add_argument("--out", default="polystore_demo_output",
                      help="output folder (default ./polystore_demo_output)")
    demo.add_argument("--headless", action="store_true",
                      help="no window even if there is a display")
    demo.add_argument("--no-napari", action="store_true",
                      help="stream to a headless receiver instead of napari")
    demo.add_argument("--fps", type=frames_per_second, default=None,
                      help="time points per second (default 10 in a window, else as fast as "
                      "possible; 0 = as fast as possible)")
    demo.add_argument("--endpoint", type=listen_endpoint,
                      help="where napari (or the headless receiver) listens (default: a free "
                      "port on 127.0.0.1)")
    demo.add_argument("--no-wait", action="store_true",
                      help="exit after streaming and leave the napari window open")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    keys = sub.add_parser(
        "keys", help="make a CURVE key pair for a viewer that listens beyond 127.0.0.1",
        description="Write DIR/NAME.key (public: give it to the pipeline machines) and "
        "DIR/NAME.key_secret (keep it on the viewer machine).",
    )  # fmt: skip
    keys.add_argument("directory", metavar="DIR", help="where to write the key files")
    keys.add_argument("--name", default="viewer", help="file name stem (default: viewer)")
    keys.set_defaults(func=cmd_keys)

    fiji = sub.add_parser(
        "fiji", help="show where the Fiji receiver script is and how to install it",
        description="Print the path of the Fiji receiver script and how to install it; with "
        "--run, run it headless (Debian's ImageJ + JeroMQ + Groovy, no Fiji needed).",
    )  # fmt: skip
    fiji.add_argument("--run", action="store_true", help="run the receiver headless now")
    fiji.add_argument("--endpoint", type=fiji_endpoint, help="where to listen (default "
                      "$POLYSTORE_FIJI_ENDPOINT or tcp://127.0.0.1:55556)")
    fiji.add_argument("--output-dir", help="with --run: also save every image as TIFF there "
                      "whenever a sender asks for a report")
    fiji.set_defaults(func=cmd_fiji)

    send = sub.add_parser(
        "send", help="stream image files, folders or zarr stores into napari or Fiji",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SEND_DESCRIPTION.format(
            napari=", ".join(sendable_extensions("napari_stream")),
            fiji=", ".join(sendable_extensions("fiji_stream"))),
    )  # fmt: skip
    send.add_argument("paths", nargs="+", metavar="PATH", help="files, folders or zarr stores")
    send.add_argument("--to", required=True, choices=STREAM_TARGETS, help="streaming backend")
    send.add_argument("--endpoint", type=connect_endpoint,
                      help="the viewer's endpoint, tcp://HOST:PORT or ipc://PATH (default: "
                      "$POLYSTORE_NAPARI_ENDPOINT / $POLYSTORE_FIJI_ENDPOINT, else the "
                      "backend's port on 127.0.0.1)")
    send.add_argument("--stream", type=stream_key, help="one layer/window key for every "
                      "file (default: derived from each path, e.g. plate/A01/t003.tif -> "
                      "plate/A01); files are still placed by their index")
    send.add_argument("--policy", choices=("block", "latest", "raise"), default="block",
                      help="when the viewer falls behind: wait (block, default), drop the "
                      "oldest unacknowledged frame (latest: the summary counts the frames "
                      "dropped, exit status 0) or fail (raise)")
    send.add_argument("--max-inflight-bytes", type=byte_size, default=None, metavar="SIZE",
                      help="shared memory in flight, and so the largest frame (default 512M); "
                      "e.g. 2G")
    send.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=cmd_send)

    shm = sub.add_parser("shm", help="list or clean polystore's shared-memory segments",
                         description="Shared-memory segments of polystore senders in /dev/shm.")
    shm.set_defaults(func=cmd_shm)
    shm_sub = shm.add_subparsers(dest="shm_command", metavar="ACTION", parser_class=_Parser)
    ls = shm_sub.add_parser("ls", help="list segments: name, owner pid, alive?, size")
    ls.add_argument("--all", action="store_true",
                    help="every segment named like a polystore sender's, whatever its prefix")
    ls.set_defaults(func=cmd_shm_ls)
    clean = shm_sub.add_parser("clean", help="remove segments whose owner process is gone")
    clean.add_argument("--all", action="store_true",
                       help="also for prefixes of backends not installed here")
    clean.set_defaults(func=cmd_shm_clean)

    from polystore.apps import bench as benchmark

    bench = sub.add_parser("bench", help="run the streaming benchmark",
                           description="polystore save() into a receiver process, next to "
                           "memcpy, raw ZeroMQ and a raw shared-memory ring, on this machine.")
    benchmark.add_arguments(bench)
    bench.set_defaults(func=benchmark.run)
    add_plugin_commands(sub)  # last: a plugin cannot take a built-in command's name
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(name)s: %(levelname)s: %(message)s",
    )
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "\npolystore: error: choose a command, e.g. `polystore demo`\n")
    prog = f"polystore {args.command}"
    try:
        return args.func(args)
    except argparse.ArgumentTypeError as exc:  # a usage problem found after parsing
        print(f"{prog}: error: {exc}\nRun '{prog} --help' for help.", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
