"""A synthetic Criteo-like raw `train.txt`, in the exact Kaggle format, with a planted signal.

Format: label, 13 integer counts (some empty, I2 sometimes negative), 26 categorical columns of
8 hex digits (some empty, values over the full 32-bit range). Cardinalities follow Kaggle's
shape, capped; ids are Zipf-skewed. Click probabilities come from per-value effects in a few
categorical columns plus a dense term, so a DLRM can learn them (test AUC above 0.7) and loses
most of that quality when its embedding tables are pruned hard. Deterministic given a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dlrm_sparsity.runner.atomic import atomic_path

# Kaggle's distinct values per categorical column (dlrm's ln_emb), used only to shape the data.
KAGGLE_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                        8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
                        286181, 105, 142572)
# Share of empty fields per integer column, roughly Kaggle's.
INT_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22)
# Categorical columns that are often empty in Kaggle (C19, C20, C22, C25, C26 and a few more).
CAT_MISSING = {2: 0.03, 11: 0.03, 15: 0.03, 18: 0.44, 19: 0.44, 20: 0.03, 21: 0.76,
               23: 0.03, 24: 0.44, 25: 0.44}
SIGNAL_COLUMNS = (0, 1, 4, 5, 7, 9, 12, 13, 16, 19, 22, 24)  # columns whose values move clicks


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hex8(values: np.ndarray) -> np.ndarray:
    """32-bit values as 8 lowercase hex digits, vectorised (no per-value Python)."""
    shifts = np.arange(28, -4, -4, dtype=np.uint64)
    nibbles = (values.astype(np.uint64)[:, None] >> shifts) & np.uint64(0xF)
    return np.ascontiguousarray(_HEX_DIGITS[nibbles]).view("S8").ravel().astype(str)


class SyntheticCriteo:
    """The fixed random parts (vocabularies, frequencies, effects) of one synthetic data set."""

    def __init__(self, seed: int = 0, max_cardinality: int = 20000, zipf_exponent: float = 1.1,
                 signal_scale: float = 0.4):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.cardinalities = [min(c, max_cardinality) for c in KAGGLE_CARDINALITIES]
        self.vocab, self.probs, self.effects = [], [], []
        for col, k in enumerate(self.cardinalities):
            self.vocab.append(rng.choice(2**32, size=k, replace=False))  # half are > 0x7fffffff
            p = 1.0 / np.arange(1, k + 1) ** zipf_exponent
            self.probs.append(p / p.sum())
            scale = signal_scale if col in SIGNAL_COLUMNS else 0.0
            self.effects.append(rng.normal(0.0, scale, size=k))
        self.int_scales = rng.uniform(0.5, 4.0, size=len(INT_MISSING))
        self.dense_weights = rng.normal(0.0, 0.25, size=len(INT_MISSING))
        self.bias = -1.6

    def sample(self, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], ...]:
        """(labels, ints, int_missing, cat_idx, cat_missing) for n samples."""
        cat_idx = np.stack([rng.choice(len(p), size=n, p=p) for p in self.probs], axis=1)
        cat_missing = np.zeros(cat_idx.shape, dtype=bool)
        for col, rate in CAT_MISSING.items():
            cat_missing[:, col] = rng.random(n) < rate
        ints = np.floor(rng.lognormal(0.0, self.int_scales, size=(n, len(INT_MISSING))))
        ints = ints.astype(np.int64)
        ints[:, 1] -= (rng.random(n) < 0.1) * rng.integers(1, 4, size=n)  # I2 dips below 0
        int_missing = rng.random(ints.shape) < np.asarray(INT_MISSING)
        logit = np.full(n, self.bias)
        for col in SIGNAL_COLUMNS:
            logit += np.where(cat_missing[:, col], 0.0, self.effects[col][cat_idx[:, col]])
        dense = np.log1p(np.where(int_missing, 0, np.maximum(ints, 0)))
        logit += (dense - dense.mean(axis=0)) @ self.dense_weights
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
        return labels, ints, int_missing, cat_idx, cat_missing

    def format_lines(self, n: int, rng: np.random.Generator) -> str:
        labels, ints, int_missing, cat_idx, cat_missing = self.sample(n, rng)
        columns = [labels.astype(str)]
        for j in range(ints.shape[1]):
            columns.append(np.where(int_missing[:, j], "", ints[:, j].astype(str)))
        for col, vocab in enumerate(self.vocab):
            columns.append(np.where(cat_missing[:, col], "", hex8(vocab[cat_idx[:, col]])))
        rows = zip(*(c.tolist() for c in columns), strict=True)
        return "".join("\t".join(row) + "\n" for row in rows)


def write_synthetic_raw(path: str | os.PathLike, num_lines: int, seed: int = 0,
                        max_cardinality: int = 20000, chunk_lines: int = 100_000,
                        show_progress: bool = True) -> Path:
    """Write num_lines of synthetic Kaggle-format data to path (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = SyntheticCriteo(seed=seed, max_cardinality=max_cardinality)
    rng = np.random.default_rng(seed + 1)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii") as f:
        with tqdm(total=num_lines, unit="lines", disable=None if show_progress else True,
                  desc=f"writing {path.name}") as bar:
            for start in range(0, num_lines, chunk_lines):
                n = min(chunk_lines, num_lines - start)
                f.write(spec.format_lines(n, rng))
                bar.update(n)
    return path
