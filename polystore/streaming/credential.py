"""The user's streaming credential: a CURVE key pair only this account can read.

Like a Jupyter kernel connection file, the file is the trust boundary between accounts on a
shared machine: a process that can read it is the user (or root); anyone else can neither
send to the user's receivers nor pose as one (docs/protocol.md, "Handshake and
authentication"). It lives at ``$POLYSTORE_CREDENTIAL`` if set, else
``${XDG_CONFIG_HOME:-~/.config}/polystore/credential.json``, and is made on first use.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

CREDENTIAL_VERSION = 1
_MAX_BYTES = 4096


class CredentialError(RuntimeError):
    """The credential file is unsafe or unreadable; the message says how to fix it."""


@dataclass(frozen=True)
class Credential:
    """The user's key pair (Z85 text, 40 characters each) and where it was read from."""

    curve_public: bytes
    curve_secret: bytes
    path: Path


def credential_path() -> Path:
    """``$POLYSTORE_CREDENTIAL``, else the XDG config directory's polystore/credential.json."""
    explicit = os.environ.get("POLYSTORE_CREDENTIAL")
    if explicit:
        return Path(explicit)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "polystore" / "credential.json"


def load_credential(path: str | Path | None = None, *, create: bool = True) -> Credential:
    """Read the credential, creating it first if it does not exist (and `create`).

    Raises `CredentialError` if the file is a link, not a regular file, owned by another
    user, readable or writable by group/others, or not a valid credential.
    """
    path = Path(path) if path is not None else credential_path()
    if create and not os.path.lexists(path):
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    """Write a fresh key pair atomically; if another process wins the race, keep its file."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    content = json.dumps({"version": CREDENTIAL_VERSION, "curve_public": public.decode(),
                          "curve_secret": secret.decode()}).encode()
    temporary = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # never overwrites: a concurrent creator's file stays
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _read(path: Path) -> Credential:
    fix = f"run `chmod 600 {path}` (and make sure it is your own regular file), or delete it " \
          "to have a new one made"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise CredentialError(f"no polystore credential at {path}") from None
    except OSError as exc:
        if os.path.islink(path):
            raise CredentialError(f"polystore credential {path} is a symbolic link; "
                                  f"replace it with a regular file: {fix}") from None
        raise CredentialError(f"cannot read polystore credential {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"polystore credential {path} is not a regular file; {fix}")
        if st.st_uid != os.getuid():
            raise CredentialError(
                f"polystore credential {path} belongs to uid {st.st_uid}, not to you "
                f"(uid {os.getuid()}); delete it, or set POLYSTORE_CREDENTIAL to a file of yours"
            )
        if st.st_mode & 0o077:
            raise CredentialError(
                f"polystore credential {path} has mode {stat.S_IMODE(st.st_mode):o}: other "
                f"accounts may read it, so it no longer proves who you are. {fix}"
            )
        data = os.read(fd, _MAX_BYTES + 1)
    finally:
        os.close(fd)
    return _parse(data, path)


def _parse(data: bytes, path: Path) -> Credential:
    broken = f"polystore credential {path} is damaged; delete it to have a new one made"
    try:
        content = json.loads(data)
        version, public, secret = (content["version"], content["curve_public"],
                                   content["curve_secret"])
    except (ValueError, KeyError, TypeError):
        raise CredentialError(broken) from None
    if version != CREDENTIAL_VERSION:
        raise CredentialError(f"polystore credential {path} has version {version!r}; this "
                              f"polystore reads version {CREDENTIAL_VERSION}. Upgrade polystore")
    if not (isinstance(public, str) and isinstance(secret, str)
            and len(public) == 40 and len(secret) == 40):
        raise CredentialError(broken)
    try:
        matches = zmq.curve_public(secret.encode()) == public.encode()
    except (zmq.ZMQError, ValueError):
        matches = False
    if not matches:
        raise CredentialError(broken)
    return Credential(public.encode(), secret.encode(), path)
