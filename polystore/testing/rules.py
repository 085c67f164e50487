"""Display rules that both receivers follow (docs/protocol.md), as tables their tests share:
the napari plugin's tests check its layout functions against them, the Fiji tests check what
the script makes of the same frames."""

from __future__ import annotations

#: The leading-axis rule: (axes, axis_names, number of leading dims, their names outermost
#: first). Names of `axis_names` that are not keys of `axes` name the outermost dims in order;
#: the rest are named innermost first from the end of t, c, z, then d0, d1, ...
LEADING_AXIS_CASES: list[tuple[dict[str, int], list[str] | None, int, tuple[str, ...]]] = [
    ({}, None, 1, ("z",)),
    ({}, None, 2, ("c", "z")),  # OME-NGFF order
    ({}, None, 3, ("t", "c", "z")),
    ({}, None, 5, ("d1", "d0", "t", "c", "z")),
    ({"t": 1}, ["t"], 2, ("c", "z")),
    ({"z": 3}, None, 1, ("c",)),  # z is a position: the own dimension is the next name
    ({"t": 0}, ["t", "c"], 2, ("c", "z")),
    ({"t": 0}, ["c", "t"], 1, ("c",)),
    ({}, ["z"], 2, ("z", "c")),  # named outermost first; the rest from the end of t, c, z
    ({}, ["c"], 3, ("c", "t", "z")),
    ({"t": 1}, ["t", "z"], 2, ("z", "c")),
    ({}, ["t", "c", "z"], 2, ("t", "c")),  # more names than dims: the first ones
    ({}, None, 0, ()),
]
