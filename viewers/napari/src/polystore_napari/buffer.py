"""Coalescing buffer between the receiver thread (producer) and the Qt main thread (consumer).

The receiver thread calls `put_frame` / `put_rois` / `clear` for every message; the display
timer calls `take()` about 60 times a second and gets at most one `Update` per stream:

* ``replace``: only the newest frame of the stream (older ones are counted as coalesced);
* ``stack``: every frame in arrival order, up to the stack capacity (older ones could not be
  shown by a stack of that capacity anyway);
* ``place``: the newest frame per position (``axes``) of the stream;
* ROIs: the newest ROI set per (image stream, path, position): saving a path again at the
  same position replaces it, like overwriting a file (docs/protocol.md).

Memory is bounded: a message that would *add* bytes beyond `max_bytes` waits (in the receiver
thread, which slows the senders through their credits) until the main thread takes the
pending items. Coalescing a ``replace`` frame never waits.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace

from msgspec import structs

from polystore.streaming import ReceivedFrame, ReceivedRois
from polystore_napari.pieces import CHANNEL_AXIS, LayoutError, canonical_axes, pieces_of

MODES = ("auto", "replace", "stack", "place")


def resolve_mode(frame: ReceivedFrame, default: str) -> str:
    """The mode a frame is shown in (docs/protocol.md, as in Fiji): its ``display.mode`` hint;
    without one, ``place`` for a frame with ``axes`` and the widget's default for the others.
    ``place`` (and ``auto``) without ``axes`` is ``replace``."""
    axes = frame.header.axes
    mode = frame.header.display.mode or ("place" if axes else default)
    if mode in ("auto", "place"):
        return "place" if axes else "replace"
    return mode


def position(axes: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(axes.items()))


def roi_key(rois: ReceivedRois) -> tuple[str, tuple[tuple[str, int], ...]]:
    """What a later ROI set of the same image stream replaces: the set of the same path at
    the same position (docs/protocol.md); sets of other paths or positions stay."""
    return rois.header.path, position(rois.header.axes)


def keep_hints(dropped: ReceivedFrame, newer: ReceivedFrame) -> ReceivedFrame:
    """`newer` with the colormap and opacity hints of `dropped` (a frame coalesced away)
    where it has none of its own: those hints stay until another replaces them
    (docs/protocol.md), so a frame the display never sees must not take its hints along.
    Only between frames that make the same layers: another frame's hints would colour layers
    they were not for (a single layer's colormap on every channel). Contrast hints hold only
    for the frames that carry them: not kept."""
    old, new = dropped.header.display, newer.header.display
    kept = {name: getattr(old, name) for name in ("colormap", "opacity")
            if getattr(new, name) is None and getattr(old, name) is not None}
    if not kept or not same_layers(dropped, newer):
        return newer
    header = structs.replace(newer.header, display=structs.replace(new, **kept))
    return ReceivedFrame(newer.array, header, newer.sender, newer.received_ns)


def shown_as(frame: ReceivedFrame, mode: str) -> tuple | None:
    """What a change of starts a stream again (docs/protocol.md, "Modes"): mode, dtype, shape,
    kind and colour as the display resolves them; None for a frame never shown: an empty
    one, or one the display refuses whatever its layers hold (labels with fractions, RGB
    labels, too many channels). Such a frame changes nothing: counted as a change, it
    dropped the frames pending before it, and the next good frame, a change back, started
    the stream again, wiping what the display already showed."""
    header, shape = frame.header, frame.array.shape
    if 0 in shape:
        return None
    try:
        pieces = pieces_of(frame.stream, header, frame.array)
    except LayoutError:  # the display refuses it, and says so
        return None
    return mode, header.dtype, shape, header.display.kind == "labels", pieces[0].rgb


def same_layers(a: ReceivedFrame, b: ReceivedFrame) -> bool:
    """Whether two frames of a stream split into the same layers (`pieces.pieces_of`): the
    same shape, position axes, axis names, channel and kind."""
    ha, hb = a.header, b.header
    return (a.array.shape == b.array.shape and ha.axes.keys() == hb.axes.keys()
            and ha.axes.get(CHANNEL_AXIS) == hb.axes.get(CHANNEL_AXIS)
            and ha.axis_names == hb.axis_names and ha.display.kind == hb.display.kind
            and ha.display.rgb == hb.display.rgb)


@dataclass
class Update:
    """What the main thread applies to one stream's layer in one tick."""

    stream: str
    mode: str
    frames: list[ReceivedFrame] = field(default_factory=list)
    #: the stream changed mode, dtype, shape or kind since the last tick and the frame that
    #: changed it was coalesced away: it starts again with these frames
    starts_again: bool = False


@dataclass
class RoisUpdate:
    stream: str
    items: list[ReceivedRois] = field(default_factory=list)


@dataclass
class Batch:
    """Everything taken in one tick. `cleared`: a sender asked to forget the streams before
    these updates arrived."""

    cleared: bool = False
    updates: list[Update] = field(default_factory=list)
    rois: list[RoisUpdate] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.cleared or bool(self.updates) or bool(self.rois)


@dataclass
class BufferStats:
    frames: int = 0  # frames put
    rois: int = 0  # ROI messages put
    coalesced: int = 0  # frames replaced by a newer one before the display took them
    overflow: int = 0  # stack frames pushed out by newer ones beyond the capacity
    taken: int = 0  # frames handed to the display
    waits: int = 0  # times the receiver thread waited for room (backpressure)


class CoalescingBuffer:
    """Thread-safe; one producer (the receiver thread) and one consumer (the Qt timer)."""

    def __init__(self, *, default_mode: str = "auto", stack_capacity: int = 100,
                 max_bytes: int = 1024**3) -> None:
        if default_mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {default_mode!r}")
        self.default_mode = default_mode
        self.stack_capacity = max(1, int(stack_capacity))
        self.max_bytes = max_bytes
        self.stats = BufferStats()
        self._cond = threading.Condition()
        self._closed = False
        self._cleared = False
        self._bytes = 0
        # slot key -> pending item; dicts keep the order in which slots appeared
        self._replace: dict[str, dict[int | None, ReceivedFrame]] = {}  # by channel position
        self._stack: dict[str, deque[ReceivedFrame]] = {}
        self._place: dict[str, dict[tuple, ReceivedFrame]] = {}
        self._rois: dict[str, dict[tuple, ReceivedRois]] = {}
        self._order: dict[tuple[str, str], None] = {}
        #: each stream's newest (mode, dtype, shape, kind, rgb): a change starts it again
        self._signature: dict[str, tuple] = {}
        self._starts_again: set[str] = set()
        #: the display's state (layer names, shapes, dtypes), set by the main thread; what
        #: `report` answers besides the buffer's own counters
        self.display_state: dict = {}

    # -- producer side (receiver thread) -----------------------------------------------------

    def _trim_stack(self, queue: deque[ReceivedFrame],
                    newest: ReceivedFrame) -> deque[ReceivedFrame]:
        """Drop the oldest frames of `newest`'s channel position beyond the capacity: each
        channel layer keeps `stack_capacity` frames, so a stream of three channels may hold
        three times as many (the other channels' frames are not its to drop)."""
        channel = newest.header.axes.get(CHANNEL_AXIS)
        mine = [i for i, f in enumerate(queue) if f.header.axes.get(CHANNEL_AXIS) == channel]
        drop = set(mine[:len(mine) - self.stack_capacity])
        if not drop:
            return queue
        kept: deque[ReceivedFrame] = deque()
        carried = None  # the hints of the dropped frames go to the next one of the channel
        for i, frame in enumerate(queue):
            if i in drop:
                carried = frame if carried is None else keep_hints(carried, frame)
                self._bytes -= frame.array.nbytes
                self.stats.overflow += 1
                continue
            if carried is not None and frame.header.axes.get(CHANNEL_AXIS) == channel:
                frame, carried = keep_hints(carried, frame), None
            kept.append(frame)
        return kept

    def put_frame(self, frame: ReceivedFrame) -> None:
        if (header := canonical_axes(frame.header)) is not frame.header:
            frame = replace(frame, header=header)
        mode = resolve_mode(frame, self.default_mode)
        nbytes = frame.array.nbytes
        signature = shown_as(frame, mode)  # outside the lock: float labels are scanned
        with self._cond:
            if self._closed:
                return
            self.stats.frames += 1
            stream = frame.stream
            if signature and self._signature.setdefault(stream, signature) != signature:
                # the stream starts again with this frame (docs/protocol.md, "Modes"): what
                # is pending of it would be gone from the display at once, so it goes now
                # (its colormap and opacity hints stay), and the display hears that the
                # change happened (it will not see it)
                self._signature[stream] = signature
                dropped = self._drop_stream(stream)
                for old in reversed(dropped):
                    frame = keep_hints(old, frame)
                if dropped:
                    self._starts_again.add(stream)
            if mode == "replace":  # the newest frame per channel position (None: all)
                channel = frame.header.axes.get(CHANNEL_AXIS)
                old = self._replace.get(stream, {}).get(channel)
                self._wait_for_room(nbytes - (old.array.nbytes if old is not None else 0))
                slots = self._replace.setdefault(stream, {})
                for key in list(slots) if channel is None else [channel]:
                    old = slots.pop(key, None)  # may have been taken while waiting
                    if old is not None:
                        self.stats.coalesced += 1
                        self._bytes -= old.array.nbytes
                        if key == channel:
                            frame = keep_hints(old, frame)
                slots[channel] = frame
            elif mode == "stack":
                self._wait_for_room(nbytes)
                queue = self._stack.setdefault(stream, deque())
                queue.append(frame)
                if len(queue) > self.stack_capacity:
                    self._stack[stream] = self._trim_stack(queue, frame)
            else:
                key = position(frame.header.axes)
                old = self._place.get(stream, {}).get(key)
                self._wait_for_room(nbytes - (old.array.nbytes if old is not None else 0))
                slots = self._place.setdefault(stream, {})
                old = slots.pop(key, None)  # pop: the newest goes to the end of the order
                if old is not None:
                    self.stats.coalesced += 1
                    self._bytes -= old.array.nbytes
                    frame = keep_hints(old, frame)
                slots[key] = frame
            self._bytes += nbytes
            slot = (mode, stream)
            if any(key[1] == stream and key != slot for key in self._order):
                self._order.pop(slot, None)  # the stream changed mode: its newest goes last
            self._order[slot] = None

    def put_rois(self, rois: ReceivedRois) -> None:
        if (header := canonical_axes(rois.header)) is not rois.header:
            rois = replace(rois, header=header)
        with self._cond:
            if self._closed:
                return
            self.stats.rois += 1
            slots = self._rois.setdefault(rois.stream, {})
            key = roi_key(rois)
            slots.pop(key, None)  # the newest goes last
            slots[key] = rois
            self._order[("rois", rois.stream)] = None

    def clear(self) -> None:
        """Forget everything pending; the display removes its stream layers."""
        with self._cond:
            self._drop_pending()
            self._signature.clear()  # forgotten streams start afresh
            self._cleared = True
            self._cond.notify_all()

    def close(self) -> None:
        """Release a producer waiting for room (the receiver is stopping)."""
        with self._cond:
            self._closed = True
            self._drop_pending()
            self._cond.notify_all()

    def _wait_for_room(self, extra: int) -> None:
        """Wait until `extra` more bytes fit (never when nothing is pending: one item of any
        size always fits). Called with the lock held."""
        if extra <= 0:
            return
        waited = False
        while not self._closed and self._bytes > 0 and self._bytes + extra > self.max_bytes:
            waited = True
            self._cond.wait(0.1)
        if waited:
            self.stats.waits += 1

    def _drop_stream(self, stream: str) -> list[ReceivedFrame]:
        """Forget the frames pending for `stream` (not its ROIs), counted as coalesced."""
        dropped = [*self._replace.pop(stream, {}).values(), *self._stack.pop(stream, ()),
                   *self._place.pop(stream, {}).values()]
        self.stats.coalesced += len(dropped)
        self._bytes -= sum(f.array.nbytes for f in dropped)
        for slot in [k for k in self._order if k[1] == stream and k[0] != "rois"]:
            del self._order[slot]
        return dropped

    def _drop_pending(self) -> None:
        self._replace.clear()
        self._stack.clear()
        self._place.clear()
        self._rois.clear()
        self._order.clear()
        self._starts_again.clear()
        self._bytes = 0

    def report(self) -> dict:
        """The receiver's `report` hook (runs in the receiver thread): the layers as last
        displayed plus what is still waiting for the display."""
        state = dict(self.display_state)
        state.update(pending_frames=self.pending, coalesced=self.stats.coalesced,
                     stack_overflow=self.stats.overflow, default_mode=self.default_mode,
                     stack_capacity=self.stack_capacity)
        return state

    # -- consumer side (Qt main thread) ------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def pending(self) -> int:
        with self._cond:
            return (sum(len(s) for s in self._replace.values())
                    + sum(len(q) for q in self._stack.values())
                    + sum(len(s) for s in self._place.values()))

    def take(self) -> Batch:
        """Everything pending, grouped per stream, in the order the streams appeared."""
        with self._cond:
            batch = Batch(cleared=self._cleared)
            for mode, stream in self._order:
                again = stream in self._starts_again
                if mode == "replace":
                    batch.updates.append(Update(stream, mode,
                                                list(self._replace[stream].values()), again))
                elif mode == "stack":
                    batch.updates.append(Update(stream, mode, list(self._stack[stream]), again))
                elif mode == "place":
                    batch.updates.append(Update(stream, mode, list(self._place[stream].values()),
                                                again))
                else:
                    batch.rois.append(RoisUpdate(stream, list(self._rois[stream].values())))
            self.stats.taken += sum(len(u.frames) for u in batch.updates)
            self._cleared = False
            self._drop_pending()
            self._cond.notify_all()
            return batch
