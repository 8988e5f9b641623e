"""The runner's sweep: error rows, workers, resume, and what it writes."""

import threading
import weakref

import pandas as pd
import pytest

from dlrm_sparsity.errors import UserInputError
from dlrm_sparsity.runner.distributed import DistContext
from dlrm_sparsity.runner.sweep import Item, Sweep, Table, run_sweep, write_outputs

TABLES = [Table("out.csv", ["name"]), Table("side.csv", ["name", "part"])]


def items(n, **determinants):
    return [Item({"name": f"p{i}"}, {"i": i, **determinants}, payload=i) for i in range(n)]


def sweep(tmp_path, its, compute, **options):
    return run_sweep(DistContext(), tmp_path, False,
                     Sweep(its, compute, TABLES, "test", ["name"], **options))


def compute(item):
    if item.payload == 2:
        raise OSError("disk full")
    if item.payload == 3:
        raise UserInputError("model.zip: checkpoint file not found")
    return [{"value": item.payload}], [{"part": "a"}, {"part": "b"}]


@pytest.mark.parametrize("workers", [0, 3])
def test_any_exception_is_an_error_row_and_the_others_finish(tmp_path, capsys, workers):
    result = sweep(tmp_path, items(6), compute, workers=workers)
    rows = result.tables[0]
    assert [r["name"] for r in rows] == [f"p{i}" for i in range(6)]  # item order
    assert rows[2]["error"] == "OSError: disk full"
    assert rows[3]["error"] == "model.zip: checkpoint file not found"
    assert [r.get("value") for r in rows if "error" not in r] == [0, 1, 4, 5]
    assert len(result.tables[1]) == 8 and result.failed == 2
    err = capsys.readouterr().err.splitlines()  # as the items end: in any order on workers
    assert sorted(err) == ["error: OSError: disk full",
                           "error: model.zip: checkpoint file not found"]
    assert write_outputs(DistContext(), tmp_path, result, TABLES) == 2
    assert len(pd.read_csv(tmp_path / "out.csv")) == 6
    assert not list(tmp_path.glob(".*progress*"))


def test_prepare_runs_on_the_calling_thread_and_compute_on_workers(tmp_path):
    main = threading.get_ident()
    seen = []

    def prepare(item):
        seen.append(("prepare", threading.get_ident() == main))
        return item.payload * 10

    def work(job):
        seen.append(("compute", threading.get_ident() == main))
        return {"value": job}

    rows = sweep(tmp_path, items(5), work, prepare=prepare, workers=2).tables[0]
    assert [r["value"] for r in rows] == [0, 10, 20, 30, 40]
    assert {s for s in seen} == {("prepare", True), ("compute", False)}


def test_a_prepared_job_is_let_go_once_computed_before_the_next_is_prepared(tmp_path):
    class Pruned:  # stands for a pruned model: only one may be alive at a time
        pass

    alive = []

    def prepare(item):
        assert all(ref() is None for ref in alive), "the previous job is still held"
        job = Pruned()
        alive.append(weakref.ref(job))
        return job

    rows = sweep(tmp_path, items(4), lambda job: {"value": 1}, prepare=prepare).tables[0]
    assert len(rows) == 4 and len(alive) == 4


def test_a_free_worker_goes_on_to_the_next_item_while_an_earlier_one_still_runs(tmp_path):
    release, ended = threading.Event(), []

    def work(item):
        if item.payload == 0:  # the first item runs until the last one is done
            assert release.wait(10)
        ended.append(item.payload)
        if item.payload == 3:
            release.set()
        return {"value": item.payload}

    rows = sweep(tmp_path, items(4), work, workers=2).tables[0]
    assert ended == [1, 2, 3, 0]  # items 1-3 passed item 0 on the other worker
    assert [r["value"] for r in rows] == [0, 1, 2, 3]  # rows still in item order


def test_a_rerun_keeps_finished_items_and_redoes_changed_failed_or_refused_ones(tmp_path):
    first = sweep(tmp_path, items(6), compute)
    write_outputs(DistContext(), tmp_path, first, TABLES)
    calls = []

    def again(item):
        calls.append(item.payload)
        return {"value": -1}

    changed = items(6)
    changed[1] = Item(changed[1].fields, {"i": 1, "data": "other"}, payload=1)
    result = sweep(tmp_path, changed, again,
                   still_valid=lambda item, old: old[0][0]["value"] != 4)
    assert sorted(calls) == [1, 2, 3, 4]  # changed, failed, failed, refused
    assert result.kept == 2 and result.failed == 0
    kept = [r for r in result.tables[1] if r["name"] == "p0"]
    assert [r["part"] for r in kept] == ["a", "b"]  # side-table rows come back with the item
