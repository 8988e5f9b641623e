"""TorchRec at Kaggle size: the disk step against dlrm's layout, and metrics against split size.

1. disk: the random Kaggle-size DLRM of bench_kaggle_size.py (26 tables, 33.8 M rows of width
   16, 2.16 GB) saved twice with the same weights, as dlrm's checkpoint and as TorchRec's
   DLRM state dict (its keys, its upper-triangle column order in the first over-arch layer).
   evaluate_disk_savings.py runs on each as a child process, the two alternating for
   --rounds rounds, on --levels of L1 1x4. Prints each run's wall time and peak RSS, the
   TorchRec/dlrm ratios (median over rounds), and whether the pruned tables of the two are
   equal to the bit.
2. metrics: evaluate_model_metrics.py on a TorchRec DLRM with Kaggle's tables (thin MLPs,
   13-64-16 and 367-64-1, as the MLPs do not change what memory the split takes), scored on
   torchrec .npy days whose test split holds --small and then --large samples, each a child
   process; prints the peak RSS of each, their ratio, and the difference per sample. With
   --table-rows, tables of that many rows instead: the split's own cost shows unmasked.

    python benchmarks/bench_torchrec.py                       # both parts
    python benchmarks/bench_torchrec.py --parts metrics --large 20000000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import gib
from bench_kaggle_size import KAGGLE, run_child

from dlrm_sparsity.checkpoints import load_state_dict
from dlrm_sparsity.layouts import (
    TORCHREC,
    dlrm_columns_of_torchrec,
    read_layout,
    torchrec_layout,
)
from dlrm_sparsity.model import DLRMConfig, DLRMNet
from dlrm_sparsity.training import save_dlrm_checkpoint


def save_both(work: Path) -> tuple[Path, Path]:
    """The same random weights in dlrm's layout and in TorchRec's."""
    torch.manual_seed(0)
    model = DLRMNet(KAGGLE)
    dlrm = work / "kaggle_dlrm.ckpt"
    save_dlrm_checkpoint(dlrm, model, 0.0, 0.0, 0, 0)
    state = model.state_dict()
    n = KAGGLE.num_features
    top = state["top_l.0.weight"][:, dlrm_columns_of_torchrec(n, KAGGLE.embedding_dim)]
    layout = torchrec_layout(n - 1, len(KAGGLE.top_mlp) - 1, 0, len(KAGGLE.bottom_mlp) - 1)
    torchrec = work / "kaggle_torchrec.pt"
    torch.save(layout.to_file({**state, "top_l.0.weight": top}), torchrec)
    return dlrm, torchrec


def same_tables(a: Path, b: Path) -> bool:
    left, right = load_state_dict(a), load_state_dict(b)
    return all(torch.equal(left[x].view(torch.int32), right[y].view(torch.int32))
               for x, y in zip(read_layout(left).tables, read_layout(right).tables,
                               strict=True))


def disk_part(work: Path, levels: list[str], rounds: int) -> None:
    models = dict(zip(("dlrm", "torchrec"), save_both(work), strict=True))
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in models}
    for r in range(rounds):
        for kind in (("dlrm", "torchrec") if r % 2 == 0 else ("torchrec", "dlrm")):
            out = work / f"{kind}_{r}"
            wall, peak = run_child(["evaluate_disk_savings.py", "--model-path",
                                    str(models[kind]), "--output-dir", str(out),
                                    "--sparsity-levels", *levels, "--norms", "L1",
                                    "--block-shapes", "1x4", "--no-report", "--device", "cpu"])
            runs[kind].append((wall, peak))
            print(f"round {r + 1} {kind}: {wall:.1f} s, peak RSS {gib(peak)}", flush=True)
    meta = {k: pd.read_csv(work / f"{k}_0" / "sparse_model_metadata.csv") for k in models}
    equal = all(same_tables(work / "dlrm_0" / a, work / "torchrec_0" / b)
                for a, b in zip(meta["dlrm"]["path"], meta["torchrec"]["path"], strict=True))
    for i, name in enumerate(("wall time", "peak RSS")):
        ratios = [t[i] / d[i] for t, d in zip(runs["torchrec"], runs["dlrm"], strict=True)]
        print(f"TorchRec / dlrm {name}: {statistics.median(ratios):.3f} (median of {rounds}; "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")
    print(f"pruned tables of the two layouts equal to the bit: {equal}")


def write_days(folder: Path, test_samples: int, sizes: tuple[int, ...],
               chunk: int = 1 << 21) -> None:
    """day_0 (a small training day) and day_1, whose second half is the test split."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for day, n in ((0, 1000), (1, 2 * test_samples)):
        stem = folder / f"day_{day}"
        arrays = {"dense": ((n, 13), np.float32), "sparse": ((n, 26), np.int32),
                  "labels": ((n, 1), np.int32)}
        out = {k: np.lib.format.open_memmap(f"{stem}_{k}.npy", "w+", dtype, shape)
               for k, (shape, dtype) in arrays.items()}
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            out["dense"][a:b] = rng.random((b - a, 13), dtype=np.float32) * 5
            out["sparse"][a:b] = rng.integers(0, sizes, (b - a, 26), dtype=np.int32)
            out["labels"][a:b] = rng.random((b - a, 1)) < 0.25
        for arr in out.values():
            arr.flush()
        del out


def metrics_part(work: Path, sizes: list[int], table_rows: int | None) -> None:
    tables = KAGGLE.table_sizes if table_rows is None else (table_rows,) * 26
    config = DLRMConfig(tables, 16, (13, 64, 16), (367, 64, 1), TORCHREC)
    torch.manual_seed(0)
    model = DLRMNet(config)
    layout = torchrec_layout(26, len(config.top_mlp) - 1, 0, len(config.bottom_mlp) - 1)
    path = work / "torchrec_model.pt"
    torch.save(layout.to_file(model.state_dict()), path)
    out = work / "metrics_disk"
    run_child(["evaluate_disk_savings.py", "--model-path", str(path), "--output-dir", str(out),
               "--sparsity-levels", "0", "--norms", "L1", "--block-shapes", "1x4",
               "--no-report"])
    peaks = {}
    for n in sizes:
        data = work / f"days_{n}"
        write_days(data, n, config.table_sizes)
        wall, peak = run_child(["evaluate_model_metrics.py", "--processed-data-file", str(data),
                                "--sparse-model-metadata",
                                str(out / "sparse_model_metadata.csv"), "--output-dir",
                                str(work / f"metrics_{n}"), "--no-report", "--device", "cpu"])
        peaks[n] = peak
        print(f"test split of {n:,} samples: {wall:.1f} s, peak RSS {gib(peak)}", flush=True)
        for f in data.iterdir():
            f.unlink()
    small, large = min(sizes), max(sizes)
    print(f"peak RSS at {large:,} / at {small:,} samples: {peaks[large] / peaks[small]:.3f} "
          f"({(peaks[large] - peaks[small]) / (large - small):.2f} bytes per extra sample)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("disk", "metrics"),
                   default=["disk", "metrics"])
    p.add_argument("--levels", nargs="+", default=["0.5", "0.9"],
                   help="levels of the disk part (config L1 1x4)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the disk part")
    p.add_argument("--small", type=int, default=2_000_000, help="test samples, smaller split")
    p.add_argument("--large", type=int, default=20_000_000, help="test samples, larger split")
    p.add_argument("--table-rows", type=int, default=None,
                   help="give the metrics model's 26 tables this many rows each instead of "
                        "Kaggle's (a small model shows what the split itself costs)")
    p.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(args.keep or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if "disk" in args.parts:
            disk_part(work, args.levels, args.rounds)
        if "metrics" in args.parts:
            metrics_part(work, [args.small, args.large], args.table_rows)


if __name__ == "__main__":
    main()
