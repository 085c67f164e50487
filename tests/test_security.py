"""Issue 11: another account on the machine can neither hang, crash, read nor steer a receiver.

Attacks run for real: a second account (a `setuid` subprocess; CI runs as root), FIFOs and
truncated segments in /dev/shm, floods of connections and parts, a full tmpfs, pid namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from polystore.streaming import NapariStreamingBackend, ViewerNotRunningError, receiver_for
from polystore.streaming import protocol as p
from polystore.streaming.credential import CredentialError, credential_path, load_credential
from tests.test_streaming import free_endpoint

ROOT = Path(__file__).resolve().parent.parent


# -- the credential ------------------------------------------------------------------------------


def test_credential_is_made_on_first_use_readable_only_by_the_user(tmp_path, monkeypatch):
    path = tmp_path / "config" / "polystore" / "credential.json"
    monkeypatch.setenv("POLYSTORE_CREDENTIAL", str(path))
    assert credential_path() == path
    made = load_credential()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    content = json.loads(path.read_text())
    assert content["version"] == 1 and content["curve_public"] == made.curve_public.decode()
    assert zmq.curve_public(made.curve_secret) == made.curve_public
    assert load_credential() == made  # read again, not replaced


def test_credential_path_follows_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.delenv("POLYSTORE_CREDENTIAL")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert credential_path() == tmp_path / "polystore" / "credential.json"


def test_concurrent_first_use_agrees_on_one_credential(tmp_path):
    path = tmp_path / "credential.json"
    code = ("import sys; from polystore.streaming.credential import load_credential; "
            "print(load_credential(sys.argv[1]).curve_public.decode())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(6)]
    keys = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert keys == {json.loads(path.read_text())["curve_public"]}
    assert [p.name for p in tmp_path.iterdir()] == ["credential.json"]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_credential_readable_by_others_is_refused_with_the_fix(tmp_path, mode):
    path = tmp_path / "credential.json"
    load_credential(path)
    path.chmod(mode)
    with pytest.raises(CredentialError, match=r"chmod 600"):
        load_credential(path)


def test_credential_symlink_is_refused(tmp_path):
    real = tmp_path / "real.json"
    load_credential(real)
    link = tmp_path / "credential.json"
    link.symlink_to(real)
    with pytest.raises(CredentialError, match="symbolic link"):
        load_credential(link)


def test_damaged_credential_is_refused(tmp_path):
    path = tmp_path / "credential.json"
    load_credential(path)
    content = json.loads(path.read_text())
    content["curve_public"] = content["curve_public"][::-1]
    path.write_text(json.dumps(content))
    with pytest.raises(CredentialError, match="damaged"):
        load_credential(path)


def test_bad_auth_value_is_refused_when_the_backend_is_made(monkeypatch):
    with pytest.raises(ValueError, match="'user'.*'none'"):
        NapariStreamingBackend("tcp://127.0.0.1:1", auth="maybe")
    monkeypatch.setenv("POLYSTORE_AUTH", "off")
    with pytest.raises(ValueError, match="POLYSTORE_AUTH"):
        receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0")


def test_receiver_and_sender_refuse_a_loosened_credential(tmp_path, monkeypatch):
    path = tmp_path / "credential.json"
    monkeypatch.setenv("POLYSTORE_CREDENTIAL", str(path))
    load_credential()
    path.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0").start()
    b = NapariStreamingBackend("tcp://127.0.0.1:9")
    with pytest.raises(CredentialError, match="chmod 600"):
        b.save(np.zeros((2, 2), np.uint8), "x.tif")
    b.close()


# -- the handshake -------------------------------------------------------------------------------


def _other_credential_env(tmp_path) -> dict:
    """The environment of a process holding a credential that is not this user's."""
    return {**os.environ, "POLYSTORE_CREDENTIAL": str(tmp_path / "other" / "credential.json")}


def test_sender_without_the_credential_is_refused_at_the_handshake(tmp_path):
    seen = []
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                      on_frame=seen.append) as rx:
        code = (
            "import sys, numpy as np\n"
            "from polystore.streaming import NapariStreamingBackend, ViewerNotRunningError\n"
            "b = NapariStreamingBackend(sys.argv[1], connect_timeout=1.0)\n"
            "try:\n"
            "    b.save(np.ones((8, 8), np.uint8), 'x.tif')\n"
            "except ViewerNotRunningError as exc:\n"
            "    print('REFUSED', exc)\n"
            "finally:\n"
            "    b.close()\n"
        )
        out = subprocess.run([sys.executable, "-c", code, rx.endpoint], capture_output=True,
                             text=True, timeout=60, env=_other_credential_env(tmp_path))
        assert "REFUSED" in out.stdout, out.stdout + out.stderr
        with NapariStreamingBackend(rx.endpoint) as own:  # the user's own sender still works
            own.save(np.ones((8, 8), np.uint8), "mine.tif")
            own.flush()
        assert rx.stats.rejected == 0  # nothing of the stranger's got as far as a message
    assert [f.header.path for f in seen] == ["mine.tif"]  # stopped: every callback has run


def test_receiver_without_the_credential_gets_nothing_from_a_sender(tmp_path):
    """An impostor receiver (here: one with another credential) on the viewer's port: the
    sender's handshake fails, it raises, and not one frame reaches the impostor."""
    code = (
        "import sys, time\n"
        "from polystore.streaming import NapariStreamingBackend, receiver_for\n"
        "seen = []\n"
        "rx = receiver_for(NapariStreamingBackend, 'tcp://127.0.0.1:0',\n"
        "                  on_frame=seen.append).start()\n"
        "print(rx.endpoint, flush=True)\n"
        "sys.stdin.readline()\n"
        "print('FRAMES', len(seen), rx.stats.rejected, flush=True)\n"
        "rx.stop()\n"
    )
    impostor = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True,
                                env=_other_credential_env(tmp_path))
    try:
        endpoint = impostor.stdout.readline().strip()
        b = NapariStreamingBackend(endpoint, connect_timeout=60.0)
        started = time.monotonic()
        with pytest.raises(ViewerNotRunningError, match="authentication handshake"):
            b.save(np.ones((8, 8), np.uint8), "secret.tif")
        # reported when the handshake fails, not when the connect deadline passes
        assert time.monotonic() - started < 20
        b.close()
        impostor.stdin.write("\n")
        impostor.stdin.flush()
        assert impostor.stdout.readline().split() == ["FRAMES", "0", "0"]
    finally:
        impostor.kill()
        impostor.wait()



def test_a_sender_refused_by_an_impostor_talks_to_the_receiver_that_replaces_it(tmp_path):
    """The impostor is stopped and the user's receiver started on its port; ZeroMQ relinks
    by itself. Before: the hang-ups the impostor caused still counted as a refusal, so the
    next save, while ZeroMQ's new handshake with the real receiver was under way, reported
    the real receiver as one that "failed the authentication handshake"."""
    endpoint = free_endpoint()
    code = (
        "import sys\n"
        "from polystore.streaming import NapariStreamingBackend, receiver_for\n"
        "rx = receiver_for(NapariStreamingBackend, sys.argv[1]).start()\n"
        "print('LISTENING', flush=True)\n"
        "sys.stdin.readline()\n"
        "rx.stop()\n"
    )
    impostor = subprocess.Popen([sys.executable, "-c", code, endpoint], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True,
                                env=_other_credential_env(tmp_path))
    rx = None
    b = NapariStreamingBackend(endpoint, connect_timeout=20.0)
    try:
        assert impostor.stdout.readline().strip() == "LISTENING"
        with pytest.raises(ViewerNotRunningError, match="authentication handshake"):
            b.save(np.ones((4, 4), np.uint8), "refused.tif")
        impostor.kill()
        impostor.wait()
        deadline = time.monotonic() + 10
        while rx is None:
            try:
                rx = receiver_for(NapariStreamingBackend, endpoint).start()
            except OSError:  # ZeroMQ releases the port a moment after the impostor dies
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        b.save(np.ones((4, 4), np.uint8), "welcome.tif")
        b.flush()
        assert rx.stats.frames == 1
    finally:
        b.close()
        impostor.kill()
        impostor.wait()
        if rx is not None:
            rx.stop()

def test_auth_none_on_both_sides_still_works(monkeypatch):
    """The documented opt-out for Fiji on JeroMQ 0.3."""
    monkeypatch.setenv("POLYSTORE_AUTH", "none")
    seen = []
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append) as rx:
        with NapariStreamingBackend(rx.endpoint) as b:
            b.save(np.ones((4, 4), np.uint8), "open.tif")
            b.flush()
    assert len(seen) == 1


def test_what_counts_as_a_refused_handshake():
    """A protocol or authentication failure refuses at once (ZeroMQ gives the endpoint up, so
    only then must the sender connect again); a hang-up mid-handshake refuses only when it
    keeps happening, ZeroMQ relinks by itself, and a success or a welcome forgets it."""
    from polystore.streaming.link import HANGUPS_BEFORE_REFUSAL, LinkState

    link = LinkState()
    link.update(zmq.EVENT_CONNECTED)
    assert link.up and link.handshaking and not link.failed
    link.update(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    assert link.refused and link.failed and link.dropped
    link.forget_failures()
    assert not link.refused and not link.failed and not link.dropped

    for _ in range(HANGUPS_BEFORE_REFUSAL - 1):
        link.update(zmq.EVENT_CONNECTED)
        link.update(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        link.update(zmq.EVENT_DISCONNECTED)
    assert link.failed and not link.refused and not link.up and not link.dropped
    # JeroMQ 0.3 (ZMTP 2.0): ZeroMQ never reports its handshake as succeeded, and every
    # disconnect reads as a hang-up; a welcome between them means the receiver restarted
    for _ in range(2 * HANGUPS_BEFORE_REFUSAL):
        link.update(zmq.EVENT_CONNECTED)
        link.welcomed()
        link.update(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        link.update(zmq.EVENT_DISCONNECTED)
    assert not link.refused and not link.dropped
    link.forget_failures()
    link.update(zmq.EVENT_CONNECTED)
    link.update(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    assert link.up and not link.handshaking
    for _ in range(HANGUPS_BEFORE_REFUSAL - 1):  # counted afresh after the success
        link.update(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert not link.refused
    link.update(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert link.refused


def test_a_receiver_that_hangs_up_one_handshake_is_retried_not_called_an_impostor():
    """A port that hangs up mid-handshake once (a receiver restarting, at its connection
    limit, or past its handshake deadline) and then serves: the sender connects; only
    repeated hang-ups or a protocol/authentication failure count as a refusal."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    started: dict = {}

    def hang_up_once_then_serve() -> None:
        client, _ = listener.accept()
        client.close()
        listener.close()
        time.sleep(0.2)
        started["rx"] = receiver_for(NapariStreamingBackend, f"tcp://127.0.0.1:{port}").start()

    server = threading.Thread(target=hang_up_once_then_serve, daemon=True)
    server.start()
    try:
        with NapariStreamingBackend(f"tcp://127.0.0.1:{port}", connect_timeout=20.0) as b:
            b.save(np.ones((4, 4), np.uint8), "after_restart.tif")
            b.flush()
    finally:
        server.join(10)
        if "rx" in started:
            assert started["rx"].stats.frames == 1
            started["rx"].stop()


def test_a_hang_up_while_the_sender_was_idle_is_not_blamed_when_nobody_listens():
    """The receiver stops; while the sender is idle, something hangs up one handshake on its
    port (a receiver restarting and stopping again; every close of Fiji's ZMTP 2.0 receiver
    reads as one) and goes. The next save finds nobody listening: it must say so, not that a
    process listening there failed the authentication handshake. Before: that hang-up was
    never forgotten (only a reconnect forgot failures, and after a hang-up none happens)."""
    import socket

    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0").start()
    port = int(rx.endpoint.rsplit(":", 1)[1])
    b = NapariStreamingBackend(rx.endpoint, connect_timeout=1.0)
    try:
        b.save(np.ones((4, 4), np.uint8), "before.tif")
        b.flush()
        rx.stop()
        deadline = time.monotonic() + 10
        while True:  # ZeroMQ releases the receiver's port a moment after it stops
            try:
                listener = socket.create_server(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        listener.settimeout(10)
        client, _ = listener.accept()  # ZeroMQ relinks by itself; hang up mid-handshake
        client.close()
        listener.close()
        time.sleep(0.5)  # the sender's monitor has the hang-up; nobody listens now
        with pytest.raises(ViewerNotRunningError, match="no napari receiver answered"):
            b.save(np.ones((4, 4), np.uint8), "after.tif")
    finally:
        b.close()


def test_user_sender_refuses_an_unauthenticated_receiver():
    """auth='user' never falls back to talking to a receiver that cannot prove itself."""
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", auth="none") as rx:
        b = NapariStreamingBackend(rx.endpoint, connect_timeout=60.0)
        start = time.monotonic()
        with pytest.raises(ViewerNotRunningError, match="auth='none'"):
            b.save(np.ones((4, 4), np.uint8), "x.tif")
        assert time.monotonic() - start < 20  # as the handshake fails, not at the deadline
        b.close()
        assert rx.stats.frames == 0


def test_the_refusal_says_what_this_sender_got_wrong():
    """One fixed text served every refusal: to a sender with auth='none' it said the
    receiver ran with auth='none' (backwards), and to one with a wrong server key it never
    named the key."""
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0") as rx:
        with NapariStreamingBackend(rx.endpoint, auth="none", connect_timeout=20.0) as b:
            with pytest.raises(ViewerNotRunningError) as refused:
                b.save(np.ones((4, 4), np.uint8), "x.tif")
    assert "this sender runs with auth='none'" in str(refused.value)
    assert "Unset POLYSTORE_AUTH" in str(refused.value)
    server_public, server_secret = zmq.curve_keypair()
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                      curve_secret_key=server_secret) as rx:
        wrong = zmq.curve_keypair()[0]
        with NapariStreamingBackend(rx.endpoint, curve_server_key=wrong,
                                    connect_timeout=20.0) as b:
            with pytest.raises(ViewerNotRunningError) as refused:
                b.save(np.ones((4, 4), np.uint8), "x.tif")
        assert rx.stats.frames == 0
    assert "POLYSTORE_NAPARI_SERVER_KEY" in str(refused.value)
    assert "is not the key of the receiver" in str(refused.value)


def test_every_sender_hears_at_once_that_an_unauthenticated_receiver_refused_it():
    """ZeroMQ reports a refused handshake once: a sender whose link monitor was attached only
    after it connected missed that report now and then (6 of 200 senders) and waited for
    its whole connect_timeout, then blamed a receiver that was not running."""
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", auth="none") as rx:
        for _ in range(150):
            with NapariStreamingBackend(rx.endpoint, connect_timeout=10.0) as b:
                start = time.monotonic()
                with pytest.raises(ViewerNotRunningError, match="auth='none'"):
                    b.save(np.ones((4, 4), np.uint8), "x.tif")
                assert time.monotonic() - start < 5  # refused, not timed out


# -- attack tools --------------------------------------------------------------------------------

STRANGER_UID = 65534  # "nobody": another local account
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another account "
                                "(setuid) or to mount a small /dev/shm (CI runs as root)")

# Runs as root only long enough to import, then becomes another account for the attack.
_STRANGER_PREAMBLE = f"""
import encodings.idna, json, os, socket, struct, sys, time  # before setuid: later imports fail
import zmq
os.setgroups([])
os.setgid({STRANGER_UID})
os.setuid({STRANGER_UID})
assert os.getuid() == {STRANGER_UID}
"""


def start_stranger(code: str, *args: str) -> subprocess.Popen:
    """Start `code` as another local account, with pipes to talk to it."""
    return subprocess.Popen([sys.executable, "-c", _STRANGER_PREAMBLE + code, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": "/tmp"})


def run_as_stranger(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` as another local account; its stdout is returned."""
    env = {**os.environ, "HOME": "/tmp"}
    return subprocess.run([sys.executable, "-c", _STRANGER_PREAMBLE + code, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


_RECEIVER_PROCESS = """
import json, logging, os, resource, sys, time
nofile = int(sys.argv[2])
if nofile:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
logging.basicConfig(level=logging.WARNING)
from polystore.streaming import NapariStreamingBackend, receiver_for
delay = float(sys.argv[1])
rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0",
                  on_frame=lambda f: time.sleep(delay)).start()
print(rx.endpoint, flush=True)
for line in sys.stdin:
    if line.strip() == "rss":
        status = open("/proc/self/status").read()
        print(int(status.split("VmRSS:")[1].split()[0]), flush=True)
    elif line.strip() == "state":
        print(json.dumps(rx.state()), flush=True)
rx.stop()
"""


class ReceiverProcess:
    """A napari-prefix receiver in its own process (so a crash or a flood is measurable)."""

    def __init__(self, frame_delay: float = 0.0, nofile: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER_PROCESS, str(frame_delay), str(nofile)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.endpoint = self.proc.stdout.readline().strip()
        assert self.endpoint.startswith("tcp://"), self.proc.stderr.read()

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def rss_mib(self) -> float:
        return int(self.ask("rss")) / 1024

    def state(self) -> dict:
        return json.loads(self.ask("state"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> str:
        """Stop it; returns its stderr."""
        if self.alive():
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read()


class Peer:
    """A hand-driven DEALER of this user (with the credential unless `keys=False`)."""

    def __init__(self, endpoint: str, token: str, keys: bool = True) -> None:
        from polystore.streaming.auth import client_keys, resolve_auth

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, token.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        user_keys = client_keys(resolve_auth(None)) if keys else None
        if user_keys is not None:
            user_keys.apply(self.sock)
        self.sock.connect(endpoint)
        self.token = token
        self.prefix = f"napari_{os.getpid()}_{token}_"

    def request(self, *parts: bytes | dict, timeout: float = 5.0):
        self.sock.send_multipart([json.dumps(x).encode() if isinstance(x, dict) else x
                                  for x in parts])
        if not self.sock.poll(timeout * 1000):
            return None
        return p.decode_receiver_message(self.sock.recv())

    def hello(self, probe: bool = True):
        header = {"v": 1, "type": "hello", "sender": self.token, "pid": os.getpid(),
                  "viewer": "napari", "segment_prefix": self.prefix}
        if not probe:
            return self.request(header)
        name = self.prefix + "probe"
        make_segment(name, b"probetoken1")
        try:
            header["probe"] = {"segment": name, "token": "probetoken1"}
            return self.request(header)
        finally:
            remove_segment(name)

    def close(self) -> None:
        self.sock.close(0)


def frame_header(segment: str | None, nbytes: int = 16, seq: int = 1, offset: int = 0) -> dict:
    return {"v": 1, "type": "frame", "seq": seq, "stream": "s", "path": "s.tif",
            "shape": [nbytes], "dtype": "uint8", "nbytes": nbytes, "sent_ns": 0,
            "segment": segment, "offset": offset}


def make_segment(name: str, data: bytes, size: int | None = None) -> None:
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size or max(len(data), 4096))
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def remove_segment(name: str) -> None:
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


@pytest.fixture
def receiver():
    seen = []
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append,
                      on_clear=lambda: seen.append("clear")).start()
    rx.seen = seen
    yield rx
    rx.stop()


# -- 1: a FIFO (or anything not a regular file) cannot hang the receiver -------------------------


def test_fifo_named_by_probe_and_frame_does_not_hang_the_receiver(receiver):
    peer = Peer(receiver.endpoint, "fifo0001")
    fifos = [peer.prefix + "probe", peer.prefix + "0"]
    for name in fifos:
        os.mkfifo(f"/dev/shm/{name}", 0o600)
    try:
        header = {"v": 1, "type": "hello", "sender": peer.token, "pid": os.getpid(),
                  "viewer": "napari", "segment_prefix": peer.prefix,
                  "probe": {"segment": fifos[0], "token": "x"}}
        welcome = peer.request(header, timeout=5)
        assert welcome is not None, "the receiver hung on a FIFO named by a probe"
        assert welcome.shm is False
        # with a real probe, then a frame naming the FIFO
        os.unlink(f"/dev/shm/{fifos[0]}")
        welcome = peer.hello()
        assert welcome.shm is True, welcome
        reply = peer.request(frame_header(fifos[1]), timeout=5)
        assert reply is not None, "the receiver hung on a FIFO named by a frame"
        assert reply.code == "bad_segment" and "not a shared-memory segment" in reply.message
    finally:
        for name in fifos:
            remove_segment(name)
        peer.close()
    start = time.monotonic()
    receiver.stop()
    assert not receiver.running and time.monotonic() - start < 5
    with socket_bound(receiver.endpoint):
        pass  # the port is free again


class socket_bound:
    """Bind a plain TCP socket to a tcp:// endpoint (raises if it is still taken)."""

    def __init__(self, endpoint: str) -> None:
        import socket

        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.sock.bind((host, int(port)))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


# -- 3: a segment truncated after the receiver read it cannot SIGBUS the receiver ----------------


def test_truncated_segment_is_an_error_reply_not_a_crash():
    rx = ReceiverProcess()
    peer = Peer(rx.endpoint, "trunc001")
    name = peer.prefix + "0"
    make_segment(name, bytes(range(256)) * 256, 65536)
    try:
        assert peer.hello().shm is True
        assert isinstance(peer.request(frame_header(name, 65536, seq=1)), p.Ack)
        os.truncate(f"/dev/shm/{name}", 0)
        reply = peer.request(frame_header(name, 65536, seq=2), timeout=10)
        assert rx.alive(), "the receiver died (SIGBUS) reading a truncated segment"
        assert reply is not None and reply.code == "bad_segment" and "past its end" in reply.message
        os.truncate(f"/dev/shm/{name}", 65536)
        assert isinstance(peer.request(frame_header(name, 65536, seq=3)), p.Ack)
        assert rx.state()["frames"] == 2
    finally:
        remove_segment(name)
        peer.close()
        rx.close()


# -- 2: a full /dev/shm is an exception in the sender, not SIGBUS --------------------------------

_FULL_SHM_PIPELINE = """
import os, sys, numpy as np
from polystore.streaming import NapariStreamingBackend, receiver_for
# Another account fills /dev/shm (a file is enough: tmpfs space is shared).
filler = os.open("/dev/shm/filler", os.O_CREAT | os.O_WRONLY, 0o600)
try:
    while True:
        os.write(filler, b"\\0" * 4096)
except OSError:
    os.close(filler)
b = NapariStreamingBackend("tcp://127.0.0.1:9", connect_timeout=0.5)  # no viewer running
try:
    b.save(np.ones((8, 8), np.uint8), "x.tif")
    print("NO ERROR")
except OSError as exc:
    print("PROBE:", exc)
os.unlink("/dev/shm/filler")
with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=print) as rx:
    with NapariStreamingBackend(rx.endpoint) as b:
        try:
            b.save(np.ones((4096, 2048), np.uint8), "big.tif")  # 8 MiB > the 4 MiB tmpfs
            print("NO ERROR")
        except OSError as exc:
            print("FRAME:", exc)
print("ALIVE")
"""


@needs_root
def test_full_dev_shm_raises_naming_free_and_needed_space():
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=4m tmpfs /dev/shm && exec "$@"',
         "sh", sys.executable, "-c", _FULL_SHM_PIPELINE],
        capture_output=True, text=True, timeout=120)
    if "mount" in out.stderr and "ALIVE" not in out.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0, f"the pipeline died (rc {out.returncode}): {out.stderr}"
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert "shared memory is full" in lines["PROBE"] and "free" in lines["PROBE"]
    assert "8.0 MiB" in lines["FRAME"] and "MiB free" in lines["FRAME"]
    assert "--shm-size" in lines["FRAME"]
    assert "`polystore shm clean`" in lines["FRAME"]  # a command that exists (not --sweep)
    assert "ALIVE" in out.stdout


# -- 4: a connection cannot claim another pipeline's segments ------------------------------------

_SPOOF_HELLO = """
endpoint, prefix, victim_segment = sys.argv[1:4]
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
probe = prefix + "probe"
with open("/dev/shm/" + probe, "wb") as f:  # the stranger can make a file of that name
    f.write(b"spoof1")
def ask(header):
    try:
        sock.send(json.dumps(header).encode(), zmq.NOBLOCK)
    except zmq.Again:  # no connection would take it
        return None
    return json.loads(sock.recv()) if sock.poll(3000) else None
token = prefix.split("_")[2]
pid = int(prefix.split("_")[1])
print(json.dumps(ask({"v": 1, "type": "hello", "sender": token, "pid": pid,
                      "viewer": "napari", "segment_prefix": prefix,
                      "probe": {"segment": probe, "token": "spoof1"}})))
print(json.dumps(ask({"v": 1, "type": "frame", "seq": 1, "stream": "s", "path": "x.tif",
                      "shape": [16], "dtype": "uint8", "nbytes": 16, "sent_ns": 0,
                      "segment": victim_segment, "offset": 0})))
os.unlink("/dev/shm/" + probe)
"""


def _victim_segment(token: str) -> tuple[str, str]:
    prefix = f"napari_{os.getpid()}_{token}_"
    make_segment(prefix + "0", b"victim's pixels!")
    return prefix, prefix + "0"


@needs_root
@pytest.mark.parametrize("auth", ["user", "none"])
def test_another_account_cannot_read_a_pipeline_s_segments_by_repeating_its_name(auth):
    """The stranger repeats a live pipeline's pid and token (both visible in /dev/shm). With
    auth (the default) it cannot even connect; without, the receiver still refuses frames
    naming segments because the stranger's probe is not this user's."""
    seen = []
    prefix, victim = _victim_segment("cafe0042")
    try:
        with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append,
                          auth=auth) as rx:
            out = run_as_stranger(_SPOOF_HELLO, rx.endpoint, prefix, victim)
            assert out.returncode == 0, out.stderr
            welcome, frame_reply = (json.loads(line) for line in out.stdout.splitlines())
            if auth == "user":
                assert welcome is None and frame_reply is None  # refused at the handshake
            else:
                assert welcome["type"] == "welcome" and welcome["shm"] is False
                assert frame_reply["code"] == "bad_segment", frame_reply
            assert seen == []
    finally:
        remove_segment(victim)
        remove_segment(prefix + "probe")


def test_a_prefix_in_use_cannot_be_claimed_by_another_connection(receiver):
    owner = Peer(receiver.endpoint, "owner001")
    thief = Peer(receiver.endpoint, "thief001")
    thief.prefix = owner.prefix
    try:
        assert owner.hello().shm is True
        header = {"v": 1, "type": "hello", "sender": owner.token, "pid": os.getpid(),
                  "viewer": "napari", "segment_prefix": owner.prefix}
        reply = thief.request(header)
        assert reply.code == "bad_segment" and "another connection" in reply.message
    finally:
        owner.close()
        thief.close()


# -- 5: memory per connection is bounded ---------------------------------------------------------

_UNFINISHED_PARTS = """
# Raw ZMTP 3.0 (libzmq itself never transmits a message before its last part).
endpoint, parts = sys.argv[1], int(sys.argv[2])
host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
conn = socket.socket()
conn.connect((host, int(port)))
conn.sendall(b"\\xff" + bytes(8) + b"\\x7f\\x03\\x00" + b"NULL".ljust(20, b"\\0") + bytes(32))
ready = (b"\\x05READY\\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
         + b"\\x08Identity" + struct.pack(">I", 0))
chunk = bytes(8 << 20)
sent = 0
try:
    conn.sendall(b"\\x04" + bytes([len(ready)]) + ready)
    for _ in range(parts):  # MORE | LONG: never the last part
        conn.sendall(b"\\x03" + struct.pack(">Q", len(chunk)) + chunk)
        sent += 1
except OSError:
    pass  # the receiver hung up
print("SENT", sent, flush=True)
sys.stdin.readline()  # keep the connection (and whatever it made the receiver hold) open
"""


@needs_root
def test_unfinished_multipart_flood_from_another_account_does_not_grow_the_receiver(figure):
    rx = ReceiverProcess()
    try:
        before = rx.rss_mib()
        stranger = start_stranger(_UNFINISHED_PARTS, rx.endpoint, "40")
        try:
            line = stranger.stdout.readline()
            assert line.startswith("SENT"), stranger.stderr.read()
            time.sleep(1)
            growth = rx.rss_mib() - before
        finally:
            stranger.kill()
            stranger.wait()
        figure("flood_unfinished_parts_40x8MiB_rss_growth_mib", round(growth, 1))
        assert growth < 32, f"40 unfinished 8 MiB parts grew the receiver by {growth:.0f} MiB"
        assert rx.alive()
    finally:
        rx.close()


def test_sender_ignoring_credits_cannot_grow_a_slow_receiver_much(figure):
    """An authenticated sender (this user) that never waits for acks: ZeroMQ stops reading its
    connection after RECEIVE_HWM messages, so the receiver holds a bounded number."""
    rx = ReceiverProcess(frame_delay=0.5)
    peer = Peer(rx.endpoint, "greedy01")
    try:
        assert isinstance(peer.hello(probe=False), p.Welcome)
        before = rx.rss_mib()
        payload = b"\1" * (1 << 20)
        header = json.dumps(frame_header(None, 1 << 20)).encode()
        sent = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and sent < 400:
            try:
                peer.sock.send_multipart([header, payload], zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.01)
        time.sleep(1)
        growth = rx.rss_mib() - before
        figure("flood_ignoring_credits_1MiB_frames_rss_growth_mib", round(growth, 1))
        figure("flood_ignoring_credits_frames_sent", sent)
        assert growth < 80, f"{sent} unacknowledged 1 MiB frames grew it by {growth:.0f} MiB"
    finally:
        peer.close()
        rx.close()


# -- 6: floods cannot evict a live sender or use up the receiver's descriptors -------------------

_HELLO_FLOOD = """
endpoint, count = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context.instance()
ctx.set(zmq.MAX_SOCKETS, 4096)
socks, answered = [], 0
for i in range(count):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    socks.append(s)
hello = {"v": 1, "type": "hello", "pid": 1, "viewer": "napari", "versions": [1]}
for i, s in enumerate(socks):
    token = f"flood{i}"
    try:
        s.send(json.dumps({**hello, "sender": token,
                           "segment_prefix": f"napari_1_{token}_"}).encode(), zmq.NOBLOCK)
    except zmq.Again:
        pass
deadline = time.monotonic() + 3
for s in socks:
    if s.poll(max(0, deadline - time.monotonic()) * 1000):
        answered += 1
print("ANSWERED", answered, flush=True)
for s in socks:
    s.close(0)
"""


@needs_root
def test_hello_flood_from_another_account_does_not_evict_a_live_sender(receiver, figure):
    with NapariStreamingBackend(receiver.endpoint) as live:
        live.save(np.zeros((8, 8), np.uint8), "live/0.tif")
        live.flush()
        out = run_as_stranger(_HELLO_FLOOD, receiver.endpoint, "1100")
        assert "ANSWERED" in out.stdout, out.stderr
        answered = int(out.stdout.split()[-1])
        figure("hello_flood_1100_answered", answered)
        assert answered == 0
        for i in range(1, 6):
            live.save(np.zeros((8, 8), np.uint8), f"live/{i}.tif")
        live.flush()  # old code: ReceiverLostError, the flood had evicted it
    receiver.stop()  # every callback has run
    assert [f.header.path for f in receiver.seen] == [f"live/{i}.tif" for i in range(6)]


def test_full_sender_table_refuses_newcomers_and_keeps_the_senders_it_has():
    """Even for this user's own connections: a full table never evicts."""
    seen = []
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append,
                      max_senders=4) as rx:
        senders = [NapariStreamingBackend(rx.endpoint) for _ in range(4)]
        try:
            for b in senders:
                b.save(np.zeros((4, 4), np.uint8), "a.tif")
            extra = NapariStreamingBackend(rx.endpoint, connect_timeout=1)
            with pytest.raises(ViewerNotRunningError, match="at most 4 senders"):
                extra.save(np.zeros((4, 4), np.uint8), "b.tif")
            extra.close()
            for b in senders:
                b.save(np.zeros((4, 4), np.uint8), "c.tif")
                b.flush()
        finally:
            for b in senders:
                b.close()
        assert rx.stats.rejected == 1, rx.stats.last_error  # the newcomer's hello only
    assert sorted(f.header.path for f in seen) == ["a.tif"] * 4 + ["c.tif"] * 4, rx.stats



@contextlib.contextmanager
def _receiver_held_by_its_viewer():
    """A receiver serving at most 3 senders, and `busy`, a sender whose frame hold.tif was
    acknowledged and now holds the receiver's thread in the viewer's callback (a viewer busy
    for a while) until `gate` is set. Yields (receiver, busy, gate, paths of the frames
    shown); on leaving, the gate opens and `busy` closes."""
    gate = threading.Event()
    seen: list[str] = []

    def on_frame(frame) -> None:
        seen.append(frame.header.path)
        if frame.header.path == "hold.tif":
            gate.wait(60)

    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=on_frame,
                      max_senders=3) as rx:
        busy = NapariStreamingBackend(rx.endpoint)
        try:
            busy.save(np.zeros((4, 4), np.uint8), "hold.tif")
            busy.flush()  # acknowledged before the callback that holds the receiver's thread
            yield rx, busy, gate, seen
        finally:
            gate.set()
            busy.close()


def test_senders_gone_before_a_busy_receiver_reads_their_hello_take_no_place_in_its_table():
    """Senders that gave up their handshake while the receiver's thread was busy in a slow
    viewer callback, and closed. Before: the receiver read each hello after its connection had
    closed and kept a session for it that nothing ever removed; the table filled and refused
    every later sender ("serves at most 3 senders") with none connected."""
    with _receiver_held_by_its_viewer() as (rx, busy, gate, seen):
        for i in range(3):
            with NapariStreamingBackend(rx.endpoint, connect_timeout=0.3) as gone:
                with pytest.raises(ViewerNotRunningError):
                    gone.save(np.zeros((4, 4), np.uint8), f"gone{i}.tif")
        gate.set()
        with NapariStreamingBackend(rx.endpoint, connect_timeout=20) as late:
            late.save(np.zeros((4, 4), np.uint8), "late.tif")
            late.flush()
        busy.save(np.zeros((4, 4), np.uint8), "busy.tif")
        busy.flush()
    assert seen == ["hold.tif", "late.tif", "busy.tif"]


def _accepted(tcp, port: int) -> list[int]:
    """The descriptors this process holds for TCP connections it accepted on `port` (`tcp`:
    /proc/net/tcp, opened beforehand: reading it takes no descriptor number then)."""
    tcp.seek(0)
    rows = [line.split() for line in tcp.read().decode().splitlines()[1:]]
    inodes = {f"socket:[{row[9]}]" for row in rows
              if int(row[1].rsplit(":", 1)[1], 16) == port and row[3] == "01"}  # established
    held = []
    for fd in range(4096):  # readlink takes no descriptor number; listing /proc/self/fd would
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in inodes:
                held.append(fd)
        except OSError:
            pass
    return held


def _wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


_GONE_SENDERS = """
import sys
import numpy as np
from polystore.streaming import NapariStreamingBackend, ViewerNotRunningError
for i in range(3):
    with NapariStreamingBackend(sys.argv[1], connect_timeout=0.3) as gone:
        try:
            gone.save(np.zeros((4, 4), np.uint8), f"gone{i}.tif")
        except ViewerNotRunningError:
            continue
    sys.exit(f"gone{i}.tif was welcomed")
"""

_LATE_SENDER = """
import sys
import numpy as np
from polystore.streaming import NapariStreamingBackend
with NapariStreamingBackend(sys.argv[1], connect_timeout=20) as late:
    late.save(np.zeros((4, 4), np.uint8), "late.tif")
    late.flush()
    print("served", flush=True)
    sys.stdin.read()  # stays connected until the test is done
"""


def test_a_gone_sender_s_hello_read_after_a_live_sender_took_its_descriptor_takes_no_place():
    """The ordering behind the test above's rare failure, forced: while the receiver's thread
    is busy, senders say hello and leave, and a new sender's connection is accepted on a
    descriptor number one of theirs had. Their hellos are read after that, when the number
    no longer says their connection closed. Before: they took places (sessions nothing ended
    while the new connection lasted), and the new sender, or the next one, was refused
    ("serves at most 3 senders") with two connected. The senders run in other processes, so
    the receiver's accepts are the only descriptors taken here meanwhile."""
    def sender(code: str, endpoint: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code, endpoint], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    with open("/proc/net/tcp", "rb", buffering=0) as tcp, \
            _receiver_held_by_its_viewer() as (rx, busy, gate, seen):
        port = int(rx.endpoint.rsplit(":", 1)[1])
        late = nxt = None
        try:
            [busy_fd] = _accepted(tcp, port)
            gone, gone_fds = sender(_GONE_SENDERS, rx.endpoint), set()
            while gone.poll() is None:
                gone_fds.update(_accepted(tcp, port))
                time.sleep(0.02)
            assert gone.returncode == 0, gone.communicate()[1]
            gone_fds.discard(busy_fd)
            _wait_for(lambda: _accepted(tcp, port) == [busy_fd],
                      "the receiver to close the gone senders' connections")
            late = sender(_LATE_SENDER, rx.endpoint)
            _wait_for(lambda: len(_accepted(tcp, port)) == 2, "the late sender's connection")
            late_fd = (set(_accepted(tcp, port)) - {busy_fd}).pop()
            assert late_fd in gone_fds, "the ordering under test needs a reused descriptor"
            gate.set()  # only now are the gone senders' hellos read
            assert late.stdout.readline() == "served\n", late.communicate(timeout=30)[1]
            # busy, late and this one: the table's 3 places, whatever order the hellos took
            nxt = NapariStreamingBackend(rx.endpoint, connect_timeout=20)
            nxt.save(np.zeros((4, 4), np.uint8), "next.tif")
            nxt.flush()
            busy.save(np.zeros((4, 4), np.uint8), "busy.tif")
            busy.flush()
        finally:
            gate.set()
            if late is not None:
                late.communicate(timeout=30)  # closes its stdin: it leaves
            if nxt is not None:
                nxt.close()
    assert seen == ["hold.tif", "late.tif", "next.tif", "busy.tif"]


def test_idle_connection_flood_does_not_use_up_the_receiver_s_descriptors(figure):
    """1,100 idle TCP connections against a receiver limited to 1,024 descriptors: it keeps
    its descriptors far below the limit (old code: all used up, every accept failing), logs
    it, and serves a new sender once the flood is gone. During the flood, new connections
    wait for the idle ones' 5 s handshake window (docs/reliability.md, limits)."""
    import socket

    rx = ReceiverProcess(nofile=1024)
    idle = []
    try:
        host, port = rx.endpoint.removeprefix("tcp://").rsplit(":", 1)
        for _ in range(1100):
            conn = socket.socket()
            conn.connect((host, int(port)))
            idle.append(conn)
        time.sleep(2)
        descriptors = len(os.listdir(f"/proc/{rx.proc.pid}/fd"))
        figure("idle_connection_flood_receiver_descriptors", descriptors)
        assert descriptors < 512, f"{descriptors} descriptors open of 1,024"
        assert rx.alive()
        for conn in idle:
            conn.close()
        idle.clear()
        with NapariStreamingBackend(rx.endpoint, connect_timeout=15) as b:
            b.save(np.zeros((8, 8), np.uint8), "after-flood.tif")
            b.flush()
        assert rx.state()["frames"] == 1
    finally:
        for conn in idle:
            conn.close()
        log = rx.close()
    assert "connections open, the limit" in log


# -- 7: other accounts can neither steer a receiver nor pose as one ------------------------------

_CONTROL = """
endpoint = sys.argv[1]
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
time.sleep(0.3)
for seq, command in enumerate(["clear", "report"]):
    try:
        sock.send(json.dumps({"v": 1, "type": "control", "seq": seq,
                              "command": command}).encode(), zmq.NOBLOCK)
    except zmq.Again:
        pass
print("REPLIES", sum(1 for _ in range(2) if sock.poll(1500) and sock.recv()), flush=True)
"""


@needs_root
def test_another_account_can_neither_clear_nor_read_a_receiver(receiver):
    out = run_as_stranger(_CONTROL, receiver.endpoint)
    assert out.stdout.split() == ["REPLIES", "0"], out.stdout + out.stderr
    assert "clear" not in receiver.seen


_IMPOSTOR = """
port = int(sys.argv[1])
sock = zmq.Context.instance().socket(zmq.ROUTER)
sock.setsockopt(zmq.LINGER, 0)
sock.bind(f"tcp://127.0.0.1:{port}")
print("LISTENING", flush=True)
received, deadline = 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if sock.poll(100):
        received += len(sock.recv_multipart())
print("RECEIVED", received, flush=True)
"""


@needs_root
def test_another_account_binding_the_viewer_port_first_receives_nothing():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOME": "/tmp"}
    impostor = subprocess.Popen([sys.executable, "-c", _STRANGER_PREAMBLE + _IMPOSTOR, str(port),
                                 "12"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert impostor.stdout.readline().strip() == "LISTENING"
        # the impostor listens 12 s: the refusal must come from the failed handshake itself,
        # long before this sender's 60 s connect deadline
        b = NapariStreamingBackend(f"tcp://127.0.0.1:{port}", connect_timeout=60.0)
        started = time.monotonic()
        with pytest.raises(ViewerNotRunningError, match="authentication handshake"):
            b.save(np.full((8, 8), 7, np.uint8), "secret.tif")
        assert time.monotonic() - started < 10
        b.close()
        assert impostor.stdout.readline().split() == ["RECEIVED", "0"]
    finally:
        impostor.kill()
        impostor.wait()


# -- 8: the sweep does not take a live segment whose owner is in another pid namespace -----------

_NAMESPACED_SENDER = """
import os, sys
pid = int(sys.argv[1])
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
child = os.fork()
if child == 0:
    from polystore.streaming.shm import SegmentPool
    pool = SegmentPool("napari_", 1 << 20)
    segment = pool.acquire(0, 4096)
    print(os.getpid(), segment.name, flush=True)
    sys.stdin.readline()
    os._exit(0)  # dies without unlinking: an orphan once its lock is gone
os.waitpid(child, 0)
"""


def _pid_not_used_here() -> int:
    for pid in range(30000, 300, -7):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


@needs_root
def test_sweep_keeps_live_segments_of_a_sender_in_another_pid_namespace():
    from polystore.streaming import sweep

    pid = _pid_not_used_here()
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _NAMESPACED_SENDER,
         str(pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2:
        proc.kill()
        pytest.skip(f"cannot make a pid namespace here: {proc.stderr.read().strip()}")
    inner_pid, name = int(line[0]), line[1]
    try:
        assert inner_pid == pid and name.startswith(f"napari_{pid}_")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # from here, the owner looks dead...
        assert name not in [s.name for s in sweep(["napari_"])]
        assert os.path.exists(f"/dev/shm/{name}")  # ...but its lock says it is alive
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(30)
        assert name in [s.name for s in sweep(["napari_"])]  # now a true orphan
    finally:
        proc.kill()
        proc.wait()
        remove_segment(name)


# -- 10: shutdown does not discard acks already queued -------------------------------------------


def test_acks_queued_at_shutdown_still_reach_the_sender():
    """The receiver stops right after the last frame; the sender's flush must still see every
    ack (old code closed with linger 0 and lost some: about 1 run in 25)."""
    failures = 0
    for _ in range(30):
        state = {}

        def on_frame(item, state=state):
            if item.header.path.endswith("last.tif"):
                state["rx"].stop()  # from the receiver thread: exits right after this frame

        rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=on_frame)
        state["rx"] = rx.start()
        with NapariStreamingBackend(rx.endpoint) as b:
            for i in range(20):
                b.save(np.zeros((64, 64), np.uint16), f"f{i}.tif")
            b.save(np.zeros((64, 64), np.uint16), "last.tif")
            try:
                b.flush()
            except Exception:  # noqa: BLE001 - counted
                failures += 1
        rx.stop()
    assert failures == 0, f"{failures} of 30 flushes lost acks the receiver had queued"


# -- 11: a header that is not UTF-8 is bad_json ---------------------------------------------------


@pytest.mark.parametrize("header", [
    b'{"v": 1, "type": "hello", "sender": "\xff\xfe"}',
    b'{"v": 1, "type": "bye", "note": "\xc3"}',
    b"\xff{}",
])
def test_header_that_is_not_utf8_is_bad_json(receiver, header):
    peer = Peer(receiver.endpoint, "utf8test")
    try:
        reply = peer.request(header)
        assert reply.code == "bad_json", reply
    finally:
        peer.close()


# -- 12: names another account takes in /dev/shm first cannot stop a pipeline --------------------

_SQUAT = """
for name in sys.argv[1:]:  # the sticky bit on /dev/shm: the pipeline cannot remove these
    os.close(os.open("/dev/shm/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
"""


def squat(names: list[str]) -> None:
    """Another account creates `names` in /dev/shm (`remove_segment` them as root after)."""
    out = run_as_stranger(_SQUAT, *names)
    assert out.returncode == 0, out.stderr


def squatted_intact(names: list[str]) -> bool:
    """Each file is still the other account's, empty: never opened, reused nor removed."""
    infos = [os.stat(f"/dev/shm/{name}") for name in names]
    return all(st.st_uid == STRANGER_UID and st.st_size == 0 for st in infos)


def save_until_delivered(b, frame: np.ndarray, path: str) -> None:
    """save(); the first save after a receiver restart may report the loss, the next one
    handshakes again (`ReceiverLostError`: 'The next save reconnects')."""
    from polystore.streaming import ReceiverLostError

    for _ in range(3):
        try:
            b.save(frame, path)
            b.flush()
            return
        except ReceiverLostError:
            continue
    b.save(frame, path)
    b.flush()


@needs_root
def test_segment_names_taken_by_another_account_do_not_stop_saves():
    """The next names `<prefix>1`, `<prefix>2`, ... are visible and guessable: another
    account creating them first made every later save raise FileExistsError."""
    seen = []
    squatted: list[str] = []
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append) as rx:
        b = NapariStreamingBackend(rx.endpoint, connect_timeout=5)
        try:
            b.save(np.full((64, 64), 1, np.uint16), "t0.tif")
            b.flush()
            prefix = b.sender.pool.prefix
            squatted = [f"{prefix}{n}" for n in range(1, 50)]
            squat(squatted)
            for i, side in enumerate([128, 256, 512], start=1):  # each needs a new segment
                b.save(np.full((side, side), i + 1, np.uint16), f"t{i}.tif")
                b.flush()
            made = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
            assert squatted_intact(squatted)
        finally:
            b.close()
            for name in squatted:
                remove_segment(name)
    assert [f.header.path for f in seen] == ["t0.tif", "t1.tif", "t2.tif", "t3.tif"]
    assert [int(f.array[0, 0]) for f in seen] == [1, 2, 3, 4]
    assert all(f.header.segment and f.header.segment.startswith(prefix) for f in seen)
    assert not {f.header.segment for f in seen[1:]} & set(squatted)
    assert len(set(made) - set(squatted)) >= 2  # the pipeline's own, named unpredictably


@needs_root
def test_probe_name_taken_by_another_account_does_not_stop_the_handshake():
    """The receiver insists on `<prefix>probe`; another account creating it first (before
    the first handshake, or before one after a receiver restart) made every handshake
    raise FileExistsError. The sender now handshakes under a fresh, unpredictable prefix."""
    seen = []
    squatted: list[str] = []
    rx = receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append).start()
    b = NapariStreamingBackend(rx.endpoint, connect_timeout=5)
    try:
        first = b.sender.pool.prefix
        squatted += [first + "probe", first + "0"]
        squat(squatted)
        b.save(np.full((64, 64), 1, np.uint8), "t0.tif")
        b.flush()
        second = b.sender.pool.prefix
        assert second != first
        squatted += [second + "probe"] + [f"{second}{n}" for n in range(1, 10)]
        squat(squatted[2:])
        rx.stop()
        rx = receiver_for(NapariStreamingBackend, rx.endpoint, on_frame=seen.append).start()
        save_until_delivered(b, np.full((64, 64), 2, np.uint8), "t1.tif")
        b.save(np.full((512, 512), 3, np.uint8), "t2.tif")  # a new segment after the restart
        b.flush()
        third = b.sender.pool.prefix
        assert squatted_intact(squatted)
    finally:
        b.close()
        rx.stop()
        for name in squatted:
            remove_segment(name)
    assert third not in (first, second)
    assert [f.header.path for f in seen] == ["t0.tif", "t1.tif", "t2.tif"]
    assert [int(f.array[0, 0]) for f in seen] == [1, 2, 3]
    assert seen[0].header.segment.startswith(second)  # by shared memory: the probe passed
    assert all(f.header.segment.startswith(third) for f in seen[1:])
    assert seen[-1].sender == third.split("_")[2]


@needs_root
def test_every_name_taken_is_an_oserror_saying_what_to_do(monkeypatch):
    """Bounded retries: when even the fresh names are taken (here: made predictable), the
    sender raises an OSError naming the cause and the remedies, and leaves nothing behind."""
    from types import SimpleNamespace

    from polystore.streaming import shm

    monkeypatch.setattr(shm, "secrets", SimpleNamespace(token_hex=lambda n: "ab" * n))
    pid = os.getpid()
    squatted = [f"napari_{pid}_{'ab' * 4}_probe", f"napari_{pid}_{'ab' * 8}_probe",
                f"napari_{pid}_{'ab' * 4}_0", f"napari_{pid}_{'ab' * 4}_{'ab' * 8}"]
    squat(squatted)
    try:
        b = NapariStreamingBackend("tcp://127.0.0.1:9", connect_timeout=0.5)
        with pytest.raises(OSError, match=r"probe.*taken by another process.*transport='inline'"):
            b.save(np.zeros((8, 8), np.uint8), "x.tif")
        b.close()
        pool = shm.SegmentPool("napari_", 1 << 20)
        with pytest.raises(OSError, match=r"taken by another process.*transport='inline'"):
            pool.acquire(0, 4096)
        pool.close()
        assert squatted_intact(squatted)
    finally:
        for name in squatted:
            remove_segment(name)


def test_an_empty_frame_numpy_cannot_shape_is_acknowledged_like_any_empty_frame():
    """shape [0, 2**31-1, 2**31-1] float64 with nbytes 0 is a valid empty frame, which Fiji
    acknowledges (docs/protocol.md: empty arrays are acknowledged), but NumPy cannot make
    such an array: the receiver answered `internal` and logged a traceback for each one."""
    got = []
    rx = receiver_for(NapariStreamingBackend, free_endpoint(), on_frame=got.append).start()
    peer = Peer(rx.endpoint, "emptybig")
    try:
        assert isinstance(peer.hello(probe=False), p.Welcome)
        header = {"v": 1, "type": "frame", "seq": 1, "stream": "s", "path": "s.tif",
                  "shape": [0, 2**31 - 1, 2**31 - 1], "dtype": "float64", "nbytes": 0,
                  "sent_ns": 0}
        assert isinstance(peer.request(header, b""), p.Ack)
        assert isinstance(peer.request({**header, "seq": 2, "shape": [0, 5]}, b""), p.Ack)
        assert rx.stats.rejected == 0
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:  # shown right after the ack
            time.sleep(0.01)
        assert [(f.array.size, f.header.shape) for f in got] == [
            (0, [0, 2**31 - 1, 2**31 - 1]), (0, [0, 5])]
    finally:
        peer.close()
        rx.stop()
