"""Racing writers in threads, and the rule they are judged by: of writers racing for one new
name with overwrite=False, exactly one wins and the others get DestinationExistsError.
Shared by the race tests of every backend (test_disk_races.py, test_store_races.py)."""

from __future__ import annotations

import threading

from polystore.errors import DestinationExistsError


def race(jobs: list) -> list[BaseException | None]:
    """Run the callables at once (a barrier), return what each raised (None: it won)."""
    barrier = threading.Barrier(len(jobs))
    results: list[BaseException | None] = [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait()
        try:
            jobs[i]()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def one_winner(results: list[BaseException | None]) -> int:
    winners = [i for i, r in enumerate(results) if r is None]
    losers = [r for r in results if r is not None]
    assert len(winners) == 1, f"{len(winners)} writers won: {results}"
    for exc in losers:
        assert isinstance(exc, DestinationExistsError), repr(exc)
        assert isinstance(exc, FileExistsError)
        assert "already exists" in str(exc) and "overwrite=True" in str(exc)
    return winners[0]
