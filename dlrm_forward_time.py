"""Forward-pass variants of a DLRM and a timing harness that measures them properly.

Variants: "without_torch_sparse" (the dense DLRM) and "with_torch_sparse" (the seed's: the
interaction output turned into a COO tensor and multiplied by the first top-layer weight with
torch.mm). Timing goes through torch.utils.benchmark (warm-up, blocked runs, median and IQR)
with a clock that synchronises the device before every reading, so asynchronous GPU work is
counted where it runs. Stage timings split a forward into its parts to show where time goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils import benchmark

from criteo_data import Batch
from dlrm_model import DLRMNet

DENSE, SPARSE = "without_torch_sparse", "with_torch_sparse"
VARIANTS = (DENSE, SPARSE)
AGREEMENT_TOLERANCE = 1e-5
MIN_RUNS = 3


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def steady_cpu_allocator() -> bool:
    """Serve large CPU tensors from the heap instead of fresh mmaps; True if it took effect.

    A 16384-sample forward allocates tensors of tens of MB. glibc's dynamic mmap threshold
    serves them either from reused heap memory or from new, page-faulting mappings, switching
    between the two unpredictably: the same forward then takes 22 or 36 ms on a 2-core machine.
    A fixed threshold (and no trimming) makes every run pay the same, lower cost. At 64 MiB it
    keeps a batch's activations on the heap while embedding tables larger than that are still
    mapped on their own and given back to the system when freed.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**20) and
                    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False  # not glibc: nothing to set


@dataclass
class Measurement:
    """One timed statement: per-run mean times and their summary, in seconds."""

    label: str
    times_s: list[float]
    median_s: float
    iqr_s: float
    mean_s: float
    number_per_run: int

    @property
    def n_runs(self) -> int:
        return len(self.times_s)


def synced_clock(device: torch.device, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """A clock that waits for the device to finish queued work before it is read."""
    if sync is None:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    def read() -> float:
        if sync is not None:
            sync()
        return clock()
    return read


def measure(fn: Callable[[], object], label: str, device: torch.device, threads: int,
            min_run_time: float, clock: Callable[[], float] | None = None,
            min_runs: int = MIN_RUNS, warmup_s: float = 0.1) -> Measurement:
    """Warm up, then time fn in blocks (blocked_autorange) for at least min_runs runs.

    The warm-up (at least two calls: allocator growth, lazy init, kernel choice) also gives
    the per-call time, which stretches min_run_time so that slow statements still get
    min_runs runs and so a median and a spread.
    """
    clock = clock or synced_clock(device)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=label,
                            num_threads=threads, timer=clock)
    with torch.inference_mode():
        start, calls = clock(), 0
        while calls < 2 or (clock() - start < warmup_s and calls < 100):
            fn()
            calls += 1
        per_call = (clock() - start) / calls
        m = timer.blocked_autorange(min_run_time=max(min_run_time, min_runs * per_call))
        times = list(m.times)
        while len(times) < min_runs:  # fast statements: a few long blocks; add blocks
            times.append(timer.timeit(m.number_per_run).mean)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return Measurement(label, times, float(median), float(q3 - q1), float(np.mean(times)),
                       m.number_per_run)


def forward_fn(model: DLRMNet, batch: Batch, variant: str) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        model.use_torch_sparse = variant == SPARSE
        return model(batch.dense, batch.offsets, batch.indices)
    return run


@torch.inference_mode()
def check_agreement(model: DLRMNet, batch: Batch) -> float:
    """Max |dense - sparse| over the batch's outputs."""
    dense = forward_fn(model, batch, DENSE)()
    sparse = forward_fn(model, batch, SPARSE)()
    model.use_torch_sparse = False
    return float((dense - sparse).abs().max())


@torch.inference_mode()
def interaction_density(model: DLRMNet, batch: Batch) -> float:
    """Share of non-zeros in R, the input the sparse variant converts to COO."""
    r = model.interact(model.bottom(batch.dense), model.embed(batch.offsets, batch.indices))
    return float((r != 0).float().mean())


@torch.inference_mode()
def stage_fns(model: DLRMNet, batch: Batch) -> dict[str, dict[str, Callable[[], object]]]:
    """Per variant, one callable per stage, each fed the real output of the stage before."""
    x = model.bottom(batch.dense)
    ly = model.embed(batch.offsets, batch.indices)
    r = model.interact(x, ly)
    r_coo = r.to_sparse_coo()
    first, rest = model.top_l[0], model.top_l[1:]
    shared = {
        "bottom_mlp": lambda: model.bottom(batch.dense),
        "embedding": lambda: model.embed(batch.offsets, batch.indices),
        "interaction": lambda: model.interact(x, ly),
    }
    return {
        DENSE: {**shared, "top_mlp": lambda: model.top_l(r)},
        SPARSE: {**shared, "to_sparse_coo": lambda: r.to_sparse_coo(),
                 "top_mlp": lambda: rest(torch.mm(r_coo, first.weight.t()) + first.bias)},
    }
