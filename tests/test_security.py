"""Issue 11: another account on the machine can neither hang, crash, read nor steer a receiver.

Attacks run for real: a second account (a `setuid` subprocess; CI runs as root), FIFOs and
truncated segments in /dev/shm, floods of connections and parts, a full tmpfs, pid namespaces.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from polystore.streaming import NapariStreamingBackend, ViewerNotRunningError, receiver_for
from polystore.streaming.credential import CredentialError, credential_path, load_credential

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
        assert [f.header.path for f in seen] == ["mine.tif"]
        assert rx.stats.rejected == 0  # nothing of the stranger's got as far as a message


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
        b = NapariStreamingBackend(endpoint, connect_timeout=1.0)
        with pytest.raises(ViewerNotRunningError, match="authentication handshake"):
            b.save(np.ones((8, 8), np.uint8), "secret.tif")
        b.close()
        impostor.stdin.write("\n")
        impostor.stdin.flush()
        assert impostor.stdout.readline().split() == ["FRAMES", "0", "0"]
    finally:
        impostor.kill()
        impostor.wait()


def test_auth_none_on_both_sides_still_works(monkeypatch):
    """The documented opt-out for Fiji on JeroMQ 0.3."""
    monkeypatch.setenv("POLYSTORE_AUTH", "none")
    seen = []
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", on_frame=seen.append) as rx:
        with NapariStreamingBackend(rx.endpoint) as b:
            b.save(np.ones((4, 4), np.uint8), "open.tif")
            b.flush()
    assert len(seen) == 1


def test_user_sender_refuses_an_unauthenticated_receiver():
    """auth='user' never falls back to talking to a receiver that cannot prove itself."""
    with receiver_for(NapariStreamingBackend, "tcp://127.0.0.1:0", auth="none") as rx:
        start = time.monotonic()
        b = NapariStreamingBackend(rx.endpoint, connect_timeout=1.0)
        with pytest.raises(ViewerNotRunningError, match="auth='none'"):
            b.save(np.ones((4, 4), np.uint8), "x.tif")
        b.close()
        assert time.monotonic() - start < 10
        assert rx.stats.frames == 0
