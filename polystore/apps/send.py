"""``polystore send``: files, folders and zarr stores streamed into a running viewer.

Files of one stream are placed along the axis their name's trailing index names
(`name_position`, `place`), so a folder of time points becomes one layer with a t slider
instead of frames that replace each other. Each file's size is read from its header before
its pixels are (`frame_bytes`). A file that cannot be read, or whose data the viewer cannot
take, is reported and the others are sent; an error that every later file would meet too
(no receiver, a lost one, a bad credential, full shared memory) stops the command at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import stat
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polystore.apps.arguments import CommandError, human_size

TARGETS = ("napari_stream", "fiji_stream")
#: what `send` reads from disk as arrays (or ROIs) to stream
_SENDABLE_FORMATS = ("npy", "tiff", "png", "jpeg", "roi")
#: a folder named *.zarr with one of these at its top is a zarr store (v2 or v3)
_ZARR_MARKERS = (".zgroup", ".zarray", "zarr.json")


def target_class(to: str) -> type:
    from polystore.streaming import FijiStreamingBackend, NapariStreamingBackend

    return {"napari_stream": NapariStreamingBackend, "fiji_stream": FijiStreamingBackend}[to]


# -- what is there to send --------------------------------------------------------------------


@dataclass
class Found:
    """What the paths named on the command line hold."""

    files: list[tuple[Path, str]] = field(default_factory=list)  # (file, label)
    stores: list[tuple[str, str | None]] = field(default_factory=list)  # (path, label)
    passed_over: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # what could not be read, and why


def _cannot_read(path: Any, exc: OSError, what: str = "") -> str:
    why = exc.strerror or str(exc)
    hint = ("; check its permissions and its folders' (ls -ld), or send it as a user who "
            "may read it") if isinstance(exc, PermissionError) else ""
    return f"cannot read {what + ' ' if what else ''}{_printable(os.fsdecode(path))}: {why}{hint}"


def is_store_folder(folder: str) -> bool:
    """A folder named *.zarr that holds zarr metadata at its top."""
    name = os.path.basename(folder.rstrip("/"))
    return (name.lower().endswith(".zarr") and len(name) > len(".zarr")
            and any(os.path.isfile(os.path.join(folder, m)) for m in _ZARR_MARKERS))


def collect(paths: Sequence[str], name_index_files: bool = True) -> Found:
    """Every regular file named or inside a named folder (recursively), with a label that
    keeps the folder name (``send plate1`` streams ``plate1/A01/t000.tif``); the zarr stores
    named or found in those folders (not walked into: their chunks are no images); and what
    was passed over: anything not a regular file (a FIFO would block the read forever),
    folders reached through a link (not followed: a link may loop), and what could not be
    read (an unreadable folder's files are not silently left out). A file named on its own
    keeps only its name, unless that name is nothing but an index (``t003.tif``, as a shell
    glob ``run1/t*.tif`` names them) and `name_index_files`: then its folder's name comes
    first (``run1/t003.tif``), so that such files share a stream as they do when their folder
    is sent. Raises ArgumentTypeError for a path that is not there."""
    from polystore.atomic import is_temp_name
    from polystore.streaming.stream_keys import split_name, strip_indices
    from polystore.zarr.planes import is_zarr_path

    found = Found()
    for arg in paths:
        if not arg:
            raise argparse.ArgumentTypeError("an empty path: name a file or folder ('.' for "
                                             "this folder)")
        try:
            mode = os.stat(arg).st_mode
        except (FileNotFoundError, NotADirectoryError):
            if "://" in arg and is_zarr_path(arg):  # a remote store: the zarr backend looks
                found.stores.append((arg, None))
                continue
            kind = "zarr store" if is_zarr_path(arg) else "file or folder"
            raise argparse.ArgumentTypeError(f"no such {kind}: {arg}") from None
        except OSError as exc:  # a folder on the way that may not be searched
            found.unreadable.append(_cannot_read(arg, exc))
            continue
        if stat.S_ISDIR(mode) and is_zarr_path(arg):  # x.zarr, x.zarr/A/1/0: a store
            found.stores.append((arg, None))
        elif stat.S_ISDIR(mode):
            _walk(arg, found, is_temp_name)
        elif stat.S_ISREG(mode):
            label = _printable(Path(arg).name)
            if name_index_files and not strip_indices(split_name(label)[1])[0]:
                label = f"{_printable(Path(arg).resolve().parent.name or 'root')}/{label}"
            found.files.append((Path(arg), label))
        else:
            raise argparse.ArgumentTypeError(f"{arg} is not a regular file or a folder (a "
                                             "FIFO, socket or device): nothing to read")
    return found


def _walk(top: str, found: Found, is_temp_name) -> None:
    root = Path(top).resolve().name or "root"

    def label(path: str) -> str:
        return _printable(f"{root}/{Path(path).relative_to(top).as_posix()}")

    def unreadable(exc: OSError) -> None:
        found.unreadable.append(_cannot_read(exc.filename, exc, "folder")
                                + "; its files were not sent")

    for current, dirs, files in os.walk(top, onerror=unreadable):
        kept = []
        for name in sorted(dirs):
            folder = os.path.join(current, name)
            if os.path.islink(folder):
                found.passed_over.append(f"{_printable(folder)}/ (a link to a folder)")
            elif is_store_folder(folder):
                found.stores.append((folder, label(folder)))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if is_temp_name(name):
                continue
            file = os.path.join(current, name)
            try:
                mode = os.stat(file).st_mode
            except FileNotFoundError:
                continue  # removed meanwhile, or a dangling link: nothing to send
            except OSError as exc:
                found.unreadable.append(_cannot_read(file, exc))
                continue
            if not stat.S_ISREG(mode):
                found.passed_over.append(f"{_printable(file)} (not a regular file)")
                continue
            found.files.append((Path(file), label(file)))


def _printable(label: str) -> str:
    """A file name that is not UTF-8 (its bytes kept by Python as surrogates, which no
    message can carry) with each bad byte shown as U+FFFD."""
    return os.fsencode(label).decode("utf-8", "replace")


def _readable() -> set[str]:
    """The extensions `send` reads (the disk backend's formats it streams)."""
    from polystore import DiskBackend

    return {ext for ext, fmt in DiskBackend.FORMATS.items() if fmt in _SENDABLE_FORMATS}


def sendable_extensions(to: str | None = None) -> list[str]:
    """The extensions `send` reads and `to` (else either target) takes."""
    from polystore.streaming.backend import matching_extension

    taken = set().union(*(target_class(t).SUPPORTED_EXTENSIONS for t in ([to] if to else
                                                                         TARGETS)))
    readable = _readable()
    return sorted(ext for ext in taken if matching_extension(f"x{ext}", readable) == ext)


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
            f"({_extensions(skipped['disk'])}); it reads {', '.join(sorted(_readable()))}"
        )
    if skipped["other"]:
        lines.append(f"passed over {len(skipped['other'])} entries: "
                     + "; ".join(skipped["other"][:5])
                     + (f"; and {len(skipped['other']) - 5} more" if len(skipped["other"]) > 5
                        else ""))
    return lines


# -- where each file goes ------------------------------------------------------------------------

#: the order of the axes in a frame's position (outermost first): t last, since viewers
#: line layers up by their last axes and t is the one streams share (docs/streaming.md)
_AXIS_ORDER = ("s", "f", "p", "z", "c", "t")


def name_position(label: str, extensions: Sequence[str] | set[str]) -> dict[str, int]:
    """The position the trailing indices of a file name give its frame (the indices the
    stream key strips, `stream_keys.strip_indices`, so files that differ only in them share
    a stream). Empty when the name has none, or is nothing but an index with no folder
    (``t003.tif``: its stream key is the whole name)."""
    from polystore.streaming.stream_keys import split_name, strip_indices

    parent, stem = split_name(label, extensions)
    base, position = strip_indices(stem)
    if not position or (not base and not parent):
        return {}
    return position


@dataclass
class Placement:
    """Each file's position in its stream, and what `send` should say about them."""

    positions: list[dict[str, int]]
    notes: list[str] = field(default_factory=list)
    collisions: list[str] = field(default_factory=list)


def place(streams: list[str], labels: list[str], positions: list[dict[str, int]]) -> Placement:
    """Final positions of the files of each stream: a stream of one file has none (it is a
    plain image); along an axis the files of a stream name, a file that names no index gets
    0; an axis whose indices would leave most positions empty (t005, t120) is filled in
    index order instead (0, 1), so no viewer must hold the gaps. Files left at one position
    of one stream replace each other in the viewer: they are listed in `collisions`."""
    placed: list[dict[str, int]] = [{} for _ in streams]
    result = Placement(placed)
    members: dict[str, list[int]] = defaultdict(list)
    for i, stream in enumerate(streams):
        members[stream].append(i)
    for stream, group in members.items():
        if len(group) > 1:
            names = {axis for i in group for axis in positions[i]}
            for axis in sorted(names, key=lambda a: (a not in _AXIS_ORDER,
                                                     _AXIS_ORDER.index(a) if a in _AXIS_ORDER
                                                     else 0, a)):
                values = sorted({positions[i][axis] for i in group if axis in positions[i]})
                order = None
                if values[-1] + 1 > 2 * len(values):
                    order = {value: n for n, value in enumerate(values)}
                    result.notes.append(
                        f"stream {stream}: its {axis} indices {values[0]}..{values[-1]} would "
                        f"leave most of the axis empty, so its {len(values)} index(es) are "
                        f"placed in order at {axis} = 0..{len(values) - 1}")
                for i in group:
                    value = positions[i].get(axis)
                    placed[i][axis] = 0 if value is None else (order[value] if order else value)
        at: dict[tuple, list[int]] = defaultdict(list)
        for i in group:
            at[tuple(placed[i].items())].append(i)
        clashes = [(where, same) for where, same in at.items() if len(same) > 1]
        if clashes:
            where, same = clashes[0]
            shown = ", ".join(labels[i] for i in same[:4])
            shown += f" and {len(same) - 4} more" if len(same) > 4 else ""
            spot = f" at {dict(where)}" if where else ""
            if len(clashes) == 1:
                what = (f"{len(same)} files go to stream {stream}{spot} and replace each other "
                        f"in the viewer (only the last stays): {shown}")
            else:
                what = (f"{sum(len(s) for _, s in clashes)} files go to {len(clashes)} "
                        f"positions of stream {stream} that two or more of them share, and "
                        "replace each other there in the viewer (only the last at each stays), "
                        f"e.g. {shown}{spot}")
            result.collisions.append(
                f"{what}. Give their names an index (snap_t000.png, snap_t001.png) or send "
                "them in separate commands with --stream")
    return result


# -- sizes, read from headers ----------------------------------------------------------------------

_PIL_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def frame_bytes(file: Path) -> int | None:
    """The bytes of the array `file` loads as, from its header without reading its pixels:
    .npy (the NumPy header), .tif/.tiff (the first series, what the disk backend loads),
    .png/.jpg/.jpeg (size and mode). None for other files, or a header that does not read
    (loading the file then says what is wrong)."""
    name = file.name.lower()
    try:
        if name.endswith(".npy"):
            import numpy as np

            with open(file, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(handle)
            return math.prod(shape) * dtype.itemsize
        if name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(file) as tif:
                series = tif.series[0]
                return math.prod(series.shape) * series.dtype.itemsize
        if name.endswith((".png", ".jpg", ".jpeg")):
            from PIL import Image

            with Image.open(file) as image:
                depth = _PIL_BYTES.get(image.mode, 1)
                bands = len(image.getbands())
                if image.mode in ("P", "PA"):  # loads as its palette's colours (RGB, RGBA)
                    bands = 4 if image.mode == "PA" else len(image.palette.mode)
                return image.width * image.height * bands * depth
    except Exception:  # noqa: BLE001 - a damaged header: the load reports it
        return None
    return None


def _too_large(what: str, nbytes: int, limit: int) -> str:
    return (f"{what}: {human_size(nbytes)} is more than one frame may be "
            f"({human_size(limit)}): raise --max-inflight-bytes")


# -- zarr stores ----------------------------------------------------------------------------------


def _store_images(stores: list[tuple[str, str | None]], limit: int) -> tuple[list, list[str]]:
    """The arrays of each store (labelled where the store was found), and why a store or
    an array is not sent: unreadable metadata, or a plane larger than one frame may be
    (checked before any plane is read: one of 18 GiB would be read whole)."""
    from polystore.zarr.backend import ZarrBackend
    from polystore.zarr.planes import find_images, plane_too_large

    source = ZarrBackend()
    images, failed = [], []
    for path, label in stores:
        try:
            found = find_images(source, path)
        except ImportError as exc:
            raise CommandError(f"cannot read {path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - metadata that does not read: report it
            failed.append(f"{path}: cannot read this zarr store: {type(exc).__name__}: {exc}")
            continue
        if not found:
            failed.append(f"{path}: no arrays of 2 or more dimensions in this zarr store")
        for image in found:
            if label is not None:  # found in a folder: plate1/run.zarr/..., as its files
                own = os.path.basename(path.rstrip("/"))
                image.label = label + image.label[len(own):]
            if too_large := plane_too_large(image, limit):
                failed.append(too_large)
            else:
                images.append(image)
    return images, failed


# -- the command ------------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from polystore import BackendRegistry, DiskBackend, FileManager
    from polystore.rois import is_roi_path
    from polystore.streaming import StreamingError, UnstreamableDataError
    from polystore.streaming.backend import stream_key
    from polystore.zarr.planes import describe_images, iter_planes

    backend_cls = target_class(args.to)
    limits = ({} if args.max_inflight_bytes is None
              else {"max_inflight_bytes": args.max_inflight_bytes})
    try:  # no connection yet: the endpoint (and a key) from the environment are checked
        backend = backend_cls(args.endpoint, policy=args.policy, **limits)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    limit = backend.options.max_inflight_bytes
    try:
        found = collect(args.paths, name_index_files=args.stream is None)
        files, skipped = _split_sendable(found.files, backend_cls)
        skipped["other"] = found.passed_over
        images, store_failures = _store_images(found.stores, limit) if found.stores else ([],
                                                                                            [])
    except BaseException:
        backend.close()
        raise
    for line in _skip_report(skipped, args.to, backend_cls):
        print(f"polystore send: {line}", file=sys.stderr)
    failed = found.unreadable + store_failures
    if not files and not images:
        backend.close()
        if failed:
            raise CommandError("nothing to send: " + "; ".join(failed))
        raise CommandError(f"nothing to send: no file in {' '.join(args.paths)} is one "
                           f"{args.to} takes ({', '.join(sendable_extensions(args.to))}), and "
                           "no zarr store")

    arrays = [i for i, (file, _) in enumerate(files) if not is_roi_path(file)]
    streams = [args.stream or stream_key(files[i][1], backend_cls.SUPPORTED_EXTENSIONS)
               for i in arrays]
    plan = place(streams, [files[i][1] for i in arrays],
                 [name_position(files[i][1], backend_cls.SUPPORTED_EXTENSIONS) for i in arrays])
    axes_of = dict(zip(arrays, plan.positions, strict=True))
    for line in plan.notes:
        print(f"polystore send: {line}", file=sys.stderr)
    for line in plan.collisions:
        print(f"polystore send: warning: {line}", file=sys.stderr)

    fm = FileManager(BackendRegistry({"disk": DiskBackend(), args.to: backend},
                                     entry_points=False))
    planes = sum(image.plane_count for image in images)
    total = len(files) + planes
    unit = "file(s)" if not images else "plane(s)" if not files else "file(s) and plane(s)"
    sent_files = sent_planes = handed = sent_bytes = 0
    stopped: BaseException | None = None
    where = ""
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"send -> {args.to}", unit="item", disable=args.quiet,
               file=sys.stderr)
    try:
        for index, (file, label) in enumerate(files):
            where = label
            bar.update(1)
            nbytes = frame_bytes(file)
            if nbytes is not None and nbytes > limit:  # before the pixels are read
                failed.append(_too_large(str(file), nbytes, limit))
                continue
            try:  # ROI files keep each ROI's plane (c, z, t): one set per plane
                data = fm.load(file, backend="disk", **(
                    {"positions": True} if is_roi_path(file) else {}))
            except Exception as exc:  # noqa: BLE001 - an unreadable file: report, go on
                failed.append(f"{file}: cannot load it: {type(exc).__name__}: {exc}")
                continue
            nbytes = getattr(data, "nbytes", 0)
            if nbytes > limit:
                failed.append(_too_large(str(file), nbytes, limit))
                continue
            axes = axes_of.get(index)
            try:
                fm.save(data, label, backend=args.to, stream=args.stream,
                        **({"axes": axes} if axes else {}))
            except UnstreamableDataError as exc:  # this file's data: report, go on
                failed.append(f"{file}: cannot send it: {exc}")
                continue
            handed += 1
            sent_files += 1
            sent_bytes += nbytes
        for image in images:
            leading = image.names[:-2]
            reading = iter_planes([image])
            while True:
                try:
                    plane = next(reading)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - a damaged store: its other arrays go
                    failed.append(f"{exc} (the rest of {image.label} was not sent)")
                    break
                bar.update(1)
                where = plane.label
                try:
                    backend.save(plane.data, plane.label, stream=args.stream or image.label,
                                 axes=plane.axes or None, axis_names=leading or None)
                except UnstreamableDataError as exc:
                    failed.append(f"{plane.label}: cannot send it: {exc}")
                    continue
                handed += 1
                sent_planes += 1
                sent_bytes += plane.data.nbytes
        bar.close()
        backend.flush()
    except KeyboardInterrupt:
        bar.close()
        _close_after_interrupt(backend, handed, f"{total} {unit}")
        raise
    except Exception as exc:  # noqa: BLE001 - sending failed: no later file would fare better
        stopped = exc
    finally:
        bar.close()
    stats = backend.sender.stats.as_dict() if handed else {}
    with contextlib.suppress(Exception):  # a lost receiver: close gives up what is in flight
        backend.close()
    for line in failed:
        print(f"polystore send: not sent: {line}", file=sys.stderr)
    if stopped is not None:
        before = f"{handed} of {total} {unit} were handed to the stream before it stopped"
        if isinstance(stopped, StreamingError):
            raise CommandError(f"{stopped} ({before})")
        raise CommandError(f"cannot send {where}: {type(stopped).__name__}: {stopped}; "
                           f"stopped there, nothing more was sent ({before})")
    seconds = time.perf_counter() - t0
    what = [f"{sent_files} file(s)"] if files else []
    if images:
        what.append(f"{sent_planes} plane(s) of {len(images)} array(s)")
    line = (f"sent {' and '.join(what)} ({human_size(sent_bytes)}) to {args.to} at "
            f"{backend.endpoint} in {seconds:.2f} s")
    dropped = stats.get("dropped", 0)
    if dropped:
        frames = stats["frames"] + stats["rois"] + stats["unsent"]
        line = (f"streamed {' and '.join(what)} ({human_size(sent_bytes)}) to {args.to} at "
                f"{backend.endpoint} in {seconds:.2f} s, but {dropped} of their {frames} "
                "frame(s) were dropped by --policy latest")
    print(line + (f": {describe_images(images)}" if images else ""))
    if dropped:
        print(f"polystore send: warning: the viewer fell behind, and {dropped} of {frames} "
              "frame(s) were dropped (--policy latest drops what the viewer is too slow for; "
              "the exit status stays 0). Send with --policy block (the default) to deliver "
              "every frame", file=sys.stderr)
    return 1 if failed else 0


def _close_after_interrupt(backend, handed: int, total: str) -> None:
    """Ctrl-C: say what is in flight while close() delivers it (a slow viewer takes
    seconds), and that a second Ctrl-C abandons it."""
    print(f"polystore send: stopped after {handed} of {total}", file=sys.stderr)
    try:
        inflight = backend.sender.inflight if handed else 0
        if inflight:
            print(f"polystore send: waiting for the viewer to take the {inflight} frame(s) in "
                  "flight... Ctrl-C again to abandon them", file=sys.stderr, flush=True)
        backend.close()
    except KeyboardInterrupt:
        print("polystore send: abandoned the frames in flight", file=sys.stderr)
        with contextlib.suppress(Exception):  # at once; its segments are unlinked
            backend.sender.close(flush_timeout=0)
