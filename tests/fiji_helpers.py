"""Helpers for tests/test_fiji.py and scripts/bench_fiji.py: run the Fiji receiver script
headless (viewers/fiji/run_headless.sh: Debian's ImageJ + JeroMQ + Groovy, the same script Fiji
runs), talk raw protocol to it, and read back the TIFFs it saves."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from polystore.testing.receiver import RawClient as _RawClient
from polystore.testing.receiver import user_curve

ROOT = Path(__file__).resolve().parents[1]
FIJI_DIR = ROOT / "viewers" / "fiji"
SCRIPT = FIJI_DIR / "polystore_receiver.groovy"
LAUNCHER = FIJI_DIR / "run_headless.sh"
IJ_JAR = Path(os.environ.get("IJ_JAR", "/usr/share/java/ij.jar"))
VENDOR = Path(os.environ.get("POLYSTORE_VENDOR", ROOT.parent / "shared" / "vendor"))
_CACHE_HOME: Path | None = None


def cache_home() -> Path:
    """XDG_CACHE_HOME of the receivers this process starts (the script's compile cache is
    <it>/polystore/fiji): one temporary folder per process, never the user's ~/.cache."""
    global _CACHE_HOME
    if _CACHE_HOME is None:
        _CACHE_HOME = Path(tempfile.mkdtemp(prefix="polystore-fiji-cache-"))
        atexit.register(shutil.rmtree, _CACHE_HOME, True)
    return _CACHE_HOME


@dataclass(frozen=True)
class Stack:
    """A Groovy + JeroMQ + Java combination the script runs on (run_headless.sh's variables)."""

    name: str
    jeromq_jar: Path
    groovy_jars: tuple[Path, ...] = ()  # empty: Debian's `groovy` command
    java_home: Path | None = None
    curve: bool = True  # JeroMQ >= 0.5: senders authenticate (JeroMQ 0.3 has no CURVE)

    def env(self) -> dict[str, str]:
        env = {"JEROMQ_JAR": str(self.jeromq_jar)}
        if self.groovy_jars:
            env["GROOVY_JARS"] = ":".join(str(j) for j in self.groovy_jars)
        if self.java_home is not None:
            env["JAVA_HOME"] = str(self.java_home)
        return env

    def missing(self) -> str | None:
        """Why this stack cannot run here, or None if it can."""
        if not self.groovy_jars and shutil.which("groovy") is None:
            return "groovy is not installed (scripts/install.sh installs it)"
        for jar in (IJ_JAR, self.jeromq_jar, *self.groovy_jars):
            if not jar.is_file():
                return f"{jar} is missing ({self.name} stack; see scripts/install.sh)"
        if self.java_home is not None and not (self.java_home / "bin" / "java").is_file():
            return f"no Java at {self.java_home}"
        if not Path("/dev/shm").is_dir():
            return "no /dev/shm on this system"
        return None


def _modern_java() -> Path | None:
    """The newest JDK here that Groovy 4 runs on (Fiji ships Java 21; 17 stands in)."""
    if "POLYSTORE_MODERN_JAVA_HOME" in os.environ:
        return Path(os.environ["POLYSTORE_MODERN_JAVA_HOME"])
    for candidate in ("/usr/lib/jvm/java-21-openjdk-amd64", "/usr/lib/jvm/java-17-openjdk-amd64"):
        if Path(candidate, "bin", "java").is_file():
            return Path(candidate)
    return None


#: Debian's packages (Groovy 2.4, JeroMQ 0.3.6: no CURVE) and what current Fiji runs
#: (Groovy 4.0.26 and a downloaded JeroMQ 0.6.0, see ../shared/vendor/README.md).
STACKS = {
    "debian": Stack(
        "debian", Path(os.environ.get("JEROMQ_JAR", "/usr/share/java/jeromq.jar")), curve=False
    ),
    "modern": Stack(
        "modern",
        VENDOR / "jeromq-0.6.0.jar",
        (VENDOR / "groovy-4.0.26.jar", VENDOR / "groovy-json-4.0.26.jar"),
        _modern_java(),
    ),
}
DEFAULT_STACK = STACKS["debian"]


def missing_requirements(stack: Stack = DEFAULT_STACK) -> str | None:
    """Why the headless receiver cannot run here on `stack`, or None if it can."""
    return stack.missing()


def require(stack: Stack = DEFAULT_STACK) -> None:
    """Skip the calling test with the reason `stack` cannot run here; in CI (CI=true) fail
    instead, so a broken install step cannot pass with the Fiji tests gone."""
    from tests import needs

    why = stack.missing()
    if why is not None:
        needs.missing(f"the Fiji {stack.name} stack cannot run: {why}")


class RawClient(_RawClient):
    """polystore.testing.receiver.RawClient that authenticates with the user's credential
    unless POLYSTORE_AUTH=none (the Debian stack's tests set it)."""

    def __init__(self, endpoint: str, prefix: str = "fiji_", viewer: str = "fiji",
                 curve: tuple[bytes, bytes, bytes] | None | str = "auto") -> None:  # fmt: skip
        if curve == "auto":
            curve = None if os.environ.get("POLYSTORE_AUTH") == "none" else user_curve()
        super().__init__(endpoint, prefix, viewer, curve)



def _xvfb_run() -> str:
    """xvfb-run, which a GUI run starts under: the test skips without it, or fails in CI."""
    from tests import needs

    return needs.program("xvfb-run")

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
    stack: Stack = DEFAULT_STACK,
    cache: Path | None = None,
    launcher: Path = LAUNCHER,
    **params,
) -> FijiReceiver:
    """Start viewers/fiji/run_headless.sh (or another copy, `launcher`); with `wait`, return
    once it listens (or raise). `gui=True` runs it with ImageJ's GUI on a virtual display
    (xvfb-run). `cache` is its XDG_CACHE_HOME (default: this process's, cache_home())."""
    endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
    if not stack.curve:  # JeroMQ 0.3 refuses to run unauthenticated unless asked
        params.setdefault("allow_unauthenticated", True)
    args = dict(endpoint=endpoint, stop_on_stdin_eof=True, **params)
    if output_dir is not None:
        args["output_dir"] = str(output_dir)
    command = [str(launcher), fiji_args(**args)]
    env = dict(os.environ, **stack.env(), XDG_CACHE_HOME=str(cache or cache_home()))
    if gui:
        command = [_xvfb_run(), "-a", *command]
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


def read_tiff(path: str | Path):
    """(array, axes, imagej metadata) of a TIFF the receiver saved."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return series.asarray(), series.axes, tif.imagej_metadata or {}


ROI_TYPES = {0: "polygon", 1: "rectangle", 2: "ellipse", 3: "line", 5: "polyline",
             10: "point"}


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


# -- the Script Editor: run, kill, stop and re-run in one JVM ------------------------------------

EDITOR = FIJI_DIR / "script_editor.groovy"


class ScriptEditor:
    """viewers/fiji/script_editor.groovy: the receiver script run several times in one JVM the
    way Fiji's Script Editor runs it (own ThreadGroup; Kill = interrupt, then Thread.stop)."""

    def __init__(self, stack: Stack = DEFAULT_STACK, gui: bool = False,
                 cache: Path | None = None) -> None:  # fmt: skip
        env = dict(os.environ, **stack.env(), XDG_CACHE_HOME=str(cache or cache_home()))
        java_home = env.get("JAVA_HOME") or "/usr/lib/jvm/java-17-openjdk-amd64"
        env["JAVA_HOME"] = java_home
        options = [] if gui else ["-Djava.awt.headless=true"]
        jars = [str(IJ_JAR), str(stack.jeromq_jar)]
        if stack.groovy_jars:
            classpath = ":".join([*map(str, stack.groovy_jars), *jars])
            command = [f"{java_home}/bin/java", *options, "-cp", classpath, "groovy.ui.GroovyMain"]
        else:
            env["JAVA_OPTS"] = " ".join(options)
            command = ["groovy", "-cp", ":".join(jars)]
        command += [str(EDITOR), str(SCRIPT)]
        if gui:
            command = [_xvfb_run(), "-a", *command]
            env["POLYSTORE_FIJI_GUI"] = "1"
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self._answers: list[str] = []
        self._event = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._event:
                self.lines.append(line)
                if line.startswith("= "):
                    self._answers.append(line[2:])
                self._event.notify_all()
        with self._event:
            self._answers.append("<ended>")
            self._event.notify_all()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def send(self, text: str):
        """Send one command; returns a function that waits for its answer line."""
        with self._event:
            seen = len(self._answers)
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

        def answer(timeout: float = 120.0) -> str:
            with self._event:
                if not self._event.wait_for(lambda: len(self._answers) > seen, timeout):
                    raise TimeoutError(f"no answer to {text!r}:\n{self.log[-3000:]}")
                return self._answers[seen]

        return answer

    def command(self, text: str, timeout: float = 120.0) -> str:
        """Send one command and return its answer line."""
        return self.send(text)(timeout)

    def threads(self) -> list[dict]:
        return json.loads(self.command("threads"))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit", timeout=10)
            except (TimeoutError, OSError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # xvfb-run, Xvfb and the JVM: its whole session
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def port_is_free(port: int) -> bool:
    """Whether a receiver could listen on 127.0.0.1:`port` now. Bound as every listener binds
    (JeroMQ, libzmq, Python's servers: SO_REUSEADDR): a socket still listening there counts,
    but not a closed connection's TIME_WAIT, which the receiver leaves for 60 s whenever it
    closes a sender's connection before the sender does (a sender still connected at Kill)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def seconds_until_free(port: int, limit: float = 10.0) -> float:
    """How long until 127.0.0.1:`port` can be bound again (inf after `limit`)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if port_is_free(port):
            return time.monotonic() - start
        time.sleep(0.02)
    return float("inf")
