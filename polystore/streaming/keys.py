"""CURVE keys for receivers that listen beyond loopback.

A viewer machine makes one key pair (`create_keys`), keeps the secret file, and gives the
public file (or its 40-character text) to the pipeline machines. Files use ZeroMQ's
certificate format (`zmq.auth`), so other ZeroMQ tools can read them.
"""

from __future__ import annotations

from pathlib import Path

import zmq.auth


def create_keys(directory: str | Path, name: str = "viewer") -> tuple[Path, Path]:
    """Write ``<name>.key`` (public: share it) and ``<name>.key_secret`` (keep it) into
    `directory`; refuse to overwrite existing keys."""
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it or choose another directory/name")
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


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
