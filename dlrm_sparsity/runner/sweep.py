"""The one loop every experiment runs: an experiment's function over items, and the rest.

An experiment supplies items (grid points, metadata rows) and a function that computes the rows
of one item. The sweep owns everything around it: reusing items finished by an earlier run
(resume.py), turning any exception into an error row while the other items go on, the progress
bar (or one log line per item where no bar is drawn), sharding and gathering under torchrun,
and worker threads. `write_outputs` then writes the CSVs atomically, draws the plot and prints
the summary, on rank 0 only.
"""

from __future__ import annotations

import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from dlrm_sparsity.errors import StopRun, UserInputError
from dlrm_sparsity.lazy import pandas as pd
from dlrm_sparsity.runner.distributed import DistContext
from dlrm_sparsity.runner.outputs import write_csv
from dlrm_sparsity.runner.resume import SIGNATURE, Resume, failed, key_of, signature_of


@dataclass(frozen=True)
class Table:
    """A CSV that a sweep writes: its file name and the columns that come first."""

    name: str
    first_columns: Sequence[str] = ()


@dataclass(frozen=True)
class Item:
    """One unit of work.

    fields: the key columns and the columns every row of the item shares;
    determinants: everything its rows depend on, hashed into the row's signature;
    payload: what the experiment's function needs (a grid point, a metadata row).
    """

    fields: dict
    determinants: dict
    payload: Any = None

    @property
    def signature(self) -> str:
        return signature_of(self.determinants)


@dataclass(frozen=True)
class Figure:
    """A plot a sweep's outputs get: draw(*tables' good rows, path), saved as name."""

    draw: Callable[..., None]
    name: str


@dataclass
class SweepResult:
    tables: list[list[dict]]  # rows per table in item order; complete on rank 0 only
    kept: int  # items reused from an earlier run
    failed: int  # items whose function raised
    resume: Resume = field(repr=False)

    def followed_by(self, later: "SweepResult", order: Callable[[dict], Any]) -> "SweepResult":
        """This sweep and a later one over the same tables as one result, each table's rows
        sorted by order(row)."""
        tables = [sorted(a + b, key=order) for a, b in zip(self.tables, later.tables,
                                                            strict=True)]
        return SweepResult(tables, self.kept + later.kept, self.failed + later.failed,
                           self.resume)


@dataclass
class _Outcome:
    value: Any = None
    error: str | None = None


def error_message(exc: Exception) -> str:
    """One line: a user error as it is (it names the file), anything else with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {text}"


def _attempt(fn: Callable, *args) -> _Outcome:
    try:
        return _Outcome(fn(*args))
    except StopRun:
        raise
    except Exception as exc:  # any other failure of one item is that item's error row
        return _Outcome(error=error_message(exc))


def _as_tables(value, n_tables: int) -> list[list[dict]]:
    """A function's result (a row, a list of rows, or a tuple of lists per table) as tables."""
    if isinstance(value, dict):
        value = [value]
    tables = list(value) if isinstance(value, tuple) else [value]
    return [list(t) for t in tables] + [[] for _ in range(n_tables - len(tables))]


def _schedule(todo: list, compute: Callable, prepare: Callable | None, workers: int
              ) -> Iterator[tuple[int, Item, _Outcome]]:
    """Run prepare(item) on the calling thread and compute() on `workers` threads.

    With 0 workers both run here, one item at a time. With workers, at most that many items
    are computed at once while the next is prepared; each comes back as soon as it is done
    (the caller orders the rows), so a free worker never waits on a slower one.
    """
    prepare = prepare or (lambda item: item)
    # `del job` below: a prepared job (a pruned model) is let go as soon as it is handed on,
    # not held until the next item's preparation has replaced it
    if workers == 0:
        for index, item in todo:
            job = _attempt(prepare, item)
            outcome = job if job.error else _attempt(compute, job.value)
            del job
            yield index, item, outcome
        return
    with ThreadPoolExecutor(workers) as pool:
        running: dict[Future, tuple[int, Item]] = {}

        def finished(at_most: int) -> Iterator[tuple[int, Item, _Outcome]]:
            while len(running) > at_most:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: running[f][0]):
                    yield *running.pop(future), future.result()

        for index, item in todo:
            job = _attempt(prepare, item)
            yield from finished(workers - 1)
            if job.error:
                future: Future = Future()
                future.set_result(job)
            else:
                future = pool.submit(_attempt, compute, job.value)
            del job
            running[future] = (index, item)
        yield from finished(0)


@dataclass(frozen=True)
class Sweep:
    """What a sweep runs: compute(prepare(item)) for every item, its rows going to tables.

    describe(item, rows): the item's log line where no progress bar is drawn.
    still_valid(item, tables) may refuse an earlier item's rows (per table) that the signature
    cannot judge: a zip that has since been deleted, a stage breakdown now asked for.
    prepare runs on the calling thread, compute on `workers` threads (none: both here).
    start(items) is told, before the first is computed, which items this rank will compute.
    together: under torchrun, every rank computes every item with the others (a model
    sharded over the ranks), rank 0 deciding what an earlier run left done and giving the rows.
    """

    items: Sequence[Item]
    compute: Callable
    tables: Sequence[Table]
    label: str
    key_columns: Sequence[str]
    describe: Callable[[Item, list[dict]], str] | None = None
    still_valid: Callable[[Item, list[list[dict]]], bool] | None = None
    prepare: Callable | None = None
    workers: int = 0
    start: Callable[[Sequence[Item]], None] | None = None
    together: bool = False


def run_sweep(ctx: DistContext, output_dir: Path, overwrite: bool, sweep: Sweep) -> SweepResult:
    """The sweep over this rank's share of the items; all ranks' rows on rank 0."""
    tables, key_columns, describe = sweep.tables, sweep.key_columns, sweep.describe
    resume = Resume([output_dir / t.name for t in tables], key_columns, ctx.rank, overwrite)
    done: list[tuple[int, list[list[dict]]]] = []
    todo, kept, n_failed = [], 0, 0
    together = sweep.together and ctx.enabled
    mine = list(enumerate(sweep.items)) if together else ctx.shard(list(enumerate(sweep.items)))

    def earlier() -> list:
        found = []
        for _, item in mine:
            old = resume.lookup(key_of(item.fields, key_columns), item.signature)
            valid = old is not None and (sweep.still_valid is None
                                         or sweep.still_valid(item, old))
            found.append(old if valid else None)
        return found

    for (index, item), old in zip(mine, ctx.on_main(earlier) if together else earlier(),
                                  strict=True):
        if old is not None:
            done.append((index, old))
            kept += 1
        else:
            todo.append((index, item))
    if sweep.start is not None:
        sweep.start([item for _, item in todo])
    with tqdm(total=len(mine), initial=kept, desc=sweep.label, unit="item",
              disable=None if ctx.is_main else True) as bar:
        for finished, (index, item, outcome) in enumerate(
                _schedule(todo, sweep.compute, sweep.prepare, sweep.workers), kept + 1):
            signature = item.signature
            if outcome.error is None:
                rows = _as_tables(outcome.value, len(tables))
                rows = [[{**item.fields, **r, SIGNATURE: signature} for r in t] for t in rows]
            else:
                if ctx.is_main or not together:
                    tqdm.write(f"error: {outcome.error}", file=sys.stderr)
                rows = _as_tables({**item.fields, "error": outcome.error, SIGNATURE: signature},
                                  len(tables))
                n_failed += 1
            if ctx.is_main or not together:
                resume.record(key_of(item.fields, key_columns), signature, rows)
            done.append((index, rows))
            bar.update()
            if ctx.is_main and bar.disable:  # a log file or a pipe: one line per item
                text = (describe(item, rows[0]) if describe and outcome.error is None
                        else outcome.error or "done")
                print(f"[{finished}/{len(mine)}] {text}", flush=True)
    if together:  # rank 0's rows are the run's
        return SweepResult([[r for _, tables_ in done for r in tables_[t]]
                            for t in range(len(tables))], kept, n_failed, resume)
    gathered = sorted(ctx.gather(done), key=lambda pair: pair[0])
    per_table = [[r for _, tables_ in gathered for r in tables_[t]] for t in range(len(tables))]
    return SweepResult(per_table, sum(ctx.gather([kept])), sum(ctx.gather([n_failed])), resume)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows without an error."""
    if "error" not in df.columns:
        return df
    return df[[not failed(r) for r in df.to_dict("records")]]


def write_outputs(ctx: DistContext, output_dir: Path, result: SweepResult,
                  tables: Sequence[Table], *, derive: Callable | None = None,
                  plot: Figure | None = None,
                  summary: Callable[..., str] | None = None) -> int:
    """Rank 0 writes the CSVs (derive(df) adds columns to the first), the plot and the summary.

    Returns the exit code: 2 if any item failed, else 0.
    """
    if ctx.is_main:
        frames = []
        for t, (table, rows) in enumerate(zip(tables, result.tables, strict=True)):
            df = pd.DataFrame(rows)
            if t == 0 and derive is not None and not df.empty:
                df = derive(df)
            frames.append(write_csv(df.to_dict("records"), output_dir / table.name,
                                    table.first_columns))
        good = [ok_rows(f) for f in frames]
        written = [str(output_dir / t.name) for t in tables]
        if plot is not None and not good[0].empty:
            plot.draw(*good, output_dir / plot.name)
            written.append(str(output_dir / plot.name))
        result.resume.close()
        if result.kept:
            print(f"resumed: kept {result.kept} finished item(s) of an earlier run "
                  "(--overwrite redoes them)")
        if summary is not None and not good[0].empty:
            print(summary(*good))
        failed_note = f"; {result.failed} failed (see the error column)" if result.failed else ""
        print(f"wrote {', '.join(written)}{failed_note}")
    ctx.barrier()
    return 2 if result.failed else 0
