"""Forward-pass variants of a DLRM and the harness that times them.

Variants are code paths chosen by name, never a flag set on a shared model:
"without_torch_sparse" is the dense DLRM; "with_torch_sparse" is the seed's, which turns the
interaction output into a COO tensor and multiplies it by the first top-layer weight with
torch.mm. The stage breakdown calls the very functions the whole forward calls.

Timing is torch.utils.benchmark's: its Timer (its default timer synchronises the accelerator
before every reading), blocked_autorange and Measurement (median, IQR). What it lacks is kept
here: a warm-up long enough to price a slow statement, a floor on the number of runs so that
every figure has a spread, and a steady CPU allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import timeit
from typing import Callable, Iterator

import torch
from torch.utils import benchmark
from torch.utils.benchmark.utils.common import TaskSpec, set_torch_threads
from torch.utils.benchmark.utils.timer import timer as synchronising_timer

from dlrm_sparsity.criteo.data import Batch
from dlrm_sparsity.model import DLRMNet

DENSE, SPARSE = "without_torch_sparse", "with_torch_sparse"
VARIANTS = (DENSE, SPARSE)
AGREEMENT_TOLERANCE = 1e-5
MIN_RUNS = 3

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _libc() -> ctypes.CDLL:
    """The C library, for its allocator's settings (raises where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


def steady_cpu_allocator() -> bool:
    """Serve large CPU tensors from the heap instead of fresh mmaps; True if it took effect.

    A 16384-sample forward allocates tensors of tens of MB. glibc's dynamic mmap threshold
    serves them either from reused heap memory or from new, page-faulting mappings, switching
    between the two unpredictably: the same forward then takes 22 or 36 ms on a 2-core machine.
    A fixed threshold, and no trimming of the heap's top, make every run pay the same, lower
    cost; both are needed (benchmarks/bench_timing_stability.py: 2% spread with both, 80% with
    the threshold alone, at the same peak RSS). At 64 MiB the threshold keeps a batch's
    activations on the heap while embedding tables larger than that are still mapped on their
    own and given back to the system when freed.
    """
    try:
        libc = _libc()
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**20) and
                    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False  # not glibc: nothing to set


def trim_heap() -> None:
    """Give the heap's free pages back to the system now (glibc's malloc_trim; elsewhere
    nothing). The steady setting never trims by itself, so that timings stay steady; between
    two measurements a trim costs no timing, and keeps what one step freed from adding to the
    next step's peak."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: nothing to trim


def sparse_top(model: DLRMNet, r_coo: torch.Tensor) -> torch.Tensor:
    """The seed's top MLP on a COO input: torch.mm with the first weight, then the rest."""
    first = model.top_l[0]
    return model.top_l[1:](torch.mm(r_coo, first.weight.t()) + first.bias)  # (B, 1)


def top(model: DLRMNet, r: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == SPARSE:
        return sparse_top(model, r.to_sparse_coo())
    return model.top_l(r)


def forward(model: DLRMNet, batch: Batch, variant: str) -> torch.Tensor:
    x = model.bottom(batch.dense)
    ly = model.embed(batch.offsets, batch.indices)
    return top(model, model.interact(x, ly), variant)


def forward_fn(model: DLRMNet, batch: Batch, variant: str) -> Callable[[], torch.Tensor]:
    return lambda: forward(model, batch, variant)


@torch.inference_mode()
def check_agreement(model: DLRMNet, batch: Batch) -> float:
    """Max |dense - torch.sparse| over the batch's outputs."""
    return float((forward(model, batch, DENSE) - forward(model, batch, SPARSE)).abs().max())


@torch.inference_mode()
def interaction_density(model: DLRMNet, batch: Batch) -> float:
    """Share of non-zeros in R, the input the sparse variant converts to COO."""
    r = model.interact(model.bottom(batch.dense), model.embed(batch.offsets, batch.indices))
    return float((r != 0).float().mean())


def stage_fns(model: DLRMNet, batch: Batch) -> Iterator[tuple[str, str, Callable[[], object]]]:
    """(variant, stage, callable) for every stage, each fed the real output of the stage
    before. A generator: each input is made only when its stage comes up, so that the COO copy
    of R (about 120 MB at level 0 for 16384 x 367) is not held while the others are timed."""
    with torch.inference_mode():
        x = model.bottom(batch.dense)
        ly = model.embed(batch.offsets, batch.indices)
        r = model.interact(x, ly)
    for variant in VARIANTS:
        yield variant, "bottom_mlp", lambda: model.bottom(batch.dense)
        yield variant, "embedding", lambda: model.embed(batch.offsets, batch.indices)
        yield variant, "interaction", lambda: model.interact(x, ly)
        if variant == DENSE:
            yield variant, "top_mlp", lambda: top(model, r, DENSE)
            continue
        yield variant, "to_sparse_coo", lambda: r.to_sparse_coo()
        with torch.inference_mode():
            r_coo = r.to_sparse_coo()
        yield variant, "top_mlp", lambda r_coo=r_coo: sparse_top(model, r_coo)


def measure(fn: Callable[[], object], label: str, threads: int, min_run_time: float,
            timer: Callable[[], float] = synchronising_timer, min_runs: int = MIN_RUNS,
            warmup_s: float = 0.1, called: int = 0,
            fixed_blocks: bool = False) -> benchmark.Measurement:
    """Warm up, then time fn in blocks (blocked_autorange), at least min_runs blocks.

    The warm-up (at least two calls, counting `called` that the caller already made: allocator
    growth, lazy init, kernel choice) also prices one call, which stretches min_run_time so
    that slow statements still get min_runs runs and so a median and a spread.

    fixed_blocks: min_runs blocks whose length the warm-up's price of a call sets, so that they
    fill min_run_time together. blocked_autorange first grows its block tenfold until the
    timer's own overhead is under 1e-4 of it, which makes a 1 ms statement cost 0.4 s to
    measure however small min_run_time is; a sweep of hundreds of short measurements (the
    memory experiment) takes the timer's overhead (about a microsecond) instead.
    """
    with torch.inference_mode():
        start, calls = timer(), 0
        while calls + called < 2 or (timer() - start < warmup_s and calls < 100):
            fn()
            calls += 1
        per_call = (timer() - start) / max(calls, 1)
        if fixed_blocks:
            # the stdlib's timeit on the same synchronising timer: Timer.timeit would call fn
            # twice more before every block, which triples a slow statement's cost
            number = max(1, round(min_run_time / min_runs / max(per_call, 1e-9)))
            clock = timeit.Timer(fn, timer=timer)
            with set_torch_threads(threads):
                raw = [clock.timeit(number) for _ in range(min_runs)]
            return benchmark.Measurement(number, raw, TaskSpec("fn()", "pass", label=label,
                                                               num_threads=threads))
        t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label,
                            num_threads=threads, timer=timer)
        m = t.blocked_autorange(min_run_time=max(min_run_time, min_runs * per_call))
        raw = list(m.raw_times)
        while len(raw) < min_runs:  # fast statements: a few long blocks; add blocks
            raw += t.timeit(m.number_per_run).raw_times
    return benchmark.Measurement(m.number_per_run, raw, m.task_spec, m.metadata)


def timing_columns(m: benchmark.Measurement) -> dict:
    """A Measurement as CSV columns (seconds per call)."""
    return {"time_median_s": m.median, "time_iqr_s": m.iqr, "time_mean_s": m.mean,
            "n_runs": len(m.times), "number_per_run": m.number_per_run}


# Experiment 5: the interaction output z masked column by column (activation sparsity).
MASKED, MASKED_SPARSE, COMPACT = "dense", "torch_sparse", "compact"
# timed in this order: compact right after dense, before torch_sparse's large allocations
MASKED_VARIANTS = (MASKED, COMPACT, MASKED_SPARSE)


class CompactForward:
    """The model with the masked columns of z physically removed.

    The interaction multiplies only the vectors that some kept pair involves (one bmm over
    them, the full one when every vector is involved) and keeps only the kept dot products and
    the kept columns of the bottom MLP's output; top_l.0 keeps only the matching columns of its
    weight. So the forward is a smaller dense computation: the variant that can beat the masked
    dense one.
    """

    def __init__(self, model: DLRMNet, mask: torch.Tensor):
        kept = mask.nonzero().view(-1)  # ascending: z's own column order
        dim = model.config.embedding_dim
        self.model = model
        self.kept = kept
        self.kept_x = kept[kept < dim]
        pairs = kept[kept >= dim] - dim
        self.pair_i, self.pair_j = model.tril_i[pairs], model.tril_j[pairs]
        self.vectors = torch.unique(torch.cat([self.pair_i, self.pair_j]))  # sorted
        position = torch.full((model.config.num_features,), -1, device=kept.device)
        position[self.vectors] = torch.arange(len(self.vectors), device=kept.device)
        self.all_vectors = len(self.vectors) == model.config.num_features
        self.rows, self.cols = position[self.pair_i], position[self.pair_j]
        self.weight_t = model.top_l[0].weight[:, kept].t().contiguous()  # (K, out)
        self.bias = model.top_l[0].bias

    def interact(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        batch, dim = x.shape
        t = torch.cat([x, *ly], dim=1).view(batch, -1, dim)  # (B, F, d)
        if not self.all_vectors:
            t = t[:, self.vectors]  # (B, U, d): the vectors some kept pair involves
        products = torch.bmm(t, t.transpose(1, 2))  # (B, U, U)
        dots = products[:, self.rows, self.cols]  # (B, kept pairs)
        return torch.cat([x[:, self.kept_x], dots], dim=1)  # (B, K) = z[:, kept]

    def __call__(self, batch: Batch) -> torch.Tensor:
        x = self.model.bottom(batch.dense)
        z = self.interact(x, self.model.embed(batch.offsets, batch.indices))
        return self.model.top_l[1:](torch.addmm(self.bias, z, self.weight_t))  # (B, 1)


def masked_forward_fn(model: DLRMNet, batch: Batch, mask: torch.Tensor, variant: str,
                      compact: CompactForward | None = None) -> Callable[[], torch.Tensor]:
    """A forward with z's masked columns zeroed: by multiplication (what the sparsifier does),
    then dense or the seed's torch.sparse top; or with those columns removed (compact)."""
    if variant == COMPACT:
        compact = compact or CompactForward(model, mask)
        return lambda: compact(batch)
    top_variant = SPARSE if variant == MASKED_SPARSE else DENSE

    def run() -> torch.Tensor:
        x = model.bottom(batch.dense)
        z = model.interact(x, model.embed(batch.offsets, batch.indices)) * mask
        return top(model, z, top_variant)
    return run
