"""Test suites other implementations can run (they need pytest): `receiver.ReceiverConformance`
checks that a receiver of wire protocol v1 answers as docs/protocol.md says."""
