"""Helpers for tests/test_fiji.py and scripts/bench_fiji.py: run the Fiji receiver script
headless (viewers/fiji/run_headless.sh: Debian's ImageJ + JeroMQ + Groovy, the same script Fiji
runs), talk raw protocol to it, and read back the TIFFs it saves."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
FIJI_DIR = ROOT / "viewers" / "fiji"
SCRIPT = FIJI_DIR / "polystore_receiver.groovy"
LAUNCHER = FIJI_DIR / "run_headless.sh"
IJ_JAR = Path(os.environ.get("IJ_JAR", "/usr/share/java/ij.jar"))
JEROMQ_JAR = Path(os.environ.get("JEROMQ_JAR", "/usr/share/java/jeromq.jar"))


def missing_requirements() -> str | None:
    """Why the headless receiver cannot run here, or None if it can."""
    if shutil.which("groovy") is None:
        return "groovy is not installed (scripts/install.sh installs it)"
    for jar in (IJ_JAR, JEROMQ_JAR):
        if not jar.is_file():
            return f"{jar} is missing (scripts/install.sh installs libij-java and libjeromq-java)"
    if not Path("/dev/shm").is_dir():
        return "no /dev/shm on this system"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fiji_args(**params) -> str:
    """Parameters the way Fiji's `--run script 'key="value",...'` takes them."""
    parts = []
    for key, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        parts.append(f'{key}="{value}"')
    return ",".join(parts)


@dataclass
class FijiReceiver:
    """A running headless receiver process; `lines` collects its stdout and stderr."""

    proc: subprocess.Popen
    endpoint: str
    output_dir: Path | None
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    pump: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 15.0) -> int:
        """Close its stdin (it was started with stop_on_stdin_eof) and wait for a clean exit."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the process to end (killing it after `timeout`) and for its last output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.pump is not None:
            self.pump.join(5)
        return self.proc.returncode


def start_receiver(
    output_dir: Path | None = None,
    *,
    endpoint: str | None = None,
    wait: bool = True,
    timeout: float = 60.0,
    gui: bool = False,
    **params,
) -> FijiReceiver:
    """Start viewers/fiji/run_headless.sh; with `wait`, return once it listens (or raise).
    `gui=True` runs it with ImageJ's GUI on a virtual display (xvfb-run)."""
    endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
    args = dict(endpoint=endpoint, stop_on_stdin_eof=True, **params)
    if output_dir is not None:
        args["output_dir"] = str(output_dir)
    command = [str(LAUNCHER), fiji_args(**args)]
    env = dict(os.environ)
    if gui:
        command = ["xvfb-run", "-a", *command]
        env["POLYSTORE_FIJI_GUI"] = "1"
    proc = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    receiver = FijiReceiver(proc, endpoint, output_dir)

    def pump() -> None:
        for line in proc.stdout:
            receiver.lines.append(line.rstrip("\n"))
            if "listening on" in line:
                receiver.ready.set()
        receiver.ready.set()  # ended: unblock waiters

    receiver.pump = threading.Thread(target=pump, daemon=True)
    receiver.pump.start()
    if wait:
        if not receiver.ready.wait(timeout) or proc.poll() is not None:
            receiver.stop(5)
            raise RuntimeError(f"the Fiji receiver did not start:\n{receiver.log}")
    return receiver


class RawClient:
    """A DEALER socket speaking raw protocol v1, for messages no well-behaved sender makes."""

    def __init__(self, endpoint: str, prefix: str = "fiji_") -> None:
        self.token = secrets.token_hex(4)
        self.pid = os.getpid()
        self.prefix = f"{prefix}{self.pid}_{self.token}_"
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, self.token.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seq = 0

    def close(self) -> None:
        try:
            self.sock.send(json.dumps({"v": 1, "type": "bye"}).encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(linger=100)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *parts: bytes | dict) -> None:
        data = [json.dumps(p).encode() if isinstance(p, dict) else p for p in parts]
        self.sock.send_multipart(data)

    def recv(self, timeout: float = 5.0) -> dict:
        if not self.sock.poll(timeout * 1000):
            raise TimeoutError("no reply from the receiver")
        return json.loads(self.sock.recv())

    def request(self, *parts: bytes | dict, timeout: float = 5.0) -> dict:
        self.send(*parts)
        return self.recv(timeout)

    def hello(self, **override) -> dict:
        """An honest hello, with the shared-memory probe that lets frames name segments."""
        probe = self.prefix + "probe"
        message = {
            "v": 1, "type": "hello", "sender": self.token, "pid": self.pid, "viewer": "fiji",
            "segment_prefix": self.prefix, "versions": [1],
            "probe": {"segment": probe, "token": "rawprobe"},
        }  # fmt: skip
        message.update(override)
        fd = os.open(f"/dev/shm/{probe}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, 4096)
            os.pwrite(fd, b"rawprobe", 0)
            return self.request(message)
        finally:
            os.close(fd)
            os.unlink(f"/dev/shm/{probe}")

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def frame(self, **override) -> dict:
        """A valid inline 2x3 uint8 frame header; `override` breaks it."""
        message = {
            "v": 1, "type": "frame", "seq": self.next_seq(), "stream": "raw", "path": "raw.tif",
            "shape": [2, 3], "dtype": "uint8", "nbytes": 6, "sent_ns": time.time_ns(),
            "segment": None,
        }  # fmt: skip
        message.update(override)
        return message


def read_tiff(path: str | Path):
    """(array, axes, imagej metadata) of a TIFF the receiver saved."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return series.asarray(), series.axes, tif.imagej_metadata or {}


ROI_TYPES = {0: "polygon", 1: "rectangle", 2: "ellipse", 3: "line", 10: "point"}


def roi_summary(data: bytes) -> dict:
    """Type, integer bounds and hyperstack position of one ImageJ .roi record (the format
    ImageJ writes into a TIFF's overlay; see ij.io.RoiDecoder)."""
    import struct

    assert data[:4] == b"Iout", data[:4]
    kind = ROI_TYPES.get(data[6], data[6])
    top, left, bottom, right = struct.unpack(">hhhh", data[8:16])
    header2 = struct.unpack(">i", data[60:64])[0]
    c, z, t = struct.unpack(">iii", data[header2 + 4 : header2 + 16]) if header2 else (0, 0, 0)
    return {"kind": kind, "bounds": (left, top, right, bottom), "position": (c, z, t)}


def image(state: dict, title: str) -> dict:
    """The report entry of the image titled `title`."""
    for entry in state["images"]:
        if entry["title"] == title:
            return entry
    titles = [i["title"] for i in state["images"]]
    raise KeyError(f"no image {title!r} in the report; have {titles}")


# -- GUI: closing a window the way a user does (the window manager's close button) ---------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def x_display(receiver: FijiReceiver) -> tuple[str, str | None]:
    """DISPLAY and XAUTHORITY of a receiver started with gui=True (xvfb-run picks them)."""
    for pid in _descendants(receiver.proc.pid):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
        if b"java" in cmdline and "DISPLAY" in env:
            return env["DISPLAY"], env.get("XAUTHORITY")
    raise RuntimeError("the receiver's JVM and its DISPLAY were not found")


class _XClientMessageEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
        ("display", ctypes.c_void_p), ("window", ctypes.c_ulong),
        ("message_type", ctypes.c_ulong), ("format", ctypes.c_int), ("l", ctypes.c_long * 5),
    ]  # fmt: skip


class _XEvent(ctypes.Union):
    _fields_ = [("xclient", _XClientMessageEvent), ("pad", ctypes.c_long * 24)]


def x_windows(receiver: FijiReceiver, title: str) -> list[int]:
    """The receiver's top-level X windows titled `title` (its gui=True display)."""
    display, xauthority = x_display(receiver)
    env = dict(os.environ, DISPLAY=display)
    if xauthority:
        env["XAUTHORITY"] = xauthority
    tree = subprocess.run(["xwininfo", "-root", "-children"], env=env, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    return [int(m.group(1), 16) for m in re.finditer(r'^\s+(0x[0-9a-f]+) "(.*)": \(', tree, re.M)
            if m.group(2) == title]  # fmt: skip


def x_close_window(receiver: FijiReceiver, title: str, timeout: float = 20.0) -> int:
    """Send WM_DELETE_WINDOW to the receiver's top-level windows titled `title`, as a window
    manager does when the user clicks a window's close button, and wait until they are gone.
    Returns how many there were."""
    display, xauthority = x_display(receiver)
    windows = x_windows(receiver, title)
    libx11 = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
    libx11.XOpenDisplay.restype = ctypes.c_void_p
    libx11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    libx11.XInternAtom.restype = ctypes.c_ulong
    libx11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    libx11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                                  ctypes.POINTER(_XEvent)]  # fmt: skip
    libx11.XFlush.argtypes = libx11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    saved = os.environ.get("XAUTHORITY")
    if xauthority:  # Xlib reads it from the environment when it connects
        os.environ["XAUTHORITY"] = xauthority
    try:
        dpy = libx11.XOpenDisplay(display.encode())
    finally:
        if saved is None:
            os.environ.pop("XAUTHORITY", None)
        else:
            os.environ["XAUTHORITY"] = saved
    if not dpy:
        raise RuntimeError(f"cannot open display {display}")
    try:
        for window in windows:
            event = _XEvent()
            event.xclient.type = 33  # ClientMessage
            event.xclient.window = window
            event.xclient.message_type = libx11.XInternAtom(dpy, b"WM_PROTOCOLS", 0)
            event.xclient.format = 32
            event.xclient.l[0] = libx11.XInternAtom(dpy, b"WM_DELETE_WINDOW", 0)
            libx11.XSendEvent(dpy, window, 0, 0, ctypes.byref(event))
        libx11.XFlush(dpy)
    finally:
        libx11.XCloseDisplay(dpy)
    deadline = time.monotonic() + timeout
    while windows and x_windows(receiver, title):
        if time.monotonic() > deadline:
            raise TimeoutError(f"window {title!r} did not close")
        time.sleep(0.05)
    return len(windows)
