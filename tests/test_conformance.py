"""The Python reference receiver runs the receiver conformance suite (polystore.testing.receiver);
tests/test_fiji.py runs the same suite against the Fiji script."""

from __future__ import annotations

import pytest

from polystore.streaming import Receiver
from polystore.testing.receiver import ReceiverConformance, ReceiverUnderTest, user_curve


class TestPythonReceiver(ReceiverConformance):
    @pytest.fixture(scope="class")
    def receiver_under_test(self):
        receiver = Receiver("tcp://127.0.0.1:0", shm_prefix="fiji_", viewer="fiji",
                            on_frame=lambda f: None, on_rois=lambda r: None).start()  # fmt: skip
        try:
            yield ReceiverUnderTest(receiver.endpoint, shm_prefix="fiji_", viewer="fiji",
                                    curve=user_curve())
        finally:
            receiver.stop()
