"""Path normalisation and root-escape checks shared by the disk and memory backends.

Both backends reject paths that climb out of their root; keeping the rule in one place means
they cannot drift apart.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polystore.errors import PathEscapeError

__all__ = [
    "ensure_within",
    "name_matches",
    "natural_sort_key",
    "normalize_extensions",
    "normalize_relative",
    "resolve_within",
]


def _as_str(path: Any) -> str:
    value = os.fspath(path)
    if isinstance(value, bytes):
        raise TypeError(f"paths must be str or os.PathLike[str], got bytes {value!r}")
    return value


def normalize_relative(path: Any, root: str = "/") -> str:
    """Lexically normalise ``path`` relative to a root, as 'a/b/c' ('' is the root itself).

    A leading '/' means the root. '.' and empty segments are dropped; '..' removes the
    previous segment and raises :class:`PathEscapeError` if it would climb above the root.
    """
    text = _as_str(path)
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PathEscapeError(text, root)
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def ensure_within(root: Path, candidate: Path, original: Any) -> None:
    """Raise PathEscapeError unless ``candidate`` (symlinks resolved) lies inside ``root``."""
    if not candidate.resolve().is_relative_to(root):
        raise PathEscapeError(_as_str(original), str(root))


def resolve_within(root: Path, path: Any) -> Path:
    """Map ``path`` to a location inside ``root`` (an already resolved directory).

    Relative paths are taken relative to ``root``; absolute paths must already point inside
    it. '..' that climbs out and symlinks that lead out both raise PathEscapeError. The
    returned path is not symlink-resolved, so deleting a link deletes the link itself.
    """
    text = _as_str(path)
    if os.path.isabs(text):
        lexical = Path(os.path.normpath(text))
        if not lexical.is_relative_to(root):
            raise PathEscapeError(text, str(root))
        candidate = lexical
    else:
        candidate = root / normalize_relative(text, str(root))
    ensure_within(root, candidate, text)
    return candidate


def normalize_extensions(extensions: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """Lower-case extensions with a leading dot; a bare string counts as one extension."""
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def name_matches(name: str, pattern: str | None, extensions: tuple[str, ...] | None) -> bool:
    """Filter used by list_files: glob ``pattern`` on the name, suffix in ``extensions``."""
    if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
        return False
    return extensions is None or name.lower().endswith(extensions)


_DIGITS = re.compile(r"(\d+)")


def natural_sort_key(text: Any) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Sort key that orders digit runs by value: 't2' < 't10' (ties such as 't2'/'t02' are
    broken by the plain text, so the order never depends on the input order)."""
    parts = _DIGITS.split(str(text))
    key = tuple((1, int(part)) if i % 2 else (0, part) for i, part in enumerate(parts))
    return key, str(text)
