"""Where a receiver may listen: loopback unless the user asks for more."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def is_loopback(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = parts.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_endpoint(endpoint: str, allow_remote: bool) -> str:
    """Refuse to listen beyond loopback unless asked; ``:0`` means any free port."""
    parts = urlsplit(endpoint)
    if parts.scheme == "ipc" or parts.scheme == "inproc":
        return endpoint
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"endpoint must look like tcp://127.0.0.1:PORT, got {endpoint!r}")
    host = parts.hostname
    if not is_loopback(endpoint) and not allow_remote:
        raise ValueError(
            f"refusing to listen on {host}: that exposes the receiver beyond this machine. "
            "Pass allow_remote=True (and CURVE keys, see docs/streaming.md) to do it on purpose"
        )
    if endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    return endpoint


def ipc_in_use(endpoint: str) -> bool:
    """True if something listens on the Unix socket of an ``ipc://`` endpoint. ZeroMQ binds
    an ipc path by replacing whatever socket file is there, so a second receiver on the same
    path would silently take it from the first (TCP refuses a port in use instead). A file
    left by a receiver that died accepts nothing: False, and the bind replaces it."""
    if not endpoint.startswith("ipc://") or endpoint == "ipc://*":
        return False
    path = endpoint[len("ipc://"):]
    if path.startswith("@"):  # Linux's abstract namespace, as ZeroMQ spells it
        path = "\0" + path[1:]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:  # no such file, not a socket, nobody listening: free to bind
        return False
    finally:
        probe.close()
    return True
