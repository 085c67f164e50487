"""A conformance suite for receivers of wire protocol v1 (docs/protocol.md).

Both receivers, the Python one (`polystore.streaming.Receiver`) and the Fiji script, must give
the same answers to the same bytes. This suite sends them raw messages no well-behaved sender
makes and checks each reply, as zarr's `StoreTests` does for stores. Subclass it in a test
module and provide the `receiver_under_test` fixture::

    class TestMyReceiver(ReceiverConformance):
        @pytest.fixture(scope="class")
        def receiver_under_test(self):
            ...start the receiver...
            yield ReceiverUnderTest(endpoint, shm_prefix="fiji_", viewer="fiji")
            ...stop it...

The suite creates shared-memory segments under the receiver's prefix and removes them again.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory

import pytest
import zmq


@dataclass(frozen=True)
class ReceiverUnderTest:
    """How to reach a running receiver: its endpoint, segment prefix and viewer name, and
    `curve` = (server public key, client public key, client secret key) when it
    authenticates its senders with CURVE (Z85 bytes)."""

    endpoint: str
    shm_prefix: str
    viewer: str
    curve: tuple[bytes, bytes, bytes] | None = None


def user_curve() -> tuple[bytes, bytes, bytes]:
    """(server key, public, secret) of a sender with the user's credential (auth="user")."""
    from polystore.streaming.credential import load_credential

    credential = load_credential()
    return credential.curve_public, credential.curve_public, credential.curve_secret


class RawClient:
    """A DEALER socket speaking raw protocol v1, for messages no well-behaved sender makes."""

    def __init__(
        self,
        endpoint: str,
        prefix: str = "fiji_",
        viewer: str = "fiji",
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.token = secrets.token_hex(4)
        self.pid = os.getpid()
        self.viewer = viewer
        self.prefix = f"{prefix}{self.pid}_{self.token}_"
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, self.token.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        # a refused handshake leaves no peer to queue for: never block a test on send
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self.seq = 0

    @classmethod
    def to(cls, receiver: ReceiverUnderTest) -> RawClient:
        return cls(receiver.endpoint, receiver.shm_prefix, receiver.viewer, receiver.curve)

    def close(self) -> None:
        try:
            self.sock.send(json.dumps({"v": 1, "type": "bye"}).encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(linger=100)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *parts: bytes | dict) -> None:
        data = [json.dumps(p).encode() if isinstance(p, dict) else p for p in parts]
        self.sock.send_multipart(data)

    def recv(self, timeout: float = 5.0) -> dict:
        if not self.sock.poll(timeout * 1000):
            raise TimeoutError("no reply from the receiver")
        return json.loads(self.sock.recv())

    def request(self, *parts: bytes | dict, timeout: float = 5.0) -> dict:
        self.send(*parts)
        return self.recv(timeout)

    def hello(self, **override) -> dict:
        """Handshake as a sender does: with a probe segment proving it shares this machine's
        shared memory (so its segments may be named in frames); `probe=None` leaves it out."""
        message = {
            "v": 1, "type": "hello", "sender": self.token, "pid": self.pid, "viewer": self.viewer,
            "segment_prefix": self.prefix, "versions": [1],
        }  # fmt: skip
        message.update(override)
        if "probe" in message:
            return self.request(message)
        token = secrets.token_hex(8)
        probe = shared_memory.SharedMemory(name=f"{self.prefix}probe", create=True, size=64)
        try:
            probe.buf[: len(token)] = token.encode()
            message["probe"] = {"segment": probe.name, "token": token}
            return self.request(message)
        finally:
            probe.close()
            probe.unlink()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def frame(self, **override) -> dict:
        """A valid inline 2x3 uint8 frame header; `override` breaks it."""
        message = {
            "v": 1, "type": "frame", "seq": self.next_seq(), "stream": "raw", "path": "raw.tif",
            "shape": [2, 3], "dtype": "uint8", "nbytes": 6, "sent_ns": time.time_ns(),
            "segment": None,
        }  # fmt: skip
        message.update(override)
        return message

    def report(self) -> dict:
        control = {"v": 1, "type": "control", "seq": self.next_seq(), "command": "report"}
        reply = self.request(control)
        assert reply["type"] == "report", reply
        return reply["state"]


# -- the table of bad messages ----------------------------------------------------------------

Make = Callable[[RawClient, str], list]  # (client, name of a real 4 KiB segment) -> parts
OVERSIZED = {"v": 1, "type": "control", "seq": 5, "command": "report", "pad": "x" * 70_000}
PAD6 = b"\0" * 6  # the payload of the 2x3 uint8 inline frame RawClient.frame() describes
SEG = object()  # stands for the name of a real 4 KiB segment of the sender's prefix
DEEP = b'{"v": 1, "type": "bye", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"
OTHER_VIEWER = "otherviewer_1_deadbeef_"


def header(**fields) -> Make:
    """Parts of a frame with only a header (shared memory), RawClient.frame() plus `fields`;
    a field set to None is left out, SEG becomes the segment's name."""

    def make(r: RawClient, segment: str) -> list:
        message = r.frame(**{k: segment if v is SEG else v for k, v in fields.items()})
        return [{k: v for k, v in message.items() if v is not None or k == "segment"}]

    return make


def inline(**fields) -> Make:
    """Parts of an inline frame: header(**fields) plus the 6 payload bytes."""
    return lambda r, segment: header(**fields)(r, segment) + [PAD6]


def message(value) -> Make:
    """Parts of a single raw header (bytes, or a dict sent as JSON, or a function of the client)."""
    return lambda r, segment: [value(r) if callable(value) else value]


def rois(seq: int, kind: str, coords: list) -> Make:
    roi = {"kind": kind, "coords": coords}
    return message({"v": 1, "type": "rois", "seq": seq, "stream": "x", "path": "x.roi.zip",
                    "sent_ns": 0, "rois": [roi]})  # fmt: skip


def hello(**override) -> Make:
    return message(lambda r: {"v": 1, "type": "hello", "sender": r.token, "pid": r.pid,
                              "viewer": r.viewer, "segment_prefix": r.prefix}
                   | override)  # fmt: skip


def foreign_segment(r: RawClient, segment: str) -> list:
    """A segment of another sender of the same viewer kind (same prefix, other pid/token)."""
    viewer_prefix = r.prefix.split(f"{r.pid}_", 1)[0]
    return header(segment=f"{viewer_prefix}1_deadbeef_0")(r, segment)


def bad(name: str, make: Make | str, code: str, seq: object = "same", hello: bool = True):
    """A bad message: `make(raw, segment)` gives its parts; the reply must be an `error` with
    `code` and `seq` ("same": the header's own seq). hello=False: sent without handshake."""
    return pytest.param(hello, make, code, seq, id=name)


BAD_MESSAGES = [
    bad("broken_json", message(b'{"v": 1, "type": "frame",'), "bad_json", None),
    bad("not_utf8", message(b'{"v": 1, "type": "\xff"}'), "bad_json", None),
    bad("lone_surrogate", message(b'{"v": 1, "type": "bye", "x": "\\ud800"}'), "bad_json", None),
    bad("trailing_data", message(b'{"v": 1, "type": "bye"} x'), "bad_json", None),
    bad("trailing_comma", message(b'{"v": 1, "type": "bye",}'), "bad_json", None),
    bad("deeply_nested", message(DEEP), "bad_json", None),
    bad("not_an_object", message(b"[1, 2, 3]"), "bad_message", None),
    bad("v_is_text", message({"v": "1", "type": "bye"}), "bad_message", None),
    bad("v_is_float", message({"v": 1.0, "type": "bye"}), "bad_message", None),
    bad("unknown_version", message({"v": 2, "type": "frame", "seq": 9}), "unsupported_version", 9),
    bad("unknown_type", message({"v": 1, "type": "dance", "seq": 3}), "bad_message", 3),
    bad("three_parts", lambda r, s: inline()(r, s) + [b"extra"], "bad_message", None),
    bad("oversized_header", message(OVERSIZED), "too_large", None),
    bad("frame_before_hello", inline(seq=4), "hello_required", 4, hello=False),
    bad("foreign_prefix", foreign_segment, "bad_segment"),
    bad("other_viewer_prefix", header(segment=OTHER_VIEWER + "0"), "bad_segment"),
    bad("dotdot_name", header(segment="../../etc/passwd"), "bad_message"),
    bad("slash_name", header(segment="fiji_0/x"), "bad_message"),
    bad("shape_beyond_segment", header(segment=SEG, shape=[99, 99], nbytes=9801), "bad_segment"),
    bad("offset_beyond_segment", header(segment=SEG, offset=4093), "bad_segment"),
    bad("offset_wraps_int64", header(segment=SEG, offset=2**63 - 1), "bad_segment"),
    bad("offset_beyond_int64", header(segment=SEG, offset=2**64), "bad_segment"),
    bad("offset_beyond_int64_missing",
        lambda r, s: header(segment=r.prefix + "999", offset=2**64)(r, s), "segment_missing"),
    bad("segment_missing", lambda r, s: header(segment=r.prefix + "999")(r, s), "segment_missing"),
    bad("empty_frame_segment_missing",
        lambda r, s: header(shape=[0, 3], nbytes=0, segment=r.prefix + "999")(r, s),
        "segment_missing"),
    bad("negative_dim", inline(shape=[-2, 3]), "bad_message"),
    bad("dim_too_big", header(shape=[2**31, 1], nbytes=2**31), "bad_message"),
    bad("nine_dims", header(shape=[1] * 9, nbytes=1), "bad_message"),
    bad("object_dtype", inline(dtype="object"), "bad_message"),
    bad("big_endian_dtype", inline(dtype=">u2", nbytes=12), "bad_message"),
    bad("nbytes_mismatch", inline(nbytes=7), "bad_shape"),
    bad("too_large", header(shape=[2**30, 4], nbytes=2**32), "too_large"),
    bad("inline_short_payload", lambda r, s: header()(r, s) + [b"\0" * 5], "bad_shape"),
    bad("inline_no_payload", header(), "bad_shape"),
    bad("segment_and_payload", inline(segment=SEG), "bad_message"),
    bad("axis_names_missing_key", inline(axes={"t": 1}, axis_names=["z"]), "bad_message"),
    bad("axis_names_repeated", inline(axes={"t": 1}, axis_names=["t", "t"]), "bad_message"),
    bad("axes_synonyms_of_one_axis", inline(axes={"t": 1, "Time": 2}), "bad_message"),
    bad("axis_names_synonyms_of_one_axis", inline(shape=[2, 1, 3], axis_names=["channel", "C"]),
        "bad_message"),
    bad("seven_axes", inline(axes=dict.fromkeys("abcdefg", 0)), "bad_message"),
    bad("negative_seq", inline(seq=-1), "bad_message", -1),
    bad("seq_is_text", inline(seq="1"), "bad_message", None),
    bad("empty_stream", inline(stream=""), "bad_message"),
    bad("bad_display_kind", inline(display={"kind": "movie"}), "bad_message"),
    bad("opacity_above_one", inline(display={"opacity": 2}), "bad_message"),
    bad("rgb_is_text", inline(display={"rgb": "yes"}), "bad_message"),
    bad("contrast_limits_reversed", inline(display={"contrast_limits": [100, 10]}),
        "bad_message"),
    bad("contrast_limits_empty_range", inline(display={"contrast_limits": [5, 5.0]}),
        "bad_message"),
    bad("rgb_labels", inline(shape=[1, 2, 3], display={"kind": "labels", "rgb": True}),
        "bad_message"),
    bad("missing_field", inline(dtype=None), "bad_message"),
    bad("rectangle_3_points", rois(21, "rectangle", [[0, 0], [1, 1], [2, 2]]), "bad_message", 21),
    bad("polygon_2_points", rois(22, "polygon", [[0, 0], [1, 1]]), "bad_message", 22),
    bad("line_1_point", rois(22, "line", [[0, 0]]), "bad_message", 22),
    bad("point_0_points", rois(22, "point", []), "bad_message", 22),
    bad("unknown_roi_kind", rois(23, "blob", [[0, 0]]), "bad_message", 23),
    bad("unknown_command", message({"v": 1, "type": "control", "seq": 24, "command": "stop"}),
        "bad_message", 24),
    bad("hello_wrong_prefix", hello(segment_prefix=OTHER_VIEWER), "bad_segment", None,
        hello=False),
    bad("hello_only_v2", hello(versions=[2]), "unsupported_version", None, hello=False),
    bad("hello_bad_token", hello(sender="no-dashes"), "bad_message", None, hello=False),
    bad("symlink_segment", "symlink", "bad_segment"),
]  # fmt: skip


class ReceiverConformance:
    """Protocol v1 answers every receiver must give. Subclasses provide `receiver_under_test`;
    `known_deviations` maps a test id of BAD_MESSAGES to the reason the receiver still strays
    (marked xfail(strict=True), so fixing it is noticed)."""

    known_deviations: dict[str, str] = {}

    @pytest.fixture
    def receiver_under_test(self) -> ReceiverUnderTest:
        raise NotImplementedError("a ReceiverConformance subclass provides this fixture")

    @pytest.fixture
    def raw(self, receiver_under_test):
        with RawClient.to(receiver_under_test) as client:
            yield client

    @pytest.mark.parametrize("hello,make,code,seq", BAD_MESSAGES)
    def test_bad_message_is_answered_and_receiver_goes_on(self, request, raw, hello, make, code,
                                                          seq, tmp_path):  # fmt: skip
        name = request.node.callspec.id
        if name in self.known_deviations:
            request.applymarker(pytest.mark.xfail(reason=self.known_deviations[name], strict=True))
        segment = shared_memory.SharedMemory(name=f"{raw.prefix}0", create=True, size=4096)
        link = None
        try:
            if hello:
                assert raw.hello()["type"] == "welcome"
            if make == "symlink":  # a segment name that is a link to a file elsewhere
                target = tmp_path / "target"
                target.write_bytes(b"\0" * 4096)
                link = f"/dev/shm/{raw.prefix}7"
                os.symlink(target, link)
                parts = [raw.frame(segment=f"{raw.prefix}7")]
            else:
                parts = make(raw, segment.name)
            reply = raw.request(*parts)
            assert reply["type"] == "error", reply
            assert reply["code"] == code, reply
            assert reply["seq"] == (parts[0]["seq"] if seq == "same" else seq), reply
            assert reply["message"], "an error says what was wrong"
            # ...and it still works: handshake (again) and a valid inline frame.
            assert raw.hello()["type"] == "welcome"
            ok = raw.request(raw.frame(stream="after_bad"), b"\1" * 6)
            assert ok == {"v": 1, "type": "ack", "seq": raw.seq}
        finally:
            if link:
                os.unlink(link)
            segment.close()
            segment.unlink()

    @pytest.mark.parametrize("client", ["plain", "stranger"])
    def test_a_client_without_the_credential_gets_nothing(self, receiver_under_test, client):
        """Same-user authentication: a peer without the user's credential (no CURVE, or its
        own key pair) is refused at the handshake; no message of it is read or answered."""
        if receiver_under_test.curve is None:
            pytest.skip("this receiver runs without authentication")
        server = receiver_under_test.curve[0]
        curve = None if client == "plain" else (server, *zmq.curve_keypair())
        with RawClient(receiver_under_test.endpoint, receiver_under_test.shm_prefix,
                       receiver_under_test.viewer, curve) as stranger:  # fmt: skip
            try:
                stranger.send({"v": 1, "type": "hello", "sender": stranger.token,
                               "pid": stranger.pid, "viewer": stranger.viewer,
                               "segment_prefix": stranger.prefix})  # fmt: skip
            except zmq.Again:
                pass  # the receiver dropped the refused connection: nothing could be sent
            with pytest.raises(TimeoutError):
                stranger.recv(timeout=1.5)
        with RawClient.to(receiver_under_test) as friend:  # and the user still gets in
            assert friend.hello()["type"] == "welcome"

    def test_welcome_answers_hello(self, raw, receiver_under_test):
        reply = raw.hello()
        assert reply["type"] == "welcome" and reply["v"] == 1, reply
        assert reply["viewer"] == receiver_under_test.viewer
        assert reply["shm"] is True  # RawClient.hello sends a probe of a real segment
        assert raw.hello(probe=None)["shm"] is False  # no probe: frames must come inline
        assert isinstance(reply["pid"], int) and reply["max_frame_bytes"] > 0

    def test_probe_enables_shared_memory(self, raw):
        segment = shared_memory.SharedMemory(name=f"{raw.prefix}probe", create=True, size=64)
        try:
            token = secrets.token_hex(8)
            segment.buf[: len(token)] = token.encode()
            reply = raw.hello(probe={"segment": segment.name, "token": token})
            assert reply["type"] == "welcome" and reply["shm"] is True, reply
            wrong = raw.hello(probe={"segment": segment.name, "token": "0" * len(token)})
            assert wrong["shm"] is False, wrong
        finally:
            segment.close()
            segment.unlink()

    def test_frames_from_shared_memory_and_inline_are_acknowledged(self, raw):
        segment = shared_memory.SharedMemory(name=f"{raw.prefix}0", create=True, size=4096)
        try:
            assert raw.hello()["type"] == "welcome"
            reply = raw.request(raw.frame(segment=segment.name, offset=100))
            assert reply == {"v": 1, "type": "ack", "seq": raw.seq}
            reply = raw.request(raw.frame(), PAD6)
            assert reply == {"v": 1, "type": "ack", "seq": raw.seq}
        finally:
            segment.close()
            segment.unlink()

    def test_an_empty_frame_is_acknowledged_whatever_its_other_dimensions(self, raw):
        """A 0 in the shape makes a valid empty frame, acknowledged and shown as nothing,
        even when the other dimensions could never be held (the Python receiver answered
        `internal`: NumPy cannot make a [0, 2**31-1, 2**31-1] float64 array)."""
        assert raw.hello()["type"] == "welcome"
        for shape in ([0, 5], [0, 2**31 - 1, 2**31 - 1]):
            header = raw.frame(shape=shape, dtype="float64", nbytes=0)
            reply = raw.request(header, b"")
            assert reply == {"v": 1, "type": "ack", "seq": raw.seq}, (shape, reply)
        assert raw.request(raw.frame(), PAD6)["type"] == "ack"

    @pytest.mark.parametrize("batch", [False, True], ids=["one_ack_each", "batch_acks"])
    def test_a_burst_of_frames_is_acknowledged_once_each_in_order(self, raw, batch):
        """Frames sent without waiting for their acks are each acknowledged once, in order.
        Only a sender whose hello asked for `batch_acks` may get the acks of several frames
        in one `ack` (`also`, at most 4 frames); behind a slow first frame (8 MiB inline)
        the rest queue up, so a receiver that batches does it here."""
        assert raw.hello(batch_acks=batch)["type"] == "welcome"
        slow = raw.frame(stream="burst", shape=[1024, 1024], dtype="float64", nbytes=8 << 20)
        raw.send(slow, bytes(8 << 20))
        seqs = [slow["seq"]]
        for _ in range(40):
            header = raw.frame(stream="burst")
            seqs.append(header["seq"])
            raw.send(header, PAD6)
        acked, sizes = [], []
        while len(acked) < len(seqs):
            reply = raw.recv(timeout=30)
            assert reply["type"] == "ack", reply
            acked += [reply["seq"], *reply.get("also", [])]
            sizes.append(1 + len(reply.get("also", [])))
        assert acked == seqs
        assert max(sizes) <= 4
        assert (max(sizes) > 1) is batch, f"acks per message: {sizes}"

    def test_a_segment_truncated_after_a_frame_is_bad_segment_until_whole_again(self, raw):
        """The segment's current size is checked before every copy, not only when it was first
        mapped: reading a truncated mapping faults (SIGBUS in Python, InternalError in Java)."""
        segment = shared_memory.SharedMemory(name=f"{raw.prefix}0", create=True, size=4096)
        try:
            assert raw.hello()["type"] == "welcome"
            assert raw.request(raw.frame(segment=segment.name))["type"] == "ack"
            os.truncate(f"/dev/shm/{segment.name}", 0)
            reply = raw.request(raw.frame(segment=segment.name))
            assert reply["type"] == "error" and reply["code"] == "bad_segment", reply
            assert "past its end" in reply["message"], reply
            os.truncate(f"/dev/shm/{segment.name}", 4096)
            assert raw.request(raw.frame(segment=segment.name))["type"] == "ack"
        finally:
            segment.close()
            segment.unlink()

    def test_a_second_connection_cannot_take_a_live_sender_s_prefix(self, raw,
                                                                    receiver_under_test):
        """Segment names are bound to the connection whose hello proved them (protocol.md,
        hello): another connection repeating its pid and token is bad_segment."""
        assert raw.hello()["type"] == "welcome"
        with RawClient.to(receiver_under_test) as other:
            reply = other.hello(sender=raw.token, pid=raw.pid, segment_prefix=raw.prefix,
                                probe=None)  # fmt: skip
            assert reply["type"] == "error" and reply["code"] == "bad_segment", reply
            assert reply["seq"] is None
        assert raw.request(raw.frame(), PAD6)["type"] == "ack"  # the owner streams on

    def test_hello_and_bye_ignore_a_seq(self, raw):
        """hello and bye have no seq: one that is there is an unknown field, ignored."""
        assert raw.hello(seq="x")["type"] == "welcome"
        raw.send({"v": 1, "type": "bye", "seq": "x"})
        with pytest.raises(TimeoutError):  # bye: no reply, not an error
            raw.recv(timeout=1.0)
        reply = raw.request(raw.frame(), PAD6)
        assert reply["type"] == "error" and reply["code"] == "hello_required", reply

    def test_only_frame_acks_are_batched(self, raw):
        """A batch_acks sender may get the acks of several frames in one ack; a rois message's
        ack is its own (protocol.md: the acks of frames), even behind held frame acks."""
        assert raw.hello(batch_acks=True)["type"] == "welcome"
        slow = raw.frame(stream="batch", shape=[1024, 1024], dtype="float64", nbytes=8 << 20)
        raw.send(slow, bytes(8 << 20))
        raw.send(raw.frame(stream="batch"), PAD6)
        rois = {"v": 1, "type": "rois", "seq": raw.next_seq(), "stream": "batch",
                "path": "batch.roi.zip", "sent_ns": 0,
                "rois": [{"kind": "point", "coords": [[1, 1]]}]}  # fmt: skip
        raw.send(rois)
        raw.send(raw.frame(stream="batch"), PAD6)
        acks = [raw.recv(timeout=30)]
        while sum(1 + len(a.get("also", [])) for a in acks) < 4:
            acks.append(raw.recv(timeout=30))
        assert all(a["type"] == "ack" for a in acks), acks
        assert {"v": 1, "type": "ack", "seq": rois["seq"]} in acks, acks
        assert all(rois["seq"] not in a.get("also", []) for a in acks), acks

    def test_after_bye_a_frame_needs_hello(self, raw):
        assert raw.hello()["type"] == "welcome"
        raw.send({"v": 1, "type": "bye"})  # no reply
        reply = raw.request(raw.frame(), PAD6)
        assert reply["type"] == "error" and reply["code"] == "hello_required", reply

    def test_rejections_are_counted_and_reported(self, raw):
        raw.hello()
        before = raw.report()
        raw.request(b"{nope")
        after = raw.report()
        assert after["rejected"] == before["rejected"] + 1
        assert after["last_error"].startswith("bad_json")

    @pytest.mark.parametrize("depth,answer", [(600, "report"), (1100, "bad_json")])
    def test_nesting_depth(self, raw, depth, answer):
        """An unknown field nested `depth` deep: every receiver answers alike (the Python
        receiver's limit is msgspec's, 994 containers on CPython 3.11; Fiji uses the same)."""
        deep = b'{"v": 1, "type": "control", "seq": 7, "command": "report", "x": '
        deep += b"[" * depth + b"]" * depth + b"}"
        assert raw.hello()["type"] == "welcome"
        reply = raw.request(deep)
        assert (reply["type"] if reply["type"] != "error" else reply["code"]) == answer, reply
        assert reply["seq"] == (7 if answer == "report" else None)

    def test_dropped_counts_frames_never_sent(self, raw):
        """`dropped` = segment_missing frames + increases of each sender's own (cumulative)
        header count; a second hello from the same sender keeps its baseline."""
        assert raw.hello()["type"] == "welcome"
        before = raw.report()["dropped"]

        def send(dropped: int) -> int:
            reply = raw.request(raw.frame(stream="dropped", dropped=dropped), PAD6)
            assert reply["type"] == "ack", reply
            return raw.report()["dropped"] - before

        assert send(3) == 3
        assert raw.hello()["type"] == "welcome"  # reconnect: same sender, same count
        assert send(3) == 3
        assert send(5) == 5
        assert send(4) == 5  # never goes back
        reply = raw.request(raw.frame(segment=raw.prefix + "999"))
        assert reply["code"] == "segment_missing", reply
        assert raw.report()["dropped"] - before == 6

    def test_flood_of_garbage_then_a_valid_frame(self, raw):
        """Many bad messages in a row (no reply awaited) are each answered, then a frame is
        acknowledged as usual."""
        assert raw.hello()["type"] == "welcome"
        garbage = [b"\xff", b"{", b"[]", json.dumps({"v": 1, "type": "frame", "seq": 1}).encode()]
        for i in range(300):
            raw.send(garbage[i % 4])
        for _ in range(300):
            assert raw.recv()["type"] == "error"
        assert raw.request(raw.frame(), PAD6)["type"] == "ack"
