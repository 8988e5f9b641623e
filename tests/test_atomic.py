"""Atomic files and the progress log: torn lines, stale temporaries, permissions, threads."""

import os
import stat
import threading

import pytest

from dlrm_sparsity.runner.atomic import ProgressLog, atomic_path, remove_stale_temporaries


def test_a_file_appears_only_when_complete(tmp_path):
    final = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole" and list(tmp_path.iterdir()) == [final]


def test_files_get_the_usual_permissions_of_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640


def test_many_threads_writing_at_once_leave_the_umask_and_every_mode_alone(tmp_path):
    """Reading the umask by setting it is not thread-safe; the writer must not touch it."""
    old = os.umask(0o022)
    try:
        start = threading.Barrier(16)

        def write(n: int) -> None:
            start.wait()
            for i in range(40):
                with atomic_path(tmp_path / f"{n}-{i}") as tmp:
                    tmp.write_text("x")

        threads = [threading.Thread(target=write, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert os.umask(0o022) == 0o022  # the process umask is still what it was
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(list(tmp_path.iterdir())) == 16 * 40 and modes == {0o644}


def test_stale_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "deep").mkdir()
    stale = [tmp_path / ".out.csv.1a2b.tmp", tmp_path / "deep" / ".x.zip.99.tmp"]
    keep = [tmp_path / "out.csv", tmp_path / ".hidden", tmp_path / "deep" / "x.zip"]
    for p in stale + keep:
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert remove_stale_temporaries(tmp_path, recursive=True) == 1
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_progress_log_repairs_a_torn_line_and_reads_every_rank(tmp_path):
    out = tmp_path / "results.csv"
    log0, log1 = ProgressLog(out, rank=0), ProgressLog(out, rank=1)
    log0.append({"a": 1})
    with open(log0.path, "ab") as f:
        f.write(b'{"a": 2, "b"')  # a crash in the middle of a line
    log0.append({"a": 3})
    log1.append({"a": 4})
    assert sorted(r["a"] for r in ProgressLog(out).read()) == [1, 3, 4]
    log0.remove()
    assert ProgressLog(out).read() == [] and not list(tmp_path.iterdir())
