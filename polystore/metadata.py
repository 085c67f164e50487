"""Process-safe JSON metadata updates.

Several worker processes may record results in one metadata file; an unlocked
read-modify-write would lose updates. :func:`update_json` serialises them with a
``filelock`` lock file next to the JSON file and replaces the file atomically, so readers
that do not take the lock still never see a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from polystore.atomic import atomic_write
from polystore.errors import FormatDataError, FormatReadError
from polystore.formats import _json_unique_keys

__all__ = ["update_json"]


def update_json(
    path: str | os.PathLike[str],
    update_fn: Callable[[Any], Any],
    timeout: float = 30.0,
    *,
    default: Callable[[], Any] = dict,
) -> Any:
    """Apply ``update_fn`` to the JSON content of ``path`` under a cross-process lock.

    ``update_fn`` receives the current content (``default()`` if the file does not exist)
    and returns the new content; returning None keeps the (possibly mutated) argument.
    Returns what was written. Raises ``filelock.Timeout`` (a TimeoutError) if the lock is
    not acquired within ``timeout`` seconds.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock", timeout=timeout):
        try:
            with open(target, encoding="utf-8") as handle:
                current = json.load(handle)
        except FileNotFoundError:
            current = default()
        except ValueError as exc:  # damaged, or not UTF-8: never overwritten
            raise FormatReadError(f"{target} is not a JSON metadata file ({exc}); it was left "
                                  "as it is: repair or move it, then update again") from exc
        result = update_fn(current)
        if result is None:
            result = current
        _json_unique_keys(result, str(target))  # 1 and '1': a reader would keep only one
        try:
            text = json.dumps(result, indent=2, allow_nan=False)
        except ValueError as exc:  # Python's NaN/Infinity: JSON no other reader takes
            raise FormatDataError(str(target), "metadata holding NaN or infinity",
                                  "JSON without NaN or infinity (use None for a missing "
                                  "number); the file was left as it was") from exc
        with atomic_write(target, "w", encoding="utf-8") as handle:
            handle.write(text)
    return result
