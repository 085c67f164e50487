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
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from polystore import __version__

log = logging.getLogger("polystore.cli")

STREAM_TARGETS = ("napari_stream", "fiji_stream")
INSTALL_NAPARI = (
    "install napari and the polystore plugin: pip install 'napari[pyqt6]' && "
    "pip install -e viewers/napari (from the polystore source folder), or run "
    "`bash scripts/install.sh` there to install everything"
)


class CommandError(Exception):
    """A failure the user can fix: printed as ``polystore <cmd>: <message>``, exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with a pointer to ``--help`` after every usage error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for help.\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _listen_endpoint(text: str) -> str:
    """An endpoint a receiver on this machine may listen on (checked before anything starts)."""
    from polystore.streaming.endpoints import check_bind_endpoint

    try:
        check_bind_endpoint(text, allow_remote=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fiji_endpoint(text: str) -> str:
    """`_listen_endpoint`, over TCP: JeroMQ cannot speak ipc:// with ZeroMQ."""
    text = _listen_endpoint(text)
    if not text.startswith("tcp://"):
        raise argparse.ArgumentTypeError(f"the Fiji receiver listens on tcp:// only (JeroMQ "
                                         f"cannot talk ipc:// to ZeroMQ), got {text!r}")
    return text


#: what ImageJ's parameter string cannot carry inside a quoted value
_UNQUOTABLE = set('"\\,\n\r')


def _stream_key(text: str) -> str:
    """A stream key as the protocol takes it (1 to 256 characters), checked once, not per
    file."""
    if not 1 <= len(text) <= 256:
        raise argparse.ArgumentTypeError(f"expected a stream key of 1 to 256 characters, got "
                                         f"{len(text)}")
    return text


def _fps(text: str) -> float:
    """0 (as fast as possible) or a pace a sleep can keep: 1e-300 overflowed time.sleep."""
    value = _non_negative_float(text)
    if value != 0 and not 1e-3 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"expected 0 (as fast as possible) or 0.001 to "
                                         f"1000000 time points per second, got {text!r}")
    return value


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kmg])i?)?b?$", re.IGNORECASE)


def _byte_size(text: str) -> int:
    """A size such as 2G, 768MiB or 1048576 (bytes; binary units), up to 1 TiB."""
    match = _SIZE.match(text.strip())
    value = 0
    if match:
        value = int(float(match[1]) * 1024 ** " kmg".index((match[2] or " ").lower()))
    if not 1 <= value <= 1024**4:
        raise argparse.ArgumentTypeError(f"expected a size such as 2G, 768M or 1048576 "
                                         f"(bytes), up to 1T, got {text!r}")
    return value


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"  # pragma: no cover


def _source_root() -> Path:
    """The source checkout this package runs from (viewers/ and scripts/ live there)."""
    return Path(__file__).resolve().parents[2]


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


# -- fiji -----------------------------------------------------------------------------------


def fiji_dir() -> Path:
    """viewers/fiji of the source checkout (it is not part of the installed package)."""
    return _source_root() / "viewers" / "fiji"


def _fiji_missing() -> list[str]:
    """What the headless Fiji receiver needs and this machine lacks."""
    missing = []
    if shutil.which("groovy") is None:
        missing.append("groovy (apt-get install groovy)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing.append("Java (apt-get install openjdk-17-jre-headless)")
    for env, default, package in (("IJ_JAR", "/usr/share/java/ij.jar", "libij-java"),
                                  ("JEROMQ_JAR", "/usr/share/java/jeromq.jar",
                                   "libjeromq-java")):  # fmt: skip
        jar = os.environ.get(env, default)
        if not Path(jar).is_file():
            missing.append(f"{jar} (apt-get install {package}, or set ${env})")
    if not (fiji_dir() / "run_headless.sh").is_file():
        missing.append(f"{fiji_dir() / 'run_headless.sh'} (part of the polystore source tree)")
    return missing


def _jeromq_has_curve() -> bool:
    """Whether the JeroMQ jar run_headless.sh uses has CURVE (0.5 and newer)."""
    import zipfile

    jar = os.environ.get("JEROMQ_JAR", "/usr/share/java/jeromq.jar")
    try:
        with zipfile.ZipFile(jar) as archive:
            return "org/zeromq/ZMQ$Curve.class" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def cmd_fiji(args: argparse.Namespace) -> int:
    from polystore.streaming import FijiStreamingBackend

    script = fiji_dir() / "polystore_receiver.groovy"
    if not script.is_file():
        raise CommandError(
            f"the Fiji receiver script is not at {script}: it ships with the polystore source "
            "(viewers/fiji/polystore_receiver.groovy), not with an installed wheel. Get the "
            "source and run `polystore fiji` from an editable install (pip install -e .)"
        )
    try:
        endpoint = args.endpoint or _fiji_endpoint(FijiStreamingBackend.default_endpoint())
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"$POLYSTORE_FIJI_ENDPOINT: {exc}") from None
    if not args.run:
        print(f"Fiji receiver script: {script}\n")
        print("Install it in Fiji (details: docs/fiji.md):")
        print("  1. put the JeroMQ jar (jeromq-<version>.jar, from Maven Central) into "
              "Fiji.app/jars/")
        print(f"  2. copy {script.name} into Fiji.app/scripts/Plugins/polystore/ and restart "
              "Fiji\n     (or open it in Fiji's script editor and press Run)")
        print(f"  3. run it from the Plugins menu; keep the endpoint {endpoint} (or make the "
              "sender use the same one)")
        print("\nThen stream: fm.save(img, 'A01/t000.tif', backend='fiji_stream')  or  "
              "polystore send FILES --to fiji_stream")
        print("Without Fiji (Debian's ImageJ + JeroMQ + Groovy): polystore fiji --run")
        return 0
    if args.output_dir:
        output = Path(args.output_dir).resolve()
        if _UNQUOTABLE & set(str(output)):
            raise CommandError(f"--output-dir {str(output)!r}: ImageJ's script parameters "
                               "cannot carry a path with a quote, backslash, comma or line "
                               "break (the receiver would save elsewhere); choose another "
                               "folder")
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--output-dir: cannot make the folder {output}: "
                               f"{exc.strerror or exc}") from None
    missing = _fiji_missing()
    if missing:
        raise CommandError(
            "cannot run the Fiji receiver headless; missing: " + "; ".join(missing)
            + ". `bash scripts/install.sh` installs all of them"
        )  # fmt: skip
    params = [f'endpoint="{endpoint}"']
    if not _jeromq_has_curve():  # Debian's JeroMQ 0.3: the script refuses unless told
        if os.environ.get("POLYSTORE_AUTH") != "none":
            raise CommandError(
                "this JeroMQ (0.3, Debian's) cannot authenticate senders, so the receiver would "
                "accept any local account. Set JEROMQ_JAR to a jeromq-0.6.0.jar, or run "
                "unauthenticated on purpose with POLYSTORE_AUTH=none (for the senders too)"
            )  # fmt: skip
        params.append("allow_unauthenticated=true")
    if args.output_dir:
        params.append(f'output_dir="{output}"')
    launcher = fiji_dir() / "run_headless.sh"
    print(f"polystore fiji: starting the headless receiver on {endpoint} (Ctrl+C stops it)",
          flush=True)
    sys.stderr.flush()
    # exec: this process becomes the receiver, so signals (Ctrl+C, SIGTERM) reach it directly
    os.execv("/bin/bash", ["bash", str(launcher), ",".join(params)])
    return 0  # pragma: no cover - execv does not return


# -- send -----------------------------------------------------------------------------------


def _collect(paths: Sequence[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(file, path label) for every regular file named or inside a named folder
    (recursively), and what was passed over: anything else (a FIFO would block the read
    forever), and folders reached through a link (not followed: a link may loop). Labels keep
    the folder name, so ``send plate1`` streams ``plate1/A01/t000.tif``."""
    from polystore.atomic import is_temp_name

    found: list[tuple[Path, str]] = []
    passed_over: list[str] = []
    for arg in paths:
        if not arg:
            raise argparse.ArgumentTypeError("an empty path: name a file or folder ('.' for "
                                             "this folder)")
        path = Path(arg)
        if path.is_dir():
            root = path.resolve().name or "root"
            for current, dirs, files in os.walk(path):
                dirs.sort()
                for name in dirs:
                    if (Path(current) / name).is_symlink():
                        passed_over.append(f"{Path(current) / name}/ (a link to a folder)")
                for name in sorted(files):
                    file = Path(current) / name
                    if is_temp_name(name):
                        continue
                    if not file.is_file():
                        passed_over.append(f"{file} (not a regular file)")
                        continue
                    found.append((file, _printable(f"{root}/{file.relative_to(path).as_posix()}")))
        elif path.is_file():
            found.append((path, _printable(path.name)))
        elif path.exists():
            raise argparse.ArgumentTypeError(f"{arg} is not a regular file or a folder (a "
                                             "FIFO, socket or device): nothing to read")
        else:
            raise argparse.ArgumentTypeError(f"no such file or folder: {arg}")
    return found, passed_over


def _printable(label: str) -> str:
    """A file name that is not UTF-8 (its bytes kept by Python as surrogates, which no
    message can carry) with each bad byte shown as U+FFFD."""
    return os.fsencode(label).decode("utf-8", "replace")


#: what `send` reads from disk as arrays (or ROIs) to stream
_SENDABLE_FORMATS = ("npy", "tiff", "png", "jpeg", "roi")


def _split_sendable(files: list[tuple[Path, str]], backend_cls) -> tuple[list, dict[str, list]]:
    """Files the disk backend reads as arrays and the streaming backend accepts; the rest,
    grouped by why they are skipped."""
    from polystore import DiskBackend
    from polystore.streaming.backend import matching_extension

    readable = {ext for ext, fmt in DiskBackend.FORMATS.items() if fmt in _SENDABLE_FORMATS}
    keep, skipped = [], {"stream": [], "disk": []}
    for file, label in files:
        if not matching_extension(label, backend_cls.SUPPORTED_EXTENSIONS):
            skipped["stream"].append(label)
        elif matching_extension(label, readable) is None:
            skipped["disk"].append(label)
        else:
            keep.append((file, label))
    return keep, skipped


def _extensions(labels: list[str]) -> str:
    counts = Counter(Path(label).suffix.lower() or "(none)" for label in labels)
    return ", ".join(f"{ext} x{n}" if n > 1 else ext for ext, n in sorted(counts.items()))


def _skip_report(skipped: dict[str, list], to: str, backend_cls) -> list[str]:
    lines = []
    if skipped["stream"]:
        lines.append(
            f"skipped {len(skipped['stream'])} file(s) {to} does not stream "
            f"({_extensions(skipped['stream'])}); it takes "
            f"{', '.join(sorted(backend_cls.SUPPORTED_EXTENSIONS))}"
        )
    if skipped["disk"]:
        lines.append(
            f"skipped {len(skipped['disk'])} file(s) send does not read "
            f"({_extensions(skipped['disk'])}); it reads {_readable_extensions()}"
        )
    if skipped["other"]:
        lines.append(f"skipped {len(skipped['other'])} entr(ies) not read: "
                     + "; ".join(skipped["other"][:5])
                     + (f"; and {len(skipped['other']) - 5} more" if len(skipped["other"]) > 5
                        else ""))
    return lines


def _readable_extensions() -> str:
    from polystore import DiskBackend

    return ", ".join(sorted(ext for ext, fmt in DiskBackend.FORMATS.items()
                            if fmt in _SENDABLE_FORMATS))


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from polystore import BackendRegistry, DiskBackend, FileManager
    from polystore.streaming import (
        FijiStreamingBackend,
        NapariStreamingBackend,
        StreamingError,
        UnstreamableDataError,
    )
    from polystore.zarr.planes import is_zarr_path, send_zarr

    limits = ({} if args.max_inflight_bytes is None
              else {"max_inflight_bytes": args.max_inflight_bytes})
    def is_store(path: str) -> bool:  # a file such as x.zarr/a.tif, or x.zarr, is a file
        return is_zarr_path(path) and not os.path.isfile(path)

    if any(is_store(p) for p in args.paths):  # zarr/OME-Zarr: plane by plane, t/c/z axes
        if not all(is_store(p) for p in args.paths):
            raise CommandError("send zarr stores (*.zarr) and files in separate commands")
        try:
            send_zarr(args.paths, args.to, endpoint=args.endpoint, policy=args.policy,
                      stream=args.stream, quiet=args.quiet, **limits)
        except (StreamingError, OSError, ValueError, ImportError, RuntimeError) as exc:
            raise CommandError(f"{type(exc).__name__}: {exc}") from None
        return 0

    backend_cls = {"napari_stream": NapariStreamingBackend,
                   "fiji_stream": FijiStreamingBackend}[args.to]  # fmt: skip
    try:
        backend = backend_cls(args.endpoint, policy=args.policy, **limits)
    except ValueError as exc:  # the endpoint or a key from the environment
        raise CommandError(str(exc)) from None
    try:
        found, passed_over = _collect(args.paths)
    except BaseException:
        backend.close()
        raise
    files, skipped = _split_sendable(found, backend_cls)
    skipped["other"] = passed_over
    for line in _skip_report(skipped, args.to, backend_cls):
        print(f"polystore send: {line}", file=sys.stderr)
    if not files:
        backend.close()
        raise CommandError(f"nothing to send: no file in {' '.join(args.paths)} is one "
                           f"{args.to} accepts and send reads ({_readable_extensions()})")
    fm = FileManager(BackendRegistry({"disk": DiskBackend(), args.to: backend},
                                     entry_points=False))
    failed: list[str] = []
    sent_bytes, saved, t0 = 0, 0, time.perf_counter()
    try:
        bar = tqdm(files, desc=f"send -> {args.to}", unit="file", disable=args.quiet,
                   file=sys.stderr)
        for file, label in bar:
            try:
                data = fm.load(file, backend="disk")
                limit = backend.options.max_inflight_bytes
                if getattr(data, "nbytes", 0) > limit:
                    failed.append(f"{file}: {_human(data.nbytes)} is more than one frame may "
                                  f"be ({_human(limit)}): raise --max-inflight-bytes")
                    continue
                fm.save(data, label, backend=args.to, stream=args.stream)
            except UnstreamableDataError as exc:
                failed.append(f"{file}: {exc}")
                continue
            except StreamingError:
                raise
            except Exception as exc:  # noqa: BLE001 - an unreadable file: report, go on
                failed.append(f"{file}: cannot load it: {type(exc).__name__}: {exc}")
                continue
            sent_bytes += getattr(data, "nbytes", 0)
            saved += 1
        bar.close()
        backend.flush()
    except StreamingError as exc:
        raise CommandError(f"{exc} ({saved} of {len(files)} file(s) were handed to the stream "
                           "before it stopped)") from None
    finally:
        backend.close()
    seconds = time.perf_counter() - t0
    sent = len(files) - len(failed)
    print(f"sent {sent} file(s) ({_human(sent_bytes)}) to {args.to} at {backend.endpoint} "
          f"in {seconds:.2f} s")
    for line in failed:
        print(f"polystore send: not sent: {line}", file=sys.stderr)
    return 1 if failed else 0


# -- shm ------------------------------------------------------------------------------------


def _our_prefixes(every: bool) -> list[str]:
    """Segment prefixes to look at: polystore's own and those of every installed streaming
    backend; with `every`, any prefix of a name shaped like a sender's segment."""
    from polystore.base import registered_backend_classes
    from polystore.registry import load_entry_points
    from polystore.streaming import PREFIXES, StreamingBackend
    from polystore.streaming.shm import SEGMENT_NAME_RE, SHM_DIR

    prefixes = set(PREFIXES)
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
        print(f"{s.name:<{width}}  {s.pid:>9}  {state:<7}  {_human(s.size):>10}")
    orphans = [s for s in segments if not s.owner_alive]
    total = sum(s.size for s in segments)
    line = f"{len(segments)} segment(s), {_human(total)}"
    if orphans:
        line += (f"; {len(orphans)} orphaned ({_human(sum(s.size for s in orphans))}) whose "
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
        print(f"removed {s.name} (owner pid {s.pid}, {_human(s.size)})")
    print(f"removed {len(removed)} orphaned segment(s), "
          f"{_human(sum(s.size for s in removed))} freed")
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
    demo.add_argument("--frames", type=_positive_int, default=60,
                      help="time points to simulate (default 60)")
    demo.add_argument("--out", default="polystore_demo_output",
                      help="output folder (default ./polystore_demo_output)")
    demo.add_argument("--headless", action="store_true",
                      help="no window even if there is a display")
    demo.add_argument("--no-napari", action="store_true",
                      help="stream to a headless receiver instead of napari")
    demo.add_argument("--fps", type=_fps, default=None,
                      help="time points per second (default 10 in a window, else as fast as "
                      "possible; 0 = as fast as possible)")
    demo.add_argument("--endpoint", type=_listen_endpoint,
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
    fiji.add_argument("--endpoint", type=_fiji_endpoint, help="where to listen (default "
                      "$POLYSTORE_FIJI_ENDPOINT or tcp://127.0.0.1:55556)")
    fiji.add_argument("--output-dir", help="with --run: also save every image as TIFF there "
                      "whenever a sender asks for a report")
    fiji.set_defaults(func=cmd_fiji)

    send = sub.add_parser(
        "send", help="stream TIFF/NPY files, folders or zarr stores into napari or Fiji",
        description="Load TIFF and NPY files (folders recursively) with the disk backend and "
        "stream them to a running viewer. Files the viewer backend does not accept are "
        "skipped and reported. A zarr/OME-Zarr path (plate.zarr, plate.zarr/A/1/0, "
        "s3://bucket/x.zarr) is streamed plane by plane with its t/c/z axes.",
    )  # fmt: skip
    send.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    send.add_argument("--to", required=True, choices=STREAM_TARGETS, help="streaming backend")
    send.add_argument("--endpoint", help="the viewer's endpoint (default: the backend's)")
    send.add_argument("--stream", type=_stream_key, help="one layer/window key for every "
                      "file (default: derived from each path, e.g. plate/A01/t003.tif -> "
                      "plate/A01)")
    send.add_argument("--policy", choices=("block", "latest", "raise"), default="block",
                      help="when the viewer falls behind: wait (block, default), drop the "
                      "oldest unacknowledged frame (latest) or fail (raise)")
    send.add_argument("--max-inflight-bytes", type=_byte_size, default=None, metavar="SIZE",
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
