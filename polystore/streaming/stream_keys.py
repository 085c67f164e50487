"""Which paths stream, and into which layer or window: a path's stream key.

String work only (no `pathlib`), as it can run for every frame (`save_batch`, `lease`;
`StreamingBackend.save` remembers each path's key). `matching_extension` finds the extension
a path streams under (the longest one, so '.roi.zip' beats '.zip'); `stream_key` names the
layer/window it updates, the same for every frame of a time series or channel set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# A trailing index: digits after a separator (_007) or a lowercase word (img001), or after a
# lowercase axis letter (t003, c1, z05, s2, f1, p4, ch2). Uppercase-letter ids such as the
# well A01 are names, not indices.
INDEX_SUFFIX = re.compile(r"(?:^\d+|[_\-. ]+\d+|(?<=[a-z])\d+|[_\-. ]*(?:[tczsfp]|ch)\d+)$")
#: the parts of one such index: separator, axis letter (none: a bare number), digits
_INDEX_PARTS = re.compile(r"([_\-. ]*)(ch|[tczsfp])?(\d+)")
#: the axis an index's letter names; a bare number (img_007, img007) is a time point
_AXIS_OF_LETTER = {"t": "t", "c": "c", "ch": "c", "z": "z", "s": "s", "f": "f", "p": "p"}


def _folder_and_name(path: Any) -> tuple[str, str]:
    """A path's folder and file name, '/' or '\\' separated, without '.' or empty parts
    (string work only: this runs for every frame)."""
    parts = [part for part in str(path).replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts:
        return "", ""
    return "/".join(parts[:-1]), parts[-1]


def matching_extension(path: Any, extensions: Iterable[str]) -> str | None:
    """The longest of `extensions` that `path` ends with (so '.roi.zip' beats '.zip')."""
    name = _folder_and_name(path)[1].lower()
    best = None
    for ext in extensions:
        if name.endswith(ext.lower()) and (best is None or len(ext) > len(best)):
            best = ext.lower()
    return best


def split_name(path: Any, extensions: Iterable[str] = ()) -> tuple[str, str]:
    """A path's folder and its file name without extension (the longest of `extensions` it
    ends with, else the text after the last dot)."""
    parent, name = _folder_and_name(path)
    ext = matching_extension(name, extensions)
    if ext is None:
        dot = name.rfind(".")
        ext = name[dot:] if 0 < dot < len(name) - 1 else ""
    return parent, name[: len(name) - len(ext)] if ext else name


def strip_indices(stem: str) -> tuple[str, dict[str, int]]:
    """A name without extension, less its trailing indices, and the position they give:
    ``t003`` is t = 3, ``z05`` z = 5, ``c1``/``ch1`` c = 1, ``s2``/``f2``/``p2`` an axis
    s/f/p, a bare number (``img_007``, ``img007``) t. An axis letter glued to a word is the
    word's (``cells001``, ``exp20240501``: a bare number). Stripping stops at an index of an
    axis already stripped, which is part of the name (``exp20240501_t001`` keeps
    ``exp20240501``; a date ``2024_05_01`` keeps ``2024_05``)."""
    base, position = stem, {}
    while (match := INDEX_SUFFIX.search(base)) and match.group(0):
        separator, letter, digits = _INDEX_PARTS.fullmatch(match.group(0)).groups()
        glued = bool(letter) and not separator and base[:match.start()][-1:].isalpha()
        axis = "t" if glued or not letter else _AXIS_OF_LETTER[letter]
        if axis in position:
            break
        position[axis] = int(digits)
        base = base[:match.end() - len(digits)] if glued else base[:match.start()]
    return base, position


def stream_key(path: Any, extensions: Iterable[str] = ()) -> str:
    """The layer/window a path streams into: its folder plus its name without extension and
    without trailing indices (``t003``, ``c1``, ``z05``, ``s2``, ``_007``), so
    ``well_A01/t003c1.tif`` and ``well_A01/t004c0.tif`` update one ``well_A01`` layer and
    ``out/smooth_007.tif`` goes to ``out/smooth``. Pass ``stream=`` to choose the key."""
    parent, stem = split_name(path, extensions)
    base = strip_indices(stem)[0]
    key = "/".join(part for part in (parent, base) if part)
    return (key or stem or "stream")[:256]
