"""The built-in demo: synthetic Criteo-like data and a small DLRM trained on it, made once.

Everything lives in `.demo/` at the repository root (git-ignored). A file lock makes concurrent
runs (torchrun ranks, parallel tests) build it once and share it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from dlrm_sparsity.criteo.preprocess import preprocess_raw
from dlrm_sparsity.criteo.synthetic import write_synthetic_raw
from dlrm_sparsity.errors import DataError
from dlrm_sparsity.training import Recipe, train_and_save

DEMO_DIR = Path(__file__).resolve().parent.parent / ".demo"
DEMO_LINES = 500_000
DEMO_SEED = 0
DEMO_MAX_CARDINALITY = 20_000
DEMO_RECIPE = Recipe(embedding_dim=16, bottom="13-64-16", top="64-1")


@dataclass(frozen=True)
class DemoPaths:
    raw: Path
    processed: Path
    model: Path


def demo_paths(root: Path = DEMO_DIR) -> DemoPaths:
    return DemoPaths(root / "train.txt", root / "kaggleAdDisplayChallenge_processed.npz",
                     root / "dlrm_demo.ckpt")


def ensure_processed(raw: str | Path, processed: str | Path, skip_bad_lines: bool = False) -> None:
    """Build dlrm's processed file from the raw file when it does not exist yet."""
    if Path(processed).exists():
        return
    if not Path(raw).exists():
        raise DataError(f"{processed}: processed data file not found, and the raw file "
                        f"{raw} to build it from does not exist either")
    print(f"building {processed} from {raw} (dlrm's preprocessing)", flush=True)
    report = preprocess_raw(raw, processed, skip_bad_lines=skip_bad_lines)
    if report.skipped_lines:
        print(f"skipped {report.skipped_lines} malformed lines of {raw}", flush=True)


def ensure_demo(root: Path = DEMO_DIR, num_lines: int = DEMO_LINES) -> DemoPaths:
    """Generate the demo data and train the demo model unless they already exist."""
    paths = demo_paths(root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):  # every platform torch runs on, unlike fcntl
        if paths.model.exists() and paths.processed.exists():
            return paths
        t0 = time.time()
        print(f"preparing the demo in {root} (once): synthetic data and a small DLRM",
              flush=True)
        if not paths.raw.exists():
            write_synthetic_raw(paths.raw, num_lines, DEMO_SEED, DEMO_MAX_CARDINALITY)
        ensure_processed(paths.raw, paths.processed)
        result = train_and_save(str(paths.processed), str(paths.raw), str(paths.model),
                                DEMO_RECIPE, device="cpu", print_every=0)
        print(f"demo model: test accuracy {result['accuracy']:.4f}, AUC "
              f"{result['roc_auc']:.4f} ({time.time() - t0:.0f} s to prepare)", flush=True)
    return paths
