"""Does a torch.sparse product leak memory? The CSR lookup of experiment 4 in isolation.

A one-hot matrix of 16384 bags times a pruned 20,000 x 16 table (95% zeros), 300 times per
pairing of layouts, on the CPU; prints how much the resident size grew. On torch 2.13,
CSR x CSR grows by about 0.2 MB a call, COO x COO does not (README, "Memory formats").

    python benchmarks/bench_sparse_leak.py
"""

from __future__ import annotations

import warnings

import torch
from bench_common import rss_bytes

CALLS = 300


def main() -> None:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*", category=UserWarning)
    torch.manual_seed(0)
    table = torch.randn(20_000, 16)
    table[torch.rand(20_000, 16) < 0.95] = 0
    pairs = torch.stack([torch.arange(16384), torch.randint(0, 20_000, (16384,))])
    one_hot = torch.sparse_coo_tensor(pairs, torch.ones(16384), (16384, 20_000)).coalesce()
    products = {
        "CSR x CSR": (one_hot.to_sparse_csr(), table.to_sparse_csr()),
        "COO x COO": (one_hot, table.to_sparse_coo().coalesce()),
    }
    print(f"torch {torch.__version__}, {CALLS} calls of torch.sparse.mm each")
    for name, (a, b) in products.items():
        torch.sparse.mm(a, b)  # first call: lazy initialisation, not counted
        start = rss_bytes()
        for _ in range(CALLS):
            torch.sparse.mm(a, b)
        grown = (rss_bytes() - start) / 2**20
        print(f"{name}: resident size +{grown:.0f} MiB ({grown / CALLS * 1024:.0f} KiB a call)")


if __name__ == "__main__":
    main()
