"""CURVE keys for receivers that listen beyond loopback.

A viewer machine makes one key pair (`create_keys`), keeps the secret file, and gives the
public file (or its 40-character text) to the pipeline machines. Files use ZeroMQ's
certificate format (`zmq.auth`), so other ZeroMQ tools can read them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import zmq.auth


def create_keys(directory: str | Path, name: str = "viewer") -> tuple[Path, Path]:
    """Write ``<name>.key`` (public: share it) and ``<name>.key_secret`` (keep it) into
    `directory`; refuse to overwrite existing keys. Both files are written in a private
    (0700) folder beside them, then copied into files created with their final mode, so the
    secret is never readable by others, not even for an instant; a failure leaves neither."""
    directory = Path(directory)
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"key name {name!r} must be a plain file name: not empty, no path "
                         "separators, not starting with '.'")
    if len(os.fsencode(f"{name}.key_secret")) > 255:
        raise ValueError(f"a key name of {len(os.fsencode(name))} bytes is too long: "
                         "<name>.key_secret must fit in 255 bytes, the longest file name; "
                         "choose a shorter name")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; keys go into a folder: give a "
                                 "folder's path (it is made if missing)")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it or choose another directory/name")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".polystore-keys-") as private:
        made_public, made_secret = zmq.auth.create_certificates(private, name)
        written: list[Path] = []
        try:
            for made, final, mode in ((made_secret, secret, 0o600), (made_public, public, 0o644)):
                # O_EXCL: never replaces a file another process made meanwhile
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                written.append(final)
                with open(fd, "wb") as out:
                    out.write(Path(made).read_bytes())
                os.chmod(final, mode)  # whatever the umask took away from the public file
        except BaseException:
            for final in written:
                final.unlink(missing_ok=True)
            raise
    return public, secret


def public_key(key: str | bytes | Path) -> bytes:
    """A server's public key from its 40-character Z85 text or a certificate file."""
    return _load(key, secret=False)


def secret_key(key: str | bytes | Path) -> bytes:
    """A server's secret key from its 40-character Z85 text or its ``.key_secret`` file."""
    return _load(key, secret=True)


def _load(key: str | bytes | Path, *, secret: bool) -> bytes:
    if isinstance(key, bytes) and len(key) == 40:
        return key
    if isinstance(key, str) and len(key) == 40 and not Path(key).exists():
        return key.encode()
    path = Path(key if not isinstance(key, bytes) else key.decode())
    if not path.is_file():
        raise ValueError(f"{path} is neither a 40-character Z85 CURVE key nor a key file "
                         "(make one with `polystore keys DIR`)")
    public, private = zmq.auth.load_certificate(str(path))
    if secret:
        if private is None:
            raise ValueError(f"{path} holds no secret key; use the .key_secret file")
        return private
    return public
