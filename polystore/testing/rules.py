"""Display rules that both receivers follow (docs/protocol.md), as tables their tests share:
the napari plugin's tests check its layout functions against them, the Fiji tests check what
the script makes of the same frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

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


@dataclass(frozen=True)
class Sent:
    """One frame of a `SHOW_CASES` case: its shape, the `save()` keywords (`axes`,
    `axis_names`, `mode`, `labels`) and its pixels: plane k (C order over the leading
    dimensions) is filled with ``value + k``."""

    shape: tuple[int, ...]
    value: int
    options: dict = field(default_factory=dict)
    dtype: str = "uint16"
    #: the viewer cannot show it (napari: a *Last error*; Fiji: an error reply) and it must
    #: change nothing
    refused: bool = False

    def array(self) -> np.ndarray:
        planes = math.prod(self.shape[:-2])
        values = np.arange(self.value, self.value + planes).reshape(self.shape[:-2] + (1, 1))
        return np.broadcast_to(values, self.shape).astype(self.dtype)


def every_plane(dims: tuple[int, int, int], planes: dict) -> dict:
    """Every (c, z, t) of an image of `dims` (c, z, t): its value in `planes`, else 0."""
    return {(c, z, t): planes.get((c, z, t), 0)
            for c in range(dims[0]) for z in range(dims[1]) for t in range(dims[2])}


#: The modes and the synonym rule (docs/protocol.md, "How viewers show frames"): frames sent
#: one by one to a stream, and what both viewers then show: (c, z, t) extents, rows and
#: columns, and the value of each plane written (`every_plane`: the others are 0).
#: A frame's `mode` hint wins; without one a frame with `axes` is placed and the others
#: replaced; `place` without `axes` is `replace`; `stack` makes each frame the next t (per
#: channel); a placed or stacked stream whose kind, dtype, frame shape or mode changes starts
#: again.
SHOW_CASES: list = [
    pytest.param([Sent((4, 5), v, {"mode": "stack"}) for v in (1, 2, 3)],
                 (1, 1, 3), (4, 5), {(0, 0, 0): 1, (0, 0, 1): 2, (0, 0, 2): 3},
                 id="stack_planes_along_t"),
    pytest.param([Sent((2, 4, 5), v, {"mode": "stack"}) for v in (10, 20)],
                 (1, 2, 2), (4, 5), {(0, 0, 0): 10, (0, 1, 0): 11, (0, 0, 1): 20, (0, 1, 1): 21},
                 id="stack_keeps_z_blocks"),
    pytest.param([Sent((2, 4, 5), v, {"mode": "stack", "axis_names": ["c"]}) for v in (10, 20)],
                 (2, 1, 2), (4, 5), {(0, 0, 0): 10, (1, 0, 0): 11, (0, 0, 1): 20, (1, 0, 1): 21},
                 id="stack_keeps_channels"),
    pytest.param([Sent((4, 5), 1, {"mode": "stack", "axes": {"c": 0}}),
                  Sent((4, 5), 2, {"mode": "stack", "axes": {"c": 1}}),
                  Sent((4, 5), 3, {"mode": "stack", "axes": {"c": 0}})],
                 (2, 1, 2), (4, 5), {(0, 0, 0): 1, (1, 0, 0): 2, (0, 0, 1): 3},
                 id="stack_per_channel_position"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}), Sent((4, 5), 2, {"axes": {"t": 1}}),
                  Sent((4, 5), 3, {"axes": {"t": 5}, "mode": "replace"})],
                 (1, 1, 1), (4, 5), {(0, 0, 0): 3}, id="replace_hint_beats_axes"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}), Sent((4, 5), 2, {"axes": {"t": 1}}),
                  Sent((4, 5), 3, {"mode": "place"})],
                 (1, 1, 1), (4, 5), {(0, 0, 0): 3}, id="place_without_axes_replaces"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}), Sent((4, 5), 2, {"axes": {"t": 1}}),
                  Sent((4, 5), 3, {"axes": {"t": 2}, "mode": "stack"})],
                 (1, 1, 1), (4, 5), {(0, 0, 0): 3}, id="stack_hint_beats_axes"),
    pytest.param([Sent((4, 5), 1, {"mode": "replace", "axes": {"c": 0}}),
                  Sent((4, 5), 2, {"mode": "replace", "axes": {"c": 1}}),
                  Sent((4, 5), 3, {"mode": "replace", "axes": {"c": 0}})],
                 (2, 1, 1), (4, 5), {(0, 0, 0): 3, (1, 0, 0): 2}, id="replace_per_channel"),
    pytest.param([Sent((4, 5), 5, {"axes": {"Time": 1, "channel": 1}})],
                 (2, 1, 2), (4, 5), {(1, 0, 1): 5}, id="synonyms_in_axes"),
    pytest.param([Sent((2, 3, 4, 5), 5, {"axis_names": ["Channels", "frames"]})],
                 (2, 1, 3), (4, 5), {(0, 0, 0): 5, (0, 0, 1): 6, (0, 0, 2): 7,
                                     (1, 0, 0): 8, (1, 0, 1): 9, (1, 0, 2): 10},
                 id="synonyms_in_axis_names"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}), Sent((4, 5), 2, {"axes": {"t": 1}}),
                  Sent((4, 5), 3, {"axes": {"t": 2}}, "float32")],
                 (1, 1, 3), (4, 5), {(0, 0, 2): 3}, id="placed_dtype_change_starts_again"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}), Sent((3, 5), 2, {"axes": {"t": 1}})],
                 (1, 1, 2), (3, 5), {(0, 0, 1): 2}, id="placed_size_change_starts_again"),
    pytest.param([Sent((2, 4, 5), 1, {"axes": {"t": 0}}), Sent((3, 4, 5), 10, {"axes": {"t": 1}})],
                 (1, 3, 2), (4, 5), {(0, 0, 1): 10, (0, 1, 1): 11, (0, 2, 1): 12},
                 id="placed_block_change_starts_again"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}),
                  Sent((4, 5), 2, {"axes": {"t": 1}, "labels": True})],
                 (1, 1, 2), (4, 5), {(0, 0, 1): 2}, id="placed_kind_change_starts_again"),
    pytest.param([Sent((4, 5), 1), Sent((4, 5), 2, {"mode": "stack"}),
                  Sent((4, 5), 3, {"mode": "stack"})],
                 (1, 1, 2), (4, 5), {(0, 0, 0): 2, (0, 0, 1): 3}, id="mode_change_starts_again"),
    pytest.param([Sent((4, 5), 1, {"axes": {"c": 0, "t": 0}}),
                  Sent((4, 5), 2, {"axes": {"c": 1, "t": 0}}),
                  Sent((4, 5), 3, {"axes": {"c": 0, "t": 1}}, "float32")],
                 (1, 1, 2), (4, 5), {(0, 0, 1): 3}, id="starting_again_drops_every_channel"),
    pytest.param([Sent((4, 5), 1, {"axes": {"c": 0, "t": 0}}),
                  Sent((4, 5), 2, {"axes": {"c": 1, "t": 1}}),
                  Sent((4, 5), 3, {"axes": {"c": 1}, "mode": "replace"})],
                 (2, 1, 1), (4, 5), {(1, 0, 0): 3}, id="replace_at_a_channel_of_a_placed_stream"),
    pytest.param([Sent((4, 5), 200, {"axes": {"c": 0}, "mode": "replace", "labels": True},
                       "int32"),
                  Sent((4, 5), 70000, {"axes": {"c": 1}, "mode": "replace", "labels": True},
                       "int32")],
                 (2, 1, 1), (4, 5), {(0, 0, 0): 200, (1, 0, 0): 70000},
                 id="labels_beyond_16_bits_keep_the_other_channels"),
    pytest.param([Sent((4, 5), 1, {"axes": {"t": 0}}, "float16"),
                  Sent((4, 5), 2, {"axes": {"t": 1}}, "float32")],
                 (1, 1, 2), (4, 5), {(0, 0, 1): 2}, id="float16_then_float32_starts_again"),
    pytest.param([Sent((2, 4, 5), 1, {"axes": {"t": 0}, "axis_names": ["t", "c"]}),
                  Sent((3, 4, 5), 10, {"axes": {"t": 1}, "axis_names": ["t", "c"]})],
                 (3, 1, 2), (4, 5), {(0, 0, 1): 10, (1, 0, 1): 11, (2, 0, 1): 12},
                 id="a_new_channel_count_starts_again"),
    pytest.param([Sent((2, 4, 5), 1, {"axes": {"t": 0}, "axis_names": ["t", "c"]}),
                  Sent((4, 5), 7, {"axes": {"t": 1, "c": 1}})],
                 (2, 1, 2), (4, 5), {(1, 0, 1): 7}, id="own_channels_then_a_channel_position"),
    pytest.param([Sent((4, 5), 1, {"mode": "replace"}),
                  Sent((4, 5), 7, {"mode": "replace", "axes": {"c": 1}})],
                 (2, 1, 1), (4, 5), {(0, 0, 0): 1, (1, 0, 0): 7},
                 id="a_whole_frame_then_a_channel"),
    pytest.param([Sent((4, 5), 1, {"mode": "stack"}), Sent((4, 5), 2, {"mode": "replace"}),
                  Sent((4, 5), 3, {"mode": "stack"})],
                 (1, 1, 1), (4, 5), {(0, 0, 0): 3}, id="stack_replace_stack"),
    pytest.param([*(Sent((4, 5), 10 + t, {"axes": {"t": t}}) for t in range(4)),
                  Sent((4, 5), 1, {"axes": {"t": 0}}, "float32"),
                  Sent((4, 5), 2, {"axes": {"t": 1}}), Sent((4, 5), 3, {"axes": {"t": 0}})],
                 (1, 1, 2), (4, 5), {(0, 0, 0): 3, (0, 0, 1): 2},
                 id="a_change_coalesced_away_still_starts_again"),
    pytest.param([*(Sent((4, 5), 10 + t, {"axes": {"t": t}}) for t in range(4)),
                  Sent((0, 5), 0, {"axes": {"t": 4}}), Sent((4, 5), 20, {"axes": {"t": 5}})],
                 (1, 1, 6), (4, 5), {(0, 0, t): 10 + t for t in range(4)} | {(0, 0, 5): 20},
                 id="an_empty_frame_changes_nothing"),
    pytest.param([Sent((256, 256), 1, {"axes": {"c": 0, "t": 0}}),
                  Sent((256, 256), 2, {"axes": {"c": 1, "t": 0}}),
                  Sent((256, 256), 3, {"axes": {"c": 0, "t": 999_999}}, "float32", refused=True),
                  Sent((256, 256), 4, {"axes": {"c": 0, "t": 1}})],
                 (2, 1, 2), (256, 256), {(0, 0, 0): 1, (1, 0, 0): 2, (0, 0, 1): 4},
                 id="a_refused_change_changes_nothing"),
]  # fmt: skip
