"""Axis names as both viewers read them (docs/protocol.md, "How viewers show frames"):
synonyms of c, z and t. Protocol v1 refuses a message that names one axis twice this way;
the napari plugin reads headers through `canonical_axis`, and the Fiji script gets the table
generated (scripts/gen_groovy_protocol.py reads it through protocol.py)."""

from __future__ import annotations

from collections.abc import Collection

#: Axis names both viewers read as c, z or t (compared in lower case; docs/protocol.md).
AXIS_SYNONYMS = {
    "c": "c", "ch": "c", "channel": "c", "channels": "c",
    "z": "z", "slice": "z", "slices": "z", "depth": "z",
    "t": "t", "time": "t", "frame": "t", "frames": "t", "timepoint": "t", "timepoints": "t",
}  # fmt: skip


def canonical_axis(name: str) -> str:
    """What an axis name means to the viewers: c, z or t for theirs and their synonyms."""
    return AXIS_SYNONYMS.get(name.lower(), name)


def repeated_axis(names: Collection[str]) -> str:
    """Why `names` name one axis twice (``t`` and ``time``), or "" if they do not."""
    if len({canonical_axis(name) for name in names}) == len(names):
        return ""
    synonyms = ", ".join(k for k in AXIS_SYNONYMS if len(k) > 1)
    return (f"axis names {list(names)} name one axis twice: viewers read {synonyms} (in any "
            "case) as c, z or t; give each axis one name")
