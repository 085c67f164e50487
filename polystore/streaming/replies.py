"""What a sender does with each reply from its receiver: one handler per message type.

``ack`` returns a credit, ``error`` rejects one message (or refuses the handshake, or tells
of a restarted receiver), ``welcome`` completes the handshake, ``report`` answers a control
request. The table from message type to handler is the whole dispatch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from polystore.streaming import protocol as p
from polystore.streaming.connection import Connection, State
from polystore.streaming.credits import CreditWindow
from polystore.streaming.options import SenderStats

log = logging.getLogger(__name__)


class ReplyHandler:
    """Decodes each reply and hands it to its handler. `answers` holds the replies to
    control requests the sender is waiting for (seq -> state, None until answered)."""

    def __init__(self, connection: Connection, credits: CreditWindow, stats: SenderStats, *,
                 describe: str, receiver_lost: Callable[[str], None]) -> None:
        self.connection = connection
        self.credits = credits
        self.stats = stats
        self.describe = describe  # "the napari receiver at tcp://...", for messages
        self.receiver_lost = receiver_lost
        self.answers: dict[int, dict | None] = {}
        self._handlers: dict[type, Callable] = {
            p.Ack: self.on_ack, p.Error: self.on_error, p.Welcome: self.on_welcome,
            p.Report: self.on_report,
        }  # fmt: skip

    def __call__(self, data: bytes) -> None:
        try:
            message = p.decode_receiver_message(data)
        except Exception as exc:  # noqa: BLE001 - a bad reply must not break the pipeline
            log.warning("ignoring an unreadable reply from %s: %s", self.describe, exc)
            return
        self._handlers[type(message)](message)

    def on_ack(self, ack: p.Ack) -> None:
        for seq in (ack.seq, *ack.also):
            if self.credits.ack(seq) and seq in self.answers:
                self.answers[seq] = {}

    def on_report(self, report: p.Report) -> None:
        if report.seq in self.answers and self.credits.complete(report.seq):
            self.answers[report.seq] = report.state

    def on_welcome(self, welcome: p.Welcome) -> None:
        if self.connection.accept(welcome):
            self.stats.handshakes += 1

    def on_error(self, error: p.Error) -> None:
        if error.seq is not None and error.seq not in self.credits:
            return  # a frame already given up (policy latest): counted then
        if error.seq is None and self.connection.state is State.HELLO_SENT:
            # the answer to our hello, whatever its code (hello_required included: saying
            # hello again would only be refused again, as fast as the receiver answers)
            self.stats.rejected += 1
            self.connection.refuse(f"{self.describe} refused the handshake: {error.message}")
        elif error.code == p.HELLO_REQUIRED:
            # a new receiver that never saw our hello: this frame is lost with the rest
            self.stats.rejected += 1
            self.receiver_lost("the receiver restarted")
        else:
            self.credits.reject(error)
