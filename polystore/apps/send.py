"""``polystore send``: files, folders and zarr stores streamed into a running viewer."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from polystore.apps.arguments import CommandError, human_size


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
    from polystore.streaming.stream_keys import matching_extension

    readable = _readable()
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
        lines.append(f"passed over {len(skipped['other'])} entries: "
                     + "; ".join(skipped["other"][:5])
                     + (f"; and {len(skipped['other']) - 5} more" if len(skipped["other"]) > 5
                        else ""))
    return lines


def _readable() -> set[str]:
    """The extensions `send` reads (the disk backend's formats it streams)."""
    from polystore import DiskBackend

    return {ext for ext, fmt in DiskBackend.FORMATS.items() if fmt in _SENDABLE_FORMATS}


def _readable_extensions() -> str:
    return ", ".join(sorted(_readable()))


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
    from polystore.rois import is_roi_path

    fm = FileManager(BackendRegistry({"disk": DiskBackend(), args.to: backend},
                                     entry_points=False))
    failed: list[str] = []
    sent_bytes, saved, t0 = 0, 0, time.perf_counter()
    try:
        bar = tqdm(files, desc=f"send -> {args.to}", unit="file", disable=args.quiet,
                   file=sys.stderr)
        for file, label in bar:
            try:
                # ROI files keep each ROI's plane (c, z, t): one set per plane
                data = fm.load(file, backend="disk", **(
                    {"positions": True} if is_roi_path(file) else {}))
                limit = backend.options.max_inflight_bytes
                if getattr(data, "nbytes", 0) > limit:
                    failed.append(f"{file}: {human_size(data.nbytes)} is more than one frame may "
                                  f"be ({human_size(limit)}): raise --max-inflight-bytes")
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
    print(f"sent {sent} file(s) ({human_size(sent_bytes)}) to {args.to} at {backend.endpoint} "
          f"in {seconds:.2f} s")
    for line in failed:
        print(f"polystore send: not sent: {line}", file=sys.stderr)
    return 1 if failed else 0
