"""Where a receiver may listen: loopback unless the user asks for more."""

from __future__ import annotations

import ipaddress
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
