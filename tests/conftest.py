"""Shared fixtures. Every test is checked for leaked shared-memory segments of our prefixes."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
PLUGIN_PACKAGES_DIR = TESTS_DIR / "packages"

SHM_DIR = Path("/dev/shm")

# A credential of this test session (decision: tests never read or make ~/.config's); every
# subprocess a test starts inherits it.
_CREDENTIAL_DIR = tempfile.mkdtemp(prefix="polystore-test-credential-")
os.environ["POLYSTORE_CREDENTIAL"] = os.path.join(_CREDENTIAL_DIR, "credential.json")
atexit.register(shutil.rmtree, _CREDENTIAL_DIR, True)


# Every prefix a polystore sender may use, including the guide's custom example.
OUR_PREFIXES = ("napari_", "fiji_", "polystore", "myviewer_")


def our_segments() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {n for n in os.listdir(SHM_DIR) if n.startswith(OUR_PREFIXES)}


def _owner_pid(name: str) -> int | None:
    """`<prefix><pid>_<token>_<n>` -> pid (None for names not of that shape)."""
    match = re.match(r"^[A-Za-z0-9]+_(\d+)_", name)
    return int(match[1]) if match else None


def _is_ours_to_judge(name: str) -> bool:
    """A segment this test run is answerable for: made by this process or by a process
    that is gone. A live foreign owner (another test run on the machine, a user's pipeline)
    is left alone: deleting its memory would break it."""
    pid = _owner_pid(name)
    if pid is None or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # a number no process can have: none owns it
        return True
    except PermissionError:
        return False
    return False


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    """Fail any test that leaves a segment of our prefixes in /dev/shm (and clean it up)."""
    before = our_segments()
    yield
    leaked = {n for n in our_segments() - before if _is_ours_to_judge(n)}
    for name in leaked:
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass
    assert not leaked, f"test leaked shared-memory segments: {sorted(leaked)}"


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", help="run the long soak variants")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def figure():
    """`figure(name, value)`: record a measured figure; written to build/figures.json at the
    end of the session (docs/reliability.md quotes them)."""
    import json

    measured: dict[str, object] = {}
    yield measured.__setitem__
    if measured:
        path = Path(__file__).resolve().parent.parent / "build" / "figures.json"
        path.parent.mkdir(exist_ok=True)
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(measured)
        path.write_text(json.dumps(old, indent=2, sort_keys=True))


# -- test-only plugin packages ------------------------------------------------------------
# tests/packages/* are installed for this test session only, never by scripts/install.sh: a
# temporary directory gets a minimal ``*.dist-info`` (METADATA + entry_points.txt) per package
# and goes on sys.path (and PYTHONPATH, for subprocesses) with the package's sources. So a
# user's environment keeps the guide's example names ("mybackend") free.
PLUGIN_PATHS: list[str] = []
_plugin_metadata_dir: str | None = None


def install_test_plugins(metadata_dir: Path) -> list[str]:
    """Make every package under tests/packages importable with its entry points; returns
    the paths to put on sys.path."""
    paths = [str(metadata_dir)]
    for project in sorted(PLUGIN_PACKAGES_DIR.glob("*/pyproject.toml")):
        meta = tomllib.loads(project.read_text())["project"]
        name, version = meta["name"], meta["version"]
        info = metadata_dir / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        groups = meta.get("entry-points", {})
        (info / "entry_points.txt").write_text(
            "".join(
                f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
                for group, eps in groups.items()
            )
        )
        paths.append(str(project.parent))
    return paths


def pytest_configure(config):
    global _plugin_metadata_dir
    _plugin_metadata_dir = tempfile.mkdtemp(prefix="polystore-test-plugins-")
    PLUGIN_PATHS[:] = install_test_plugins(Path(_plugin_metadata_dir))
    sys.path[:0] = PLUGIN_PATHS
    os.environ["PYTHONPATH"] = os.pathsep.join(
        PLUGIN_PATHS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )


def pytest_unconfigure(config):
    if _plugin_metadata_dir:
        shutil.rmtree(_plugin_metadata_dir, ignore_errors=True)

