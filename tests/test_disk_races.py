"""Races and tree walks on the disk backend, attacked with real files, threads and processes.

* ``overwrite=False`` is one atomic step on disk: of writers racing for one new name
  (save, write_bytes, FileManager.copy/move) exactly one wins, the others get
  DestinationExistsError, and the file holds exactly the winner's bytes.
* Tree walks (collect_dirs_and_files, mirror_directory_with_symlinks, list_files) never
  follow a symbolic link to a directory, so a link to a parent cannot loop and a link out
  of the tree is not walked.
* A dangling symbolic link is not a file: list_files and collect_dirs_and_files leave it
  out (exists() and is_file() are False for it too), and loading it says what it is.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from polystore import DiskBackend, FileManager
from polystore.atomic import atomic_write
from polystore.errors import DestinationExistsError
from tests.races import one_winner, race

ROUNDS = 40
WRITERS = 4
SIZE = 1 << 20  # 1 MiB per writer: the write takes long enough for the others to check


def _payload(writer: int, round_: int) -> bytes:
    return bytes([writer + 1]) * SIZE + f"{writer}:{round_}".encode()


def _no_temp_files(directory: Path) -> None:
    left = [n for n in os.listdir(directory) if n.startswith(".")]
    assert not left, f"temporary files left behind: {left}"


@pytest.mark.parametrize("method", ["save", "write_bytes"])
def test_save_overwrite_false_threads_exactly_one_wins(tmp_path: Path, method: str) -> None:
    disk = DiskBackend()
    write = getattr(disk, method)
    for r in range(ROUNDS):
        target = tmp_path / f"r{r}" / "out.bin"  # a missing parent: created by the writers
        jobs = [
            (lambda i=i, r=r, t=str(target): write(_payload(i, r), t, overwrite=False))
            for i in range(WRITERS)
        ]
        winner = one_winner(race(jobs))
        assert disk.read_bytes(str(target)) == _payload(winner, r)
        assert disk.list_dir(str(target.parent)) == ["out.bin"]
        _no_temp_files(target.parent)


def test_save_overwrite_false_refuses_existing_and_keeps_it(tmp_path: Path) -> None:
    disk = DiskBackend()
    path = str(tmp_path / "a.npy")
    disk.save(np.arange(3), path)
    with pytest.raises(DestinationExistsError, match="already exists.*overwrite=True"):
        disk.save(np.zeros(5), path, overwrite=False)
    np.testing.assert_array_equal(disk.load(path), np.arange(3))
    disk.save(np.zeros(5), path, overwrite=True)
    np.testing.assert_array_equal(disk.load(path), np.zeros(5))
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        disk.save(np.zeros(5), path, overwrite="no")
    _no_temp_files(tmp_path)


def test_filemanager_save_passes_overwrite_to_disk(tmp_path: Path) -> None:
    fm = FileManager({"disk": DiskBackend()})
    path = str(tmp_path / "t.json")
    fm.save({"a": 1}, path, "disk", overwrite=False)
    with pytest.raises(FileExistsError):
        fm.save({"a": 2}, path, "disk", overwrite=False)
    assert fm.load(path, "disk") == {"a": 1}


def _process_writer(path: str, writer: int, round_: int, barrier, queue) -> None:
    barrier.wait()
    try:
        DiskBackend().write_bytes(_payload(writer, round_), path, overwrite=False)
        queue.put((writer, None))
    except DestinationExistsError as exc:
        queue.put((writer, str(exc)))


def test_save_overwrite_false_processes_exactly_one_wins(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for r in range(8):
        target = tmp_path / f"p{r}.bin"
        barrier, queue = ctx.Barrier(WRITERS), ctx.Queue()
        procs = [
            ctx.Process(target=_process_writer, args=(str(target), i, r, barrier, queue))
            for i in range(WRITERS)
        ]
        for p in procs:
            p.start()
        outcome = dict(queue.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        winners = [w for w, err in outcome.items() if err is None]
        assert len(winners) == 1, outcome
        assert target.read_bytes() == _payload(winners[0], r)
    _no_temp_files(tmp_path)


@pytest.mark.parametrize("named_temp", [False, True], ids=["O_TMPFILE", "named-temp"])
def test_atomic_write_no_replace(tmp_path: Path, monkeypatch, named_temp: bool) -> None:
    """Both ways atomic_write makes its temporary file refuse an existing name."""
    if named_temp:  # as on a filesystem without O_TMPFILE
        import polystore.atomic as atomic

        monkeypatch.setitem(atomic._tmpfile_support, os.stat(tmp_path).st_dev, False)
    target = tmp_path / "f"
    with atomic_write(target, "wb", replace=False) as handle:
        handle.write(b"first")
    with pytest.raises(FileExistsError), atomic_write(target, "wb", replace=False) as handle:
        handle.write(b"second")
    assert target.read_bytes() == b"first"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError), atomic_write(dangling, "wb", replace=False) as h:
        h.write(b"x")
    assert not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["f", "link"]


def _sources(folder: Path, round_: int) -> list[Path]:
    """One source file per writer, each with its own payload."""
    sources = [folder / f"src{round_}_{i}.bin" for i in range(WRITERS)]
    for i, src in enumerate(sources):
        src.write_bytes(_payload(i, round_))
    return sources


def test_copy_overwrite_false_threads_exactly_one_wins(tmp_path: Path) -> None:
    fm = FileManager({"disk": DiskBackend()})
    for r in range(ROUNDS):
        sources = [str(s) for s in _sources(tmp_path, r)]
        dst = str(tmp_path / "out" / f"r{r}.bin")
        jobs = [(lambda s=s, d=dst: fm.copy(s, d, "disk", overwrite=False)) for s in sources]
        winner = one_winner(race(jobs))
        assert DiskBackend().read_bytes(dst) == _payload(winner, r)
        for i, s in enumerate(sources):  # a copy never touches its source
            assert Path(s).read_bytes() == _payload(i, r)
    _no_temp_files(tmp_path / "out")


def test_move_overwrite_false_threads_no_file_lost(tmp_path: Path) -> None:
    """A rename onto a new name: the loser's source must still be there (os.replace made
    both succeed, deleting the first mover's file)."""
    fm = FileManager({"disk": DiskBackend()})
    for r in range(ROUNDS):
        sources = _sources(tmp_path, r)
        dst = tmp_path / "out" / f"r{r}.bin"
        jobs = [(lambda s=s, d=str(dst): fm.move(str(s), d, "disk", overwrite=False))
                for s in sources]
        winner = one_winner(race(jobs))
        assert dst.read_bytes() == _payload(winner, r)
        for i, s in enumerate(sources):
            assert s.exists() == (i != winner)
            if i != winner:
                assert s.read_bytes() == _payload(i, r)


def test_move_overwrite_false_without_renameat2(tmp_path: Path, monkeypatch) -> None:
    """The fallback where renameat2 is missing (musl, macOS): a file is hard-linked into
    place (atomic, refuses an existing name) and then unlinked from its source."""
    from polystore import atomic

    monkeypatch.setattr(atomic, "_renameat2", None)
    test_move_overwrite_false_threads_no_file_lost(tmp_path)
    fm = FileManager({"disk": DiskBackend()})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"f")
    fm.move(str(tmp_path / "d"), str(tmp_path / "e"), "disk", overwrite=False)
    assert (tmp_path / "e" / "f.bin").read_bytes() == b"f" and not (tmp_path / "d").exists()


def test_move_across_disk_backends_overwrite_false_refuses(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    fm = FileManager({"a": DiskBackend(a), "b": DiskBackend(b)})
    (a / "x.bin").write_bytes(b"mine")
    (b / "x.bin").write_bytes(b"theirs")
    with pytest.raises(DestinationExistsError):
        fm.move("x.bin", "x.bin", src_backend="a", dst_backend="b", overwrite=False)
    assert (a / "x.bin").read_bytes() == b"mine" and (b / "x.bin").read_bytes() == b"theirs"
    fm.move("x.bin", "y.bin", src_backend="a", dst_backend="b", overwrite=False)
    assert not (a / "x.bin").exists() and (b / "y.bin").read_bytes() == b"mine"


def test_tree_copy_overwrite_false_loser_removes_only_its_own(tmp_path: Path) -> None:
    """Two tree copies racing into one new directory: a file both have is won by one, the
    loser's rollback never deletes a file the winner wrote."""
    fm = FileManager({"disk": DiskBackend()})
    for r in range(ROUNDS):
        trees = []
        for i in range(WRITERS):
            tree = tmp_path / f"t{r}_{i}"
            (tree / "sub").mkdir(parents=True)
            (tree / "sub" / "same.bin").write_bytes(_payload(i, r))
            trees.append(str(tree))
        dst = str(tmp_path / f"out{r}")
        results = race(
            [(lambda t=t, d=dst: fm.copy(t, d, "disk", overwrite=False)) for t in trees]
        )
        ok = [i for i, res in enumerate(results) if res is None]
        for res in results:
            assert res is None or isinstance(res, FileExistsError), repr(res)
        assert len(ok) == 1, results
        assert Path(dst, "sub", "same.bin").read_bytes() == _payload(ok[0], r)


# -- symbolic links in tree walks ---------------------------------------------------------
def _tree_with_links(root: Path, outside: Path) -> None:
    (root / "A01").mkdir(parents=True)
    (root / "A01" / "t1.bin").write_bytes(b"1")
    (root / "A01" / "up").symlink_to(root)  # a loop
    (root / "out").symlink_to(outside)  # out of the tree
    (root / "dangling.bin").symlink_to(root / "missing.bin")
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "s.bin").write_bytes(b"s")


def test_collect_dirs_and_files_does_not_follow_directory_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "plate", tmp_path / "elsewhere"
    _tree_with_links(root, outside)
    fm = FileManager({"disk": DiskBackend()})
    dirs, files = fm.collect_dirs_and_files(str(root), "disk")
    # links to directories are reported as directories (as os.walk does) but not entered
    assert dirs == [str(root), str(root / "A01"), str(root / "A01" / "up"), str(root / "out")]
    assert files == [str(root / "A01" / "t1.bin")]


def test_mirror_keeps_directory_links_as_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "plate", tmp_path / "elsewhere"
    _tree_with_links(root, outside)
    fm = FileManager({"disk": DiskBackend()})
    mirror = tmp_path / "mirror"
    count = fm.mirror_directory_with_symlinks(str(root), str(mirror), "disk")
    assert count == 3  # t1.bin, A01/up, out
    assert (mirror / "A01" / "t1.bin").is_symlink()
    assert (mirror / "out").is_symlink() and (mirror / "A01" / "up").is_symlink()
    assert os.readlink(mirror / "out") == str(root / "out")
    # nothing under the links was recreated: the mirror holds exactly these entries
    made = sorted(str(p.relative_to(mirror)) for p in mirror.rglob("*"))
    assert made == ["A01", "A01/t1.bin", "A01/up", "out"]
    assert fm.load_text(str(mirror / "out" / "secret" / "s.bin"), "disk") == "s"


def test_list_files_leaves_out_dangling_links_and_dir_links(tmp_path: Path) -> None:
    root, outside = tmp_path / "plate", tmp_path / "elsewhere"
    _tree_with_links(root, outside)
    (root / "good.bin").symlink_to(root / "A01" / "t1.bin")  # a link to a file is a file
    fm = FileManager({"disk": DiskBackend()})
    found = fm.list_files(str(root), "disk", recursive=True)
    assert found == [str(root / "A01" / "t1.bin"), str(root / "good.bin")]
    for path in found:
        assert fm.is_file(path, "disk")
        fm.load(path, "disk")
    assert fm.list_files(str(root), "disk") == [str(root / "good.bin")]
    assert fm.find_file_recursive(str(root), "dangling.bin", "disk") is None


def test_loading_a_dangling_link_says_so(tmp_path: Path) -> None:
    (tmp_path / "d.bin").symlink_to(tmp_path / "gone.bin")
    disk = DiskBackend()
    with pytest.raises(FileNotFoundError, match="symbolic link.*gone.bin.*does not exist"):
        disk.load(str(tmp_path / "d.bin"))
    assert disk.is_symlink(str(tmp_path / "d.bin"))  # untouched


def test_copying_a_tree_with_a_dangling_link_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "t" / "s").mkdir(parents=True)
    (tmp_path / "t" / "s" / "a.bin").write_bytes(b"a")
    (tmp_path / "t" / "s" / "z.bin").symlink_to(tmp_path / "nope")
    fm = FileManager({"disk": DiskBackend()})
    with pytest.raises(FileNotFoundError, match="z.bin.*symbolic link.*does not exist"):
        fm.copy(str(tmp_path / "t"), str(tmp_path / "u"), "disk")
    assert not (tmp_path / "u").exists()
    assert (tmp_path / "t" / "s" / "a.bin").read_bytes() == b"a"


# -- filesystems without hard links; a failed link+unlink move ---------------------------
def _without_hard_links(monkeypatch, directory: Path, renameat2: bool) -> None:
    """As on vfat/exFAT or a FUSE filesystem: no O_TMPFILE and link() fails with EPERM;
    ``renameat2=False`` also takes RENAME_NOREPLACE away (FUSE without rename2)."""
    import errno

    import polystore.atomic as atomic

    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setitem(atomic._tmpfile_support, os.stat(directory).st_dev, False)
    monkeypatch.setattr(os, "link", no_link)
    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", None)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "no-renameat2"])
def test_copy_move_save_work_without_hard_links(tmp_path: Path, monkeypatch,
                                                renameat2: bool) -> None:
    """A default copy or move (overwrite=False) on a filesystem without hard links worked
    before overwrite=False became a link(): it must still work, and still refuse."""
    _without_hard_links(monkeypatch, tmp_path, renameat2)
    fm = FileManager({"disk": DiskBackend()})
    disk = DiskBackend()
    (tmp_path / "a.bin").write_bytes(b"a")
    fm.copy(str(tmp_path / "a.bin"), str(tmp_path / "b.bin"), "disk")
    assert (tmp_path / "b.bin").read_bytes() == b"a"
    disk.save(np.arange(3), str(tmp_path / "n.npy"), overwrite=False)
    with pytest.raises(DestinationExistsError):
        disk.save(np.zeros(2), str(tmp_path / "n.npy"), overwrite=False)
    np.testing.assert_array_equal(disk.load(str(tmp_path / "n.npy")), np.arange(3))
    fm.move(str(tmp_path / "a.bin"), str(tmp_path / "m.bin"), "disk")
    assert (tmp_path / "m.bin").read_bytes() == b"a" and not (tmp_path / "a.bin").exists()
    with pytest.raises(DestinationExistsError):
        fm.move(str(tmp_path / "b.bin"), str(tmp_path / "m.bin"), "disk")
    with pytest.raises(DestinationExistsError):
        disk.rename(str(tmp_path / "b.bin"), str(tmp_path / "m.bin"), overwrite=False)
    assert (tmp_path / "b.bin").read_bytes() == b"a" == (tmp_path / "m.bin").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "m.bin", "n.npy"]  # no temporary files


def test_move_fallback_whose_unlink_fails_leaves_no_second_name(tmp_path: Path,
                                                               monkeypatch) -> None:
    """The link+unlink fallback (no renameat2): when the source cannot be unlinked (its
    directory is read-only, or append-only for root) the move fails as a rename would, and
    the hard link it made at the destination is removed again (it was left: the file at two
    names, one inode, and a retry refused as 'already exists')."""
    import subprocess

    from polystore import atomic

    monkeypatch.setattr(atomic, "_renameat2", None)
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    (src_dir / "a.bin").write_bytes(b"a")
    (src_dir / "probe").write_bytes(b"")
    locked = []
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+a", str(src_dir)], capture_output=True).returncode == 0:
            locked.append(lambda: subprocess.run(["chattr", "-a", str(src_dir)], check=True))
    else:
        src_dir.chmod(0o555)
        locked.append(lambda: src_dir.chmod(0o755))
    try:
        try:
            os.unlink(src_dir / "probe")
        except OSError:
            pass
        else:
            pytest.skip("cannot make a directory whose entries cannot be unlinked here")
        fm = FileManager({"disk": DiskBackend()})
        with pytest.raises(PermissionError):
            fm.move(str(src_dir / "a.bin"), str(dst_dir / "a.bin"), "disk")
        assert os.listdir(dst_dir) == []
        assert (src_dir / "a.bin").read_bytes() == b"a"
        assert os.stat(src_dir / "a.bin").st_nlink == 1
    finally:
        for unlock in locked:
            unlock()


def test_move_overwrite_false_onto_a_hard_link_of_the_source_keeps_both(tmp_path: Path) -> None:
    """A hard link of the source is an existing name like any other: refused, both kept
    (the shortcut for hard links ran before the check and unlinked the source)."""
    source, link = tmp_path / "a.bin", tmp_path / "b.bin"
    source.write_bytes(b"data")
    os.link(source, link)
    for move in (lambda: DiskBackend().rename(str(source), str(link), overwrite=False),
                 lambda: FileManager({"disk": DiskBackend()}).move(
                     str(source), str(link), backend="disk", overwrite=False)):
        with pytest.raises(DestinationExistsError, match="overwrite=True"):
            move()
        assert source.read_bytes() == link.read_bytes() == b"data"
    DiskBackend().rename(str(source), str(link))  # asked to replace: one name is left
    assert not source.exists() and link.read_bytes() == b"data"
