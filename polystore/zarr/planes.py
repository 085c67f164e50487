"""Stream a zarr/OME-Zarr store into a viewer plane by plane (``polystore send x.zarr``).

Each array (an OME-Zarr image: its full-resolution level; a plate: every field of every
well) is sent as 2-D planes, read one at a time, with its t/c/z position as the frame's
``axes``: OME axes metadata, else zarr v3 ``dimension_names`` (v2 ``_ARRAY_DIMENSIONS``),
else the viewers' naming rule ((n, y, x) is z, y, x). The viewer rebuilds the nD layer.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polystore.zarr.backend import ZarrBackend, frame_axis_names
from polystore.zarr.store import ZarrPath, split_zarr_path

__all__ = ["Plane", "ZarrImage", "describe_images", "find_images", "is_zarr_path", "iter_planes",
           "plane_too_large", "send_zarr"]


def is_zarr_path(path: str) -> bool:
    """Whether ``path`` names something inside (or is) a ``.zarr`` store."""
    try:
        split_zarr_path(path)
    except ValueError:
        return False
    return True


@dataclass
class ZarrImage:
    """One array to stream: where it is, the array, the names of its dimensions."""

    label: str
    array: Any
    names: list[str]

    @property
    def plane_count(self) -> int:
        return int(np.prod(self.array.shape[:-2])) if self.array.ndim > 2 else 1


@dataclass
class Plane:
    """One 2-D plane of an image and where it sits (``axes``: t/c/z index by name)."""

    image: ZarrImage
    data: np.ndarray
    axes: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        position = "_".join(f"{k}{v:03d}" for k, v in self.axes.items())
        return f"{self.image.label}/{position or 'plane'}.tif"


def _dimension_names(array: Any, ome_names: list[str] | None) -> list[str]:
    if ome_names and len(ome_names) == array.ndim:
        return list(ome_names)
    names = getattr(array.metadata, "dimension_names", None)
    if names is None:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names and all(names) and len(names) == array.ndim and len(set(names)) == array.ndim:
        return [str(n) for n in names]
    rule = frame_axis_names(array.ndim)
    if rule is not None:
        return list(rule)
    return [f"d{i}" for i in range(array.ndim - 2)] + ["y", "x"]


def find_images(backend: ZarrBackend, path: str) -> list[ZarrImage]:
    """Every array ``path`` holds, as the viewer should see it (in a stable order)."""
    from polystore.zarr.backend import _is_array
    from polystore.zarr.ome import _read_ome

    zp = backend.split(path)
    found: list[ZarrImage] = []

    def visit(node: Any, label: str) -> None:
        if _is_array(node):
            if node.ndim >= 2:
                found.append(ZarrImage(label, node, _dimension_names(node, None)))
            return
        ome = _read_ome(node)
        try:
            if visit_ome(node, label, ome):
                return
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"{label}: its OME-Zarr metadata names what is not there or is "
                             f"malformed ({type(exc).__name__}: {exc}); check its .zattrs / "
                             "zarr.json, or send one of its arrays by path") from None
        for name in sorted(node.keys()):
            visit(node[name], f"{label}/{name}")

    def visit_ome(node: Any, label: str, ome: dict) -> bool:
        """Visit what a multiscales image or a plate names; False if `node` is neither."""
        if ome.get("multiscales"):
            multiscale = ome["multiscales"][0]
            level = node[multiscale["datasets"][0]["path"]]
            names = [axis["name"] for axis in multiscale["axes"]]
            found.append(ZarrImage(label, level, _dimension_names(level, names)))
            return True
        if ome.get("plate"):
            for well in ome["plate"]["wells"]:
                well_group = node[well["path"]]
                images = _read_ome(well_group).get("well", {}).get("images", [])
                for image in images:
                    visit(well_group[image["path"]], f"{label}/{well['path']}/{image['path']}")
            return True
        return False

    visit(backend._open(zp), _short_label(zp))
    return found


def _short_label(zp: ZarrPath) -> str:
    """The store's folder name and the node path: plate.zarr/A/1/0."""
    name = zp.root.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}/{zp.node}" if zp.node else name


def iter_planes(images: list[ZarrImage]) -> Iterator[Plane]:
    """The planes of each image in C order (t outermost), each read when reached."""
    for image in images:
        leading = image.names[:-2]
        for index in np.ndindex(*image.array.shape[:-2]):  # () once for a 2-D array
            axes = dict(zip(leading, map(int, index), strict=True))
            try:
                data = np.asarray(image.array[index] if index else image.array[...])
            except Exception as exc:  # a damaged chunk: codecs raise anything
                where = f" at {axes}" if axes else ""
                raise ValueError(f"{image.label}{where}: cannot read this plane "
                                 f"({type(exc).__name__}: {exc}); the store may be damaged"
                                 ) from exc
            yield Plane(image, data, axes)


def send_zarr(paths: list[str], to: str, *, endpoint: str | None = None,
              policy: str = "block", stream: str | None = None, quiet: bool = False,
              backend: ZarrBackend | None = None, **limits: int) -> int:
    """Stream every plane of the zarr ``paths`` to ``to`` (napari_stream or fiji_stream)
    with a progress bar; print a summary. Returns the number of planes sent and not dropped
    (``policy="latest"`` drops what a slow viewer cannot take; the summary says how many).
    `limits`: the target's ``max_inflight_bytes``."""
    from tqdm import tqdm

    from polystore.streaming import FijiStreamingBackend, NapariStreamingBackend

    source = backend or ZarrBackend()
    images = [image for path in paths for image in find_images(source, path)]
    if not images:
        raise ValueError(f"no arrays of 2 or more dimensions in {' '.join(paths)}")
    target_cls = {"napari_stream": NapariStreamingBackend,
                  "fiji_stream": FijiStreamingBackend}[to]  # fmt: skip
    target = target_cls(endpoint, policy=policy, **limits)
    limit = target.options.max_inflight_bytes
    for image in images:  # before any plane is read: one of 18 GiB would be read whole
        if too_large := plane_too_large(image, limit):
            target.close()
            raise ValueError(too_large)
    total = sum(image.plane_count for image in images)
    sent_bytes, sent, started = 0, 0, time.perf_counter()
    try:
        with tqdm(total=total, desc=f"send -> {to}", unit="plane", disable=quiet,
                  file=sys.stderr) as bar:
            for plane in iter_planes(images):
                leading = plane.image.names[:-2]
                target.save(plane.data, plane.label, stream=stream or plane.image.label,
                            axes=plane.axes or None, axis_names=leading or None)
                sent_bytes += plane.data.nbytes
                sent += 1
                bar.update(1)
        target.flush()
        dropped = target.sender.stats["dropped"]
    except BaseException:
        print(f"stopped after {sent} of {total} plane(s)", file=sys.stderr)
        raise
    finally:
        target.close()
    seconds = time.perf_counter() - started
    lost = f", but {dropped} of them were dropped by policy={policy!r}" if dropped else ""
    print(f"sent {total} plane(s) of {len(images)} array(s) ({sent_bytes / 2**20:.1f} MiB) "
          f"to {to} at {target.endpoint} in {seconds:.2f} s{lost}: {describe_images(images)}")
    return total - dropped


def plane_too_large(image: ZarrImage, limit: int) -> str | None:
    """Why `image` cannot be streamed (a plane larger than one frame may be: `limit`), asked
    before any plane is read; None if it can."""
    plane = math.prod(image.array.shape[-2:]) * image.array.dtype.itemsize
    if plane <= limit:
        return None
    return (f"{image.label}: a plane of {image.array.shape[-2:]} {image.array.dtype} is "
            f"{plane:,} bytes, more than one frame may be ({limit:,}); raise "
            "--max-inflight-bytes (max_inflight_bytes=), or send a smaller region from Python")


def describe_images(images: list[ZarrImage]) -> str:
    """The first few images, as a summary names them: label, shape and axis names."""
    summary = ", ".join(f"{image.label} {tuple(image.array.shape)} "
                        f"({''.join(n if len(n) == 1 else f'[{n}]' for n in image.names)})"
                        for image in images[:4])
    return summary + (f" and {len(images) - 4} more" if len(images) > 4 else "")
