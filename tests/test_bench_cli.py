"""`polystore bench` when things go wrong: a small /dev/shm, a kill, Ctrl-C. Real runs of the
command; its child processes are found by a marker in their environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = [sys.executable, "-m", "polystore", "bench", "--quick"]


def _marked(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker` (the bench and its children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
        except OSError:
            continue
    return found


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _ring_segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith("polystoreringbench_")]


@contextlib.contextmanager
def _bench(marker: str, *extra: str) -> Iterator[subprocess.Popen]:
    """`polystore bench --quick` running with `marker` in its environment; afterwards it and
    every process of its marker are gone, whatever the test did."""
    env = {**os.environ, "POLYSTORE_TEST_MARK": marker}
    bench = subprocess.Popen([*BENCH, *extra], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield bench
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def _children_running(bench: subprocess.Popen, marker: str) -> bool:
    return len([p for p in _marked(marker) if p != bench.pid]) >= 1


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare to mount a small /dev/shm")
def test_a_small_dev_shm_is_a_clear_error_and_leaves_nothing():
    """Docker's default /dev/shm is 64 MB: the raw ring's 8 x 8 MiB segments do not fit.
    The ring used ftruncate only, so the bench died of SIGBUS (rc 135, no message), left its
    segments where `polystore shm ls --all` could not see them and its receiver processes
    running for ever."""
    marker = uuid.uuid4().hex
    script = ("mount -t tmpfs -o size=64m tmpfs /dev/shm || exit 77; "
              f"{' '.join(BENCH)}; echo rc=$?; ls /dev/shm")
    out = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "POLYSTORE_TEST_MARK": marker})
    if out.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr}")
    assert "rc=1" in out.stdout, (out.stdout, out.stderr)
    assert "shared memory is full" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stdout.split("rc=1", 1)[1].split() == [], out.stdout  # /dev/shm left empty
    assert _wait_for(lambda: not _marked(marker), 10), _marked(marker)


def test_a_killed_bench_takes_its_children_along_and_shm_clean_finds_its_ring():
    marker = uuid.uuid4().hex
    before = set(_ring_segments())
    with _bench(marker) as bench:
        assert _wait_for(lambda: _children_running(bench, marker) and
                         set(_ring_segments()) - before, 60), "the ring never started"
        bench.kill()  # SIGKILL: no cleanup of its own at all
        bench.wait(10)
        assert _wait_for(lambda: not _marked(marker), 10), \
            f"children still running after their bench died: {_marked(marker)}"
        left = set(_ring_segments()) - before
        assert left  # what a killed run leaves...
        out = subprocess.run([sys.executable, "-m", "polystore", "shm", "clean"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert not set(_ring_segments()) & left, out.stdout  # ...`shm clean` removes


def test_ctrl_c_stops_quietly_and_writes_no_json(tmp_path: Path):
    marker = uuid.uuid4().hex
    out_json = tmp_path / "figures" / "b.json"
    with _bench(marker, "--json", str(out_json)) as bench:
        assert _wait_for(lambda: _children_running(bench, marker), 60)
        time.sleep(0.5)
        os.killpg(bench.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        _, stderr = bench.communicate(timeout=60)
        assert bench.returncode == 130, stderr
        assert "interrupted" in stderr
        assert "Traceback" not in stderr, stderr
        assert not out_json.exists() and not out_json.parent.exists()
        assert _wait_for(lambda: not _marked(marker), 10), _marked(marker)


def test_json_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path):
    (tmp_path / "afile").write_text("")
    for bad, why in ((tmp_path, "is a folder"), (tmp_path / "afile" / "b.json", "not a folder")):
        out = subprocess.run([*BENCH, "--json", str(bad)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and why in out.stderr, out.stderr
