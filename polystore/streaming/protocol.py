"""Wire protocol v1: every message, defined once.

`docs/protocol.md` is the spec; this module is its Python mirror and the Groovy receiver in
`viewers/fiji/` is the other. Headers are JSON objects (UTF-8) decoded into typed msgspec
structs, so a malformed or hostile header becomes a `ProtocolError` with a code, never an
exception inside a receiver loop. Nothing on the wire is pickled.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from polystore.streaming.axis_names import AXIS_SYNONYMS  # noqa: F401 - generated into Fiji

VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: Largest header a receiver accepts; larger ones are rejected unread.
MAX_HEADER_BYTES = 64 * 1024
#: Default cap on one frame's pixel bytes (receivers may configure lower or higher).
MAX_FRAME_BYTES = 2 * 1024**3
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_ROIS = 100_000

#: Allowed pixel dtypes, by NumPy name, always little-endian on the wire.
DTYPES: dict[str, int] = {
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "uint32": 4,
    "int32": 4,
    "uint64": 8,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
}

# \Z, not $: msgspec matches with re.search, and $ would accept a trailing newline.
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]{1,240}\Z")]
Token = Annotated[str, Meta(pattern=r"^[A-Za-z0-9]{1,32}\Z")]
StreamKey = Annotated[str, Meta(min_length=1, max_length=256)]
PathText = Annotated[str, Meta(max_length=4096)]
Dim = Annotated[int, Meta(ge=0, le=MAX_DIM)]
Seq = Annotated[int, Meta(ge=0)]
DType = Literal[
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64",
]  # fmt: skip
AxisName = Annotated[str, Meta(min_length=1, max_length=32)]
Axes = Annotated[dict[AxisName, Annotated[int, Meta(ge=0, le=1_000_000)]], Meta(max_length=6)]


class Probe(Struct):
    """A tiny segment the sender writes `token` into; a receiver that can read it back
    shares the sender's /dev/shm, so frames travel by shared memory, else inline."""

    segment: Name
    token: Token


class Display(Struct, omit_defaults=True):
    """Hints for the viewer; every field is optional."""

    kind: Literal["image", "labels"] = "image"
    colormap: Annotated[str, Meta(max_length=64)] | None = None
    contrast_limits: Annotated[list[float], Meta(min_length=2, max_length=2)] | None = None
    mode: Literal["replace", "stack", "place"] | None = None
    opacity: Annotated[float, Meta(ge=0, le=1)] | None = None
    rgb: bool | None = None


class Hello(Struct, tag="hello", tag_field="type"):
    v: int
    sender: Token
    pid: Annotated[int, Meta(ge=0)]
    viewer: Annotated[str, Meta(max_length=64)]
    segment_prefix: Name
    versions: list[int] = field(default_factory=lambda: [VERSION])
    probe: Probe | None = None
    #: The sender reads acks that carry several sequence numbers (`Ack.also`).
    batch_acks: bool = False


class Frame(Struct, tag="frame", tag_field="type", omit_defaults=True):
    """One array. `segment` names the shared-memory segment holding its bytes at `offset`;
    `segment=None` means the bytes follow as the message's second ZeroMQ frame."""

    v: int
    seq: Seq
    stream: StreamKey
    path: PathText
    shape: Annotated[list[Dim], Meta(min_length=1, max_length=MAX_NDIM)]
    dtype: DType
    nbytes: Annotated[int, Meta(ge=0)]
    sent_ns: Annotated[int, Meta(ge=0)]
    segment: Name | None = None
    offset: Annotated[int, Meta(ge=0)] = 0
    axes: Axes = field(default_factory=dict)
    axis_names: Annotated[list[AxisName], Meta(max_length=6)] | None = None
    display: Display = field(default_factory=Display)
    dropped: Annotated[int, Meta(ge=0)] = 0


class Roi(Struct, omit_defaults=True):
    """One region of interest in pixel coordinates (row, column) of its image's last two axes.

    rectangle/ellipse: two points (corners / bounding box); line: >= 2 points (its ends, or
    the vertices of an open path); polygon: >= 3 points; point: >= 1 point (several: one
    multi-point ROI). `ROI_POINT_COUNTS` holds the counts.
    """

    kind: Literal["polygon", "rectangle", "ellipse", "line", "point"]
    coords: Annotated[
        list[Annotated[list[float], Meta(min_length=2, max_length=2)]],
        Meta(min_length=1, max_length=100_000),
    ]
    label: Annotated[str, Meta(max_length=256)] | None = None


#: (fewest, most) points per ROI kind (polygon: 3+); a line of 3+ is an open path
ROI_POINT_COUNTS = {"rectangle": (2, 2), "ellipse": (2, 2), "line": (2, MAX_ROIS),
                    "point": (1, MAX_ROIS)}


class Rois(Struct, tag="rois", tag_field="type", omit_defaults=True):
    """Regions of interest belonging to the image stream `stream`, at position `axes`."""

    v: int
    seq: Seq
    stream: StreamKey
    path: PathText
    sent_ns: Annotated[int, Meta(ge=0)]
    rois: Annotated[list[Roi], Meta(max_length=MAX_ROIS)]
    axes: Axes = field(default_factory=dict)
    axis_names: Annotated[list[AxisName], Meta(max_length=6)] | None = None


class Control(Struct, tag="control", tag_field="type"):
    """Ask the receiver for something: `report` (its state) or `clear` (drop its streams)."""

    v: int
    seq: Seq
    command: Literal["report", "clear"]


class Bye(Struct, tag="bye", tag_field="type"):
    v: int


SenderMessage = Hello | Frame | Rois | Control | Bye


class Welcome(Struct, tag="welcome", tag_field="type"):
    v: int
    receiver: str
    viewer: str
    pid: int
    shm: bool
    max_frame_bytes: int = MAX_FRAME_BYTES


class Ack(Struct, tag="ack", tag_field="type", omit_defaults=True):
    """The receiver holds its own copy of message `seq`, and of each message in `also` (sent
    only to senders whose hello set `batch_acks`): their segments may be reused."""

    v: int
    seq: int
    also: list[int] = field(default_factory=list)


class Error(Struct, tag="error", tag_field="type"):
    """Message `seq` (None when it could not be read) was rejected; its segment is free."""

    v: int
    seq: int | None
    code: str
    message: str


class Report(Struct, tag="report", tag_field="type"):
    v: int
    seq: int
    state: dict


ReceiverMessage = Welcome | Ack | Error | Report

# Error codes (docs/protocol.md, "Errors").
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
UNSUPPORTED_VERSION = "unsupported_version"
HELLO_REQUIRED = "hello_required"
BAD_SEGMENT = "bad_segment"
SEGMENT_MISSING = "segment_missing"
TOO_LARGE = "too_large"
BAD_SHAPE = "bad_shape"
INTERNAL = "internal"


class ProtocolError(Exception):
    """A message broke the protocol; `code` is one of the error codes above."""

    def __init__(self, code: str, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.seq = seq


class _Envelope(Struct):
    """Just enough of any header to check its version before trusting the rest."""

    v: int
    type: str
    seq: Any = None  # only echoed when it is an int of a message that has one


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_sender_decoder = msgspec.json.Decoder(SenderMessage)
_receiver_decoder = msgspec.json.Decoder(ReceiverMessage)
_encoder = msgspec.json.Encoder()


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def decode_sender_message(header: bytes, max_bytes: int = MAX_HEADER_BYTES) -> SenderMessage:
    """Decode one sender header and validate each field (spec steps 1-4), raising
    `ProtocolError` with a code. Cross-field rules (`check_frame`, `check_rois` in checks.py)
    come after the receiver has checked the handshake (step 5), as docs/protocol.md orders them."""
    if len(header) > max_bytes:
        raise ProtocolError(TOO_LARGE, f"header of {len(header)} bytes exceeds {max_bytes}")
    if not header.isascii():  # ASCII is valid UTF-8; isascii allocates nothing, decode does
        try:
            header.decode("utf-8")  # in any field, known or not: bad_json, as the spec says
        except UnicodeDecodeError as exc:
            raise ProtocolError(BAD_JSON, f"header is not UTF-8: {exc}") from None
    try:  # the common case, a valid message, is decoded once
        message = _sender_decoder.decode(header)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        message = None  # find out why below, through the envelope
    if message is not None:
        if message.v not in SUPPORTED_VERSIONS:
            raise _unsupported(message.v, getattr(message, "seq", None))
        return message
    try:
        envelope = _envelope_decoder.decode(header)
    except msgspec.ValidationError as exc:
        raise ProtocolError(BAD_MESSAGE, f"unreadable header: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(BAD_JSON, f"header is not UTF-8 JSON: {exc}") from None
    seq = envelope.seq  # hello and bye have none: one there is ignored, like any unknown field
    if type(seq) is not int or envelope.type in ("hello", "bye"):
        seq = None
    if envelope.v not in SUPPORTED_VERSIONS:
        raise _unsupported(envelope.v, seq)
    try:
        return _sender_decoder.decode(header)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(BAD_MESSAGE, f"invalid {envelope.type!r} message: {exc}",
                            seq) from None


def _unsupported(version: int, seq: int | None) -> ProtocolError:
    return ProtocolError(
        UNSUPPORTED_VERSION,
        f"protocol version {version} is not supported (supported: "
        f"{list(SUPPORTED_VERSIONS)}); upgrade the older of sender and receiver",
        seq,
    )


def decode_receiver_message(data: bytes) -> ReceiverMessage:
    return _receiver_decoder.decode(data)
