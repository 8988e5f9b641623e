"""Checks that need a CUDA device; they skip cleanly elsewhere."""

import pytest
import torch

from conftest import random_batch, tiny_config
from dlrm_forward_time import Dense, Timing, TorchSparseTop, max_difference, measure
from dlrm_sparsity.criteo.data import Batch
from dlrm_sparsity.mask_engine import SortOnceMasks
from dlrm_sparsity.model import DLRMNet
from sparse_utils import SEED_LEVELS, GridPoint, same_bits, sparsify_embeddings, sparsify_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def cuda_batch(config, n=4096):
    dense, offsets, indices = random_batch(config, n)
    return Batch(dense.to(CUDA), offsets.contiguous().to(CUDA), indices.to(CUDA),
                 torch.zeros(n, device=CUDA))


def test_timing_synchronises_the_gpu_before_each_clock_reading(monkeypatch):
    model = DLRMNet(tiny_config(tables=(5000,) * 26, dim=16)).to(CUDA).eval()
    batch = cuda_batch(model.config)
    calls = []
    real = torch.accelerator.synchronize
    monkeypatch.setattr(torch.accelerator, "synchronize",
                        lambda d=None: (calls.append(d), real(d)))
    m = measure(Dense(model).on(batch), "gpu", Timing(threads=1, min_run_time=0.05))
    assert m.median > 0 and len(m.times) >= 3 and len(calls) >= 2 * len(m.times)


def test_variants_agree_on_the_gpu():
    model = DLRMNet(tiny_config(tables=(5000,) * 26, dim=16)).to(CUDA).eval()
    assert max_difference(Dense(model), TorchSparseTop(model),
                          cuda_batch(model.config)) <= 1e-5


def test_pruning_on_the_gpu_gives_the_cpu_weights():
    torch.manual_seed(0)
    sd = DLRMNet(tiny_config(tables=(3000, 2000), dim=16)).state_dict()
    for point in (GridPoint("L1", (1, 1), 0.7), GridPoint("L2", (1, 4), 0.9)):
        cpu = sparsify_embeddings(sd, point, torch.device("cpu")).weights
        gpu = sparsify_embeddings(sd, point, CUDA).weights
        assert all(torch.equal(cpu[k], gpu[k]) for k in sd)


@pytest.mark.parametrize("norm, shape", [("L1", (1, 1)), ("L1", (1, 4)), ("L2", (1, 4))])
def test_the_sort_once_engine_gives_the_stock_weights_on_the_gpu(norm, shape):
    """As on the CPU (test_mask_engine), with a table large enough for the GPU's other sort
    path, full of ties: the engine's (1, 1, n) sort must order ties as the stock
    (1, block size, n) one does."""
    from test_mask_engine import tables

    g = torch.Generator().manual_seed(1)
    cases = {**tables(), "large_ties": torch.randint(-3, 4, (70_000, 16), generator=g).float()}
    engine = SortOnceMasks(norm, shape, SEED_LEVELS)
    for name, table in cases.items():
        for level in SEED_LEVELS:
            ours = engine.pruned(name, table.to(CUDA), level)
            stock, _ = sparsify_table(table.to(CUDA), GridPoint(norm, shape, level), name, CUDA)
            assert same_bits(ours.cpu(), stock), (name, level)


def test_a_model_larger_than_the_gpu_is_one_line_that_points_to_torchrun(tiny_pipeline,
                                                                         tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import evaluate_disk_savings
    from conftest import run_script
    repo = Path(__file__).resolve().parent.parent
    assert run_script(evaluate_disk_savings, [
        "--model-path", tiny_pipeline["model"], "--output-dir", tmp_path, "--device", "cpu",
        "--sparsity-levels", "0", "--norms", "L1", "--block-shapes", "1x4"]) == 0
    proc = subprocess.run(
        [sys.executable, str(repo / "evaluate_model_metrics.py"), "--raw-data-file",
         str(tiny_pipeline["raw"]), "--processed-data-file", str(tiny_pipeline["processed"]),
         "--output-dir", str(tmp_path), "--device", "cuda", "--rank-memory", "0.000001"],
        capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "does not fit the GPU (1 kB): run under torchrun on several GPUs" in proc.stderr
