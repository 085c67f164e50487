"""Races on the zarr and memory backends (disk: test_disk_races.py), attacked with real
stores, threads and processes.

* ``overwrite=False`` is checked under the node's (zarr) or the store's (memory) lock, in
  the same step as the write: of writers racing for one new name (FileManager.copy/move
  within one store, save) exactly one wins, the others get DestinationExistsError, and the
  item holds the winner's data. A loser of a move keeps its source.
* Two processes moving a -> b and b -> a at once both finish: the two nodes' locks are
  taken in one order, not source first.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from tests import needs

zarr = needs.module("zarr")

from polystore import BackendRegistry, FileManager, MemoryBackend  # noqa: E402
from polystore.errors import DestinationExistsError  # noqa: E402
from polystore.zarr import ZarrBackend  # noqa: E402
from tests.races import one_winner, race  # noqa: E402

ROUNDS = 12
WRITERS = 4


def _fm() -> FileManager:
    return FileManager(BackendRegistry(entry_points=False))


def _frame(writer: int) -> np.ndarray:
    return np.full((64, 64), writer + 1, dtype="uint16")


#: backend -> (store folder, file suffix): zarr arrays have none, memory files a format
STORES = {"zarr": ("races.zarr", ""), "memory": ("races", ".npy")}


def _sources(fm: FileManager, backend: str, store: Path, round_: int) -> list[str]:
    paths = [str(store / f"r{round_}" / f"s{i}{STORES[backend][1]}") for i in range(WRITERS)]
    for i, path in enumerate(paths):
        fm.save(_frame(i), path, backend=backend)
    return paths


@pytest.mark.parametrize("backend", ["zarr", "memory"])
@pytest.mark.parametrize("operation", ["copy", "move"])
def test_copy_or_move_overwrite_false_threads_exactly_one_wins(tmp_path, operation, backend):
    fm = _fm()
    folder, suffix = STORES[backend]
    store = tmp_path / folder
    for r in range(ROUNDS):
        sources = _sources(fm, backend, store, r)
        target = str(store / f"r{r}" / f"out{suffix}")
        results = race([
            (lambda s=s, t=target: getattr(fm, operation)(s, t, backend=backend,
                                                          overwrite=False))
            for s in sources])
        winner = one_winner(results)
        np.testing.assert_array_equal(fm.load(target, backend=backend), _frame(winner))
        for i, source in enumerate(sources):  # a move's losers keep their sources
            kept = operation == "copy" or i != winner
            assert fm.exists(source, backend=backend) is kept, (r, i, winner)


@pytest.mark.parametrize("backend", [ZarrBackend, MemoryBackend])
def test_save_overwrite_false_threads_exactly_one_wins(tmp_path, backend):
    suffix = ".npy" if backend is MemoryBackend else ""
    backend = backend()
    for r in range(ROUNDS):
        target = str(tmp_path / "races.zarr" / f"r{r}" / f"out{suffix}")
        results = race([
            (lambda i=i, t=target: backend.save(_frame(i), t, overwrite=False))
            for i in range(WRITERS)])
        winner = one_winner(results)
        np.testing.assert_array_equal(backend.load(target), _frame(winner))


def test_overwrite_false_refuses_an_existing_array_and_time_point(tmp_path):
    backend = ZarrBackend()
    store = tmp_path / "s.zarr"
    backend.save(_frame(0), str(store / "a"))
    backend.save(_frame(1), str(store / "b"))
    backend.save(_frame(2), str(store / "cells" / "t000"))
    for attempt in (lambda: backend.save(_frame(5), str(store / "b"), overwrite=False),
                    lambda: backend.copy_within(str(store / "a"), str(store / "b"),
                                                overwrite=False),
                    lambda: backend.rename(str(store / "a"), str(store / "b"), overwrite=False),
                    lambda: backend.save(_frame(5), str(store / "cells" / "t000"),
                                         overwrite=False),
                    lambda: backend.save(_frame(5), str(store / "a"), ome=True,
                                         overwrite=False)):
        with pytest.raises(DestinationExistsError, match="overwrite=True"):
            attempt()
    np.testing.assert_array_equal(backend.load(str(store / "a")), _frame(0))
    np.testing.assert_array_equal(backend.load(str(store / "b")), _frame(1))
    np.testing.assert_array_equal(backend.load(str(store / "cells" / "t000")), _frame(2))
    backend.save(_frame(3), str(store / "cells" / "t001"), overwrite=False)  # a new one
    assert backend.load(str(store / "cells")).shape == (2, 64, 64)


def test_memory_overwrite_false_refuses_an_existing_file_and_keeps_it():
    memory = MemoryBackend()
    memory.save(_frame(0), "a.npy")
    memory.save(_frame(1), "b.npy")
    for attempt in (lambda: memory.save(_frame(5), "b.npy", overwrite=False),
                    lambda: memory.write_bytes(b"x", "b.npy", overwrite=False),
                    lambda: memory.rename("a.npy", "b.npy", overwrite=False)):
        with pytest.raises(DestinationExistsError, match="overwrite=True"):
            attempt()
    np.testing.assert_array_equal(memory.load("a.npy"), _frame(0))
    np.testing.assert_array_equal(memory.load("b.npy"), _frame(1))
    memory.save(_frame(2), "c.npy", overwrite=False)  # a new name
    memory.rename("c.npy", "b.npy")  # asked to replace
    np.testing.assert_array_equal(memory.load("b.npy"), _frame(2))


# -- crossed moves between processes ---------------------------------------------------------

def _slow_append(store: str, started) -> None:
    """Hold the node ``b``'s lock for a while: append a large, slowly compressed frame."""
    backend = ZarrBackend(compression="zstd", level=9)
    frame = np.random.default_rng(0).integers(0, 2**16, (4096, 4096), dtype="uint16")
    started.set()
    backend.append(frame, f"{store}/b", 1)


def _move(store: str, src: str, dst: str, go, results) -> None:
    backend = ZarrBackend()
    go.wait(60)
    try:
        backend.rename(f"{store}/{src}", f"{store}/{dst}")
        results.put((src, "moved"))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((src, f"{type(exc).__name__}: {exc}"))


def test_crossed_moves_between_processes_both_finish(tmp_path):
    """a -> b and b -> a while a third process holds b: both wait for b, and the one that
    gets it next must not then wait for a held by the other (taking the source's lock
    first, that happened about every second try and stalled both for the lock's 120 s)."""
    ctx = multiprocessing.get_context("spawn")
    backend = ZarrBackend()
    for attempt in range(3):
        store = str(tmp_path / f"x{attempt}.zarr")
        backend.save(np.zeros((1, 4096, 4096), "uint16"), f"{store}/b", compression="none")
        backend.save(np.ones((1, 8, 8), "uint16"), f"{store}/a")
        started, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
        movers = [ctx.Process(target=_move, args=(store, "a", "b", go, results)),
                  ctx.Process(target=_move, args=(store, "b", "a", go, results))]
        holder = ctx.Process(target=_slow_append, args=(store, started))
        for p in (*movers, holder):
            p.start()
        try:
            assert started.wait(60)
            time.sleep(0.3)  # the holder is writing (it needs seconds)
            go.set()
            done = [results.get(timeout=30) for _ in movers]
        finally:
            for p in (*movers, holder):
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
        assert sorted(done) == [("a", "moved"), ("b", "moved")], done
