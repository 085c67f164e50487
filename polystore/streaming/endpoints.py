"""Where a receiver may listen: loopback unless the user asks for more."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import stat
import time
from collections.abc import Iterator
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
    if parts.scheme == "ipc":
        return endpoint
    if parts.scheme == "inproc":
        raise ValueError(f"cannot listen on {endpoint}: inproc:// reaches only sockets of one "
                         "ZeroMQ context, and a receiver has its own. Use tcp://127.0.0.1:PORT "
                         "or, for napari on this machine, ipc://PATH")
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"endpoint must look like tcp://127.0.0.1:PORT, got {endpoint!r}")
    host = parts.hostname
    if not is_loopback(endpoint) and not allow_remote:
        raise ValueError(
            f"refusing to listen on {host}: that exposes the receiver beyond this machine. "
            "Pass allow_remote=True (`polystore napari --allow-remote`) and CURVE keys (see "
            "docs/streaming.md, Security) to do it on purpose"
        )
    check_listen_port(endpoint)
    if endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    return endpoint


def _host_and_port(endpoint: str) -> tuple[str, str]:
    """``tcp://HOST:PORT`` -> (HOST, PORT); PORT is "" when there is none."""
    host, colon, port = endpoint[len("tcp://"):].rpartition(":")
    if not colon or port.endswith("]"):  # none, or the end of an IPv6 address
        return endpoint[len("tcp://"):], ""
    return host, port


def wants_ipv6(endpoint: str) -> bool:
    """``tcp://[::1]:PORT``: ZeroMQ (and JeroMQ) sockets speak IPv4 unless told."""
    return endpoint.startswith("tcp://[")


def check_listen_port(endpoint: str) -> None:
    """Refuse a ``tcp://`` port out of range: ZeroMQ takes it modulo 65536 without a word, so
    ``:99999`` would listen on port 34463. ``:0`` or ``:*`` asks for any free port."""
    port = _host_and_port(endpoint)[1]
    if port != "*" and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"endpoint {endpoint!r} needs a TCP port from 0 to 65535 (0 or * for "
                         "any free one)" + (f", got {port!r}" if port else ", and it names none")
                         + "; e.g. tcp://127.0.0.1:5555")


def check_connect_endpoint(endpoint: object, source: str | bool = "") -> str:
    """Raise ValueError unless a sender can connect to `endpoint` (``tcp://HOST:PORT`` or
    ``ipc://PATH``): checked when a backend is made, not left to ZeroMQ's "Invalid argument"
    at the first save (or to its port taken modulo 65536). `source` names where the
    endpoint came from (an environment variable), if not from the caller."""
    problem = ""
    if not isinstance(endpoint, str):
        problem = f"it is a {type(endpoint).__name__}, not a str"
    elif endpoint.startswith("tcp://"):
        host, port = _host_and_port(endpoint)
        if host in ("", "*") or not (port.isascii() and port.isdigit()):
            problem = "a tcp:// endpoint needs a host and a port number"
        elif not 1 <= int(port) <= 65535:
            problem = (f"its port {port} is not from 1 to 65535 (a sender connects to one "
                       "receiver's port: port 0 means 'any free port' only when listening; a "
                       "larger number ZeroMQ would take modulo 65536, another port)")
    elif endpoint.startswith("ipc://"):
        if endpoint in ("ipc://", "ipc://*", "ipc://@"):
            problem = "an ipc:// endpoint needs the path the receiver listens on"
    elif endpoint.startswith("inproc://"):
        problem = "no receiver can listen on inproc:// (it reaches one ZeroMQ context only)"
    else:
        problem = "the transport must be tcp:// or ipc://"
    if problem:
        where = f" (from {source})" if source else ""
        raise ValueError(f"cannot stream to endpoint {endpoint!r}{where}: {problem}. Use "
                         "tcp://HOST:PORT (e.g. tcp://127.0.0.1:55555) or ipc://PATH, the "
                         "endpoint the receiver listens on")
    return endpoint


def _check_ipc_path(endpoint: str, path: str) -> None:
    """Raise OSError unless an ``ipc://`` endpoint's `path` is free for a receiver. ZeroMQ
    binds an ipc path by deleting whatever file is there: a second receiver would silently
    take the path (and its senders) from the first, where TCP refuses a port in use, and a
    user's file of that name would be lost. A socket left by a receiver that died accepts
    nothing, and a symbolic link is replaced, not followed: the bind may reuse either."""
    if path.startswith("@"):  # Linux's abstract namespace, as ZeroMQ spells it
        path = "\0" + path[1:]
    else:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = None  # nothing there (or unreachable: the bind will say why)
        if mode is not None and not (stat.S_ISSOCK(mode) or stat.S_ISLNK(mode)):
            raise OSError(f"cannot listen on {endpoint}: {path} exists and is "
                          "not a socket, and listening there would delete it. Choose another "
                          "path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (BlockingIOError, TimeoutError):
        pass  # a full backlog (EAGAIN), or a connect that waited in vain: someone listens
    except OSError as exc:
        if exc.errno != errno.EPROTOTYPE:
            return  # refused or missing: nobody listens there (a path too long: the bind says)
        # a datagram or seqpacket socket another program has bound: the bind would delete it
        raise OSError(f"cannot listen on {endpoint}: another program's socket (not a "
                      "stream socket) is bound there, and listening would take it from that "
                      "program. Choose another path") from None
    finally:
        probe.close()
    raise OSError(f"cannot listen on {endpoint}: another receiver (or program) is listening "
                  "there. Stop it or choose another path")


#: How long a receiver waits for another one's check and bind on the same directory.
IPC_LOCK_WAIT_S = 2.0


@contextlib.contextmanager
def claim_ipc_path(endpoint: str) -> Iterator[None]:
    """Bind an ``ipc://`` endpoint inside this block: its path is checked free first
    (`_check_ipc_path`, OSError if not), under an exclusive lock on its directory, so that
    two receivers starting there at once cannot both find it free and the second bind take
    the path from the first. A directory needs no lock file of its own; one this user cannot
    open is not locked (the bind says why). Any account may lock a directory it can read
    (/tmp): a lock held longer than IPC_LOCK_WAIT_S is not waited for, so nobody can keep a
    receiver from starting. Other endpoints pass through."""
    path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else "*"
    if path == "*":  # not ipc://, or a path ZeroMQ picks itself
        yield
        return
    directory = None
    if not path.startswith("@"):  # abstract names have none: the kernel refuses a second
        with contextlib.suppress(OSError):
            directory = os.open(os.path.dirname(os.path.abspath(path)),
                                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + IPC_LOCK_WAIT_S
        while directory is not None:
            try:
                fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # held by someone else for longer than any start: go on without
                time.sleep(0.005)
        _check_ipc_path(endpoint, path)
        yield
    finally:
        if directory is not None:
            os.close(directory)  # and with it the lock


def ipc_socket_file(endpoint: str) -> tuple[str, int, int] | None:
    """(path, device, inode) of the socket file a receiver bound at an ``ipc://`` path, for
    `remove_ipc_socket_file`; None for other endpoints (and abstract ``ipc://@names``)."""
    path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else "@"
    if path.startswith("@"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, st.st_dev, st.st_ino


def remove_ipc_socket_file(bound: tuple[str, int, int] | None) -> None:
    """Remove the socket file a stopped receiver leaves behind (ZeroMQ does not), unless the
    path now holds another file (a receiver started there since)."""
    if bound is None:
        return
    path, dev, ino = bound
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
