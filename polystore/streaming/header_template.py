"""A frame header encoded once per stream, path, shape and dtype; each frame fills in its own
fields.

Frame after frame of one stream, a header differs only in `seq`, `sent_ns`, `segment`, `axes`
and `dropped`. `HeaderTemplate` checks and encodes the rest once (with the protocol's own
encoder) and splices the per-frame fields into the same bytes `protocol.encode` would give
(tests/test_header_template.py holds them to that): no header struct is built, checked and
encoded per frame.
"""

from __future__ import annotations

import msgspec

from polystore.streaming import protocol as p

_encoder = msgspec.json.Encoder()


class HeaderTemplate:
    """The encoded header of every frame of one stream with one path, shape and dtype.

    Built (by `StreamMeta.header_template`) from a header already checked; `encode` gives the bytes
    of that header with the frame's own fields, as `protocol.encode` orders them: ``seq``
    after ``v``, ``sent_ns`` after ``nbytes``, then ``segment``, ``axes``, the fields that
    never change, and ``dropped`` last."""

    __slots__ = ("nbytes", "_head", "_middle", "_tail")

    def __init__(self, header: p.Frame, encoded: bytes) -> None:
        """`encoded`: `header` encoded, with seq and sent_ns 0 and no segment, offset, axes
        or dropped count (the fields `encode` fills in)."""
        if header.seq or header.sent_ns or header.segment is not None or header.offset \
                or header.axes or header.dropped:
            raise ValueError("a header template is built from a header without its "
                             "per-frame fields")
        self.nbytes = header.nbytes
        seq_at = encoded.index(b',"seq":0,') + len(b',"seq":')
        # JSON strings escape their quotes: this key can only be the field itself
        sent_at = encoded.index(b',"sent_ns":0') + len(b',"sent_ns":')
        if not encoded.endswith(b"}"):
            raise ValueError(f"not an encoded header: {encoded[:80]!r}")
        self._head = encoded[:seq_at]
        self._middle = encoded[seq_at + 1:sent_at]
        self._tail = encoded[sent_at + 1:-1]

    def encode(self, seq: int, sent_ns: int, segment: str | None, axes: dict[str, int],
               dropped: int) -> bytes:
        """This template's header for one frame (`axes` already checked: `checked_axes`)."""
        parts = [self._head, b"%d" % seq, self._middle, b"%d" % sent_ns]
        if segment is not None:
            parts.append(b',"segment":' + _encoder.encode(segment))
        if axes:
            parts.append(b',"axes":' + _encoder.encode(axes))
        parts.append(self._tail)
        if dropped:
            parts.append(b',"dropped":%d' % dropped)
        parts.append(b"}")
        return b"".join(parts)
